"""The crew's encoder (engine/crew.py), which the engine uses while the machine is busy:
the same features as the encoder's own forward, and the same transcript through the engine."""

from __future__ import annotations

import pytest
import torch

from susurrus.engine import Engine
from susurrus.engine.crew import Crew, encode, spans
from susurrus.engine.threads import ThreadPolicy

from .conftest import AUDIO, requires_shared


@pytest.fixture(scope="module")
def crew():
    crew = Crew(2)
    yield crew
    crew.close()


def test_spans_cover_every_row_once():
    for length, parts in ((1500, 2), (1500, 7), (5, 8), (3000, 1)):
        cut = spans(length, parts)
        assert cut[0][0] == 0 and cut[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(cut, cut[1:]))
        assert len(cut) <= parts


@requires_shared
def test_crew_features_equal_the_encoders(tiny_en, crew):
    from susurrus import load_audio
    from susurrus.features import log_mel_spectrogram, pad_or_trim

    audio = load_audio(str(AUDIO / "jfk.flac"))
    mel = log_mel_spectrogram(pad_or_trim(torch.from_numpy(audio)))[None]
    with torch.inference_mode():
        expected = tiny_en.encoder(mel)
        # Uneven spans too: a row's sums must not depend on where its span starts.
        for parts in (1, 2, 3):
            assert torch.equal(encode(tiny_en.encoder, mel, crew, parts), expected), parts


def test_a_failing_task_raises_in_the_caller_and_the_crew_goes_on(crew):
    done = []

    def fail() -> None:
        raise RuntimeError("part failed")

    with pytest.raises(RuntimeError, match="part failed"):
        crew.run([fail, lambda: done.append(1)])
    assert done == [1]  # the other task still ran
    crew.run([lambda: done.append(torch.get_num_threads())])
    assert done[-1] == 1  # each crew thread runs its products on one OpenMP thread


@requires_shared
def test_a_busy_engine_encodes_with_a_crew_and_transcribes_the_same(tiny_en):
    from susurrus import load_audio

    audio = load_audio(str(AUDIO / "jfk.flac"))
    idle = Engine(tiny_en, max_batch=1, threads=2)
    busy = Engine(tiny_en, max_batch=1)
    # As the policy leaves it once one thread measured faster than two.
    busy.threads = ThreadPolicy(max_threads=2)
    busy.threads.current = 1
    assert busy.threads.busy and not idle.threads.busy
    expected = idle.transcribe(audio, language="en")
    got = busy.transcribe(audio, language="en")
    assert busy._crew is not None and idle._crew is None
    assert "ask not what your country can do for you" in got["text"]
    assert got["segments"] == expected["segments"]
