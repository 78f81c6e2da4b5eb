"""Where the time of one window goes, susurrus against CTranslate2 (faster-whisper's engine):
the encoder's pass over a 30 s window, and one greedy decoding step.

A step's cost is taken as (time of a window decoded up to 448 tokens - time of the same
window stopped after 3) / the tokens in between: the prompt's pass and the audio's keys
and values cancel out, and what is left is what a long recording pays per token. The same
windows (the first minute and a half of `en-long`), the same weights and thread count for
both; each number is the best of `--repeats`. Every system and type is measured in a fresh
process: CTranslate2's float32 steps measured after its int8 ones in the same process took
8.9 ms instead of 5.7 (tiny.en).

Run with the peers' environment, which has CTranslate2; susurrus runs in its own:

    benchmarks/.venv-peers/bin/python benchmarks/components.py --our-python .venv/bin/python
        [--models tiny.en,base] [--threads 2]

Prints a Markdown table with ours / theirs ratios (below 1: ours faster).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from worker import read_wav  # noqa: E402

WINDOWS = (0, 30, 60)  # starts (s) of the 30 s windows timed
LONG, SHORT = 448, 3  # most tokens of the two decodes a step's cost comes from


def _best(run, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


def _time_windows(audio: np.ndarray, repeats: int, prepare, encode, tokens) -> list:
    """(start, encoder seconds, (seconds, tokens) up to LONG, the same up to SHORT) for each
    window: `prepare(samples)` makes the encoder's input (untimed), `encode(input)` its
    output, `tokens(output, most)` the tokens of a greedy decode of at most `most`."""
    rows = []
    for start in WINDOWS:
        ready = prepare(audio[start * 16000 : (start + 30) * 16000])
        encode_seconds, encoded = _best(lambda r=ready: encode(r), repeats)
        found = {}
        for most in (LONG, SHORT):
            seconds, result = _best(lambda e=encoded, n=most: tokens(e, n), repeats)
            found[most] = seconds, len(result)
        rows.append((start, encode_seconds, found[LONG], found[SHORT]))
    return rows


def measure_ours(model_name: str, compute_type: str, audio: np.ndarray, repeats: int) -> list:
    import torch

    import susurrus
    from susurrus.decoding import DecodingOptions, decode

    model = susurrus.load_model(model_name, device="cpu", compute_type=compute_type)

    def prepare(samples: np.ndarray) -> torch.Tensor:
        mel = susurrus.log_mel_spectrogram(torch.from_numpy(samples.copy()), model.dims.n_mels)
        return susurrus.pad_or_trim(mel, 3000)

    def encode(mel: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            model.embed_audio(mel[None])
        return mel  # decode() encodes its window itself: the step cost is the difference

    def tokens(mel: torch.Tensor, most: int) -> list[int]:
        options = DecodingOptions(language="en", temperature=0.0, sample_len=most, fp16=False)
        return decode(model, mel, options).tokens

    return _time_windows(audio, repeats, prepare, encode, tokens)


def measure_ct2(model_dir: str, compute_type: str, threads: int, audio: np.ndarray,
                repeats: int) -> list:
    import ctranslate2
    from faster_whisper.feature_extractor import FeatureExtractor

    model = ctranslate2.models.Whisper(
        model_dir, device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
    )
    features = FeatureExtractor(feature_size=model.n_mels)
    prompt = ["<|startoftranscript|>"]
    if model.is_multilingual:
        prompt += ["<|en|>", "<|transcribe|>"]

    def prepare(samples: np.ndarray) -> object:
        mel = features(samples)[:, :3000]
        return ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None]))

    def encode(view: object) -> object:
        return model.encode(view, to_cpu=False)

    def tokens(encoded: object, most: int) -> list[int]:
        result = model.generate(encoded, [prompt], max_length=most, beam_size=1)
        return result[0].sequences_ids[0]

    return _time_windows(audio, repeats, prepare, encode, tokens)


def summarize(rows: list) -> dict:
    """Median encoder seconds a window and milliseconds a step over the windows."""
    encode = float(np.median([r[1] for r in rows]))
    steps = [
        (long_s - short_s) / (long_n - short_n) * 1000
        for _, _, (long_s, long_n), (short_s, short_n) in rows
        if long_n - short_n >= 20  # a window that stopped early says little about a step
    ]
    return {"encode_ms": encode * 1000, "step_ms": float(np.median(steps)) if steps else None,
            "tokens": [r[2][1] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--our-python", default=str(HERE.parent / ".venv" / "bin" / "python"))
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=str(HERE / "data"))
    # A child process that measures one system: ours MODEL TYPE WAV, or ct2 DIR TYPE WAV.
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, model, compute_type, wav = args.child
        if kind == "ours":
            import torch

            torch.set_num_threads(args.threads)
            rows = measure_ours(model, compute_type, read_wav(wav), args.repeats)
        else:
            rows = measure_ct2(model, compute_type, args.threads, read_wav(wav), args.repeats)
        print(json.dumps(summarize(rows)))
        return

    wav = Path(args.data) / "en-long.wav"
    if not wav.is_file():
        raise SystemExit(f"{wav}: missing; benchmarks/run.py prepares it")
    table = ["| model | system | encoder / window | step | ours / theirs (encoder, step) |",
             "|---|---|--:|--:|--:|"]
    for model in args.models.split(","):
        prepared = subprocess.run(
            [args.our_python, str(HERE / "worker.py"), "prepare-model", model, args.data],
            capture_output=True, text=True, check=True,
        )
        ct2_dir = json.loads(prepared.stdout.strip().splitlines()[-1])["ct2_dir"]
        found = {}
        for system, python, kind, where, types in (
            ("CTranslate2", sys.executable, "ct2", ct2_dir, ("int8", "float32")),
            ("susurrus", args.our_python, "ours", model, ("auto", "float32")),
        ):
            for compute_type in types:
                child = subprocess.run(
                    [python, __file__, "--child", kind, where, compute_type, str(wav),
                     "--threads", str(args.threads), "--repeats", str(args.repeats)],
                    capture_output=True, text=True, check=True,
                )
                found[f"{system} {compute_type}"] = json.loads(
                    child.stdout.strip().splitlines()[-1]
                )
        theirs = min((f for name, f in found.items() if name.startswith("CTranslate2")),
                     key=lambda f: f["step_ms"] or float("inf"))
        for system, f in found.items():
            ratio = ""
            if system.startswith("susurrus") and f["step_ms"] and theirs["step_ms"]:
                ratio = (f"{f['encode_ms'] / theirs['encode_ms']:.2f}, "
                         f"{f['step_ms'] / theirs['step_ms']:.2f}")
            step = f"{f['step_ms']:.2f} ms" if f["step_ms"] else "-"
            table.append(f"| {model} | {system} | {f['encode_ms']:.0f} ms | {step} | {ratio} |")
    print(f"threads {args.threads}; against CTranslate2's faster step type")
    print("\n".join(table))


if __name__ == "__main__":
    main()
