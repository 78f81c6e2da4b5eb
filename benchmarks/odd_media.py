"""The whole odd-media corpus through the CLI: counts for the README.

    PYTHONPATH=. .venv/bin/python benchmarks/odd_media.py [--keep DIR]

Builds the corpus of `tests/media_corpus.py` (well over 200 odd and malformed files made
from ../shared/audio), runs `susurrus` once over all of it with tiny.en, and prints how many
files were transcribed, reported as having no speech, or refused with an error, how many
tracebacks and unexpected outcomes there were, and how long it took.
`tests/test_corpus.py` runs a sample of the same corpus in the test suite.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.media_corpus import build_corpus, run_cli  # noqa: E402

SHARED_AUDIO = ROOT.parent / "shared" / "audio"
SOURCES = [
    "jfk.flac",
    "en_ls_1272-128104-0000.flac",
    "en_lj_LJ001-0002.flac",
    "en_arctic_a0024.flac",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="build the corpus and outputs here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the whole run")
    parser.add_argument("--list", action="store_true", help="print every file's outcome")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = args.keep or Path(tmp)
        cases = build_corpus(where / "corpus", [SHARED_AUDIO / s for s in SOURCES])
        start = time.perf_counter()
        proc, outcomes, stray = run_cli(cases, where / "out", timeout=args.timeout)
        seconds = time.perf_counter() - start
    status = collections.Counter(o.status for o in outcomes)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_kind[o.case.kind][o.status] += 1
    unexpected = [o for o in outcomes if not o.as_expected]
    print(f"files: {len(cases)}  ({len(set(c.kind for c in cases))} families)")
    print(
        f"readable: {status['transcribed'] + status['no-speech']}  "
        f"(transcribed {status['transcribed']}, no speech {status['no-speech']})"
    )
    print(f"unreadable (one error line each): {status['error']}")
    print(f"tracebacks: {proc.stderr.count('Traceback')}  exit status: {proc.returncode}")
    print(f"unexpected outcomes: {len(unexpected)}  stray stderr lines: {len(stray)}")
    print(f"CLI run: {seconds:.1f} s")
    for kind, counts in by_kind.items():
        print(f"  {kind:12s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if args.list:
        for o in outcomes:
            print(f"{o.status:11s} {o.case.kind:11s} {o.case.path.name!r} {' | '.join(o.lines)}")
    for o in unexpected:
        print(f"UNEXPECTED {o.case.path.name} ({o.case.expect}): {o.status} {o.why} {o.lines}")
    for line in stray:
        print(f"STRAY {line}")
    ok = not unexpected and not stray and "Traceback" not in proc.stderr
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
