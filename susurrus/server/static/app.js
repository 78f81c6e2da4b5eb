// The susurrus page: uploads a recording to the OpenAI-style API with stream=true and shows
// each segment as the server finishes it. Text from the server or the user only ever goes
// into the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, url: null, segments: [], result: null, duration: 0, abort: null };

function authHeaders() {
  const key = $("key").value.trim() || localStorage.getItem("susurrus-key") || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

function pickFile(file) {
  if (!file) return;
  state.file = file;
  if (state.url) URL.revokeObjectURL(state.url);
  state.url = URL.createObjectURL(file);
  $("player").src = state.url;
  $("player").hidden = false;
  $("drop-text").textContent = file.name + " (" + (file.size / 1e6).toFixed(1) + " MB)";
  $("start").disabled = false;
  setStatus("Ready: press Transcribe.");
}

// Timestamps as susurrus's writers make them (srt: always hours and a comma).
function stamp(seconds, srt) {
  let ms = Math.round(seconds * 1000);
  const h = Math.floor(ms / 3600000); ms -= h * 3600000;
  const m = Math.floor(ms / 60000); ms -= m * 60000;
  const s = Math.floor(ms / 1000); ms -= s * 1000;
  const two = (n) => String(n).padStart(2, "0");
  const hours = srt || h > 0 ? two(h) + ":" : "";
  return hours + two(m) + ":" + two(s) + (srt ? "," : ".") + String(ms).padStart(3, "0");
}

function render(format) {
  const cues = state.segments
    .map((s) => ({ start: s.start, end: s.end, text: s.text.trim().replaceAll("-->", "->") }))
    .filter((c) => c.text);
  if (format === "txt") return state.segments.map((s) => s.text.trim() + "\n").join("");
  if (format === "srt") {
    return cues.map((c, i) => `${i + 1}\n${stamp(c.start, true)} --> ${stamp(c.end, true)}\n${c.text}\n\n`).join("");
  }
  if (format === "vtt") {
    return "WEBVTT\n\n" + cues.map((c) => `${stamp(c.start)} --> ${stamp(c.end)}\n${c.text}\n\n`).join("");
  }
  return JSON.stringify(state.result, null, 2);
}

function download(format) {
  const types = { txt: "text/plain", srt: "application/x-subrip", vtt: "text/vtt", json: "application/json" };
  const blob = new Blob([render(format)], { type: types[format] + ";charset=utf-8" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  const stem = (state.file ? state.file.name : "transcript").replace(/\.[^.]*$/, "");
  link.download = stem + "." + format;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function addSegment(segment) {
  state.segments.push(segment);
  const item = document.createElement("li");
  item.dataset.start = segment.start;
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = stamp(segment.start) + " – " + stamp(segment.end);
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = segment.text.trim();
  item.append(time, text);
  item.addEventListener("click", () => {
    const player = $("player");
    player.currentTime = segment.start;
    player.play().catch(() => {});  // autoplay rules may refuse; the position is set anyway
    document.querySelectorAll("#segments li.playing").forEach((li) => li.classList.remove("playing"));
    item.classList.add("playing");
  });
  $("segments").appendChild(item);
  if (state.duration > 0) $("progress").value = Math.min(1, segment.end / state.duration);
}

function handleEvent(event) {
  if (event.type === "transcript.text.delta") {
    if (event.duration) state.duration = event.duration;
    addSegment(event.segment);
    setStatus("Transcribing… " + state.segments.length + " segment(s) so far");
  } else if (event.type === "transcript.text.done") {
    state.result = { text: event.text, segments: event.segments, language: event.language };
    $("progress").value = 1;
    const words = event.text ? event.text.split(/\s+/).length : 0;
    const language = event.language ? event.language[0].toUpperCase() + event.language.slice(1) : "audio";
    setStatus(`Done: ${words} words, ${event.duration.toFixed(1)} s of ${language}.`);
    $("downloads").hidden = false;
  } else if (event.error) {
    setStatus("Error: " + event.error.message, true);
  }
}

async function start() {
  if (!state.file) return;
  const key = $("key").value.trim();
  if (key) localStorage.setItem("susurrus-key", key);
  state.segments = [];
  state.result = null;
  state.duration = 0;
  $("segments").replaceChildren();
  $("downloads").hidden = true;
  $("progress").hidden = false;
  $("progress").removeAttribute("value");
  $("start").disabled = true;
  $("stop").hidden = false;
  setStatus("Uploading " + state.file.name + "…");

  const form = new FormData();
  form.append("file", state.file, state.file.name);
  form.append("model", $("model").value);
  if ($("language").value) form.append("language", $("language").value);
  form.append("stream", "true");
  const path = $("task").value === "translate" ? "translations" : "transcriptions";
  state.abort = new AbortController();
  try {
    const response = await fetch("/v1/audio/" + path, {
      method: "POST", body: form, headers: authHeaders(), signal: state.abort.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      const message = body && body.error ? body.error.message : response.statusText;
      if (response.status === 401) $("key-label").hidden = false;
      setStatus(`Error ${response.status}: ${message}`, true);
      return;
    }
    setStatus("Transcribing…");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (line.startsWith("data: ")) handleEvent(JSON.parse(line.slice(6)));
        }
      }
    }
  } catch (error) {
    setStatus(error.name === "AbortError" ? "Stopped." : "Error: " + error.message, error.name !== "AbortError");
  } finally {
    $("start").disabled = false;
    $("stop").hidden = true;
    if (!state.result) $("progress").hidden = true;
    refreshServer();
  }
}

async function refreshServer() {
  try {
    const health = await (await fetch("/health")).json();
    $("load").textContent = `${health.sessions} running, ${health.queued} queued (batch ${health.max_batch})`;
    if (health.auth_required) $("key-label").hidden = false;
    const languages = $("language");
    if (languages.options.length === 1 && health.languages) {
      for (const [code, name] of Object.entries(health.languages)) {
        languages.add(new Option(name, code));
      }
    }
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) return;
    const models = (await response.json()).data;
    const list = $("models");
    list.replaceChildren(...models.map((m) => {
      const item = document.createElement("li");
      item.textContent = m.id + (m.loaded ? " (loaded)" : "") + (m.default ? " – default" : "");
      if (m.loaded) item.className = "loaded";
      return item;
    }));
    const select = $("model");
    if (select.options.length === 0) {
      for (const m of models) select.add(new Option(m.id + (m.default ? " (default)" : ""), m.id, m.default, m.default));
    }
  } catch (error) {
    $("load").textContent = "server unreachable";
  }
}


// -- the microphone: live captions over the /v1/realtime WebSocket ---------------------------
// Audio is captured by an AudioWorklet, brought to 16 kHz mono PCM16 here and sent as binary
// frames every 250 ms; the server answers with confirmed text (only ever appended) and a
// tentative tail (replaced by each event).
const live = { socket: null, context: null, stream: null, pending: [], pendingLength: 0, rest: new Float32Array(0), phase: 0 };

function downsample(block, rate) {
  if (rate === 16000) return Int16Array.from(block, (x) => Math.round(Math.max(-1, Math.min(1, x)) * 32767));
  // Averages the input samples that fall in each 16 kHz sample (a box filter: enough
  // against aliasing for speech) and converts to 16-bit. Input left over, and the
  // fraction of a sample, carry to the next block.
  const input = new Float32Array(live.rest.length + block.length);
  input.set(live.rest);
  input.set(block, live.rest.length);
  const ratio = rate / 16000;
  const out = [];
  let position = live.phase;
  while (position + ratio <= input.length) {
    let sum = 0, count = 0;
    for (let i = Math.floor(position); i < Math.floor(position + ratio); i++) { sum += input[i]; count++; }
    const value = Math.max(-1, Math.min(1, count ? sum / count : 0));
    out.push(Math.round(value * 32767));
    position += ratio;
  }
  const used = Math.floor(position);
  live.rest = input.slice(used);
  live.phase = position - used;
  return Int16Array.from(out);
}

function sendPending() {
  if (!live.socket || live.socket.readyState !== WebSocket.OPEN || live.pendingLength === 0) return;
  const joined = new Int16Array(live.pendingLength);
  let offset = 0;
  for (const part of live.pending) { joined.set(part, offset); offset += part.length; }
  live.pending = [];
  live.pendingLength = 0;
  live.socket.send(joined.buffer);
}

function liveEvent(event) {
  if (event.type === "conversation.item.input_audio_transcription.delta") {
    $("live-confirmed").textContent += event.delta;
    $("live-tentative").textContent = event.tentative;
  } else if (event.type === "conversation.item.input_audio_transcription.completed") {
    $("live-tentative").textContent = "";
    setStatus("Live transcript complete.");
    live.socket.close();
  } else if (event.type === "error") {
    setStatus("Error: " + event.error.message, true);
  }
}

async function startMicrophone() {
  const key = $("key").value.trim();
  if (key) localStorage.setItem("susurrus-key", key);
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
  } catch (error) {
    setStatus("Error: no microphone (" + error.message + ")", true);
    return;
  }
  // A 16 kHz context lets the browser resample with a proper filter; where a browser cannot
  // connect a microphone to a context of another rate, the default rate and downsample().
  let context = new AudioContext({ sampleRate: 16000 });
  let source;
  try {
    source = context.createMediaStreamSource(stream);
  } catch (error) {
    context.close();
    context = new AudioContext();
    source = context.createMediaStreamSource(stream);
  }
  await context.audioWorklet.addModule("/static/capture.js");
  const node = new AudioWorkletNode(context, "susurrus-capture");
  node.port.onmessage = (message) => {
    const pcm = downsample(message.data, context.sampleRate);
    live.pending.push(pcm);
    live.pendingLength += pcm.length;
  };
  source.connect(node);
  const params = new URLSearchParams({ model: $("model").value || "" });
  if ($("language").value) params.set("language", $("language").value);
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const protocols = ["realtime"];
  const stored = key || localStorage.getItem("susurrus-key") || "";
  if (stored) protocols.push("openai-insecure-api-key." + stored);
  const socket = new WebSocket(scheme + location.host + "/v1/realtime?" + params, protocols);
  socket.onmessage = (message) => liveEvent(JSON.parse(message.data));
  socket.onclose = () => stopCapture();
  Object.assign(live, { socket, context, stream, pending: [], pendingLength: 0, rest: new Float32Array(0), phase: 0 });
  live.timer = setInterval(sendPending, 250);
  $("live-confirmed").textContent = "";
  $("live-tentative").textContent = "";
  $("live").hidden = false;
  $("mic").textContent = "Stop microphone";
  $("mic").setAttribute("aria-pressed", "true");
  setStatus("Listening… speak now.");
}

function stopCapture() {
  clearInterval(live.timer);
  if (live.stream) live.stream.getTracks().forEach((track) => track.stop());
  if (live.context) live.context.close();
  live.stream = null;
  live.context = null;
  $("mic").textContent = "Microphone";
  $("mic").setAttribute("aria-pressed", "false");
}

function stopMicrophone() {
  sendPending();
  stopCapture();
  if (live.socket && live.socket.readyState === WebSocket.OPEN) {
    setStatus("Finishing the live transcript…");
    live.socket.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => pickFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pickFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("download").addEventListener("click", () => download($("format").value));
  $("mic").addEventListener("click", () => (live.stream ? stopMicrophone() : startMicrophone()));
  document.querySelectorAll("#downloads a").forEach((a) =>
    a.addEventListener("click", (e) => { e.preventDefault(); download(a.dataset.format); }));
  $("key").value = localStorage.getItem("susurrus-key") || "";
  $("key").addEventListener("change", refreshServer);
  refreshServer();
  setInterval(refreshServer, 3000);
});
