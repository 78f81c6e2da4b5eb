"""Shared fixtures: the shared speech set beside the checkout, and the embedded models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AUDIO = SHARED / "audio"
PARITY = SHARED / "reference" / "parity"

requires_shared = pytest.mark.skipif(not AUDIO.is_dir(), reason="../shared/audio is not present")


def manifest() -> list[dict]:
    with open(AUDIO / "manifest.tsv", encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))


def parity(model: str, setting: str) -> list[dict]:
    with open(PARITY / f"{model}.{setting}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_en():
    from susurrus import load_model

    return load_model("tiny.en", device="cpu")


@pytest.fixture(scope="session")
def base():
    from susurrus import load_model

    return load_model("base", device="cpu")
