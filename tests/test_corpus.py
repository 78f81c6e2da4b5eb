"""The CLI over odd and malformed media (tests/media_corpus.py): no traceback, no hang, every
unreadable file one error line, every readable one transcribed or reported as no speech.

The suite runs a sample of every family of the corpus in one CLI run; the whole corpus
(264 files) runs with SUSURRUS_FULL_CORPUS=1 here, or with `benchmarks/odd_media.py`.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

from .conftest import AUDIO, requires_shared
from .media_corpus import AUDIO as EXPECT_AUDIO
from .media_corpus import ERROR, build_corpus, run_cli, sample

pytestmark = requires_shared

SOURCES = [
    "jfk.flac",
    "en_ls_1272-128104-0000.flac",
    "en_lj_LJ001-0002.flac",
    "en_arctic_a0024.flac",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    return build_corpus(tmp_path_factory.mktemp("corpus"), [AUDIO / s for s in SOURCES])


def check(cases, out: Path, timeout: float) -> collections.Counter:
    proc, outcomes, stray = run_cli(cases, out, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    wrong = [(o.case.path.name, o.case.expect, o.status, o.why, o.lines) for o in outcomes]
    assert [w for w, o in zip(wrong, outcomes) if not o.as_expected] == []
    assert stray == []
    status = collections.Counter(o.status for o in outcomes)
    # Only unreadable files make the exit status non-zero, and they do.
    assert proc.returncode == (1 if status["error"] else 0)
    return status


def test_corpus_is_large_and_varied(corpus) -> None:
    kinds = collections.Counter(c.kind for c in corpus)
    assert len(corpus) >= 200 and len(kinds) >= 15
    assert len({c.path for c in corpus}) == len(corpus)
    assert all(os.path.lexists(c.path) for c in corpus if c.kind != "link")


def test_cli_over_a_sample_of_the_corpus(corpus, tmp_path: Path) -> None:
    cases = sample(corpus, 2)
    status = check(cases, tmp_path / "out", timeout=900)
    assert status["error"] >= sum(c.expect == ERROR for c in cases)
    # Real speech among the odd files is transcribed: the good encodings, rates, channels.
    assert status["transcribed"] >= sum(c.expect == EXPECT_AUDIO for c in cases) // 2
    assert status["no-speech"] >= 3  # silence, music, a cut too short to hold a word


@pytest.mark.skipif(
    os.environ.get("SUSURRUS_FULL_CORPUS") != "1", reason="the whole corpus: SUSURRUS_FULL_CORPUS=1"
)
def test_cli_over_the_whole_corpus(corpus, tmp_path: Path) -> None:
    check(corpus, tmp_path / "out", timeout=3600)
