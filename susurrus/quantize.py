"""Compute types: float32, float16, bfloat16, and int8 weights for the linear layers.

int8 stores every linear layer's weight (and the output projection, tied to the token
embedding) as int8 with one float scale per output row: a quarter of the float32 bytes. On
the CPU the matrix products run in int8 kernels with the activations quantized on the fly,
each row on its own scale (FBGEMM's `quantized::linear_dynamic` for decoding steps, with the
rows brought to one range first); decoding one token is bound by memory
bandwidth, so reading 4x fewer weight bytes is most of the gain. Elsewhere (CUDA) the weight
is dequantized just before the product: the memory saving stays, the speed is the float one.
`auto` on a CPU with native bfloat16 keeps the encoder out of int8 (see resolve_compute_type).
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .compute_types import COMPUTE_TYPES  # noqa: F401 (part of this module's API)
from .errors import SusurrusError

PER_ROW_MIN_ROWS = 64  # inputs with this many rows (encoder, prompts) get per-row scales
FLOAT_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The kernels of a decoding step's int8 products (a few rows), chosen by measurement
# (kernels.py): FBGEMM's dynamic kernel (activations rounded to 8 bits per row), or the
# weight-only int8 kernel on bfloat16 activations. The second costs far less per call
# where the CPU computes bfloat16 natively (one row of tiny's 1152x384, Zen 4: 10 against
# 25 us), but falls behind FBGEMM for several rows of the larger layers (five rows of
# base's 2048x512: 62 against 33 us). Or the hand-written kernel (native.py) on float32
# activations, the weight alone rounded, where it builds: on an AMD EPYC Zen 3 it streams
# the weights at 17-25 GB/s against the weight-only kernel's 10-19 (base's 2048x512, hot
# cache, one row: 31 against 61 us; five rows: 90 against 217).
STEP_KERNELS = ("fbgemm", "int8pack", "native")
# The kernels of an int8 layer's products of many rows (the encoder's 1500 frames, prompt
# passes), chosen per shape by measurement (kernels.py): PyTorch's int8 matrix product on
# activations rounded to 8 bits per row, or the float32 product of the weight dequantized
# for the call. The first is the faster where the CPU multiplies int8 natively (VNNI); on
# an AMD EPYC Zen 3 (AVX2 only) it takes 218 ms for 1500 rows of tiny's 1152x384, the
# second 7.5 ms (and keeps the activations unrounded).
ROWS_KERNELS = ("int_mm", "dequantized")


class ComputePlan(NamedTuple):
    """How a compute type is laid out over the model."""

    dtype: torch.dtype  # the float type of the weights and activations
    int8: bool  # int8 weights for the linear layers
    attention_dtype: torch.dtype | None  # attention in this type instead (None: dtype)
    # The encoder's convolutions and linear layers in this type instead of int8, around a
    # residual stream kept in `dtype` (None: as the rest).
    encoder_dtype: torch.dtype | None = None
    # The encoder's layers in the type measured fastest on this CPU (kernels.encoder_type:
    # bfloat16 where the CPU computes in it, int8, or `dtype`) instead of int8.
    measure_encoder: bool = False
    # The decoder's keys and values (its own and the audio's) stored in this type, the
    # arithmetic still `dtype`'s (float16 on the CPU: half a window's memory, widened as
    # the native attention reads them; kernels.py times it against float32 keys).
    cache_dtype: torch.dtype | None = None
    # The decoder's projections of the audio into keys and values left float under int8:
    # they run once a window (1500 frames, never in a step), and every step's attention
    # reads what they produce (tiny.en, 19 windows teacher-forced, mean KL divergence from
    # float32 0.00055 -> 0.00047; 4.7 MB more, base 9.4).
    float_audio_projections: bool = False


def resolve_compute_type(compute_type: str, device: torch.device) -> ComputePlan:
    """The plan for a compute type on a device.

    `default` keeps the reference behaviour (float16 on CUDA, float32 elsewhere); `auto` picks
    the fastest for the device: float16 on CUDA; on a CPU with bfloat16 matrix units (AMX)
    an int8 decoder with attention in bfloat16 and the encoder's layers in bfloat16,
    elsewhere an int8 decoder and an encoder in the type measured fastest. The float part
    of an int8 type is float32 on the CPU, since the int8 kernels take float32; there
    `int8_bfloat16` runs the attention in bfloat16 instead (on CPUs that have it natively:
    about 10% faster, slightly less accurate).

    Why the encoder leaves int8 under `auto`: its products have 1500 rows, where the CPU's
    bfloat16 matrix units (AMX) beat quantizing the activations per call by far: the base
    encoder takes about 0.11 s a window instead of 0.2 s, and its output is four times
    closer to float32's (the weights are bfloat16, not rounded to 8 bits). The decoder's
    one-token steps are bound by reading weights, where int8's quarter size wins. Without
    AMX the encoder's layers take the type measured fastest (kernels.encoder_type):
    bfloat16 where the CPU computes in it (AVX512-BF16: on an AMD EPYC Zen 4 its products
    of 1500 rows run 2.2x float32's, the encoder takes 130 ms a window instead of 206 for
    tiny.en), else int8 where its products measure faster (without VNNI they are many
    times slower: Zen 3, tiny.en, 3.6 s a window against 0.26 s in float32), else float32.
    The decoder's projections of the audio stay float32 there (`float_audio_projections`),
    which takes back what a bfloat16 encoder moves: teacher-forced on 19 windows of both
    long inputs, mean KL divergence from float32 0.00055 (tiny.en) and 0.00033 (base)
    before and after the two. The decoder keeps its keys and values in float16 where the
    native attention reads them (half their memory, the arithmetic float32): base with
    `--batch_size 8` peaked at 708-740 MB instead of 911 greedy, 809-827 instead of 1061
    with beam 5 (Zen 4, en-long/en-synth).
    """
    if compute_type not in COMPUTE_TYPES:
        raise SusurrusError(
            f"unknown compute type {compute_type!r}: choose one of {', '.join(COMPUTE_TYPES)}"
        )
    cuda = device.type == "cuda"
    if compute_type == "default":
        return ComputePlan(torch.float16 if cuda else torch.float32, False, None)
    if compute_type == "auto":
        if cuda:
            return ComputePlan(torch.float16, False, None)
        if device.type == "cpu" and bfloat16_tiles():
            return ComputePlan(torch.float32, True, torch.bfloat16, torch.bfloat16,
                               float_audio_projections=True)
        # Keys and values in float16 where the native attention reads them: a window's
        # audio takes 18 MB instead of 37 (base), eight windows side by side 148 MB less.
        keys = torch.float16 if native.available() else None
        return ComputePlan(torch.float32, True, None, None, measure_encoder=True,
                           cache_dtype=keys, float_audio_projections=True)
    if compute_type in FLOAT_TYPES:
        return ComputePlan(FLOAT_TYPES[compute_type], False, None)
    float_name = compute_type.partition("_")[2] or ("float16" if cuda else "float32")
    if cuda:
        return ComputePlan(FLOAT_TYPES[float_name], True, None)
    bf16_attention = float_name == "bfloat16" and device.type == "cpu" and native_bfloat16()
    return ComputePlan(torch.float32, True, torch.bfloat16 if bf16_attention else None)


def quantize_rows(weight: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output row: weight ~= int8 * scale[:, None].

    Done `chunk` rows at a time, so that a large matrix (the 51865-row embedding) never
    has a float32 copy in memory.
    """
    weight = weight.detach()
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], chunk):
        rows = weight[start : start + chunk].float()
        s = rows.abs().amax(dim=1).clamp_min(1e-12) / 127
        q[start : start + chunk] = torch.round(rows / s[:, None]).clamp_(-127, 127)
        scale[start : start + chunk] = s
    return q, scale


def native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bfloat16_tiles() -> bool:
    """Whether this CPU has bfloat16 matrix units (AMX): where products of many rows in
    bfloat16 beat int8 ones by far."""
    return "amx_bf16" in native.cpu_flags() and native_bfloat16()


@functools.cache
def fbgemm_built() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


@functools.cache
def weight_only_supported() -> bool:
    """Whether this build has the CPU's weight-only int8 kernel on bfloat16 activations."""
    try:
        torch._weight_int8pack_mm(
            torch.zeros(1, 64, dtype=torch.bfloat16),
            torch.zeros(8, 64, dtype=torch.int8),
            torch.ones(8, dtype=torch.bfloat16),
        )
    except (RuntimeError, AttributeError):
        return False
    return True


def _fbgemm_available(device: torch.device) -> bool:
    # Asked by every int8 layer on every step: the engine list is read once.
    return device.type == "cpu" and fbgemm_built()


@functools.cache
def has_vnni() -> bool:
    """Whether the CPU multiplies u8 x s8 into 32-bit sums without saturating (VNNI)."""
    return any(flag in native.cpu_flags() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


@functools.cache
def linear_dynamic():
    # The operator's overload itself: the overload packet's dispatch in Python costs a few
    # per cent of a decoding step's int8 products. Looked up on first use, as builds
    # without the quantized kernels lack it.
    return torch.ops.quantized.linear_dynamic.default


@functools.cache
def fbgemm_grid() -> tuple[Tensor, int]:
    """FBGEMM's grid for activations pinned to [-1, 1] (see `Int8Linear._per_row_fused`):
    its step, and the largest level either side of zero. Without VNNI FBGEMM keeps
    activations to 7 bits (reduce_range)."""
    qmax = 255 if has_vnni() else 127
    return torch.tensor(2 / qmax, dtype=torch.float32), qmax // 2


def two_row_product(x: Tensor, packed: object) -> tuple[Tensor, Tensor]:
    """`x` (rows, features) times FBGEMM's `packed` int8 weight with the activations kept
    to about 16 bits instead of 8, and the activations the product stands for.

    Each row is scaled to its largest magnitude and rounded to FBGEMM's grid for [-1, 1]
    (a row of +1 and -1 pins the range, so FBGEMM's own rounding changes nothing); what
    the rounding left goes in as a second row, scaled and rounded the same way. One call
    reads the weight once for both: on a decoding step, bound by reading the weight, the
    second row costs next to nothing."""
    step, levels = fbgemm_grid()
    rows = x.shape[0]
    # abs().amax() rather than vector_norm(inf): equal, and faster for several rows.
    top = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)
    unit = x / top
    high = torch.round(unit / step).clamp_(-levels, levels).mul_(step)
    left = unit - high
    top2 = left.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)
    low = torch.round(left / top2 / step).clamp_(-levels, levels).mul_(step)
    pin = Int8Linear._pin(x.shape[1])
    out = linear_dynamic()(torch.cat([high, low, pin]), packed, not has_vnni())
    product = out[rows : 2 * rows].mul_(top2).add_(out[:rows]).mul_(top)
    return product, (low * top2 + high) * top


def pack_fbgemm(weight_int8: Tensor, scale: Tensor) -> object:
    """FBGEMM's prepacked copy of int8 rows with per-row scales, for `linear_dynamic`."""
    zero = torch.zeros(weight_int8.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # The quantized-tensor constructors are marked deprecated; the kernels are not.
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(weight_int8, scale.double(), zero, 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (per-row scales) and a float bias.

    On the CPU the activations are quantized on the fly too, always per row (per audio
    frame, per prompt position, per decoding row), since one scale for them all would
    crush the quiet ones and tie each row's result to its neighbours: a product of many
    rows in int8 matrix products, the decoder's one new token per row per step through
    FBGEMM's fused kernel.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        q, scale = quantize_rows(weight)
        self._hold(q, scale, None if bias is None else bias.detach().float().clone())

    def _hold(self, weight_int8: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = weight_int8.shape
        self._packed = None  # FBGEMM's prepacked copy, made on first use with few rows
        self._scale_bf16: Tensor | None = None  # the weight-only kernel's scales
        self._rescale: Tensor | None = None  # float32 scales / bfloat16 ones
        # The kernel of decoding steps (STEP_KERNELS; kernels.py measures which): one for
        # every row count, so that a window's numbers depend neither on how many rows step
        # beside it nor, with beams, on its prompt's pass having had one row.
        self.step_kernel = "fbgemm"
        self.rows_kernel = "int_mm"  # of products of many rows (ROWS_KERNELS; kernels.py)
        # Of sequences (3-D inputs: a prompt's pass, the audio's frames) instead, where
        # set: a decoder's, whose activations stay unrounded there (kernels.py). A step of
        # many rows (2-D) keeps `rows_kernel`, as it would pay a weight's copy every step.
        self.sequence_kernel: str | None = None
        # The float32 kernel of the dequantized product of many rows, as measured for this
        # shape (kernels.py: oneDNN's on an AMD EPYC Zen 5, 2.1-2.9x MKL's F.linear for a
        # prompt's 180 rows); F.linear where unset.
        self.float_product: Callable[[Tensor, Tensor, Tensor | None], Tensor] | None = None

    @classmethod
    def stacked(cls, layers: list[Int8Linear]) -> Int8Linear:
        """One layer whose outputs are those of `layers` side by side, in one product.

        Rows are quantized independently, so the stacked layer gives exactly the separate
        layers' results; a missing bias becomes zeros.
        """
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        biases = [
            layer.bias if layer.bias is not None else layer.scale.new_zeros(layer.out_features)
            for layer in layers
        ]
        fused._hold(
            torch.cat([layer.weight_int8 for layer in layers]),
            torch.cat([layer.scale for layer in layers]),
            torch.cat(biases),
        )
        return fused

    def packed(self) -> object:
        """FBGEMM's prepacked copy of the weight, made on first use (the bias is added
        after the rows' scales are undone)."""
        if self._packed is None:
            self._packed = pack_fbgemm(self.weight_int8, self.scale)
        return self._packed

    def dequantized_weight(self) -> Tensor:
        """The weight in float32 (int8 times each row's scale), a fresh copy."""
        return self.weight_int8.float().mul_(self.scale[:, None])

    def _many_rows(self, x: Tensor) -> Tensor:
        kernel = self.sequence_kernel if x.dim() > 2 and self.sequence_kernel else self.rows_kernel
        if kernel == "dequantized":
            return self._dequantized(x)
        return self._per_row(x)

    def _dequantized(self, x: Tensor) -> Tensor:
        """The float32 product of the weight dequantized for this call only: a float copy
        kept would cost the memory int8 saves, and converting the weight is a small part
        of a product of many rows (tiny's 1152x384: 0.13 of 7.5 ms for 1500 rows)."""
        weight = self.dequantized_weight()
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] >= PER_ROW_MIN_ROWS:
            return (self.float_product or F.linear)(x, weight, self.bias)
        # A short prompt: MKL's sums for a few rows change with the thread count (which the
        # engine's thread policy changes with the load); weight-first products' do not.
        out = (weight @ rows.t()).t().contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def _per_row(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        # In place where it keeps the arithmetic: on the encoder's 1500 rows a fresh
        # (rows, features) temporary per element-wise step costs as much as the product.
        step = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127)
        q = torch.div(rows, step).round_().to(torch.int8)
        out = torch._int_mm(q, self.weight_int8.t()).float().mul_(step * self.scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _per_row_fused(self, rows: Tensor) -> Tensor:
        """Each row of `rows` (rows, features) quantized on its own scale, through FBGEMM's
        fused kernel.

        FBGEMM quantizes all rows of a call with one scale, taken from their joint range:
        a window's numbers would then depend on the windows decoded beside it (another
        user's audio, on a server). So each row is first divided by its own largest
        magnitude, and a row holding +1 and -1 pins the joint range to [-1, 1] whatever
        the rows: every row's rounding depends on that row alone, alone or in a batch.
        """
        if not has_vnni():
            # Without VNNI the u8 x s8 pair sums saturate at 16 bits unless the activations
            # keep to 7 bits (reduce_range), which costs accuracy: base's int8 WER on the
            # English dev files 3.69% against float32's 2.52 (AMD EPYC Zen 3). Each row goes
            # in as two instead (two_row_product), about 14 bits.
            out = two_row_product(rows, self.packed())[0]
        else:
            out = self._one_row_product(rows)
        if self.bias is not None:
            out.add_(self.bias)
        return out

    def _one_row_product(self, rows: Tensor, reduce_range: bool = False) -> Tensor:
        """`rows` times the weight through FBGEMM, each row pinned to the 8-bit grid on
        its own scale (7 bits with `reduce_range`), without the bias."""
        # abs().amax(), not vector_norm(inf): the same values, as fast for one row and
        # 3-9x faster for several (five rows of 2048: 3.2 against 28 us).
        top = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12)
        pinned = torch.cat([rows / top, self._pin(rows.shape[1])])
        return linear_dynamic()(pinned, self.packed(), reduce_range)[:-1].mul_(top)

    def _weight_only(self, rows: Tensor) -> Tensor:
        """The weight-only int8 kernel on bfloat16 activations: no rounding of the rows to 8
        bits, and each row on its own whatever its neighbours, like the fused path. The
        kernel takes its scales in bfloat16; the output is brought back to the exact
        float32 scales as it returns to float32 (with the bias, in one operation)."""
        if self._scale_bf16 is None:
            self._scale_bf16 = self.scale.bfloat16()
            self._rescale = self.scale / self._scale_bf16.float()
        out = torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight_int8, self._scale_bf16)
        if self.bias is not None:
            return torch.addcmul(self.bias, out, self._rescale)
        return out * self._rescale

    @staticmethod
    @functools.cache
    def _pin(features: int) -> Tensor:
        pin = torch.zeros(1, features)
        pin[0, 0], pin[0, 1] = 1.0, -1.0
        return pin

    def forward(self, x: Tensor) -> Tensor:
        if _fbgemm_available(x.device) and x.dtype == torch.float32:
            # Several positions per sequence (audio frames, a prompt) differ widely in scale:
            # the first position's outliers, or left padding, would crush the others under
            # one shared scale.
            several = x.dim() > 2 and x.shape[-2] > 1
            if several or x.numel() >= PER_ROW_MIN_ROWS * self.in_features:
                return self._many_rows(x)
            # A decoding step's rows come 2-D (engine/step.py): no reshapes there.
            rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
            # (A layer unpickled on a machine where the native kernels cannot build may
            # still name them: FBGEMM's path then.)
            if self.step_kernel == "native" and native.available():
                out = native.int8_rows_q16(rows, self.weight_int8, self.scale, self.bias)
            elif self.step_kernel == "int8pack":
                out = self._weight_only(rows)
            else:
                out = self._per_row_fused(rows)
            return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)
        # Dequantized in float32: a row's scale can be a float16 subnormal.
        weight = self.dequantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def _apply(self, fn, recurse=True):
        self._packed = self._scale_bf16 = None  # moved or cast: made again on first use
        super()._apply(fn, recurse)
        self.scale = self.scale.float()  # kept in float32 whatever the model's type
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """The token embedding in int8, serving both lookups and the tied output projection.

    A second int8 byte per weight holds the first one's rounding error (per-row scales
    again), about 16 bits in all: the lookups read both, and so do the few logits that
    decide the next token (`logits`). Half the memory of a float16 copy."""

    # Logits recomputed from both bytes per row: 4 already gave float32's text on base's
    # long-form benchmark input (greedy and beam 5); 16 leaves room for suppressed tokens.
    EXACT_TOP = 16

    def __init__(self, weight: Tensor, chunk: int = 4096) -> None:
        super().__init__()
        self.projection = Int8Linear(weight, None)
        self.num_embeddings, self.embedding_dim = weight.shape
        p = self.projection
        error = torch.empty_like(p.weight_int8)
        error_scale = torch.empty_like(p.scale)
        for start in range(0, weight.shape[0], chunk):  # no float32 copy of it all
            part = slice(start, start + chunk)
            left = weight[part].detach().float() - p.weight_int8[part] * p.scale[part, None]
            error[part], error_scale[part] = quantize_rows(left)
        self.register_buffer("error_int8", error)
        self.register_buffer("error_scale", error_scale)

    def rows(self, tokens: Tensor) -> Tensor:
        """The embedding rows of `tokens` to about 16 bits, in float32."""
        p = self.projection
        return (p.weight_int8[tokens] * p.scale[tokens].unsqueeze(-1)).add_(
            self.error_int8[tokens] * self.error_scale[tokens].unsqueeze(-1)
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.rows(tokens)

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits of every token: from the int8 weights, then the largest `EXACT_TOP` of
        each row again from the float weights.

        The int8 weights alone cost base 0.6 WER points greedy and 0.4 beam 5 on the
        long-form benchmark input (3.11/2.52 against float32's 2.52/2.14, layers in int8 or
        not): rounding the output projection flips close calls between the leading tokens.
        Recomputing the leading 4, 16 or 64 from the float weights gave float32's text
        exactly, for a top-k and a small gather a step; from the two bytes here, the same.
        FBGEMM's kernel also rounds the hidden state to 8 bits per call, which on its own
        turns a near-silent window into a repetition loop; each state goes in as two rows
        instead, to about 16 bits (`two_row_product`). With the decoder's layers on the
        native kernel the projection takes it too (its `step_kernel`, kernels.py): the
        state is not rounded at all."""
        p = self.projection
        rows = hidden.reshape(-1, hidden.shape[-1])
        if not (_fbgemm_available(rows.device) and rows.dtype == torch.float32):
            out = p(rows)  # the float product of the dequantized weight
        elif p.step_kernel == "native" and native.available():
            out = native.int8_rows_q16(rows, p.weight_int8, p.scale, None)
        else:
            out = two_row_product(rows, p.packed())[0]
        out = self._exact_top(rows, out)
        return out.reshape(*hidden.shape[:-1], p.out_features)

    def _exact_top(self, rows: Tensor, out: Tensor) -> Tensor:
        k = min(self.EXACT_TOP, out.shape[-1])
        p = self.projection
        if (native.available() and out.device.type == "cpu" and rows.dtype == torch.float32
                and out.dtype == torch.float32 and out.is_contiguous() and rows.shape[-1] % 8 == 0
                and p.scale.dtype == self.error_scale.dtype == torch.float32):
            # One call: a scan of each row and k short dot products (torch's top-k alone
            # takes 110 us of a row of 51865 on a 2-core EPYC; this all, 15).
            native.exact_top(rows, out, p.weight_int8, p.scale, self.error_int8,
                             self.error_scale, k)
            return out
        top = out.topk(k, dim=-1).indices
        # A product and a sum per row rather than one batched product: each row's numbers
        # then do not depend on the rows beside it.
        exact = (self.rows(top) * rows.float().unsqueeze(1)).sum(-1)
        return out.scatter_(-1, top, exact.to(out.dtype))


def quantize_int8(model: nn.Module, audio_projections: bool = True) -> nn.Module:
    """Replace every nn.Linear (and the token embedding) of `model` (a Whisper, or one of
    its encoder and decoder) by int8, in place; with `audio_projections` False, all but
    the decoder's projections of the audio into keys and values (ComputePlan).

    Self-attention layers get their query, key and value projections stacked into one
    product: a decoding step then makes one small int8 call instead of three, and at one
    row per call the fixed cost of a call is most of its time.
    """
    for module_name, module in list(model.named_modules()):
        audio = module_name.endswith("cross_attn")
        for child_name, child in list(module.named_children()):
            if audio and not audio_projections and child_name in ("key", "value"):
                continue
            if isinstance(child, nn.Linear):
                quantized = Int8Linear(child.weight, child.bias)
            elif isinstance(child, nn.Embedding) and child_name == "token_embedding":
                quantized = Int8Embedding(child.weight)
            else:
                continue
            setattr(module, child_name, quantized)
            # Each layer's float32 pieces, freed but kept by glibc between the int8 copies
            # that outlive them, would add up: base's load peaked at 556-606 MB, 516 with this.
            release_free_memory()
    for name, module in model.named_modules():
        if name.endswith(".attn") and getattr(module, "qkv", False) is None:
            module.qkv = Int8Linear.stacked([module.query, module.key, module.value])
            del module.query, module.key, module.value
    return model


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: about 130 MB of
    resident memory after loading base, depending on where the heap ends); 5 us."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to do
        pass


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
