"""Hand-written CPU kernels for the products and attention of a decoding step (csrc/step.c).

A decoding step multiplies one row per window (five with beam search) by every weight of
the decoder: its time is reading the weights. PyTorch's kernels for so few rows stream
them at about half the memory speed of a 2-core AMD EPYC (Zen 3, AVX2 only): base's int8
layers through the weight-only kernel at 10-15 GB/s, its output projection through
FBGEMM's at 15, where CTranslate2's steps reach 23-24. The kernels here read each weight
row once for all input rows. Decoding steps' int8 products (`int8_rows_q16`) round the
activations to 16 bits with a scale per 128 inputs and sum in integers (1.6-1.7 times
as fast as widening every weight to float32 on a Zen 4; the rounding moves a product by
about 3e-5 of it, far less than the int8 weights' own rounding and than the 8 bits
FBGEMM's kernel rounds to); `int8_rows` keeps them in float32 for the float32 screen's
proven bound (screen.py).

They are compiled on first use with the system's C compiler (AVX2, FMA and F16C, OpenMP; the
16-bit products also in an AVX512-VNNI version, taken where the CPU has it) into the
cache directory, and are one more candidate that kernels.py measures against PyTorch's:
never used unless faster here. Where they cannot be built (no compiler, another CPU
family, $SUSURRUS_NATIVE=0) the PyTorch kernels serve, after one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "step.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared")
LIBRARIES = ("-lmvec", "-lm")  # glibc's vector expf and erff
ENV_SWITCH = "SUSURRUS_NATIVE"  # 0: never build or use them
BUILD_SECONDS = 120


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def _why_not() -> str | None:
    """Why the kernels cannot run on this machine, or None."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"${ENV_SWITCH}=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"a {platform.machine()} CPU (they are written for x86-64)"
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        return "a CPU without AVX2, FMA and F16C"
    return None


def build_dir() -> Path:
    from .download import default_cache_dir  # the models' cache root

    return default_cache_dir() / "native"


def _compiler() -> str | None:
    found = os.environ.get("CC") or "cc"
    return shutil.which(found)


def _build(compiler: str, directory: Path) -> Path:
    """The compiled library, built once per source, flags and compiler (its path and
    size): a changed file or another compiler gets a new name, never a stale build."""
    stamp = os.stat(compiler)
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join((compiler, str(stamp.st_size), *FLAGS, *LIBRARIES)).encode())
    target = directory / f"step-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once (a batch's
    # workers) each get a whole library or none.
    fd, temporary = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", temporary, *LIBRARIES],
            capture_output=True, text=True, timeout=BUILD_SECONDS,
        )
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise OSError(lines[0] if lines else f"exit status {done.returncode}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None (after one warning) where they
    cannot be built or loaded here."""
    if (reason := _why_not()) is not None:
        logger.info("native step kernels off: %s", reason)
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning(
            "no C compiler (cc or $CC) to build the native step kernels; PyTorch's serve "
            "instead (decoding may be slower on this CPU)"
        )
        return None
    try:
        # torch is imported first: its OpenMP runtime is the one the library links to,
        # so both share one pool of threads.
        lib = ctypes.CDLL(str(_build(compiler, build_dir())))
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("could not build the native step kernels (%s); PyTorch's serve instead",
                       error)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name in ("susurrus_int8_rows", "susurrus_float_rows"):
        function = getattr(lib, name)
        function.restype = None
        function.argtypes = [pointer] * 5 + [size] * 3 + [ctypes.c_int]
    lib.susurrus_int8_rows_q16.restype = None
    lib.susurrus_int8_rows_q16.argtypes = [pointer] * 5 + [size] * 3 + [pointer, ctypes.c_int]
    lib.susurrus_quantized_floats.restype = size
    lib.susurrus_quantized_floats.argtypes = [size, size]
    lib.susurrus_attention.restype = None
    lib.susurrus_attention.argtypes = [pointer] * 6 + [size] * 10 + [ctypes.c_int] * 2
    lib.susurrus_exact_top.restype = None
    lib.susurrus_exact_top.argtypes = [pointer] * 6 + [size] * 3 + [size, pointer, ctypes.c_int]
    lib.susurrus_timestamp_rules.restype = None
    lib.susurrus_timestamp_rules.argtypes = [pointer] + [size] * 5 + [pointer] * 6
    lib.susurrus_q16_vnni.restype = ctypes.c_int
    lib.susurrus_q16_vnni.argtypes = [ctypes.c_int]
    lib.susurrus_log_probs.restype = None
    lib.susurrus_log_probs.argtypes = [pointer, size, size, ctypes.c_int, pointer, pointer]
    lib.susurrus_decoder_step.restype = None
    lib.susurrus_decoder_step.argtypes = [ctypes.POINTER(Step)]
    return lib


# The decoder step's arguments (susurrus_step and its parts in csrc/step.c), field for field.
_P, _I = ctypes.c_void_p, ctypes.c_int64


class Linear(ctypes.Structure):
    _fields_ = [("weight", _P), ("scale", _P), ("bias", _P), ("out", _I), ("in_", _I)]


class Layer(ctypes.Structure):
    _fields_ = [
        *((name, _P) for name in ("attn_ln_w", "attn_ln_b", "cross_ln_w", "cross_ln_b",
                                  "mlp_ln_w", "mlp_ln_b")),
        *((name, Linear) for name in ("qkv", "out", "cross_query", "cross_out", "fc1", "fc2")),
        *((name, _P) for name in ("self_k", "self_v", "cross_k", "cross_v")),
    ]


class Step(ctypes.Structure):
    _fields_ = [
        *((name, _I) for name in ("rows", "state", "heads", "layers", "frames", "self_row",
                                  "self_head", "self_half", "cross_audio", "cross_head",
                                  "cross_half")),
        ("positions", _P), ("tasks", _P), ("n_tasks", _I), ("ln_w", _P), ("ln_b", _P),
        ("eps", ctypes.c_float), ("x", _P), ("work", _P), ("scratch", _I),
        ("layer", ctypes.POINTER(Layer)), ("threads", ctypes.c_int), ("quant", _I),
    ]


def decoder_step(step: Step) -> None:
    """Run a whole decoder step as `step` describes it (engine/native_step.py builds it).
    Call only where `available()`."""
    _lib().susurrus_decoder_step(ctypes.byref(step))


EXACT_TOP_MOST = 64  # the kernel holds at most this many leading logits per row


def exact_top(hidden: Tensor, logits: Tensor, weight: Tensor, scale: Tensor, error: Tensor,
              error_scale: Tensor, k: int) -> Tensor:
    """In place, the `k` largest of each row of `logits` (rows, n) recomputed as `hidden`
    (rows, width) times weight * scale + error * error_scale (int8 rows with float32
    per-row scales: a weight and its rounding error); returns their indices (rows, k).
    Call only where `available()`."""
    rows, n = logits.shape
    width = hidden.shape[1]
    if not (0 < k <= EXACT_TOP_MOST and width % 8 == 0 and logits.is_contiguous()
            and logits.dtype == hidden.dtype == torch.float32):
        raise ValueError("the exact-top kernel takes float32 rows, widths of a multiple of 8 "
                         f"and at most {EXACT_TOP_MOST} logits")
    hidden = hidden.contiguous()
    found = torch.empty(rows, k, dtype=torch.int64)
    _lib().susurrus_exact_top(
        hidden.data_ptr(), logits.data_ptr(), weight.data_ptr(), scale.data_ptr(),
        error.data_ptr(), error_scale.data_ptr(), rows, n, width, k, found.data_ptr(),
        max(1, min(torch.get_num_threads(), rows)),
    )
    return found


def q16_vnni(on: bool | None = None) -> bool:
    """Whether the 16-bit int8 products (`int8_rows_q16`, the native step's) run on
    AVX512-VNNI, where the CPU has it; `on` switches it (comparisons, tests). Call only
    where `available()`."""
    return bool(_lib().susurrus_q16_vnni(-1 if on is None else int(on)))


def timestamp_rules(logits: Tensor, tb: int, eot: int, no_timestamps: int, sampled: Tensor,
                    last: Tensor, penult: Tensor, latest: Tensor, timestamps: Tensor,
                    initial: Tensor) -> None:
    """The reference's timestamp rules on `logits` (rows, vocabulary), in place, from each
    row's state (engine/search.py's RowRules: int64 `sampled`, `latest`, `initial`; bool
    `last`, `penult`, `timestamps`; one per row). Call only where `available()`."""
    rows, vocab = logits.shape
    if logits.dtype != torch.float32 or not logits.is_contiguous() or logits.is_cuda:
        raise ValueError("the timestamp rules take contiguous float32 CPU logits")
    if not (0 <= eot < tb <= vocab and 0 <= no_timestamps < vocab):
        raise ValueError(f"tokens eot {eot}, no_timestamps {no_timestamps} and first "
                         f"timestamp {tb} do not fit a vocabulary of {vocab}")
    state = [t.contiguous() for t in (sampled, last, penult, latest, timestamps, initial)]
    if any(t.shape != (rows,) or t.dtype != want for t, want in zip(state, _RULE_TYPES)):
        raise ValueError("the timestamp rules take one int64 or bool state per row")
    _lib().susurrus_timestamp_rules(logits.data_ptr(), rows, vocab, tb, eot, no_timestamps,
                                    *(t.data_ptr() for t in state))


_RULE_TYPES = (torch.int64, torch.bool, torch.bool, torch.int64, torch.bool, torch.int64)


def log_probs(logits: Tensor, tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each row's token (`tokens`, else its largest logit's index, the first of equals)
    and its log-probability, for float32 `logits` (rows, vocabulary): log_softmax's
    (x - max) - log(sum(exp(x - max))), in one pass on one thread, closer to the exact
    value than PyTorch's float32 log_softmax (tiny.en's real logits: within 3e-7 of the
    float64 one, against 3e-5). Call only where `available()`."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.is_cuda:
        raise ValueError("the log-probabilities take 2-D float32 CPU logits")
    logits = logits.contiguous()
    rows, vocab = logits.shape
    if tokens is None:
        best = torch.empty(rows, dtype=torch.int64)
    elif tokens.shape == (rows,) and not tokens.is_cuda:
        best = tokens.to(torch.int64).contiguous().clone()
        if rows and not (0 <= int(best.min()) and int(best.max()) < vocab):
            raise ValueError(f"tokens outside a vocabulary of {vocab}")
    else:
        raise ValueError("one CPU token per row")
    logprob = torch.empty(rows, dtype=torch.float32)
    _lib().susurrus_log_probs(logits.data_ptr(), *logits.shape, int(tokens is None),
                              best.data_ptr(), logprob.data_ptr())
    return best, logprob


def available() -> bool:
    return library() is not None


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not available here (native.available())")
    return lib


def _rows(function, weight: Tensor, scale: Tensor | None, bias: Tensor | None,
          x: Tensor, rounded: bool = False) -> Tensor:
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError("native kernels take 2-D float32 rows")
    x = x.contiguous()
    out_features, in_features = weight.shape
    if x.shape[1] != in_features:
        raise ValueError(f"rows of {x.shape[1]} features against a weight of {in_features}")
    # The kernels read float32 vectors as laid out: anything else is converted here.
    if scale is not None and (scale.dtype != torch.float32 or not scale.is_contiguous()):
        scale = scale.float().contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    # The rounded rows' scratch, held until the call returns.
    scratch = torch.empty(quantized_floats(x.shape[0], in_features)) if rounded else None
    work = () if scratch is None else (scratch.data_ptr(),)
    function(
        weight.data_ptr(),
        None if scale is None else scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        x.data_ptr(), y.data_ptr(),
        out_features, in_features, x.shape[0], *work, torch.get_num_threads(),
    )
    return y


def quantized_floats(rows: int, in_features: int) -> int:
    """Floats of scratch a thread needs for `rows` input rows rounded to 16 bits."""
    return int(_lib().susurrus_quantized_floats(rows, in_features))


def int8_rows(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x (rows, in) float32 times the int8 `weight` (out, in) with float32 per-row
    `scale`, plus `bias`: (rows, out) float32. Call only where `available()`."""
    if weight.dtype != torch.int8 or not weight.is_contiguous():
        raise ValueError("the int8 kernel takes a contiguous int8 weight")
    return _rows(_lib().susurrus_int8_rows, weight, scale, bias, x)


def int8_rows_q16(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """`int8_rows` with each row of x rounded to 16 bits first (a scale per 128 inputs;
    about 3e-5 of each result, far below the weight's own int8 rounding) and summed in
    integers: 1.6-1.7 times as fast on a Zen 4 (csrc/step.c). Widths that are not a
    multiple of 128 are not rounded. Decoding steps of int8 layers take this one."""
    if weight.dtype != torch.int8 or not weight.is_contiguous():
        raise ValueError("the int8 kernel takes a contiguous int8 weight")
    return _rows(_lib().susurrus_int8_rows_q16, weight, scale, bias, x, rounded=True)


def float_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (rows, in) float32 times the float32 `weight` (out, in), plus `bias`."""
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        raise ValueError("the float kernel takes a contiguous float32 weight")
    return _rows(_lib().susurrus_float_rows, weight, None, bias, x)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(dim)) v for float32 q (batch, heads, queries, dim) and k, v
    (batch, heads, keys, dim), both float32 or both float16 (widened as they are read: the
    arithmetic is float32); `mask` (batch, 1, 1, keys) bool, one query per row, True where
    a key is attended. Each (batch, head) on one thread, the same sums whatever the thread
    count."""
    batch, heads, queries, dim = q.shape
    keys = k.shape[2]
    if (dim % 8 or q.dtype != torch.float32 or k.dtype != v.dtype
            or k.dtype not in (torch.float32, torch.float16)):
        raise ValueError("native attention takes float32 queries over float32 or float16 keys "
                         "and values, heads of a multiple of 8")
    if k.shape != (batch, heads, keys, dim) or v.shape != k.shape:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} do not match "
                         f"queries {tuple(q.shape)}")
    q = q.contiguous()
    # Keys and values may be a slice of a cache (strided heads and batch), not of a key.
    k = k if k.stride(3) == 1 and k.stride(2) == dim else k.contiguous()
    v = v if v.stride(3) == 1 and v.stride(2) == dim else v.contiguous()
    if mask is not None:
        if queries != 1:
            raise ValueError("a mask takes one query per row")
        # Rows of `keys` bytes side by side, as the kernel reads them.
        mask = mask.reshape(batch, keys).to(torch.uint8).contiguous()
    out = torch.empty(batch, heads, queries, dim, dtype=torch.float32)
    scores = torch.empty(batch * heads * queries * ((keys + 7) // 8 * 8), dtype=torch.float32)
    _lib().susurrus_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(),
        None if mask is None else mask.data_ptr(), out.data_ptr(), scores.data_ptr(),
        batch, heads, queries, keys, dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), keys, int(k.dtype == torch.float16),
        torch.get_num_threads(),
    )
    return out
