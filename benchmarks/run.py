"""Benchmark susurrus against openai-whisper and faster-whisper on the same weights.

Run by `make bench` under benchmarks/.venv-peers (which has the peers, jiwer, the Whisper
normalisers, zhconv and matplotlib); susurrus runs under the project's own venv. Every run
of every system is a fresh `worker.py` process. See benchmarks/README.md for what is
measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import difflib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEMS = [
    "susurrus",
    "susurrus-b8",
    "susurrus-int8",
    "susurrus-auto",
    "susurrus-auto-b8",
    "openai-whisper",
    "faster-whisper-fp32",
    "faster-whisper-int8",
]
OURS = {"susurrus", "susurrus-b8", "susurrus-int8", "susurrus-auto", "susurrus-auto-b8"}
PACKAGES = {
    "susurrus": "susurrus",
    "susurrus-b8": "susurrus",
    "susurrus-int8": "susurrus",
    "susurrus-auto": "susurrus",
    "susurrus-auto-b8": "susurrus",
    "openai-whisper": "openai-whisper",
    "faster-whisper-fp32": "faster-whisper",
    "faster-whisper-int8": "faster-whisper",
}
REFERENCE = "openai-whisper"  # agreement is measured against it
MODELS = ["tiny.en", "base"]
SETTINGS = ["greedy", "beam5"]
GAP_S = 0.5
SR = 16000
INPUTS = ["jfk", "en-long", "zh-long", "en-synth"]
# en-synth: a reading of this text by espeak-ng (a voice none of the dev files has), then
# the LJSpeech concatenation. Fixed voice and speed: espeak-ng writes the same samples
# every time.
READING = HERE / "texts" / "reading.txt"
ESPEAK_ARGS = ["-v", "en-us", "-s", "145"]  # an American male voice, 145 words a minute
LJ_CONCAT = "en_lj_LJ001-0001-0016_concat.flac"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data


def read_manifest(shared: Path) -> list[dict]:
    with open(shared / "manifest.tsv", encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))


def decode(path: Path) -> np.ndarray:
    # PyAV comes with faster-whisper; the same resampler whisper's ffmpeg call uses.
    from faster_whisper.audio import decode_audio

    return decode_audio(str(path), sampling_rate=SR)


def write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SR)
        f.writeframes(pcm.tobytes())


def synthesise(text_path: Path, wav: Path) -> np.ndarray:
    """`text_path` read by espeak-ng (ESPEAK_ARGS) as 16 kHz float32 samples."""
    raw = wav.with_suffix(".espeak.wav")
    raw.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["espeak-ng", *ESPEAK_ARGS, "-f", str(text_path), "-w", str(raw)],
        check=True,
        capture_output=True,
    )
    return decode(raw)  # espeak-ng writes 22.05 kHz: resampled like every other input


def reading_text(path: Path) -> str:
    """The reading's words as one line (paragraph breaks are pauses, not words)."""
    return " ".join(path.read_text(encoding="utf-8").split())


def prepare_inputs(
    shared: Path, data: Path, names: list[str], skipped: list[str] | None = None
) -> dict[str, dict]:
    """Write the benchmark recordings as 16 kHz wav and return {name: {wav, language, ref}}.

    Every system gets the same decoded samples, so decoding (and whisper's need for an
    ffmpeg binary) is out of the measurement. An input that cannot be made here (en-synth
    without espeak-ng) is left out, with the reason in `skipped`.
    """
    rows = read_manifest(shared)
    specs = {
        "jfk": ("en", [r for r in rows if r["file"] == "jfk.flac"]),
        "en-long": (
            "en",
            [r for r in rows if r["language"] == "en" and r["category"] in ("short", "long")],
        ),
        "zh-long": (
            "zh",
            [r for r in rows if r["language"] == "zh" and r["category"] in ("short", "long")],
        ),
        "en-synth": ("en", [r for r in rows if r["file"] == LJ_CONCAT]),
    }
    inputs = {}
    for name in names:
        language, items = specs[name]
        if not items:
            raise SystemExit(f"{shared}: no files for {name}")
        pieces, texts = [], []
        if name == "en-synth":
            if shutil.which("espeak-ng") is None:
                reason = "en-synth (espeak-ng is not installed: apt-get install espeak-ng)"
                log(f"input {reason}: skipped")
                if skipped is not None:
                    skipped.append(reason)
                continue
            pieces.append(synthesise(READING, data / f"{name}.wav"))
            texts.append(reading_text(READING))
        for row in items:
            if pieces:
                pieces.append(np.zeros(int(GAP_S * SR), dtype=np.float32))
            pieces.append(decode(shared / row["file"]))
            texts.append(row["transcript"].strip())
        audio = np.concatenate(pieces)
        wav = data / f"{name}.wav"
        write_wav(wav, audio)
        reference = ("" if language == "zh" else " ").join(texts)
        (data / f"{name}.txt").write_text(reference + "\n", encoding="utf-8")
        files = ([f"{READING.relative_to(ROOT)} (espeak-ng {' '.join(ESPEAK_ARGS)})"]
                 if name == "en-synth" else []) + [r["file"] for r in items]
        (data / f"{name}.files.txt").write_text(
            "".join(f + "\n" for f in files), encoding="utf-8"
        )
        inputs[name] = {
            "wav": str(wav),
            "language": language,
            "reference": reference,
            "audio_s": len(audio) / SR,
            "files": len(files),
        }
        log(f"input {name}: {len(files)} file(s), {len(audio) / SR:.1f} s -> {wav}")
    return inputs


# ---------------------------------------------------------------- scoring


def make_scorers():
    import jiwer
    import zhconv
    from whisper_normalizer.basic import BasicTextNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    english, basic = EnglishTextNormalizer(), BasicTextNormalizer()

    def units(text: str, language: str) -> list[str]:
        """Normalised words (English) or characters (Chinese), the units errors count in."""
        if language == "zh":
            return list(re.sub(r"\s+", "", zhconv.convert(basic(text), "zh-cn")))
        return english(text).split()

    def error_rate(hypothesis: str, reference: str, language: str) -> float:
        ref, hyp = units(reference, language), units(hypothesis, language)
        if language == "zh":
            return jiwer.cer("".join(ref), "".join(hyp))
        return jiwer.wer(" ".join(ref), " ".join(hyp))

    return units, error_rate


def similarity(a: list, b: list) -> float:
    """2*matches/(len a + len b) of the longest-matching-blocks alignment; 1.0 = identical."""
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


# ---------------------------------------------------------------- running


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["HF_HUB_OFFLINE"] = "1"  # the models are local directories: never reach a hub
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def spec_of(name: str, spec: dict) -> str:
    return f"{name}={spec['wav']}:{spec['language']}"


def run_worker(python: str, argv: list[str], env: dict[str, str], timeout: float) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [python, str(HERE / "worker.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"worker {argv[:1]} failed ({proc.returncode}):\n{tail}")
    out = json.loads(lines[-1])
    out["process_s"] = time.perf_counter() - start
    return out


@contextlib.contextmanager
def busy_loops(count: int):
    """`count` processes spinning on a core each while the block runs, stopped after."""
    loops = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)
    ]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict], inputs: dict[str, dict], scorers) -> list[dict]:
    """One row per (model, setting, system, input): medians over runs."""
    units, error_rate = scorers
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for run in runs:
        for res in run["results"]:
            key = (run["model"], run["setting"], run["system"], res["input"], run.get("busy", 0))
            groups.setdefault(key, []).append((run, res))
    rows = []
    for (model, setting, system, name, busy), items in groups.items():
        language = inputs[name]["language"]
        ref_items = groups.get((model, setting, REFERENCE, name, busy), [])
        token_agree, text_agree, identical = [], [], []
        for i, (_, res) in enumerate(items):
            if not ref_items:
                break
            # Pair run i with the reference's run i (greedy decodes are deterministic; at a
            # sampled fallback the pairing keeps the comparison like for like).
            ref = ref_items[min(i, len(ref_items) - 1)][1]
            token_agree.append(similarity(res["tokens"], ref["tokens"]))
            text_agree.append(
                similarity(units(res["text"], language), units(ref["text"], language))
            )
            identical.append(res["tokens"] == ref["tokens"])
        walls = [res["wall_s"] for _, res in items]
        wall = median(walls)
        audio_s = items[0][1]["audio_s"]
        share = None
        idle = groups.get((model, setting, system, name, 0)) if busy else None
        if idle:
            # Each busy run against the idle run made just before it (--busy-share): a
            # slow spell of a shared machine falls on both halves of a pair.
            idle_walls = {run["run"]: res["wall_s"] for run, res in idle}
            share = median(
                [idle_walls[run["run"]] / res["wall_s"] for run, res in items
                 if run["run"] in idle_walls]
            )
        rows.append(
            {
                "model": model,
                "setting": setting,
                "system": system,
                "busy": busy,
                "share_of_idle": share,
                "version": items[0][0]["version"],
                "input": name,
                "language": language,
                "audio_s": audio_s,
                "runs": len(items),
                "wall_s": wall,
                "wall_s_all": walls,
                "speed_x": audio_s / wall if wall else None,
                "cpu_s": median([res["cpu_s"] for _, res in items]),
                "peak_rss_mb": median([run["peak_rss_mb"] for run, _ in items]),
                "load_s": median([run["load_s"] for run, _ in items]),
                "import_s": median([run.get("import_s") for run, _ in items]),
                "metric": "cer" if language == "zh" else "wer",
                "error_rate": median(
                    [
                        error_rate(res["text"], inputs[name]["reference"], language)
                        for _, res in items
                    ]
                ),
                "token_agreement": median(token_agree) if token_agree else None,
                "text_agreement": median(text_agree) if text_agree else None,
                "identical_runs": f"{sum(identical)}/{len(identical)}" if identical else None,
                "text": items[0][1]["text"],
            }
        )
    order = {s: i for i, s in enumerate(SYSTEMS)}
    rows.sort(
        key=lambda r: (
            list(inputs).index(r["input"]),
            MODELS.index(r["model"]) if r["model"] in MODELS else 9,
            SETTINGS.index(r["setting"]),
            order.get(r["system"], 99),
            r["busy"],
        )
    )
    return rows


# ---------------------------------------------------------------- reports


def fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def markdown(rows: list[dict], meta: dict, inputs: dict[str, dict]) -> str:
    out = [
        f"# Benchmark {meta['date']} on {meta['machine']}",
        "",
        f"CPU: {meta['cpu']} ({meta['cores']} cores); threads per system: {meta['threads']}; "
        f"runs per system: {meta['runs']}, medians shown; load average at start "
        f"{meta['loadavg_start']}, at end {meta.get('loadavg_end', '?')}; "
        f"{meta.get('elapsed_s', 0) / 60:.0f} min. Command: `{meta['command']}`.",
        "",
        "Speed = audio seconds / transcription wall seconds (higher is faster; model load "
        "excluded and shown separately). CPU = user+system CPU seconds of the transcription. "
        "RSS = peak resident memory of the worker process. Load = model load, imports "
        "excluded (import = the system's Python imports). WER (English, "
        "EnglishTextNormalizer) / CER (Mandarin, BasicTextNormalizer, no spaces, simplified). "
        "Tokens = token agreement with openai-whisper: difflib similarity 2M/(N1+N2) of the "
        "concatenated text tokens (timestamps dropped); Same = runs whose text tokens equal "
        "openai-whisper's exactly.",
        "",
    ]
    for name, spec in inputs.items():
        metric = "CER" if spec["language"] == "zh" else "WER"
        out += [
            f"## {name}: {spec['files']} file(s), {spec['audio_s']:.1f} s of audio",
            "",
            f"| model | setting | system | speed (×RT) | wall s | CPU s | RSS MB | load s "
            f"| import s | {metric} % | tokens | same |",
            "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in rows:
            if r["input"] != name:
                continue
            system = r["system"] + (f", {r['busy']} busy loop(s)" if r["busy"] else "")
            out.append(
                f"| {r['model']} | {r['setting']} | {system} | {fmt(r['speed_x'], '.1f')} "
                f"| {fmt(r['wall_s'], '.2f')} | {fmt(r['cpu_s'], '.1f')} "
                f"| {fmt(r['peak_rss_mb'], '.0f')} | {fmt(r['load_s'], '.2f')} "
                f"| {fmt(r['import_s'], '.2f')} "
                f"| {fmt(r['error_rate'] * 100 if r['error_rate'] is not None else None, '.2f')} "
                f"| {fmt(r['token_agreement'], '.3f')} | {r['identical_runs'] or '–'} |"
            )
        out.append("")
        shares = [r for r in rows if r["input"] == name and r["share_of_idle"] is not None]
        if shares:
            out += [
                "Busy speed as a share of idle speed, the median of each run's pair (the idle "
                "run, then the busy one right after it):",
                "",
                "| model | setting | system | busy loops | busy / idle |",
                "|---|---|---|--:|--:|",
            ]
            out += [
                f"| {r['model']} | {r['setting']} | {r['system']} | {r['busy']} "
                f"| {r['share_of_idle'] * 100:.0f}% |"
                for r in shares
            ]
            out.append("")
    out += ["Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())]
    out += [f"susurrus source: {meta.get('susurrus_source', 'unknown')}", ""]
    if meta.get("skipped"):
        out += ["Skipped: " + "; ".join(meta["skipped"]), ""]
    return "\n".join(out)


def chart(rows: list[dict], inputs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(inputs)
    if any(not r["busy"] for r in rows):
        rows = [r for r in rows if not r["busy"]]  # --busy-share: the idle runs drawn
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.6 * len(names)), squeeze=False)
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    colours = dict(zip(SYSTEMS, plt.get_cmap("tab10").colors))
    for ax, name in zip(axes[:, 0], names):
        mine = [r for r in rows if r["input"] == name]
        groups = list(dict.fromkeys((r["model"], r["setting"]) for r in mine))
        width = 0.8 / max(1, len(systems))
        for j, system in enumerate(systems):
            xs, ys = [], []
            for i, group in enumerate(groups):
                for r in mine:
                    if (r["model"], r["setting"]) == group and r["system"] == system:
                        xs.append(i + (j - (len(systems) - 1) / 2) * width)
                        ys.append(r["speed_x"] or 0)
            bars = ax.bar(xs, ys, width, label=system, color=colours[system])
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        ax.set_xticks(range(len(groups)), [f"{m} {s}" for m, s in groups])
        ax.set_ylabel("× real time (higher = faster)")
        ax.set_title(f"{name} ({inputs[name]['audio_s']:.0f} s audio)")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    # At most four systems a row, or the legend runs off the figure's sides.
    columns = min(len(systems), 4)
    fig.legend(handles, labels, loc="upper center", ncol=columns, fontsize=9)
    rows_of_legend = -(-len(systems) // columns)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.035 * rows_of_legend))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def git_state() -> str:
    """The commit susurrus ran from, marked when its sources differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "susurrus"], cwd=ROOT, capture_output=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def parse_list(text: str, allowed: list[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "audio")
    parser.add_argument("--our-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--inputs", default="jfk,en-long,zh-long,en-synth")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--machine", default=platform.node() or "machine")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="busy-loop processes kept running during every run (a machine where another "
        "program takes cores)",
    )
    parser.add_argument(
        "--busy-share",
        action="store_true",
        help="every run made twice in a row, idle and then with busy loops (--busy's count, "
        "at least 1); the report gives each system's busy speed as a share of its idle "
        "speed, from those pairs",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 run, tiny.en, jfk + en-long only: a smoke run"
    )
    args = parser.parse_args(argv)

    # abspath, not resolve: resolving the venv's python symlink would leave the venv.
    args.our_python = os.path.abspath(args.our_python)
    systems = parse_list(args.systems, SYSTEMS, "system")
    models = parse_list(args.models, MODELS, "model")
    settings = parse_list(args.settings, SETTINGS, "setting")
    names = parse_list(args.inputs, INPUTS, "input")
    runs = args.runs
    if args.quick:
        runs, models, names = 1, ["tiny.en"], [n for n in names if n in ("jfk", "en-long")]
    skipped = []

    caps = json.loads(
        subprocess.check_output([args.our_python, str(HERE / "worker.py"), "capabilities"])
    )
    for batched in ("susurrus-b8", "susurrus-auto-b8"):
        if batched in systems and not caps["batch_size"]:
            systems.remove(batched)
            skipped.append(f"{batched} (susurrus.transcribe has no batch_size parameter)")

    started = time.time()
    meta = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": args.machine,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "runs": runs,
        "loadavg_start": loadavg(),
        "busy_loops": args.busy,
        "busy_share": args.busy_share,
        "command": " ".join(["benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "python": platform.python_version(),
        "susurrus_source": git_state(),
        "settings": {
            "temperature": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            "best_of": 5,
            "beam_size": {"greedy": None, "beam5": 5},
            "condition_on_previous_text": True,
            "without_timestamps": False,
            "word_timestamps": False,
            "vad_filter": False,
            "warmup": not args.no_warmup,
        },
        "skipped": skipped,
    }
    inputs = prepare_inputs(args.shared, args.data, names, skipped)
    if not inputs:
        raise SystemExit("no input to run: " + "; ".join(skipped))
    assets = {
        m: json.loads(
            subprocess.check_output(
                [args.our_python, str(HERE / "worker.py"), "prepare-model", m, str(args.data)],
                cwd=ROOT,
            )
        )
        for m in models
    }
    env = worker_env(args.threads)
    jobs = []
    for model in models:
        # tiny.en only knows English: Mandarin would be scored on a translation attempt.
        model_inputs = [n for n in inputs if model != "tiny.en" or inputs[n]["language"] == "en"]
        if len(model_inputs) < len(inputs):
            skipped.append(f"{model} on zh-long (English-only model)")
        common = ["--model", model, "--threads", str(args.threads)]
        common += ["--checkpoint", assets[model]["checkpoint"]]
        common += ["--ct2-dir", assets[model]["ct2_dir"]]
        common += [a for n in model_inputs for a in ("--input", spec_of(n, inputs[n]))]
        common += ["--no-warmup"] if args.no_warmup else []
        # Runs outermost: a burst of load on the shared machine hits every system alike.
        loads = [0, max(1, args.busy)] if args.busy_share else [args.busy]
        for setting in settings:
            cmd = common + ["--setting", setting]
            for run in range(runs):
                for system in systems:
                    for busy in loads:
                        jobs.append((model, setting, run, system, busy, cmd))

    all_runs: list[dict] = []
    versions: dict[str, str] = {}
    kernel_choices: dict[tuple[str, str], list[str]] = {}
    for i, (model, setting, run, system, busy, common) in enumerate(jobs, 1):
        label = f"[{i}/{len(jobs)}] {model} {setting} {system} run {run + 1}"
        label += f", {busy} busy loop(s)" if busy else ""
        python = args.our_python if system in OURS else args.peer_python
        try:
            with busy_loops(busy):
                out = run_worker(python, [system, *common], env, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log(f"{label}: FAILED {exc}")
            skipped.append(f"{model} {setting} {system} run {run + 1}: failed")
            continue
        out["run"] = run
        out["busy"] = busy
        if out.get("kernels") and (model, system) not in kernel_choices:
            kernel_choices[model, system] = out["kernels"]
            log(f"{model} {system}: kernels chosen here: " + "; ".join(out["kernels"]))
        all_runs.append(out)
        versions[PACKAGES[system]] = out["version"]
        times = ", ".join(
            f"{r['input']} {r['wall_s']:.2f}s ({r['audio_s'] / r['wall_s']:.1f}x)"
            for r in out["results"]
        )
        log(f"{label}: load {out['load_s']:.2f}s, {times}")
    meta["loadavg_end"] = loadavg()
    meta["kernels"] = {f"{m} {s}": k for (m, s), k in kernel_choices.items()}
    meta["elapsed_s"] = round(time.time() - started, 1)
    from importlib.metadata import version

    versions.update({p: version(p) for p in ("torch", "ctranslate2")})
    meta["versions"] = versions

    rows = summarise(all_runs, inputs, make_scorers())
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    machine = re.sub(r"[^A-Za-z0-9_.-]+", "-", args.machine)
    report = {"meta": meta, "inputs": inputs, "summary": rows, "runs": all_runs}
    json_path = args.results / f"{stamp}-{machine}.json"
    text = json.dumps(report, indent=1, ensure_ascii=False)
    # One line per token list rather than one line per token: about a third smaller.
    text = re.sub(r"\[(?:\s*-?\d+,)*\s*-?\d+\s*\]", lambda m: re.sub(r"\s+", "", m[0]), text)
    json_path.write_text(text + "\n", encoding="utf-8")
    (args.results / "latest.md").write_text(markdown(rows, meta, inputs), encoding="utf-8")
    chart(rows, inputs, args.results / "latest.png")
    log(f"wrote {json_path}, {args.results / 'latest.md'}, {args.results / 'latest.png'}")
    log(f"elapsed {meta['elapsed_s'] / 60:.1f} min")
    print(markdown(rows, meta, inputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
