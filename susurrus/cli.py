"""The `susurrus` command: the reference `whisper` command's flags, plus `susurrus probe`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings

from . import __version__
from .errors import SusurrusError

MODEL_DEFAULT = "base"
FORMATS = ["txt", "vtt", "srt", "tsv", "json", "all"]
WORD_OPTIONS = ["highlight_words", "max_line_count", "max_line_width", "max_words_per_line"]
# Subtitle timing limits beyond the reference: they need word timestamps and turn them on.
CUE_OPTIONS = ["max_cps", "min_cue_duration", "max_cue_duration"]


def _bool(text: str) -> bool:
    from .options import parse_bool

    try:
        return parse_bool(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}") from None


def _optional(kind):
    def parse(text: str):
        return None if text == "None" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _threads(text: str) -> int | str | None:
    if text == "auto":
        return text
    count = _optional(int)(text)
    if count is not None and count < 0:
        raise argparse.ArgumentTypeError(f"expected a count of 0 or more or auto, got {text!r}")
    return count


def _add_bool(group, name: str, default: bool, help: str) -> None:
    """`--name True|False` as the reference, `--name` alone for True, `--no-name` for False."""
    group.add_argument(
        f"--{name}",
        type=_bool,
        nargs="?",
        const=True,
        default=default,
        metavar="BOOL",
        help=help,
    )
    for spelling in {f"--no-{name}", f"--no-{name.replace('_', '-')}"}:
        group.add_argument(spelling, dest=name, action="store_false", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    from .compute_types import COMPUTE_TYPES
    from .download import available_models
    from .tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    parser = argparse.ArgumentParser(
        prog="susurrus",
        description="Transcribe or translate speech in audio and video files with Whisper. "
        "`susurrus probe FILE` describes a media file's streams; `susurrus export MODEL OUT.pt` "
        "writes a model as an OpenAI checkpoint; `susurrus live [SOURCE]` transcribes a "
        "microphone, stdin or a file while it plays; `susurrus serve` runs an OpenAI-compatible "
        "transcription server with a web page (see `susurrus serve --help`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("audio", nargs="+", help="audio or video file(s) to transcribe")
    parser.add_argument("--version", action="version", version=f"susurrus {__version__}")

    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=MODEL_DEFAULT,
        help=f"model name ({', '.join(available_models())}) or path to a checkpoint "
        "file or model directory",
    )
    g.add_argument(
        "--model_dir",
        default=None,
        help="where downloaded models are kept (default: $SUSURRUS_CACHE_DIR or ~/.cache/susurrus)",
    )
    g.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    _add_bool(g, "fp16", True, "half precision on a GPU; the CPU always uses float32")
    g.add_argument(
        "--compute_type",
        default="default",
        choices=COMPUTE_TYPES,
        help="weights and arithmetic: default (float16 on a GPU, float32 on the CPU, as "
        "whisper), int8 (4x smaller weights, faster on the CPU, WER within a few tenths), "
        "int8_bfloat16 (int8, attention in bfloat16), auto (the fastest for the device: on "
        "a CPU with AMX, an int8 decoder and a bfloat16 encoder; elsewhere an int8 "
        "decoder, and an int8 encoder only where measured faster), "
        "float32, float16, bfloat16",
    )
    g.add_argument(
        "--threads",
        type=_threads,
        default=0,
        help="CPU threads for torch; 0 or auto (default): torch's count, and decoding "
        "steps measure as they run whether one thread is faster (another program busy on "
        "a core); N: exactly N",
    )

    g = parser.add_argument_group("input and output")
    g.add_argument(
        "--audio_stream",
        type=int,
        default=None,
        help="which audio stream of the file to use, counting audio streams from 0"
        "; None: the one ffmpeg picks (marked default, else most channels, else the first)",
    )
    g.add_argument("--output_dir", "-o", default=".", help="directory to save the outputs")
    g.add_argument(
        "--output_format",
        "-f",
        default="all",
        choices=FORMATS,
        help="format of the output file; 'all' writes every format",
    )
    _add_bool(g, "verbose", True, "print segments as they are decoded; False shows a progress bar")

    g = parser.add_argument_group("language and task")
    languages = sorted(LANGUAGES) + sorted(k.title() for k in TO_LANGUAGE_CODE)
    g.add_argument(
        "--task",
        default="transcribe",
        choices=["transcribe", "translate"],
        help="'transcribe' in the spoken language, or 'translate' to English",
    )
    g.add_argument(
        "--language",
        type=_optional(str),
        default=None,
        metavar="LANGUAGE",
        help="spoken language, as a code or English name (e.g. zh, Chinese); "
        f"None detects it. One of: {', '.join(languages)}",
    )

    g = parser.add_argument_group("decoding")
    g.add_argument("--temperature", type=float, default=0, help="sampling temperature")
    g.add_argument(
        "--best_of",
        type=_optional(int),
        default=5,
        help="candidates to sample when the temperature is above zero",
    )
    g.add_argument(
        "--beam_size",
        type=_optional(int),
        default=5,
        help="beams in beam search at temperature zero; None for greedy",
    )
    g.add_argument(
        "--patience",
        type=float,
        default=None,
        help="beam search patience (1.0 is conventional beam search)",
    )
    g.add_argument(
        "--length_penalty",
        type=float,
        default=None,
        help="length penalty alpha; None ranks by log-probability / length",
    )
    g.add_argument(
        "--suppress_tokens",
        default="-1",
        help="comma-separated token ids to suppress; -1 suppresses non-speech symbols",
    )
    g.add_argument(
        "--initial_prompt",
        default=None,
        help="text to condition the first window on (names, spellings, style)",
    )
    _add_bool(
        g,
        "carry_initial_prompt",
        False,
        "prepend the initial prompt to every window's context, not only the first",
    )
    _add_bool(
        g,
        "condition_on_previous_text",
        True,
        "give the previous window's text as context to the next",
    )
    g.add_argument(
        "--clip_timestamps",
        default="0",
        help="comma-separated start,end,... seconds of the parts to transcribe",
    )

    g.add_argument(
        "--batch_size",
        type=_optional(int),
        default=None,
        help="with several files: decode this many files side by side, each exactly as "
        "alone; with one file: decode this many 30-second windows at once, cut at pauses "
        "beforehand, each without the previous one's text as prompt "
        "(default: one window after another, as whisper)",
    )
    _add_bool(
        g,
        "resume",
        False,
        "save each file's progress after every window (FILE.resume.json in the output "
        "directory) and continue from it; finished files are skipped",
    )

    g = parser.add_argument_group("fallback and silence")
    g.add_argument(
        "--temperature_increment_on_fallback",
        type=_optional(float),
        default=0.2,
        help="temperature step when a window fails the thresholds below",
    )
    g.add_argument(
        "--compression_ratio_threshold",
        type=_optional(float),
        default=2.4,
        help="retry when the text's gzip compression ratio exceeds this",
    )
    g.add_argument(
        "--logprob_threshold",
        type=_optional(float),
        default=-1.0,
        help="retry when the average token log-probability is below this",
    )
    g.add_argument(
        "--no_speech_threshold",
        type=_optional(float),
        default=0.6,
        help="a window whose no-speech probability exceeds this, with low "
        "log-probability, is treated as silence",
    )
    _add_bool(
        g,
        "vad",
        False,
        "find speech with Silero voice activity detection first and decode only that",
    )

    g = parser.add_argument_group("word timestamps and subtitles")
    _add_bool(g, "word_timestamps", False, "word-level timestamps from cross-attention")
    g.add_argument(
        "--prepend_punctuations", default="\"'“¿([{-", help="punctuation merged with the next word"
    )
    g.add_argument(
        "--append_punctuations",
        default="\"'.。,，!！?？:：”)]}、",
        help="punctuation merged with the previous word",
    )
    _add_bool(g, "highlight_words", False, "underline each word as it is spoken (srt, vtt)")
    g.add_argument(
        "--max_line_width",
        type=_optional(int),
        default=None,
        help="most characters in a subtitle line",
    )
    g.add_argument(
        "--max_line_count", type=_optional(int), default=None, help="most lines in a subtitle cue"
    )
    g.add_argument(
        "--max_words_per_line",
        type=_optional(int),
        default=None,
        help="most words in a subtitle line",
    )
    g.add_argument(
        "--max_cps",
        type=_optional(float),
        default=None,
        help="most characters per second a subtitle cue asks to read (srt, vtt); cues last "
        "into the following pause, or briefly delay the next one; turns on --word_timestamps",
    )
    g.add_argument(
        "--min_cue_duration",
        type=_optional(float),
        default=None,
        help="fewest seconds a subtitle cue stays on screen (srt, vtt); turns on --word_timestamps",
    )
    g.add_argument(
        "--max_cue_duration",
        type=_optional(float),
        default=None,
        help="most seconds a subtitle cue lasts; longer ones are split between words (srt, "
        "vtt); turns on --word_timestamps",
    )
    g.add_argument(
        "--hallucination_silence_threshold",
        type=_optional(float),
        default=None,
        help="skip silences longer than this (seconds) around likely hallucinations",
    )
    return parser


def _stderr(line: str) -> None:
    """A line on stderr, on a line of its own even while progress bars are drawn (the
    engine may be decoding the next file meanwhile)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def _error(message: str) -> None:
    _stderr(f"susurrus: error: {message}")


def _warn(message: str) -> None:
    _stderr(f"susurrus: warning: {message}")


def no_speech_message(path: str, silent: bool, audio_stream: int | None) -> str:
    """The warning for a file with no speech. When another audio stream of the file has
    sound (a recorder that writes an empty track first, a film whose default track is
    empty), it names the `--audio_stream` that reads it."""
    from .audio import chosen_audio_stream, streams_with_sound

    try:
        used = chosen_audio_stream(path) if audio_stream is None else audio_stream
        others = streams_with_sound(path, exclude=used)
    except SusurrusError:
        used, others = audio_stream, []  # the hint is a courtesy; the answer stands
    if not others:
        return f"{path}: no speech found" + (" (the audio is silent)" if silent else "")
    hint = ", ".join(f"audio stream {i} (--audio_stream {i})" for i in others)
    verb = "have" if len(others) > 1 else "has"
    if silent:
        return f"{path}: no speech found: audio stream {used} is silent; {hint} {verb} sound"
    return f"{path}: no speech found in audio stream {used}; {hint} also {verb} sound"


def probe_main(argv: list[str]) -> int:
    from .audio import format_probe, probe

    parser = argparse.ArgumentParser(prog="susurrus probe", description="Describe a media file.")
    parser.add_argument("files", nargs="+", help="audio or video file(s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            info = probe(path)
        except SusurrusError as exc:
            _error(str(exc))
            status = 1
            continue
        print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_probe(info))
    return status


def parse_request(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """The command line as checked values: the transcription options as `transcribe()`'s
    keyword arguments (`options`), the writers' word and cue options (`writer_options`),
    and the rest by name. Usage errors exit through `parser.error`; an unknown language
    raises SusurrusError. Shared by the main command and `susurrus batch`."""
    from .tokenizer import language_code

    args = vars(parser.parse_args(argv))
    request = {
        name: args.pop(name)
        for name in ("model", "model_dir", "device", "output_dir", "output_format",
                     "audio_stream", "audio", "verbose", "batch_size", "resume", "threads",
                     "compute_type")
    }
    for option in CUE_OPTIONS:
        value = args[option]
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{option} must be a positive number")
    shortest, longest = args["min_cue_duration"], args["max_cue_duration"]
    if shortest is not None and longest is not None and shortest > longest:
        parser.error("--min_cue_duration is longer than --max_cue_duration")
    cue_options = {option: args.pop(option) for option in CUE_OPTIONS}
    if any(value is not None for value in cue_options.values()):
        args["word_timestamps"] = True

    if not args["word_timestamps"]:
        for option in WORD_OPTIONS:
            if args[option]:
                parser.error(f"--{option} requires --word_timestamps True")
    if args["max_line_count"] and not args["max_line_width"]:
        warnings.warn("--max_line_count has no effect without --max_line_width", stacklevel=1)
    if args["max_words_per_line"] and args["max_line_width"]:
        warnings.warn("--max_words_per_line has no effect with --max_line_width", stacklevel=1)
    writer_options = {option: args.pop(option) for option in WORD_OPTIONS}
    writer_options.update(cue_options)
    request["writer_options"] = writer_options

    if args["language"] is not None:
        args["language"] = language_code(args["language"])
    temperature = args.pop("temperature")
    increment = args.pop("temperature_increment_on_fallback")
    if increment is not None and increment > 0:
        import numpy as np

        temperature = tuple(np.arange(temperature, 1.0 + 1e-6, increment).tolist())
    args["temperature"] = temperature
    if request["batch_size"] is not None and request["batch_size"] < 1:
        raise SusurrusError(f"--batch_size must be at least 1, got {request['batch_size']}")
    output_dir = request["output_dir"]
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        # Said now, not after every file was transcribed and none could be written.
        raise SusurrusError(f"--output_dir {output_dir} is a file, not a folder")
    request["options"] = args
    return request


def _distinct_outputs(paths: list[str]) -> tuple[list[str], str | None]:
    """The inputs, each file once, and the clash (a message) where two different files
    would write the same outputs (a/talk.mp3 and b/talk.wav: talk.txt, ...), of which the
    reference keeps the last without a word."""
    from .writers import output_stem

    seen: dict[str, str] = {}  # real path: as given
    stems: dict[str, str] = {}  # output name: input
    kept = []
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen[real] = path
        kept.append(path)
        stem = output_stem(path)
        if stem in stems:
            return kept, (
                f"{stems[stem]} and {path} would both be written as {stem}.*: transcribe "
                "them into different folders (--output_dir)"
            )
        stems[stem] = path
    return kept, None


def transcribe_main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        request = parse_request(parser, argv)
    except SusurrusError as exc:
        _error(str(exc))
        return 2
    paths, clash = _distinct_outputs(request["audio"])
    if clash:
        _error(clash)
        return 2
    args = request["options"]
    model_name = request["model"]
    model_dir = request["model_dir"]
    device = request["device"]
    output_dir = request["output_dir"]
    output_format = request["output_format"]
    audio_stream = request["audio_stream"]
    writer_options = request["writer_options"]
    vad = args["vad"]
    temperature = args.pop("temperature")

    try:
        threads = request["threads"]
        compute_type = request["compute_type"]

        import torch

        from .load import load_model
        from .writers import format_timestamp, get_writer

        if threads and threads != "auto":
            torch.set_num_threads(threads)
        if vad:
            from .vad import ensure_available

            # Fail before loading the model rather than once per file.
            ensure_available()
        model = load_model(
            model_name, device=device, download_root=model_dir, compute_type=compute_type
        )
        if not model.is_multilingual and args["language"] not in (None, "en"):
            warnings.warn(
                f"{model_name} is an English-only model but got language "
                f"{args['language']!r}; using English instead",
                stacklevel=1,
            )
            args["language"] = "en"
        writer = get_writer(output_format, output_dir)
    except SusurrusError as exc:
        _error(str(exc))
        return 2

    from .options import TranscribeOptions
    from .transcribe import StateFile, read_recording, recording_is_silent, transcribe_many
    from .writers import output_stem

    verbose = request["verbose"]
    batch_size = request["batch_size"]
    resume = request["resume"]
    many = len(paths) > 1
    try:
        # One file: batch_size cuts it into windows decoded side by side; several files:
        # that many files decode side by side, each as it would alone. (Cutting each of
        # several files as well was measured: 1.37x against 1.32x the unbatched call, but
        # WER/CER 4.42 against 3.74 and 19 of 22 texts as alone; benchmarks/engine.py.)
        options = TranscribeOptions.create(
            temperature=temperature, batch_size=None if many else batch_size, **args
        )
    except ValueError as exc:
        _error(str(exc))
        return 2

    def state_path(path: str) -> str:
        return os.path.join(output_dir, f"{output_stem(path)}.resume.json")

    failed = 0
    todo = []
    for path in paths:
        if resume and os.path.isfile(path):
            try:
                saved = StateFile(state_path(path), path, model, options).load()
            except SusurrusError as exc:
                _error(str(exc))
                failed += 1
                continue
            if saved is not None and saved["session"].get("complete"):
                _stderr(f"susurrus: {path}: already transcribed (--resume)")
                continue
        todo.append(path)

    def read(path: str):
        return read_recording(path, model.dims.n_mels, stream=audio_stream, vad=vad)

    results = transcribe_many(
        model,
        todo,
        batch_size=batch_size if many and batch_size else 1,
        options=options,
        read=read,
        state_path=state_path if resume else None,
        threads=threads or None,
        # Segments of files decoded side by side would interleave: printed per file.
        verbose=verbose if not (many and batch_size) else None,
    )
    try:
        for path, result in results:
            try:
                if isinstance(result, Exception):
                    raise result
                if many and batch_size and verbose:
                    for segment in result["segments"]:
                        start = format_timestamp(segment["start"])
                        end = format_timestamp(segment["end"])
                        print(f"[{start} --> {end}] {segment['text']}", flush=True)
                if not result["segments"] or not result["text"].strip():
                    # An answer, not a failure: the outputs say so and the exit status stays 0.
                    result["no_speech"] = True
                    silent = recording_is_silent(read(path))
                    _warn(no_speech_message(path, silent, audio_stream))
                writer(result, path, writer_options)
            except SusurrusError as exc:
                _error(str(exc))
                failed += 1
            except (ValueError, NotImplementedError, OSError) as exc:
                _error(f"{path}: {exc}")
                failed += 1
    except KeyboardInterrupt:
        if resume:
            _error("interrupted; run the same command again to continue where it stopped")
        else:
            _error("interrupted; add --resume to be able to continue an interrupted run")
        return 130
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, *args, **kwargs: f"susurrus: warning: {message}\n"
    try:
        if argv and argv[0] == "probe" and not os.path.exists("probe"):
            status = probe_main(argv[1:])
        elif argv and argv[0] == "serve" and not os.path.exists("serve"):
            from .server import main as serve_main

            status = serve_main(argv[1:])
        elif argv and argv[0] == "live" and not os.path.exists("live"):
            from .live_cli import main as live_main

            status = live_main(argv[1:])
        elif argv and argv[0] == "export" and not os.path.exists("export"):
            from .export import main as export_main

            status = export_main(argv[1:])
        elif argv and argv[0] == "batch" and not os.path.exists("batch"):
            from .batch.cli import main as batch_main

            status = batch_main(argv[1:])
        else:
            status = transcribe_main(argv)
    except KeyboardInterrupt:
        _error("interrupted")
        status = 130
    sys.exit(status)


if __name__ == "__main__":
    main()
