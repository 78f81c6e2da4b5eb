"""The web page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright):
upload a dev file, watch the transcript arrive, click a segment, download the srt."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from .conftest import AUDIO, eventually, requires_shared
from .serving import ROOT, ServerProcess, cli_outputs, needs_server_extra

pytestmark = requires_shared
needs_server_extra()
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

KEY = "page-key-" + uuid.uuid4().hex
JFK = AUDIO / "jfk.flac"
# Kept after the run (CI can upload it): what the page looked like with a transcript.
ARTIFACTS = Path(os.environ.get("SUSURRUS_TEST_ARTIFACTS", ROOT / "out" / "test-artifacts"))


def find_chromium() -> str:
    """Debian's chromium, installed with apt-get when missing and we are root; else skip."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "chromium"],
        ):
            done = subprocess.run(command, capture_output=True, env=env, timeout=900)
            if done.returncode != 0:
                pytest.skip(f"chromium is missing and `{' '.join(command)}` failed")
        path = shutil.which("chromium")
        if path:
            return path
    pytest.skip(
        "no chromium browser: install Debian's package (apt-get install chromium) "
        "or run as root so the test can install it"
    )


def wait_until(condition, timeout: float = 20.0) -> None:
    # Not page.wait_for_function: it evaluates a string, which the page's CSP forbids.
    assert eventually(condition, timeout), "timed out"


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright):
    browser = playwright.chromium.launch(executable_path=find_chromium(), headless=True)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    process = ServerProcess(
        ["--model", "tiny.en", "--api-key", KEY, "--upload-dir", str(root / "uploads")],
        root / "server.log",
    )
    yield process
    process.stop()


def test_page_transcribes_plays_and_downloads(browser, server, tmp_path):
    expected = cli_outputs([JFK], tmp_path / "cli", "--model", "tiny.en")["jfk.flac"]
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(server.url + "/")
    assert page.title().startswith("susurrus")

    # The server wants a key: the page shows its field.
    page.wait_for_selector("#key-label:not([hidden])")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.locator("#model option").nth(1).wait_for(state="attached")
    assert page.input_value("#model") == "tiny.en"  # the default is selected
    assert page.locator("#models li").count() > 1

    page.set_input_files("#file", str(JFK))
    assert "jfk.flac" in page.text_content("#drop-text")
    page.select_option("#format", "srt")
    page.click("#start")
    page.wait_for_selector("#downloads:not([hidden])", timeout=120_000)

    texts = page.locator("#segments li .text").all_text_contents()
    want = [s["text"].strip() for s in expected["result"]["segments"]]
    assert texts == want
    transcript = " ".join(texts)
    for word in ("fellow", "Americans", "country"):
        assert word in transcript
    assert "Done" in page.text_content("#status")
    assert page.evaluate("document.getElementById('progress').value") == 1

    # Clicking a segment plays the recording from that segment's start.
    second = page.locator("#segments li").nth(1)
    second.click()
    start = float(second.get_attribute("data-start"))
    assert start == expected["result"]["segments"][1]["start"] > 0
    wait_until(
        lambda: abs(page.evaluate("document.getElementById('player').currentTime") - start) < 0.5
    )
    assert "playing" in (second.get_attribute("class") or "")

    with page.expect_download() as info:
        page.click("#download")
    download = info.value
    assert download.suggested_filename == "jfk.srt"
    saved = tmp_path / "jfk.srt"
    download.save_as(saved)
    assert saved.read_text(encoding="utf-8") == expected["srt"]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "server-page.png"), full_page=True)
    assert not [u for u in failed if not u.startswith("blob:")]
    context.close()


def test_page_shows_names_and_errors_as_text(browser, server):
    """A file name with markup stays text, and so does the server's error about it."""
    context = browser.new_context()
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(server.url + "/")
    page.wait_for_selector("#key-label:not([hidden])")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.locator("#model option").nth(1).wait_for(state="attached")
    name = "<img src=x onerror=alert(1)>.mp3"
    page.set_input_files(
        "#file", files=[{"name": name, "mimeType": "audio/mpeg", "buffer": b"not audio " * 100}]
    )
    assert name in page.text_content("#drop-text")
    page.click("#start")
    page.wait_for_selector("#status.error", timeout=60_000)
    status = page.text_content("#status")
    assert status.startswith("Error 400")
    assert page.locator("img").count() == 0
    assert not dialogs
    context.close()


def fake_microphone_file(path: Path) -> Path:
    """jfk.flac as the 16-bit WAV that Chromium's fake capture device plays."""
    import wave

    import numpy as np

    from susurrus import load_audio

    samples = load_audio(str(JFK))
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(pcm.tobytes())
    return path


def test_page_microphone_shows_live_captions(playwright, server, tmp_path):
    """The microphone button with Chromium's fake capture device playing a dev file: the
    live captions show its words while it plays, and the final transcript after Stop."""
    wav = fake_microphone_file(tmp_path / "jfk.wav")
    # One Playwright per thread: the module's, with a browser of its own for the fake device.
    browser = playwright.chromium.launch(
        executable_path=find_chromium(),
        headless=True,
        args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required",
        ],
    )
    context = browser.new_context(permissions=["microphone"])
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("#key-label:not([hidden])")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.locator("#model option").nth(1).wait_for(state="attached")
    page.click("#mic")
    page.wait_for_selector("#live:not([hidden])")
    assert page.get_attribute("#mic", "aria-pressed") == "true"
    # Words appear while the (looping) file still plays: confirmed, then more of them.
    wait_until(lambda: "country" in page.text_content("#live-confirmed").lower(), 120)
    page.click("#mic")
    wait_until(lambda: "complete" in page.text_content("#status"), 60)
    captions = page.text_content("#live-confirmed").lower()
    # The capture device plays in real time, so where the chunks fall (and so a word or two
    # of tiny.en's) changes from run to run: most of the file's words, not all.
    heard = [w for w in ("fellow", "americ", "ask", "not", "country", "can do for you")
             if w in captions]
    assert len(heard) >= 5, captions
    assert page.text_content("#live-tentative") == ""
    assert not errors, errors
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "server-page-live.png"), full_page=True)
    context.close()
    browser.close()
