"""Matrix-product kernels for the CPU, chosen by measurement on this machine.

The same float32 product `x @ weight.T + bias` runs at very different speeds through
PyTorch's paths, and which one wins depends on the CPU vendor, the shape and the number of
rows: on an AMD EPYC (Zen 4, 2 threads) base's output projection for one row takes 6.9 ms
through `F.linear` (MKL), 2.8 ms through oneDNN and 7.0 ms as `weight @ x.T`; for five rows
(beam 5) 12.0, 4.2 and 3.7 ms, and 3.2 ms through oneDNN with the weight packed in its
blocked layout (the packed copy costs memory: see PACKED_STEP_ROWS). So each product shape
of a model, in each row-count bucket that decoding produces, is timed once per candidate
and the fastest kept. The choices are
cached per CPU model, torch version and thread count in a small JSON file in the cache
directory: measuring costs a few seconds the first time, nothing afterwards.

On an AMD EPYC Zen 3 (AVX2 only) MKL runs a product of one row on one thread and reads the
weight at 12 GB/s: `split` cuts the weight into a batch of parts the threads share
(24 GB/s). Where the hand-written kernels of native.py build (x86-64 with AVX2 and a C
compiler), `native` joins the candidates of a few rows: each weight row read once for all
rows, at 20-25 GB/s there. Every candidate computes the same float sums in another order,
so float32 results change only by that reordering (the parity tests pass with each
candidate forced in turn:
`SUSURRUS_KERNEL=linear|onednn|weight_first|onednn_packed|split|native`), and none that a
decoding step may take sums differently with another thread count (the engine changes it
with the load). An int8 decoder's steps choose, in whole steps with the output
projection, between FBGEMM's dynamic kernel, the weight-only int8 kernel on bfloat16
activations and the native one on activations rounded to 16 bits (`SUSURRUS_INT8=fbgemm|int8pack|
native` forces one; quantize.py), and its products of many rows between PyTorch's int8
product and the float product of the dequantized weight
(`SUSURRUS_INT8_ROWS=int_mm|dequantized`): without VNNI the first is 30 times slower.

The attention of decoding steps runs as two plain products around a float32 softmax, or
through the native kernel where it builds and whole steps measure it faster
(`SUSURRUS_ATTENTION=sdpa|matmul|native` forces a kernel), and where the compute type
asks for bfloat16 attention (`auto`), whole decoder steps for one window and for eight
side by side are timed to find whether bfloat16 pays at all: on a Zen 4 without AMX,
PyTorch's fused bfloat16 kernel takes 0.64 ms for one query over 1500 frames, float32's
0.07 ms, two bfloat16 products 0.13 ms. Steps never take SDPA unless forced: its sums for
one query change with the thread count, which the engine's thread policy changes with
the machine's load. Only the audio's keys take bfloat16: the decoder's own keys stay in
the model's. Elsewhere `auto` asks for float16 keys and values (its own and the audio's)
as a type of storage only: the native kernel widens them as it reads them, the
arithmetic float32, half the memory of each window (base: 18 MB of audio keys instead of
37); whole steps are timed the same way to find whether they cost any speed.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import platform
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native, quantize
from . import screen as screening
from .download import default_cache_dir
from .errors import SusurrusError

logger = logging.getLogger(__name__)

Kernel = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
# A row bucket's choice: (most rows, kernel, kernel without a packed weight).
Choice = tuple[int, Kernel, Kernel]
# 2: the attention of decoding steps measured with the decoder's own keys in the model's type,
# always through the two products (choices of format 1 are stale). 3: a bucket of 5 rows.
# 4: oneDNN with a packed weight (caches without it would never try it). 5: the split
# products, and F.linear no longer a candidate for a few rows (its sums change with the
# thread count there). 6: the native kernels, and the float decoder's choice that decides
# whether a step runs as one native call (the float decoder's key did not name its
# candidates, so a cache from before kept choices that never tried them). 7: the encoder's
# type (`bfloat16-rows:`), which format 6 readers take for a stale entry. Each format has a
# file of its own (cache_path): two versions sharing one file would each find the other's
# entries stale and measure again at every start. 8: the native int8 step kernel rounds
# its activations to 16 bits (1.6x as fast alone): format 7's int8-decoder choices were
# measured against the slower one. 9: the dequantized product of many rows (int8 layers'
# prompts, `int8-rows:` choices) goes through the float32 kernel measured for its shape
# (oneDNN's on a Zen 5, 2-3x MKL's): format 8's int8-rows choices timed it through F.linear;
# and the native 16-bit int8 products run on AVX512-VNNI where the CPU has it (1.4-1.9x for
# 3 or 5 rows on a Zen 5): format 8's int8-decoder choices timed the AVX2 version.
FORMAT = 9
# Row counts that decoding steps produce: one row, a beam or a few windows, a batch of
# beams. A product uses the smallest bucket that holds its rows, else the largest. Five is
# the default beam size and best_of, where the fastest product can differ from 4 or 8 rows
# (base's output projection on a Zen 4: `weight @ x.T` 3.3 ms against oneDNN's 4.4).
STEP_BUCKETS = (1, 4, 5, 8, 32)
# The layers are timed alone only for the many rows of the encoder (and prompt passes);
# for decoding steps they are timed inside whole decoder steps (_measure_decoder).
ENCODER_BUCKETS = (1500,)
MEASURE_SECONDS = 0.01  # per candidate and bucket: enough for a stable minimum
DECODER_ROUNDS = 6  # whole decoder steps timed per candidate and bucket
COLD_BYTES = 48 << 20  # more than a last-level cache holds (copies of a small weight)
ENV_FORCE = "SUSURRUS_KERNEL"


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _weight_first(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # weight @ x.T streams the (large) weight once for all rows in MKL's favoured layout.
    # Its output comes transposed: copied to rows, since every later pass over a row
    # (the token rules, softmax, top-k) is many times slower over a strided one (base's
    # five beams: the rules' largest-text-logit 0.69 ms instead of 0.01).
    rows = x.reshape(-1, x.shape[-1])
    out = (weight @ rows.t()).t().contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _split(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # MKL runs a product of one row (or a few) on one thread: on an AMD EPYC Zen 3 a
    # decoding step's layers then read their weights at 11-12 GB/s of the 29 a plain
    # sum reaches. The weight's rows cut into equal parts make a batch of products that
    # the threads share (tiny.en's 1536x384, weights out of cache: 89 against 198 us).
    # Each output is one dot product, as in F.linear; the parts depend on the shape
    # alone, never on the thread count (which the engine changes with the load), so the
    # sums do not either.
    rows = x.reshape(-1, x.shape[-1])
    out_features, in_features = weight.shape
    parts = next((p for p in SPLIT_PARTS if out_features % p == 0), 1)
    if rows.shape[0] > SPLIT_ROWS:
        return F.linear(x, weight, bias)
    if parts == 1:
        return _weight_first(x, weight, bias)  # the same sums for any thread count
    out = torch.bmm(
        weight.view(parts, out_features // parts, in_features),
        rows.t().expand(parts, in_features, rows.shape[0]),
    )
    # (parts, outputs, rows) -> (rows, parts * outputs): a view for one row.
    out = out.permute(2, 0, 1).reshape(rows.shape[0], out_features)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out_features)


SPLIT_PARTS = (8, 4, 2)  # the first that divides the outputs
SPLIT_ROWS = 32  # more rows than a step's: F.linear shares them between threads itself


# The row count oneDNN lays a packed weight out for. Packed for 8 rows, a weight serves 1 to
# 8 rows as fast as packed for each (base's 2048x512 layer, Zen 4: 113-134 us), and 32
# rows faster than dense.
PACK_ROWS = 8
# The decoding steps' row buckets that may take a packed weight. A packed copy is a second
# copy of the weight, made on first use and kept while the weight lives (base: 88 MB for
# the decoder's layers, 106 for the output projection), so packed weights serve beam
# search only (`packed_weights`), where they pay back in every step: base float32 beam 5
# 14.3 -> 12.0 s on 213 s of speech (Zen 4; peak memory 794 -> 972 MB). Greedy steps and
# their sampling fallbacks keep the plain weights (base's steps were no faster packed,
# and the peak memory went from 790 to 1050 MB). The projection's one row is the logit
# screen's work, and 32 is the screen's deferred product: never packed.
PACKED_STEP_ROWS = range(1, 33)
PACKED_PROJECTION_ROWS = range(2, 9)
_packing: contextvars.ContextVar[bool] = contextvars.ContextVar("packing", default=False)


@contextlib.contextmanager
def packed_weights(allowed: bool = True) -> Iterator[None]:
    """Within this context (this thread's), products may take the packed weights they were
    measured fastest with; outside it they take the fastest plain kernel."""
    token = _packing.set(allowed)
    try:
        yield
    finally:
        _packing.reset(token)


_packs: dict[int, tuple[weakref.ref, tuple[int, int], Tensor]] = {}  # id(weight) -> packed


def _stamp(weight: Tensor) -> tuple[int, int]:
    # Storage and version: a weight replaced or written in place (load_state_dict) is
    # packed again. Inference tensors keep no version counter.
    return weight.data_ptr(), -1 if weight.is_inference() else weight._version


def packed_weight(weight: Tensor) -> Tensor:
    """oneDNN's packed copy of a float32 weight (made once, dropped with the weight)."""
    key = id(weight)
    hit = _packs.get(key)
    stamp = _stamp(weight)
    if hit is not None and hit[0]() is weight and hit[1] == stamp:
        return hit[2]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
    if hit is None or hit[0]() is not weight:
        weakref.finalize(weight, _packs.pop, key, None)
    _packs[key] = (weakref.ref(weight), stamp, packed)
    return packed


def _onednn_packed(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # oneDNN's blocked layout streams better than the plain one for a few rows: base's
    # layers on a Zen 4, five rows, weights out of cache: 2048x512 128 against 185 us,
    # the output projection 3.2 against 4.4 ms (same sums up to their order).
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, "none", [], "")


def _native(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # The hand-written kernel (native.py): each weight row read once for all rows, the
    # outputs shared between threads, every sum in one order whatever the row and thread
    # counts. Written for a step's few rows; more (a prompt, the encoder) go to F.linear.
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > SPLIT_ROWS or x.dtype != torch.float32 or not native.available():
        return F.linear(x, weight, bias)
    out = native.float_rows(rows, weight.contiguous(), bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


CANDIDATES: dict[str, Kernel] = {
    "linear": _linear,
    "onednn": _onednn,
    "weight_first": _weight_first,
    "onednn_packed": _onednn_packed,
    "split": _split,
    "native": _native,
}
PACKED = frozenset({"onednn_packed"})  # candidates that keep a second copy of the weight


def _attention_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _attention_matmul(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    # Two batched products around a float32 softmax. For one query per head, PyTorch's
    # fused CPU kernel in bfloat16 spends most of its time outside the arithmetic: 0.64 ms
    # against 0.13 ms this way for base's 1500 frames on a Zen 4.
    scores = q @ k.transpose(-1, -2)
    # (Casts only where the type differs: a cast to the same type is still a call.)
    scores = (scores if scores.dtype == torch.float32 else scores.float()).mul_(
        q.shape[-1] ** -0.5
    )
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    weights = scores.softmax(-1)
    return (weights if v.dtype == torch.float32 else weights.to(v.dtype)) @ v


def _attention_native(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    # The hand-written kernel (native.py): each head's keys and values read once, the
    # scores and softmax in float32 in between, a head per thread. For base's 1500
    # frames, one row, keys and values out of cache (Zen 3): 272 against the two
    # products' 421 us a layer. Other types, and a mask of several queries a row (a
    # prompt continued), take the two products.
    plain = (q.dtype == torch.float32 and k.dtype == v.dtype
             and k.dtype in (torch.float32, torch.float16) and q.shape[-1] % 8 == 0)
    batch, heads, queries, dim = q.shape
    keys = k.shape[2]
    shaped = k.shape == v.shape == (batch, heads, keys, dim)  # no broadcast batch or heads
    masked_ok = mask is None or (queries == 1 and mask.shape == (batch, 1, 1, keys))
    if plain and shaped and masked_ok and native.available():
        return native.attention(q, k, v, mask)
    if k.dtype == torch.float16 and q.dtype == torch.float32:
        k, v = k.float(), v.float()  # the products' arithmetic in float32 too
    return _attention_matmul(q, k, v, mask)


# The native kernel reads float16 keys and values (the audio's, stored narrow) itself.
_attention_native.reads_half = True  # type: ignore[attr-defined]


def _attention_blocks(q: Tensor, k: Tensor, v: Tensor, block: int = 128) -> Tensor:
    # The encoder's attention a block of queries at a time, each block's scores small
    # enough to stay in cache between the two products and the softmax. In bfloat16 on
    # a CPU without AMX, PyTorch's fused kernel runs at a third of the products' speed
    # (base, 1500 frames, Zen 4: 26 ms a layer against 11). The scores of bfloat16
    # inputs come out rounded to bfloat16 (its products have no float32 output), as in
    # the decoding steps' attention; the softmax computes in float32 within its kernel.
    # One scores buffer serves every block, written in place: a fresh one per block (6 MB
    # in float32) comes from the system each time and is paid in page faults, which made
    # the layer take anywhere from 14 to 39 ms depending on the allocator's state. Fewer
    # queries than keys work too.
    batch, heads, length, dim = q.shape
    q = q * dim**-0.5
    keys = k.transpose(-1, -2).contiguous()  # once, not copied again by every block's product
    out = q.new_empty(batch, length, heads, v.shape[-1])
    scores = q.new_empty(batch, heads, min(block, length), k.shape[-2])
    part = q.new_empty(batch, heads, min(block, length), v.shape[-1])
    for start in range(0, length, block):
        rows = min(block, length - start)
        s = torch.matmul(q[:, :, start : start + rows], keys, out=scores[:, :, :rows])
        torch.softmax(s, -1, out=s)
        p = torch.matmul(s, v, out=part[:, :, :rows])
        out[:, start : start + rows] = p.transpose(1, 2)
    return out.transpose(1, 2)


# The encoder's attention (many queries, no mask): PyTorch's fused kernel, or blocks of
# queries through two products.
LONG_ATTENTION: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "sdpa": F.scaled_dot_product_attention,
    "blocks": _attention_blocks,
}

ATTENTION: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]] = {
    "sdpa": _attention_sdpa,
    "matmul": _attention_matmul,
    "native": _attention_native,
}
# Audios per step the attention is timed for: one window, and windows side by side.
ATTENTION_BUCKETS = (1, 8)
# The attention kernel of CPU decoding steps, unless the native one (where it builds) is
# measured faster: PyTorch's SDPA splits one query's keys between threads, so its sums,
# and a transcript's last digits, change with the thread count, which the engine's
# thread policy changes as the machine's load does (engine/threads.py); the two
# products' sums do not, nor the native kernel's. On a Zen 4 the two products are within
# 4% of SDPA in float32 and 5x faster in bfloat16. SDPA stays forcible for comparisons.
STEP_ATTENTION = "matmul"


def _step_attention_kernels() -> list[str]:
    """The step attention kernels timed on this machine."""
    return [STEP_ATTENTION, *(["native"] if native.available() else [])]


ATTENTION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENV_FORCE_ATTENTION = "SUSURRUS_ATTENTION"


def _usable(name: str, dtype: torch.dtype, rows: int = 1, packed: Iterable[int] = ()) -> bool:
    """Whether candidate `name` is timed for `rows` rows of a product in `dtype`; `packed`:
    the row counts where this product may keep a packed copy of its weight."""
    if name == "onednn":
        # oneDNN has no bfloat16 inner product without the CPU's own (AVX2 only: an error).
        bf16 = dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.backends.mkldnn.is_available() and (dtype == torch.float32 or bf16)
    if name == "onednn_packed":
        return torch.backends.mkldnn.is_available() and dtype == torch.float32 and rows in packed
    if name == "native":
        return dtype == torch.float32 and rows <= SPLIT_ROWS and native.available()
    if name == "linear":
        # MKL's sums for a few rows change with the thread count (AMD EPYC Zen 3: 5 to 7
        # and 9 to 11 rows), which the engine's thread policy changes with the machine's
        # load: a beam's numbers would depend on what else runs.
        return not 1 < rows <= STEP_BUCKETS[-1]
    return True


def cpu_name() -> str:
    """The CPU's model name (what the choices are cached under)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_key(threads: int | None = None) -> str:
    threads = threads or torch.get_num_threads()
    return f"{cpu_name()} | torch {torch.__version__} | {threads} threads"


def cache_path() -> Path:
    """$SUSURRUS_KERNEL_CACHE, else kernels-<format>.json in the model cache's folder
    ($SUSURRUS_CACHE_DIR, $XDG_CACHE_HOME/susurrus, ~/.cache/susurrus)."""
    if file := os.environ.get("SUSURRUS_KERNEL_CACHE"):
        return Path(file).expanduser()
    return default_cache_dir() / f"kernels-{FORMAT}.json"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_key(dtype: torch.dtype, out_features: int, in_features: int) -> str:
    return f"{_dtype_name(dtype)}:{out_features}x{in_features}"


def time_candidates(
    kernels: dict[str, Kernel], weight: Tensor, bias: Tensor | None, rows: int, seconds: float
) -> dict[str, float]:
    """Best time of one product of `rows` rows through each kernel, in seconds.

    Decoding reads every weight once per step, long after it left the caches, so the
    product is timed on copies of the weight that together exceed the last-level cache.
    The kernels take turns, so that a burst of other work slows them alike, and each keeps
    its best time.
    """
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    size = weight.numel() * weight.element_size()
    # Where a candidate packs, copies only: a packed copy of the model's own weight would
    # outlive the measuring (and the largest weights would not be cloned for nothing).
    first = weight.clone() if PACKED & kernels.keys() else weight
    copies = [first] + [weight.clone() for _ in range(max(0, COLD_BYTES // size - 1))]
    for name, kernel in kernels.items():
        # First calls: the library's own set-up, and the packed copies (made outside the
        # timed calls).
        for w in copies if name in PACKED else copies[:1]:
            kernel(x, w, bias)
    best = dict.fromkeys(kernels, float("inf"))
    spent = 0.0
    runs = 0
    while runs < 3 or (spent < seconds * len(kernels) and runs < 50):
        w = copies[runs % len(copies)]
        for name, kernel in kernels.items():
            start = time.perf_counter()
            kernel(x, w, bias)
            took = time.perf_counter() - start
            best[name] = min(best[name], took)
            spent += took
        runs += 1
    return best


def choose(timings: dict[str, float], preferred: str = "linear", tie: float = 1.05) -> str:
    """The fastest candidate; `preferred` (the reference's own path: `linear` for products)
    on a near tie (within `tie`: 5% unless a choice needs more), so that noise never moves
    work off it for less. A packed weight is a second copy in memory: it must win by more
    than 5% too."""
    best = min(timings, key=timings.__getitem__)
    if preferred in timings and timings[preferred] <= timings[best] * tie:
        return preferred
    if best in PACKED:
        plain = [name for name in timings if name not in PACKED]
        if plain:
            runner_up = min(plain, key=timings.__getitem__)
            if timings[runner_up] <= timings[best] * 1.05:
                return runner_up
    return best


def _choices(rows: int, timings: dict[str, float]) -> dict[str, str]:
    """A bucket's cache entries: the fastest kernel, and where that one packs its weight,
    the fastest plain one under `<rows>:plain` (what steps outside beam search take)."""
    best = choose(timings)
    entry = {str(rows): best}
    if best in PACKED:
        entry[f"{rows}:plain"] = choose({n: t for n, t in timings.items() if n not in PACKED})
    return entry


def _rounded(found: dict[int | str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Timings as kept beside the choices: milliseconds, per bucket."""
    return {str(rows): {n: round(t * 1e3, 4) for n, t in f.items()} for rows, f in found.items()}


class KernelTable:
    """Choices per (dtype, shape): for each row bucket, the name of the fastest kernel.
    `busy`: the keys measured while other processes took the cores."""

    def __init__(self, choices: dict[str, dict[str, str]] | None = None,
                 busy: Iterable[str] = ()) -> None:
        self.choices: dict[str, dict[str, str]] = choices or {}
        self.timings: dict[str, dict[str, dict[str, float]]] = {}
        self.busy: set[str] = set(busy) & set(self.choices)

    def kernels(self, key: str) -> tuple[Choice, ...] | None:
        """(max rows, kernel, plain kernel) for a shape, smallest bucket first; None if
        unmeasured."""
        entry = self.choices.get(key)
        if not entry:
            return None
        buckets = sorted(int(rows) for rows in entry if rows.isdigit())
        return tuple(
            (rows, CANDIDATES[entry[str(rows)]],
             CANDIDATES[entry.get(f"{rows}:plain", entry[str(rows)])])
            for rows in buckets
        )

    def measure(
        self,
        key: str,
        weight: Tensor,
        bias: Tensor | None,
        buckets: Iterable[int],
        seconds: float = MEASURE_SECONDS,
        packed: Iterable[int] = (),
    ) -> None:
        """Time every usable candidate for each row bucket of one product and keep the
        fastest; `packed`: the buckets where a packed copy of the weight may be kept."""
        entry: dict[str, str] = {}
        timings: dict[int, dict[str, float]] = {}
        with torch.inference_mode():
            for rows in buckets:
                usable = {
                    name: kernel
                    for name, kernel in CANDIDATES.items()
                    if _usable(name, weight.dtype, rows, packed)
                }
                found = timings[rows] = time_candidates(usable, weight, bias, rows, seconds)
                entry.update(_choices(rows, found))
        self.choices[key] = entry
        self.timings[key] = _rounded(timings)

    def describe(self) -> list[str]:
        """One line per shape: the chosen kernel per row bucket."""
        def label(rows: str, name: str) -> str:
            if rows == "dtype":
                return f"in {name}"
            bucket, _, plain = rows.partition(":")  # "5:plain": outside beam search
            return f"{bucket} rows{' ' + plain if plain else ''}: {name}"

        return [
            f"{key}: {', '.join(label(rows, name) for rows, name in entry.items())}"
            for key, entry in sorted(self.choices.items())
        ]


_lock = threading.Lock()
_tables: dict[tuple[str, str], KernelTable] = {}  # per cache file and machine key

# Choices measured while other processes run are wrong for good (AMD EPYC Zen 3: tiny.en's
# float32 projection measured beside other work kept the full product, 3.2 ms a step,
# against 2.2 for its screen), so measurements watch the machine, and choices made on a
# busy one are measured again at the first start that finds it idle.
LOAD_SAMPLES = 5  # looks at the machine before trusting choices measured on a busy one


def others_running() -> int | None:
    """Threads of other processes running or ready to run now (Linux's procs_running,
    less this process's running threads); None where /proc does not tell."""
    try:
        # This process's running threads counted before and after the total, and the
        # larger count kept: a thread of ours that stops running between the reads (an
        # OpenMP thread going to sleep) must not pass for another process's.
        before = _own_running()
        with open("/proc/stat", encoding="ascii") as f:
            total = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
        own = max(before, _own_running())
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return max(0, total - own)


def _own_running() -> int:
    own = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii") as f:
                own += f.read().rpartition(")")[2].split()[0] == "R"
        except OSError:  # a thread that just ended
            continue
    return own


@dataclasses.dataclass(frozen=True)
class CpuMark:
    """Clock ticks spent so far on this process's CPUs (by anyone, or stolen by the
    hypervisor) and by this process, and when they were read."""

    busy: int
    own: int
    at: float


def cpu_mark() -> CpuMark | None:
    """The CPU time counters now; None where /proc does not tell."""
    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        busy = 0
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *ticks = line.split()
                if name in cpus:
                    # user nice system idle iowait irq softirq steal: all but idle, iowait
                    t = [int(x) for x in ticks[:8]]
                    busy += t[0] + t[1] + t[2] + t[5] + t[6] + t[7]
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        own = int(fields[11]) + int(fields[12])  # utime, stime of every thread
    except (OSError, AttributeError, ValueError, IndexError):
        return None
    return CpuMark(busy, own, time.monotonic())


def others_cores(since: CpuMark | None, now: CpuMark | None = None) -> float | None:
    """How many cores other processes (and the hypervisor) used on average from `since`
    to `now` (default: read now); None where /proc does not tell or no time passed."""
    now = now or cpu_mark()
    if since is None or now is None or now.at <= since.at:
        return None
    ticks = (now.busy - since.busy) - (now.own - since.own)
    return ticks / os.sysconf("SC_CLK_TCK") / (now.at - since.at)


# Other processes' average use (in cores) above the cores this process's threads leave
# free that counts as a busy machine. Measured on a 2-core EPYC VM over 0.3-1 s of
# kernel measurements at 2 threads: idle -0.04..0.07, one busy loop 0.53..0.80.
OTHERS_BUSY_CORES = 0.3
# The ticks of /proc/stat are sampled and this process's own are not: they part by up to
# two ticks (seen over 50 ms measurements: -2..+2), which a short measurement must not
# take for another process.
TICK_SLACK = 2


def others_took_cores(since: CpuMark | None, now: CpuMark | None = None,
                      cpus: int | None = None, threads: int | None = None) -> bool:
    """Whether other processes used cores that this process's `threads` need, on average
    from `since` to `now` (CPU time, not samples of who runs: this process's own threads
    come and go between reads of procs_running, and hid a busy loop from a sample now
    and then)."""
    now = now or cpu_mark()
    used = others_cores(since, now)
    if used is None or since is None or now is None:
        return False
    free = _free_cores(cpus, threads)
    slack = TICK_SLACK / os.sysconf("SC_CLK_TCK") / (now.at - since.at)
    return used - slack > free + OTHERS_BUSY_CORES


def _free_cores(cpus: int | None, threads: int | None) -> int:
    """The cores this process's `threads` (default: torch's count) leave free of its
    `cpus` (default: those it may run on)."""
    return max(0, (cpus or _usable_cpus()) - (threads or torch.get_num_threads()))


def _usable_cpus() -> int:
    """The CPUs this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def threads_left(others: int | None, threads: int, cpus: int | None = None) -> int:
    """How many of `threads` have a core to themselves while `others` threads of other
    processes run (at least one; all where that is unknown), of the `cpus` this process
    may run on (default: its affinity)."""
    if others is None:
        return threads
    return max(1, min(threads, (cpus or _usable_cpus()) - others))


def load_samples(count: int, gap: float) -> Iterator[int | None]:
    """`count` samples of `others_running`, `gap` seconds apart, taken as they are read."""
    for i in range(count):
        if i:
            time.sleep(gap)
        yield others_running()


def machine_busy(samples: Iterable[int | None], cpus: int | None = None,
                 threads: int | None = None) -> bool:
    """Whether other processes took cores this process's `threads` need, in most of the
    `samples` of `others_running` (unknown samples are left out, and none known is idle)."""
    free = _free_cores(cpus, threads)
    known = sorted(n for n in samples if n is not None)
    return bool(known) and known[len(known) // 2] > free


def _idle_now() -> bool:
    return not machine_busy(load_samples(LOAD_SAMPLES, 0.005))


def _read_cache(path: Path, key: str) -> KernelTable | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("ignoring the kernel cache %s (%s); measuring again", path, e)
        return None
    entry = data.get("machines", {}).get(key) if isinstance(data, dict) else None
    if entry is None:
        return None
    valid = (
        data.get("format") == FORMAT
        and isinstance(entry, dict)
        and all(_valid_entry(key, buckets) for key, buckets in entry.items())
    )
    if not valid:
        logger.warning("ignoring a stale kernel cache entry in %s; measuring again", path)
        return None
    busy = data.get("busy")
    busy = busy.get(key) if isinstance(busy, dict) else None
    return KernelTable(entry, busy=[k for k in busy if isinstance(k, str)]
                       if isinstance(busy, list) else ())


def _valid_entry(key: str, buckets: object) -> bool:
    if not isinstance(buckets, dict):
        return False
    names = CANDIDATES
    if key.startswith("encoder-attention:"):
        names = LONG_ATTENTION
    elif key.startswith("screen:"):
        names = SCREEN
    elif key.startswith("int8-decoder:"):
        names = quantize.STEP_KERNELS
    elif key.startswith("int8-rows:"):
        names = quantize.ROWS_KERNELS
    elif key.startswith("bfloat16-rows:"):
        names = ("float32", "bfloat16")
    elif key.startswith("fused:"):
        names = FUSED
    elif key.startswith("attention:"):
        names = ATTENTION
        if buckets.get("dtype") not in ATTENTION_DTYPES:
            return False

    def valid(rows: str, name: object) -> bool:
        if rows == "dtype":
            return names is ATTENTION
        if names is quantize.STEP_KERNELS or names is FUSED:  # one for every row count
            return rows == "all" and name in names
        if names is CANDIDATES and rows.endswith(":plain"):
            return rows[:-6].isdigit() and name in names and name not in PACKED
        return rows.isdigit() and name in names

    return all(valid(str(rows), name) for rows, name in buckets.items())


def _write_cache(path: Path, key: str, table: KernelTable) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            data = {}
    except (OSError, ValueError):
        data = {}
    machines = data.get("machines") if isinstance(data.get("machines"), dict) else {}
    machines[key] = table.choices
    busy = data.get("busy") if isinstance(data.get("busy"), dict) else {}
    busy = {k: v for k, v in busy.items() if k in machines and isinstance(v, list)}
    busy[key] = sorted(table.busy)
    data = {"format": FORMAT, "machines": machines,
            "busy": {k: v for k, v in busy.items() if v}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: the choices still hold for this process
        logger.warning("could not save the kernel choices to %s: %s", path, e)


def _linears(module: nn.Module) -> list[nn.Linear]:
    """The float linear layers of `module` on the CPU (int8 layers have kernels of their
    own)."""
    return [
        m
        for m in module.modules()
        if type(m) in (nn.Linear, TunedLinear) and m.weight.device.type == "cpu"
    ]


def _projection(model: nn.Module) -> tuple[nn.Module, Tensor] | None:
    """The decoder and its tied output projection's float CPU weight, if it has one."""
    decoder = getattr(model, "decoder", None)
    embedding = getattr(decoder, "token_embedding", None)
    if type(embedding) is nn.Embedding and embedding.weight.device.type == "cpu":
        return decoder, embedding.weight
    return None


Product = tuple[Tensor, "Tensor | None", tuple[int, ...], range]


def _products(model: nn.Module) -> dict[str, Product]:
    """Every distinct float product shape of `model` timed alone: key -> (weight, bias, row
    buckets, buckets that may keep a packed weight)."""
    found: dict[str, Product] = {}
    for module in _linears(model):
        w = module.weight
        key = shape_key(w.dtype, *w.shape)
        if key not in found:
            bias = None if module.bias is None else module.bias.detach()
            # Many rows (the encoder, prompts): the packed copy would only cost memory.
            found[key] = (w.detach(), bias, ENCODER_BUCKETS, range(0))
    if (projection := _projection(model)) is not None:
        w = projection[1].detach()
        found.setdefault(
            "projection:" + shape_key(w.dtype, *w.shape),
            (w, None, STEP_BUCKETS, PACKED_PROJECTION_ROWS),
        )
    return found


def table_for(model: nn.Module, path: Path | None = None) -> KernelTable:
    """The kernel choices for `model`'s products on this machine: from the cache file
    (default `cache_path()`), else measured now and saved there."""
    key = machine_key()
    path = path or cache_path()
    with _lock:
        table = _known(path, key)
        missing = {k: v for k, v in _products(model).items() if k not in table.choices}
        layers = _decoder_layers(model)
        refine = layers is not None and layers[0] not in table.choices
        attention = _attention_key(model)
        attend = attention is not None and attention not in table.choices
        encoder = _encoder_attention(model)
        encode = encoder is not None and encoder[0] not in table.choices
        screen = _screen_key(model)
        screen_missing = screen is not None and screen not in table.choices
        int8 = _int8_layers(model)
        int8_missing = int8 is not None and "all" not in table.choices.get(int8[0], {})
        rows_missing = {
            s for s in _int8_rows_shapes(model)
            if _int8_rows_key(*s) not in table.choices
            or shape_key(torch.float32, *s) not in table.choices
        } if quantize.fbgemm_built() else set()
        if (missing or refine or attend or encode or screen_missing or int8_missing
                or rows_missing):
            start = time.perf_counter()
            measured_before = set(table.choices)
            mark = cpu_mark()
            for name, (weight, bias, buckets, packed) in missing.items():
                table.measure(name, weight, bias, buckets, packed=packed)
            if rows_missing:
                _measure_int8_rows(table, rows_missing)
            # The measurements below run the decoder, whose audio keys and values are
            # products of 1500 rows: through the int8 rows kernel chosen here, not the
            # default, which without VNNI takes 0.44 s a call (base's first load under
            # `auto` on an AMD EPYC Zen 3 spent 15 of its 21 s there).
            _apply_int8_rows(model, table)
            if refine:
                _measure_decoder(model, table, *layers)
            if attend:
                _measure_attention(model, table, attention)
            if encode:
                _measure_encoder_attention(table, *encoder)
            if screen_missing:
                _measure_screen(model, table, screen)
            if int8_missing:
                _measure_int8(model, table, *int8)
            fresh = set(table.choices) - measured_before
            if others_took_cores(mark):
                table.busy |= fresh
                logger.warning(
                    "other processes used the cores while susurrus measured its matrix "
                    "kernels: the choices may be slow; they are measured again at a start "
                    "that finds the machine idle"
                )
            else:
                table.busy -= fresh
            logger.info(
                "measured %d product shapes in %.2f s: %s",
                len(missing),
                time.perf_counter() - start,
                "; ".join(table.describe()),
            )
            _write_cache(path, key, table)
        return table


def _known(path: Path, key: str) -> KernelTable:
    """The choices this process holds for a cache file and machine, read from the file
    the first time (empty when it has none). Call with `_lock` held."""
    table = _tables.get((str(path), key))
    if table is None:
        table = _read_cache(path, key) or KernelTable()
        if table.busy and _idle_now():
            logger.info("kernel choices in %s were measured on a busy machine; measuring "
                        "them again now that it is idle", path)
            for busy in table.busy:
                del table.choices[busy]
            table.busy = set()
        _tables[str(path), key] = table
    return table


def _decoder_layers(model: nn.Module) -> tuple[str, list[nn.Linear]] | None:
    """The decoder's float CPU linear layers and the key their joint measurement is
    cached under; None when there are none (an int8 decoder)."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "new_cache"):
        return None
    layers = _linears(decoder)
    # An int8 decoder's float layers (its audio projections, ComputePlan) are no step's.
    if not layers or any(isinstance(m, quantize.Int8Linear) for m in decoder.modules()):
        return None
    w = layers[0].weight
    return f"decoder:{_dtype_name(w.dtype)}:{w.shape[1]}x{len(layers)}", layers


def _time_steps(
    model: nn.Module,
    dtype: torch.dtype,
    candidates: Callable[[int], list[str]],
    install: Callable[[str], None],
    buckets: Iterable[int] = STEP_BUCKETS,
    logits: bool = False,
) -> dict[int, dict[str, float]]:
    """Best time of a whole decoder step for each row bucket and each of its candidates
    (`install(name)` routes the products through one), with packed weights allowed, and
    with the output projection if `logits`.

    Timed alone, one small product keeps the threads spinning and its weight in cache;
    inside a step, between attention and layer norms, it costs several times more, and
    the order of the candidates can change (base's 512x512 layers, one row, AMD EPYC:
    25 us alone, 86 us in a step through F.linear). So each candidate runs real steps
    of the decoder on random audio.
    """
    decoder = model.decoder
    n_state = decoder.positional_embedding.shape[1]
    found_by_rows: dict[int, dict[str, float]] = {}
    with torch.inference_mode():
        # One window's audio for every row (its beams, say): the attention costs the
        # same whichever kernel, and the memory stays small.
        # A step well into a window (position 40), or at the end of a small model's.
        n_ctx = min(48, decoder.positional_embedding.shape[0])
        position = max(0, n_ctx - 8)
        cache = decoder.new_cache(1, n_ctx=n_ctx)
        features = torch.randn(1, model.dims.n_audio_ctx, n_state, dtype=dtype)
        decoder.fill_cross_cache(cache, features)
        for rows in buckets:
            step_cache = decoder.new_cache(rows, n_ctx=n_ctx)
            step_cache.cross_k, step_cache.cross_v = cache.cross_k, cache.cross_v
            tokens = torch.zeros(rows, 1, dtype=torch.long)
            usable = candidates(rows)
            found = found_by_rows[rows] = dict.fromkeys(usable, float("inf"))
            # Candidates take turns (a burst of other work slows them alike), each
            # keeping its best step; the first round only warms up.
            for turn in range(DECODER_ROUNDS + 1):
                for name in usable:
                    install(name)
                    step_cache.length = position
                    start = time.perf_counter()
                    with packed_weights():
                        hidden = decoder(tokens, step_cache)
                        if logits:  # with the output projection
                            decoder.logits(hidden)
                    if turn:
                        found[name] = min(found[name], time.perf_counter() - start)
    return found_by_rows


def _measure_decoder(model: nn.Module, table: KernelTable, key: str, layers: list) -> None:
    """Choose the decoder layers' kernel per row bucket by timing whole decoder steps
    (_time_steps): the fastest takes every layer shape's bucket."""
    dtype = layers[0].weight.dtype
    saved = [(m, m.__class__, getattr(m, "kernel_choices", None)) for m in layers]

    def install(name: str) -> None:
        kernel = CANDIDATES[name]
        for m in layers:
            m.__class__ = TunedLinear
            m.kernel_choices = {dtype: ((1 << 30, kernel, kernel),)}

    try:
        found = _time_steps(
            model, dtype,
            lambda rows: [n for n in CANDIDATES if _usable(n, dtype, rows, PACKED_STEP_ROWS)],
            install,
        )
    finally:
        for m in layers:  # measured packed; kept only if chosen (made again on first use)
            _packs.pop(id(m.weight), None)
        for m, cls, choices in saved:
            m.__class__ = cls
            if choices is None:
                m.__dict__.pop("kernel_choices", None)
            else:
                m.kernel_choices = choices
    entry: dict[str, str] = {}
    for rows, timings in found.items():
        entry.update(_choices(rows, timings))
    table.choices[key] = entry
    table.timings[key] = _rounded(found)
    for m in layers:
        shape = table.choices.setdefault(shape_key(dtype, *m.weight.shape), {})
        shape.update(entry)


ENV_FORCE_INT8 = "SUSURRUS_INT8"
# Row counts an int8 decoder's step kernel is timed for: one window decoded alone, greedy
# and with beam search's five rows (the tool's usual work).
INT8_BUCKETS = (1, 5)
# The margin the weight-only kernel must win by: wider than the 5% of products, since the
# choice changes words; narrower than the attention's 10%, since these totals move by
# about 1.5% between fresh processes (EPYC: tiny.en's ratio 1.094-1.117 over 6 processes,
# base's 1.027-1.054), against the attention's 10%.
INT8_TIE = 1.075


def _int8_layers(model: nn.Module) -> tuple[str, list[quantize.Int8Linear]] | None:
    """An int8 CPU decoder's layers (its output projection aside: one large product,
    where FBGEMM wins) and the key their choice is cached under; None without them."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "new_cache") or not quantize.fbgemm_built():
        return None
    projection = getattr(decoder.token_embedding, "projection", None)
    layers = [
        m for m in decoder.modules()
        if isinstance(m, quantize.Int8Linear) and m is not projection
        and m.weight_int8.device.type == "cpu"
    ]
    if not layers:
        return None
    # The audio's attention in its own type makes a different step (int8 against auto);
    # the candidates are in the key, so that a cache measured without one (an older
    # version, a machine without a compiler then) is measured again once it can run.
    attention = _dtype_name(decoder.blocks[0].cross_attn.attention_dtype or torch.float32)
    names = "+".join(_int8_candidates())
    return f"int8-decoder:{attention}:{layers[0].in_features}x{len(layers)}:{names}", layers


def _int8_candidates() -> list[str]:
    """The step kernels this machine can run (quantize.STEP_KERNELS)."""
    usable = {"fbgemm": True, "int8pack": quantize.weight_only_supported(),
              "native": native.available()}
    return [name for name in quantize.STEP_KERNELS if usable[name]]


def _measure_int8(model: nn.Module, table: KernelTable, key: str, layers: list) -> None:
    """Choose the int8 decoder's step kernel by timing whole decoder steps through each,
    one row and five, and comparing the totals.

    One kernel serves every row count: the two round the activations differently, so
    mixing them (one for a beam window's one-row prompt pass, the other for its five-row
    steps) gave tiny.en's beam search on the synthetic reading 14.4% WER against 9.2 and
    9.9 with either alone. The choice changes a transcript's words now and then, not only
    its last digits (the weight-only kernel's are the closer to float32's: tiny.en's steps
    on real speech, teacher-forced, mean KL divergence 0.0008 against FBGEMM's 0.0019), so
    FBGEMM (what int8 had) stays unless the other is more than INT8_TIE faster. On the EPYC:
    tiny.en's totals 9-12% faster through the weight-only kernel (its long-form greedy run
    4-9%), base's 3-5% (FBGEMM stays)."""
    layers = [*layers, model.decoder.token_embedding.projection]  # it follows them
    saved = [m.step_kernel for m in layers]

    def install(name: str) -> None:
        for m in layers:
            m.step_kernel = name

    names = _int8_candidates()
    try:
        found = _time_steps(model, torch.float32, lambda rows: names, install, INT8_BUCKETS,
                            logits=True)
    finally:
        for m, name in zip(layers, saved):
            m.step_kernel = name
    totals = {name: sum(f[name] for f in found.values()) for name in names}
    table.choices[key] = {"all": choose(totals, preferred="fbgemm", tie=INT8_TIE)}
    table.timings[key] = _rounded({**found, "all": totals})


def _apply_int8(model: nn.Module, table: KernelTable | None,
                found: tuple[str, list[quantize.Int8Linear]] | None) -> None:
    """The int8 decoder's step kernel: `found` is `_int8_layers(model)` as the model was
    measured (before the attention's type was chosen, which is in its key)."""
    if found is None:
        return
    key, layers = found
    name = forced(ENV_FORCE_INT8, quantize.STEP_KERNELS)
    if name is None and table is not None:
        name = table.choices.get(key, {}).get("all")
    if name not in _int8_candidates():
        if name is not None:
            logger.warning("the %s int8 step kernel cannot run here; using FBGEMM's", name)
        name = "fbgemm"
    for m in layers:
        m.step_kernel = name
    # The output projection takes the layers' kernel only if it is the native one: the
    # two others round the state to 8 bits, which FBGEMM's two-row product avoids.
    model.decoder.token_embedding.projection.step_kernel = (
        "native" if name == "native" else "fbgemm"
    )


ENV_FORCE_INT8_ROWS = "SUSURRUS_INT8_ROWS"
# A kernel slower than the best by this factor on its first call is not called again (the
# int8 product without VNNI takes a quarter of a second a call: three each would make the
# first load of base on such a CPU take 10 s).
ROWS_DROP = 2.0


def _int8_rows_key(out_features: int, in_features: int) -> str:
    return f"int8-rows:{out_features}x{in_features}"


def _int8_rows_shapes(model: nn.Module) -> set[tuple[int, int]]:
    """The shapes (out, in) of `model`'s int8 CPU layers, the output projection aside (its
    rows of every count go through FBGEMM: quantize.two_row_product)."""
    decoder = getattr(model, "decoder", None)
    projection = getattr(getattr(decoder, "token_embedding", None), "projection", None)
    return {
        (m.out_features, m.in_features)
        for m in model.modules()
        if isinstance(m, quantize.Int8Linear) and m is not projection
        and m.weight_int8.device.type == "cpu"
    }


def _float_product(table: KernelTable | None, out_features: int, in_features: int,
                   honour_forced: bool = True) -> Kernel | None:
    """The float32 kernel measured fastest for many rows of this shape (what a dequantized
    int8 product runs through), or the one $SUSURRUS_KERNEL forces (`honour_forced`);
    None where unmeasured (F.linear)."""
    name = forced() if honour_forced else None
    if name is None and table is not None:
        entry = table.choices.get(shape_key(torch.float32, out_features, in_features), {})
        name = entry.get(str(ENCODER_BUCKETS[-1]))
    return CANDIDATES[name] if name is not None else None


def _measure_int8_rows(table: KernelTable, shapes: Iterable[tuple[int, int]]) -> None:
    """Choose each int8 shape's kernel for many rows (quantize.ROWS_KERNELS) by timing a
    product of the encoder's 1500 rows through each, on a random layer of that shape; the
    dequantized one through the float32 kernel measured for the shape (measured here first
    where the table has none)."""
    with torch.inference_mode():
        for out_features, in_features in sorted(shapes):
            weight = torch.randn(out_features, in_features)
            bias = torch.randn(out_features)
            floats = shape_key(torch.float32, out_features, in_features)
            if floats not in table.choices:
                table.measure(floats, weight, bias, ENCODER_BUCKETS)
            key = _int8_rows_key(out_features, in_features)
            if key in table.choices:
                continue
            layer = quantize.Int8Linear(weight, bias)
            # As measured, never forced: these choices are cached for unforced runs too.
            layer.float_product = _float_product(table, out_features, in_features,
                                                 honour_forced=False)
            rows = ENCODER_BUCKETS[-1]
            x = torch.randn(rows, in_features)
            kernels = {"int_mm": layer._per_row, "dequantized": layer._dequantized}
            first = {}
            for name, kernel in kernels.items():  # set-up calls, timed as an upper bound
                start = time.perf_counter()
                kernel(x)
                first[name] = time.perf_counter() - start
            best = dict(first)
            for _ in range(3):
                for name, kernel in kernels.items():
                    if first[name] > ROWS_DROP * min(first.values()):
                        continue  # far behind already: not worth its time again
                    start = time.perf_counter()
                    kernel(x)
                    best[name] = min(best[name], time.perf_counter() - start)
            # The float product keeps the activations unrounded: it wins ties.
            table.choices[key] = {str(rows): choose(best, preferred="dequantized")}
            table.timings[key] = _rounded({rows: best})


# $SUSURRUS_ENCODER: the encoder's layers in this type whatever was measured (comparisons).
ENV_FORCE_ENCODER = "SUSURRUS_ENCODER"
ENCODER_TYPES = ("float32", "bfloat16", "int8")
# How much faster than float32 bfloat16 products of many rows must be for the encoder to
# take them: they move its output by about 1.5% (tiny.en and base, 6 windows of en-long),
# so a near tie is not worth it (AMD EPYC Zen 4: 2.2x faster).
BFLOAT16_ROWS_TIE = 1.25


def _bfloat16_rows_key(out_features: int, in_features: int) -> str:
    return f"bfloat16-rows:{out_features}x{in_features}"


def _measure_bfloat16_rows(table: KernelTable, shapes: Iterable[tuple[int, int]]) -> None:
    """Time each shape's product of the encoder's 1500 rows in float32 and in bfloat16
    (both through F.linear, weights out of cache as a layer's are), and cache the faster
    type, float32 on a near tie (BFLOAT16_ROWS_TIE)."""
    rows = ENCODER_BUCKETS[-1]
    linear = {"float32": CANDIDATES["linear"]}  # named for the slot; either type goes
    with torch.inference_mode():
        for out_features, in_features in sorted(shapes):
            key = _bfloat16_rows_key(out_features, in_features)
            if key in table.choices:
                continue
            weights = {"float32": torch.randn(out_features, in_features)}
            weights["bfloat16"] = weights["float32"].bfloat16()
            best = dict.fromkeys(weights, float("inf"))
            for _ in range(2):  # the types take turns, as time_candidates' kernels do
                for name, weight in weights.items():
                    took = time_candidates(linear, weight, None, rows, MEASURE_SECONDS)
                    best[name] = min(best[name], took["float32"])
            table.choices[key] = {str(rows): choose(best, "float32", BFLOAT16_ROWS_TIE)}
            table.timings[key] = _rounded({rows: best})


def encoder_type(encoder: nn.Module, own: torch.dtype) -> torch.dtype | None:
    """The type `encoder`'s layers run fastest in on this CPU, its residual stream staying
    `own` (float32): bfloat16 where the CPU computes in it natively and every shape's
    products of many rows measure faster so (closer to float32 than int8: its weights keep
    16 bits and its activations are not rounded per row); else None (int8) where every
    int8 product measures faster than float32's; else `own`. Measured once, cached.
    $SUSURRUS_ENCODER forces one of ENCODER_TYPES."""
    name = forced(ENV_FORCE_ENCODER, ENCODER_TYPES)
    if name is not None:
        return None if name == "int8" else ATTENTION_DTYPES[name]
    shapes = {(m.out_features, m.in_features) for m in _linears(encoder)}
    if not shapes:
        return own
    with _lock:
        path, key = cache_path(), machine_key()
        table = _known(path, key)
        wanted = [_int8_rows_key, lambda o, i: shape_key(torch.float32, o, i)]
        if quantize.native_bfloat16():
            wanted.append(_bfloat16_rows_key)
        if any(k(*shape) not in table.choices for k in wanted for shape in shapes):
            try:
                _measure_int8_rows(table, shapes)
                if quantize.native_bfloat16():
                    _measure_bfloat16_rows(table, shapes)
            except (RuntimeError, ValueError) as e:
                # A candidate that cannot run here: the model still loads, in its own type.
                logger.warning("could not measure the encoder's products (%s); keeping %s",
                               e, _dtype_name(own))
                return own
            _write_cache(path, key, table)
    bucket = str(ENCODER_BUCKETS[-1])
    if quantize.native_bfloat16() and all(
        table.choices[_bfloat16_rows_key(*s)][bucket] == "bfloat16" for s in shapes
    ):
        return torch.bfloat16
    if all(table.choices[_int8_rows_key(*s)][bucket] == "int_mm" for s in shapes):
        return None
    return own


def _apply_int8_rows(model: nn.Module, table: KernelTable | None) -> None:
    """The many-row kernel of each int8 layer as measured per shape; for the decoder's
    sequences (a prompt's pass, the audio's keys and values once a window) the float
    product of the dequantized weight, whatever was measured (its steps of many rows, 64
    and more, keep the measured one: a weight's copy every step would cost).

    The decoder's products of many rows set what every step of the window reads, and
    rounding their activations to 8 bits (PyTorch's int8 product) cost words: base under
    `auto` on an AMD EPYC Zen 4, teacher-forced on 7 windows of en-long, mean KL divergence
    from float32 0.0012 with them rounded, 0.0003 not (549 of 551 next tokens agreeing
    instead of 547); en-long WER greedy 3.11 -> 2.52 (float32's), beam 5 2.72 -> 2.33
    (float32 2.14), at the same speed (they are a small part of a window's time)."""
    name = forced(ENV_FORCE_INT8_ROWS, quantize.ROWS_KERNELS)
    choices = table.choices if table is not None else {}
    decoder = getattr(model, "decoder", None)
    projection = getattr(getattr(decoder, "token_embedding", None), "projection", None)
    in_decoder = {id(m) for m in decoder.modules()} if decoder is not None else set()
    for m in model.modules():
        if isinstance(m, quantize.Int8Linear) and m.weight_int8.device.type == "cpu":
            entry = choices.get(_int8_rows_key(m.out_features, m.in_features), {})
            m.rows_kernel = name or entry.get(str(ENCODER_BUCKETS[-1]), "int_mm")
            sequences = id(m) in in_decoder and m is not projection and name is None
            m.sequence_kernel = "dequantized" if sequences else None
            m.float_product = _float_product(table, m.out_features, m.in_features)


def _attention_key(model: nn.Module) -> str | None:
    """The key a CPU decoder's attention choice is cached under: the type its attention
    asks for and its shapes; None for a model without one."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "new_cache"):
        return None
    pe = decoder.positional_embedding
    if pe.device.type != "cpu":
        return None
    attn = decoder.blocks[0].cross_attn
    asked = attn.attention_dtype or pe.dtype
    # With the kernels timed: a cache measured without one is measured again once it runs.
    return (
        f"attention:{_dtype_name(asked)}:{pe.shape[1]}x{attn.n_head}x{len(decoder.blocks)}"
        f":{model.dims.n_audio_ctx}:{'+'.join(_step_attention_kernels())}"
    )


def _encoder_attention(model: nn.Module) -> tuple[str, tuple[int, ...], torch.dtype] | None:
    """The key the encoder's attention choice is cached under, with the shape (batch,
    heads, frames, head_dim) and type of its queries; None for a model without a CPU
    encoder."""
    encoder = getattr(model, "encoder", None)
    pe = getattr(encoder, "positional_embedding", None)
    if pe is None or pe.device.type != "cpu" or not len(encoder.blocks):
        return None
    block = encoder.blocks[0]
    attn = block.attn
    # Queries come out of the block's layers in their type (int8 ones: the stream's).
    fc = block.mlp[0]
    produced = fc.weight.dtype if isinstance(fc, nn.Linear) else pe.dtype
    dtype = attn.attention_dtype or produced
    frames, n_state = pe.shape
    shape = (1, attn.n_head, frames, n_state // attn.n_head)
    return f"encoder-attention:{_dtype_name(dtype)}:{'x'.join(map(str, shape[1:]))}", shape, dtype


def _measure_encoder_attention(
    table: KernelTable, key: str, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """Choose the encoder's attention kernel by timing one layer's attention of random
    queries, keys and values through each candidate (SDPA on a near tie)."""
    found = dict.fromkeys(LONG_ATTENTION, float("inf"))
    with torch.inference_mode():
        q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
        for turn in range(4):  # taking turns; the first round only warms up
            for name, kernel in LONG_ATTENTION.items():
                start = time.perf_counter()
                kernel(q, k, v)
                if turn:
                    found[name] = min(found[name], time.perf_counter() - start)
    table.choices[key] = {"1": choose(found, preferred="sdpa")}
    table.timings[key] = _rounded({1: found})


def _apply_encoder_attention(model: nn.Module, table: KernelTable | None) -> None:
    if (encoder := _encoder_attention(model)) is None:
        return
    entry = table.choices.get(encoder[0]) if table is not None else None
    name = (entry or {}).get("1", "sdpa")
    kernel = None if name == "sdpa" else LONG_ATTENTION[name]
    for block in model.encoder.blocks:
        block.attn.long_kernel = kernel


def _set_attention(decoder: nn.Module, dtype: torch.dtype | None, kernel) -> None:
    """The decoder's attention of the audio in `dtype` (None: as it is), every decoder
    step's attention through `kernel` (None: SDPA).

    Its own keys (self-attention) stay in the model's type under bfloat16: at most 448
    positions, a narrow type saves little there, and each new key length would make
    oneDNN build and keep a bfloat16 product of its own (a long file with beam 5: 500 MB
    more). float16 beside float32 is a type of storage only (the arithmetic stays
    float32, the native kernel widening as it reads): both kinds of keys take it."""
    own = decoder.positional_embedding.dtype
    storage = dtype == torch.float16 and own == torch.float32
    for block in decoder.blocks:
        if dtype is not None:
            block.attn.attention_dtype = dtype if storage else None
            block.cross_attn.attention_dtype = None if dtype == own else dtype
        block.attn.step_kernel = block.cross_attn.step_kernel = kernel


def _measure_attention(model: nn.Module, table: KernelTable, key: str) -> None:
    """Choose the type of the decoder's attention of the audio and the kernel of its
    steps by timing whole decoder steps through each kernel (_step_attention_kernels):
    the type the compute plan asks for (bfloat16 keys and values under `auto`) against
    the model's own, for one window and for windows side by side (see
    choose_attention)."""
    from .engine.step import Run, decoder_step  # the engine's step is what is timed

    decoder = model.decoder
    own = decoder.positional_embedding.dtype
    asked = decoder.blocks[0].cross_attn.attention_dtype or own
    saved = [
        (m, m.attention_dtype, m.step_kernel)
        for block in decoder.blocks
        for m in (block.attn, block.cross_attn)
    ]
    n_state = decoder.positional_embedding.shape[1]
    # A step well into a window (as _measure_decoder's), fitted to a small model's context.
    n_ctx = min(48, decoder.positional_embedding.shape[0])
    timings: dict[str, dict[str, float]] = {}
    try:
        with torch.inference_mode():
            for dtype in dict.fromkeys((asked, own)):
                for rows in ATTENTION_BUCKETS:
                    found = timings.setdefault(str(rows), {})
                    _set_attention(decoder, dtype, None)
                    cache = decoder.new_cache(rows, n_ctx=n_ctx)
                    features = torch.randn(rows, model.dims.n_audio_ctx, n_state, dtype=own)
                    decoder.fill_cross_cache(cache, features)
                    tokens = torch.zeros(rows, 1, dtype=torch.long)
                    # One row: the engine's step at one position; several: rows at
                    # different positions, the engine's masked step.
                    same = n_ctx - 8 if rows == 1 else None
                    positions = torch.arange(n_ctx - rows, n_ctx) if rows > 1 else torch.tensor(
                        [same]
                    )
                    run = (Run(0, rows, 0, rows, 1),)
                    # Kernels take turns (a burst of other work slows them alike).
                    for turn in range(DECODER_ROUNDS + 1):
                        for name in _step_attention_kernels():
                            _set_attention(decoder, dtype, ATTENTION[name])
                            label = f"{_dtype_name(dtype)}/{name}"
                            start = time.perf_counter()
                            decoder_step(
                                decoder, tokens, positions, cache.self_k, cache.self_v,
                                cache.cross_k, cache.cross_v, run, same,
                            )
                            took = time.perf_counter() - start
                            if turn:
                                found[label] = min(found.get(label, float("inf")), took)
    finally:
        for m, dtype, kernel in saved:
            m.attention_dtype, m.step_kernel = dtype, kernel

    table.choices[key] = choose_attention(timings, asked, own)
    table.timings[key] = _rounded(timings)


# The type decides a transcript's last digits (and, with int8, now and then a word), so
# a choice that noise can flip would give one machine different results per fresh cache
# (so does an int8 decoder's step kernel: INT8_TIE).
# On the EPYC, base's totals of the two types came within 0-4% of each other in three
# fresh processes, and more than 5% apart the other way in a fourth (which took float32):
# timings there move by up to 10% between processes.
ATTENTION_TIE = 1.10


def choose_attention(
    timings: dict[str, dict[str, float]], asked: torch.dtype, own: torch.dtype
) -> dict[str, str]:
    """From step times per bucket ({rows: {"dtype/kernel": time}}): the type whose steps
    through its fastest kernel take the least total time, the asked one on a near tie
    (ATTENTION_TIE: it halves the memory of the audio's keys); then that type's fastest
    kernel over all buckets (the two products, STEP_ATTENTION, on a near tie), the
    kernel of every bucket: a window's numbers never depend on how many step beside it."""

    def totals(dtype: torch.dtype) -> dict[str, float]:
        prefix = f"{_dtype_name(dtype)}/"
        names = {label[len(prefix):] for found in timings.values() for label in found
                 if label.startswith(prefix)}
        return {name: sum(found[prefix + name] for found in timings.values())
                for name in names if all(prefix + name in found for found in timings.values())}

    by_type = {d: totals(d) for d in dict.fromkeys((asked, own))}
    best = {d: min(found.values()) for d, found in by_type.items()}
    chosen = asked if best[asked] <= best[own] * ATTENTION_TIE else own
    kernel = choose(by_type[chosen], preferred=STEP_ATTENTION)
    return {"dtype": _dtype_name(chosen), **{rows: kernel for rows in timings}}


def _apply_attention(
    model: nn.Module, entry: dict[str, str] | None, forced_name: str | None
) -> None:
    if forced_name is not None:
        _set_attention(model.decoder, None, ATTENTION[forced_name])
    elif entry is not None:
        # Every bucket names the same kernel (choose_attention).
        name = next((v for k, v in entry.items() if k != "dtype"), STEP_ATTENTION)
        _set_attention(model.decoder, ATTENTION_DTYPES[entry["dtype"]], ATTENTION[name])


# Whole decoding steps: as chosen part by part above, or every part through the native
# kernels and the step in one native call (engine/native_step.py). Each part is timed in
# PyTorch's loop, where a call costs its thread wake-ups; the native step saves those, so
# a part a little slower alone can make the faster step (AMD EPYC Zen 4, base under
# `auto`: the audio's attention measured faster in bfloat16 through PyTorch, yet the
# step through the loop took 12.6 s of en-long greedy against 8.7 s all native).
FUSED = ("chosen", "fused")
# The native step is the more exact too (no activation rounded to 8 bits, the audio's
# attention in float32), so it keeps a near tie.
FUSED_TIE = 1.05
FUSED_BUCKETS = (1, 5)  # greedy and beam search's rows


def _fused_key(model: nn.Module) -> str | None:
    """The key the choice between the chosen parts and the native step is cached under:
    the attention's and the layers' keys; None where no native step can run."""
    from .engine import native_step

    decoder = getattr(model, "decoder", None)
    if (decoder is None or not hasattr(decoder, "new_cache") or not native_step.ENABLED
            or not native_step.shaped(decoder) or (attention := _attention_key(model)) is None):
        return None
    layers = _int8_layers(model) or _decoder_layers(model)
    return None if layers is None else f"fused:{attention}|{layers[0]}"


def _native_parts(decoder: nn.Module, asked: torch.dtype | None) -> Callable[[], None]:
    """Route every part of `decoder`'s steps through the native kernels (the audio's
    keys in float16 where the plan `asked` for it, which the kernel reads, else in
    float32); returns what puts the previous choices back."""
    saved_attention = [(m, m.attention_dtype, m.step_kernel)
                       for block in decoder.blocks for m in (block.attn, block.cross_attn)]
    int8 = [m for m in decoder.modules() if isinstance(m, quantize.Int8Linear)]
    saved_int8 = [(m, m.step_kernel) for m in int8]
    floats = [m for m in decoder.modules() if isinstance(m, TunedLinear)]
    saved_float = [(m, dict(m.kernel_choices)) for m in floats]
    own = decoder.positional_embedding.dtype
    _set_attention(decoder, torch.float16 if asked == torch.float16 else own, ATTENTION["native"])
    for m in int8:
        m.step_kernel = "native"
    native_kernel = CANDIDATES["native"]
    for m in floats:
        pairs = m.kernel_choices.get(torch.float32)
        if pairs is not None:
            m.kernel_choices[torch.float32] = tuple(
                (rows, native_kernel, native_kernel) if rows <= SPLIT_ROWS else (rows, k, p)
                for rows, k, p in pairs
            )

    def restore() -> None:
        for m, dtype, kernel in saved_attention:
            m.attention_dtype, m.step_kernel = dtype, kernel
        for m, name in saved_int8:
            m.step_kernel = name
        for m, choices in saved_float:
            m.kernel_choices = choices

    return restore


def _measure_fused(model: nn.Module, asked: torch.dtype | None) -> dict[str, float]:
    """Total time of decoding steps (with the output projection) over FUSED_BUCKETS rows,
    as chosen and all native (`_native_parts`), taking turns."""
    from .engine.step import Run, decoder_step

    decoder = model.decoder
    n_state = decoder.positional_embedding.shape[1]
    n_ctx = min(48, decoder.positional_embedding.shape[0])
    totals = dict.fromkeys(FUSED, 0.0)
    with torch.inference_mode():
        # One window's audio for every bucket, its keys and values in each type the
        # attention asks for (made once per type).
        cross = decoder.new_cache(1, n_ctx=n_ctx)
        decoder.fill_cross_cache(cross, torch.randn(1, model.dims.n_audio_ctx, n_state))
        audio: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}

        def keys_values() -> tuple[list[Tensor], list[Tensor]]:
            dtype = (decoder.blocks[0].cross_attn.attention_dtype
                     or decoder.positional_embedding.dtype)
            if dtype not in audio:
                audio[dtype] = ([k.to(dtype) for k in cross.cross_k],
                                [v.to(dtype) for v in cross.cross_v])
            return audio[dtype]

        for rows in FUSED_BUCKETS:
            cache = decoder.new_cache(rows, n_ctx=n_ctx)
            tokens = torch.zeros(rows, 1, dtype=torch.long)
            positions = torch.full((rows,), n_ctx - 8)
            run = (Run(0, rows, 0, 1, rows),)  # one window's rows (its beams)
            best = dict.fromkeys(FUSED, float("inf"))
            for turn in range(DECODER_ROUNDS + 1):
                for name in FUSED:
                    restore = _native_parts(decoder, asked) if name == "fused" else None
                    try:
                        ck, cv = keys_values()
                        start = time.perf_counter()
                        with packed_weights():
                            decoder_step(decoder, tokens, positions, cache.self_k,
                                         cache.self_v, ck, cv, run, n_ctx - 8)
                        took = time.perf_counter() - start
                    finally:
                        if restore is not None:
                            restore()
                    if turn:
                        best[name] = min(best[name], took)
            for name in FUSED:
                totals[name] += best[name]
    return totals


def _apply_fused(model: nn.Module, table: KernelTable | None, key: str | None,
                 asked: torch.dtype | None) -> None:
    """Measure (once per machine, cached) whether `model`'s decoding steps run faster all
    native than as their parts were chosen, and route them so if they do. `key`:
    `_fused_key(model)`, and `asked` the type the plan asked for the audio's keys, both
    as before the attention's type was chosen."""
    if table is None or any(forced(v, n) for v, n in (
        (ENV_FORCE, CANDIDATES), (ENV_FORCE_ATTENTION, ATTENTION),
        (ENV_FORCE_INT8, quantize.STEP_KERNELS),
    )):
        return
    from .engine import native_step

    if key is None:
        return
    decoder = model.decoder
    with packed_weights():  # as beam search's steps run (greedy ones never pack)
        if all(native_step.plan(decoder, rows) is not None for rows in FUSED_BUCKETS):
            return  # the parts chosen are the native ones already
    with _lock:
        if key not in table.choices:
            mark = cpu_mark()
            totals = _measure_fused(model, asked)
            chosen = "fused" if totals["fused"] <= totals["chosen"] * FUSED_TIE else "chosen"
            table.choices[key] = {"all": chosen}
            table.timings[key] = _rounded({"all": totals})
            if others_took_cores(mark):
                table.busy.add(key)
            else:
                table.busy.discard(key)
            logger.info("decoding steps %s: %s", key, "; ".join(
                f"{name} {1e3 * t:.2f} ms" for name, t in totals.items()))
            _write_cache(cache_path(), machine_key(), table)
    if table.choices[key].get("all") == "fused":
        _native_parts(decoder, asked)  # the int8 output projection among them


# Greedy float32 steps: the whole projection, or its int8 screen (see screen.py).
SCREEN = ("full", "screen")
ENV_FORCE_SCREEN = "SUSURRUS_SCREEN"
SCREEN_DEFERRED_ROWS = 64  # the deferred normalisers' product is timed at this many rows


def _screen_key(model: nn.Module) -> str | None:
    """The key of the screen's choice, for a float32 projection that can have one."""
    projection = _projection(model)
    if projection is None or not screening.supported():
        return None
    w = projection[1]
    if w.dtype != torch.float32 or w.shape[0] <= screening.ORDINARY_TOKENS:
        return None
    return "screen:" + shape_key(w.dtype, *w.shape)


def _measure_screen(model: nn.Module, table: KernelTable, key: str) -> None:
    """Time a greedy step's projection both ways: the float32 product of one row, against
    the screen's int8 product plus its share of the deferred float32 product (one row of
    `SCREEN_DEFERRED_ROWS`). The screen's refinement of a few tokens is left out: on
    random activations every token is a candidate, which real ones never make."""
    _, w = _projection(model)
    pairs = table.kernels("projection:" + shape_key(w.dtype, *w.shape))
    if pairs is None:
        return

    def product(hidden: Tensor, weight: Tensor) -> Tensor:
        return pick(pairs, hidden.shape[0])(hidden, weight, None)

    with torch.inference_mode():
        try:
            screen = screening.LogitScreen(w, product=product)
            screen.approximate(torch.randn(1, w.shape[1]))
        except RuntimeError as e:  # a build without the int8 kernel's bfloat16 path
            logger.info("no logit screen here (%s)", e)
            table.choices[key] = {"1": "full"}
            return
        # Taking turns (time_candidates): the full product's read evicts the screen's
        # weights, as a decoding step's other layers do.
        best = time_candidates(
            {"full": lambda x, weight, bias: product(x, weight),
             "screen": lambda x, weight, bias: screen.approximate(x)},
            w, None, 1, MEASURE_SECONDS,
        )
        deferred = time_candidates({"deferred": lambda x, weight, bias: product(x, weight)},
                                   w, None, SCREEN_DEFERRED_ROWS, MEASURE_SECONDS)
        best["screen"] += deferred["deferred"] / SCREEN_DEFERRED_ROWS
    table.choices[key] = {"1": choose(best, preferred="full")}
    table.timings[key] = _rounded({1: best})


def _apply_screen(model: nn.Module, table: KernelTable | None) -> None:
    """Give the decoder its logit screen where it was measured faster (or is forced)."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "screen"):
        return
    decoder.screen = None
    key = _screen_key(model)
    if key is None:
        return
    name = forced(ENV_FORCE_SCREEN, SCREEN)
    if name is None and table is not None:
        name = table.choices.get(key, {}).get("1")
    if name == "screen":
        decoder.screen = screening.LogitScreen(decoder.token_embedding.weight,
                                               product=decoder.project)


class TunedLinear(nn.Linear):
    """nn.Linear whose CPU products go through the kernel measured fastest for their rows."""

    kernel_choices: dict[torch.dtype, tuple[Choice, ...]]

    def forward(self, x: Tensor) -> Tensor:
        pairs = self.kernel_choices.get(x.dtype) if x.device.type == "cpu" else None
        if pairs is None or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return pick(pairs, x.numel() // x.shape[-1])(x, self.weight, self.bias)


def pick(choices: tuple[Choice, ...], rows: int) -> Kernel:
    """The kernel of the smallest bucket that holds `rows` (else of the largest): the
    fastest, or within `packed_weights` only, the fastest plain one."""
    for choice in choices:
        if rows <= choice[0]:
            break
    return choice[1] if _packing.get() else choice[2]


class TunedProjection:
    """The decoder's output projection (tied to the token embedding) through the kernel
    measured fastest for its rows."""

    def __init__(self, pairs: dict[torch.dtype, tuple[Choice, ...]]) -> None:
        self.pairs = pairs

    def __call__(self, hidden: Tensor, weight: Tensor) -> Tensor:
        pairs = self.pairs.get(hidden.dtype) if hidden.device.type == "cpu" else None
        if pairs is None or hidden.dtype != weight.dtype:
            return hidden @ weight.to(hidden.dtype).T
        return pick(pairs, hidden.numel() // hidden.shape[-1])(hidden, weight, None)


def forced(variable: str = ENV_FORCE, names: Iterable[str] = CANDIDATES) -> str | None:
    """The kernel that $SUSURRUS_KERNEL forces for every product, or $SUSURRUS_ATTENTION
    for every decoding step's attention (tests, comparisons)."""
    name = os.environ.get(variable, "").strip()
    if not name:
        return None
    if name not in names:
        raise SusurrusError(f"{variable}={name!r}: choose one of {', '.join(names)}")
    return name


def tune(model: nn.Module) -> KernelTable | None:
    """Route `model`'s float CPU products through the kernels measured fastest here.

    Safe to call again after the model is cast (new dtypes are measured); products on
    other devices keep F.linear. Returns the table used (None when a kernel is forced).
    """
    name = forced()
    attention = forced(ENV_FORCE_ATTENTION, ATTENTION)
    table = None
    if name is None or attention is None:
        try:
            table = table_for(model)
        except (RuntimeError, ValueError) as e:
            # A shape or build the candidates cannot run: the plain products still can.
            logger.warning("could not measure the matrix-product kernels (%s); using F.linear", e)
            return None

    def pairs_for(key: str) -> tuple[Choice, ...] | None:
        if name is not None:
            return ((1, CANDIDATES[name], CANDIDATES[name]),)
        return table.kernels(key)

    for module in _linears(model):
        w = module.weight
        pairs = pairs_for(shape_key(w.dtype, *w.shape))
        if pairs is not None:
            choices = dict(getattr(module, "kernel_choices", {}))
            choices[w.dtype] = pairs
            module.__class__ = TunedLinear
            module.kernel_choices = choices
    if (projection := _projection(model)) is not None:
        decoder, w = projection
        pairs = pairs_for("projection:" + shape_key(w.dtype, *w.shape))
        if pairs is not None:
            old = getattr(decoder, "project", None)
            merged = dict(old.pairs) if isinstance(old, TunedProjection) else {}
            merged[w.dtype] = pairs
            decoder.project = TunedProjection(merged)
    # The keys that name the attention's type, as measured: what the plan asked for, which
    # choosing the type changes.
    int8, fused = _int8_layers(model), _fused_key(model)
    decoder = getattr(model, "decoder", None)
    asked = decoder.blocks[0].cross_attn.attention_dtype if fused is not None else None
    if (key := _attention_key(model)) is not None:
        _apply_attention(model, table.choices.get(key) if table else None, attention)
    _apply_encoder_attention(model, table)
    _apply_screen(model, table)
    _apply_int8(model, table, int8)
    _apply_int8_rows(model, table)
    _apply_fused(model, table, fused, asked)
    return table
