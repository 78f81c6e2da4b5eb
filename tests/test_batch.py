"""`susurrus batch`: an archive of real recordings and bad files on local worker processes
and on a local Ray cluster, against the plain command's outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from susurrus.batch import WorkerConfig, discover, run_batch
from susurrus.batch.cli import make_config

from .conftest import AUDIO, requires_shared

pytestmark = requires_shared

GOOD = ["jfk.flac", "en_arctic_a0024.flac", "en_lj_LJ001-0002.flac", "en_ls_61-70968-0002.flac"]
LONG = "en_lj_LJ001-0001-0016_concat.flac"  # 111 s: four windows, progress saved after each
FLAGS = ["--model", "tiny.en", "--beam_size", "None", "--threads", "1"]


def command(*args: str, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "susurrus", *args], capture_output=True, text=True, timeout=600,
        **kwargs,
    )


def write_silence(path: Path, seconds: float = 3.0) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(np.zeros(int(16000 * seconds), dtype=np.int16).tobytes())


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, str]:
    """The plain command's text per file, the same options."""
    out = tmp_path_factory.mktemp("plain")
    files = [str(AUDIO / name) for name in [*GOOD, LONG]]
    proc = command(*files, *FLAGS, "-f", "txt", "-o", str(out), "--verbose", "False")
    assert proc.returncode == 0, proc.stderr
    return {name: (out / name.replace(".flac", ".txt")).read_text() for name in [*GOOD, LONG]}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Two folders of real speech (one name in both), a silent recording, and bad files: a
    text file named .mp3, a FLAC cut after its first 300 bytes, a note that is not media."""
    root = tmp_path_factory.mktemp("archive")
    (root / "a").mkdir()
    (root / "b" / "deep").mkdir(parents=True)
    shutil.copy(AUDIO / GOOD[0], root / "a" / GOOD[0])
    shutil.copy(AUDIO / GOOD[1], root / "a" / GOOD[1])
    shutil.copy(AUDIO / GOOD[0], root / "b" / GOOD[0])
    shutil.copy(AUDIO / GOOD[2], root / "b" / "deep" / GOOD[2])
    shutil.copy(AUDIO / GOOD[3], root / GOOD[3])
    write_silence(root / "b" / "quiet.wav")
    (root / "b" / "notes.mp3").write_text("these are notes, not audio\n")
    head = (AUDIO / "en_ls_1272-128104-0000.flac").read_bytes()[:300]
    (root / "a" / "cut.flac").write_bytes(head)
    (root / "README.txt").write_text("not media: never picked up\n")
    return root


EXPECTED = {  # output stem -> (status, the plain command's file or None)
    "a/jfk": ("ok", "jfk.flac"),
    "a/en_arctic_a0024": ("ok", "en_arctic_a0024.flac"),
    "b/jfk": ("ok", "jfk.flac"),
    "b/deep/en_lj_LJ001-0002": ("ok", "en_lj_LJ001-0002.flac"),
    "en_ls_61-70968-0002": ("ok", "en_ls_61-70968-0002.flac"),
    "b/quiet": ("no-speech", None),
    "b/notes": ("failed", None),
    "a/cut": ("failed", None),
}


def read_index(out: Path) -> dict[str, dict]:
    lines = (out / "index.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len({r["path"] for r in records}) == len(records), "compacted: one line per input"
    return {r["stem"]: r for r in records}


def check_archive(out: Path, plain: dict[str, str], archive: Path) -> dict[str, dict]:
    index = read_index(out)
    assert set(index) == set(EXPECTED)
    for stem, (status, source) in EXPECTED.items():
        record = index[stem]
        assert record["status"] == status, record
        assert Path(record["path"]).is_relative_to(archive)
        if status == "failed":
            assert record["error"] and "\n" not in record["error"], record
            assert record["outputs"] == []
            continue
        assert record["error"] is None
        formats = ("txt", "vtt", "srt", "tsv", "json")
        assert record["outputs"] == [f"{stem}.{ext}" for ext in formats]
        assert all((out / name).is_file() for name in record["outputs"])
        assert record["worker"] and record["duration"] > 0 and record["rtf"] > 0
        if source is not None:
            assert record["language"] == "en"
            assert (out / f"{stem}.txt").read_text() == plain[source], stem
        else:
            assert (out / f"{stem}.txt").read_text() == ""
            assert json.loads((out / f"{stem}.json").read_text())["no_speech"] is True
    assert not list(out.rglob("*.resume.json")), "saved progress is removed once recorded"
    return index


def index_text(out: Path) -> str:
    try:
        return (out / "index.jsonl").read_text()
    except FileNotFoundError:
        return ""


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and not p.name.startswith("index.")}


def test_names_mirror_the_tree_and_never_collide(tmp_path):
    (tmp_path / "x" / "sub").mkdir(parents=True)
    (tmp_path / "y").mkdir()
    for name in ["x/talk.mp3", "x/talk.wav", "x/sub/talk.mp3", "y/talk.mp3", "x/note.txt"]:
        (tmp_path / name).write_bytes(b"")
    manifest = tmp_path / "list.tsv"
    manifest.write_text("path\tlanguage\ny/talk.mp3\tGerman\nx/sub/talk.mp3\t\n")
    items = discover([str(tmp_path / "x"), str(tmp_path / "y"), str(manifest)])
    assert [(item.stem, item.language) for item in items] == [
        ("x/talk.mp3", None), ("x/talk.wav", None), ("x/sub/talk", None), ("y/talk", "de"),
    ]
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(json.dumps({"file": "x/talk.wav", "lang": "fr"}) + "\n")
    (item,) = discover([str(jsonl)])
    assert (item.stem, item.language) == ("talk", "fr")
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("audio,language\ny/talk.mp3,de\nx/talk.mp3,\n")
    items = discover([str(csv_file)])
    assert [(i.stem, i.language) for i in items] == [("y/talk", "de"), ("x/talk", None)]


def test_bad_manifest_and_missing_input_are_one_line_errors(tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text("name,duration\na.mp3,3\n")
    for inputs in ([str(manifest)], [str(tmp_path / "nowhere")]):
        proc = command("batch", *inputs, "-o", str(tmp_path / "out"), "--model", "tiny.en")
        assert proc.returncode == 2
        assert proc.stderr.startswith("susurrus: error: ") and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    (tmp_path / "in").mkdir()
    shutil.copy(AUDIO / "jfk.flac", tmp_path / "in")
    proc = command("batch", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("susurrus: error: a worker could not start: ") and "nope" in last


def test_local_workers_archive_then_rerun_rewrites_nothing(archive, plain, tmp_path):
    out = tmp_path / "out"
    proc = command("batch", str(archive), "-o", str(out), *FLAGS, "--workers", "2")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "5 transcribed, 1 without speech, 2 failed" in proc.stderr
    assert proc.stderr.count("susurrus: error: ") == 2
    index = check_archive(out, plain, archive)
    # Which worker gets what depends on which loads its model first.
    assert all(r["worker"].startswith("local-") for r in index.values())
    pyarrow = pytest.importorskip("pyarrow.parquet")
    table = pyarrow.read_table(out / "index.parquet").to_pylist()
    assert sorted(r["stem"] for r in table) == sorted(EXPECTED)

    before = mtimes(out)
    proc = command("batch", str(archive), "-o", str(out), *FLAGS, "--workers", "2")
    assert proc.returncode == 1, proc.stderr  # the bad files are tried again, and fail again
    assert "0 transcribed, 0 without speech, 2 failed, 6 done before" in proc.stderr
    assert mtimes(out) == before
    check_archive(out, plain, archive)


def test_interrupted_run_resumes_the_long_file(plain, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in [LONG, *GOOD[:2]]:
        shutil.copy(AUDIO / name, folder / name)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "susurrus", "batch", str(folder), "-o", str(out), *FLAGS,
            "--batch_size", "2"]
    state = out / LONG.replace(".flac", ".resume.json")
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        # Interrupted once the long file has saved a window and a short one is recorded.
        while not (state.exists() and '"stem": "jfk"' in index_text(out)):
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert state.exists()
    done = {r["stem"] for r in read_index(out).values()}
    assert "jfk" in done and LONG.replace(".flac", "") not in done
    before = {name: t for name, t in mtimes(out).items() if name.split(".")[0] in done}

    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(done)} done before" in proc.stderr
    index = read_index(out)
    assert {r["status"] for r in index.values()} == {"ok"} and len(index) == 3
    for name in [LONG, *GOOD[:2]]:
        assert (out / name.replace(".flac", ".txt")).read_text() == plain[name], name
    assert {name: t for name, t in mtimes(out).items() if name in before} == before
    assert not state.exists()


def config(out: Path, *flags: str) -> WorkerConfig:
    """The workers' configuration as `susurrus batch` makes it from these flags."""
    _, made, _ = make_config(["unused", "-o", str(out), *(flags or FLAGS)])
    return made


def test_a_killed_worker_process_loses_no_file(archive, plain, tmp_path):
    out = tmp_path / "out"
    killed: list[dict] = []

    def kill_first(event: dict) -> None:
        if not killed:
            killed.append(event)
            os.kill(event["pid"], signal.SIGKILL)

    summary = run_batch([str(archive)], config(out), workers=2, on_start=kill_first,
                        progress=False)
    assert killed
    assert (summary.ok, summary.no_speech, summary.failed) == (5, 1, 2)
    index = check_archive(out, plain, archive)
    retried = [r for r in index.values() if r["attempts"] > 1]
    assert retried and all(r["worker"].split("@")[0] != killed[0]["worker"] for r in retried)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (start-up takes seconds): 2 CPUs, 2 actors."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'susurrus[ray]')")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()


def test_ray_actors_archive(cluster, archive, plain, tmp_path):
    out = tmp_path / "out"
    summary = run_batch([str(archive)], config(out), ray=True, workers=2, progress=False)
    assert summary.workers == 2
    assert summary.exit_status == 1
    index = check_archive(out, plain, archive)
    assert len({r["worker"] for r in index.values() if r["worker"]}) == 2


def test_ray_killed_actor_loses_no_file(cluster, archive, plain, tmp_path):
    out = tmp_path / "out"
    killed: list[str] = []

    def kill_first(event: dict) -> None:
        if not killed:
            killed.append(event["actor"])
            cluster.kill(cluster.get_actor(event["actor"]))

    summary = run_batch([str(archive)], config(out), ray=True, workers=2, on_start=kill_first,
                        progress=False)
    assert killed
    assert (summary.ok, summary.no_speech, summary.failed) == (5, 1, 2)
    index = check_archive(out, plain, archive)
    assert any(r["attempts"] > 1 for r in index.values())
    assert not any(r["worker"].startswith(f"{killed[0]}@") for r in index.values())


def test_ray_base_model_same_text_as_plain(cluster, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in GOOD[:2]:
        shutil.copy(AUDIO / name, folder / name)
    proc = command(*[str(folder / n) for n in GOOD[:2]], "--model", "base", "-f", "txt",
                   "-o", str(tmp_path / "plain"), "--verbose", "False")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    base = config(out, "--model", "base", "--threads", "1", "-f", "txt")
    summary = run_batch([str(folder)], base, ray=True, workers=2, progress=False)
    assert (summary.ok, summary.failed) == (2, 0)
    for name in GOOD[:2]:
        txt = name.replace(".flac", ".txt")
        assert (out / txt).read_text() == (tmp_path / "plain" / txt).read_text()
