"""Exact float32 greedy decoding without reading the whole float32 output projection per step.

A float32 decoding step of base spends a third of its time in the output projection
(51865 x 512 weights, 106 MB read per step). Greedy decoding only needs, per step, the
best token (after the token rules) and, once the window is done, the sum of the chosen
tokens' log-probabilities. So each step:

1. computes every ordinary text token's logit from an int8 copy of the weights (a quarter
   of the bytes), with a proven bound on its distance from the float32 logit
   (`LogitScreen.approximate`);
2. after the suppressed tokens are masked, recomputes in float32 every token whose upper
   bound could reach the largest lower bound: the best token is always among them, so the
   choice and the timestamp rules (which compare the best text token) see float32 values
   (`LogitScreen.refine`). A few dozen tokens at most in most steps (on base en-long one
   reaches in the median step); the special and timestamp tokens are always float32.
3. The softmax's normaliser needs every logit: it waits until the window is done, when
   the steps' hidden states go through the float32 weights in one matrix product, which
   reads them once for all steps (`LogitScreen.log_probs`).

Tokens are those of the plain float32 product; log-probabilities differ from it only by
the order of float sums.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from . import native, quantize

# Every Whisper vocabulary starts with its ordinary BPE tokens, at least this many; the
# tokens from here on (end of text, the other special tokens, the timestamps) are few and
# always computed in float32.
ORDINARY_TOKENS = 50256
# Rows of the deferred product at once: bounds its (rows, vocabulary) temporary.
DEFERRED_CHUNK = 32  # as fast as 64 here (base: 29 against 30 ms for 90 steps), half the memory
# Two engines on one model may ask for the screen at once (a lock per screen would keep
# the model from being deep-copied).
_BUILD_LOCK = threading.Lock()
# Candidates recomputed without looking at their own bounds (a gather of this many rows
# costs less than the bounds' dozen small operations).
FEW_CANDIDATES = 64


def supported_kernels() -> list[str]:
    """The int8 kernels this machine has for the screen, the default first: the native
    one (native.py) where it builds, FBGEMM's (x86), the int8-weight kernel with bfloat16
    activations."""
    found = ["native"] if native.available() else []
    found += ["fbgemm"] if quantize.fbgemm_built() else []
    return found + (["int8pack"] if hasattr(torch, "_weight_int8pack_mm") else [])


def supported() -> bool:
    """Whether the screen can run here at all."""
    return bool(supported_kernels())


class LogitScreen:
    """The output projection's int8 screen for one float32 weight (vocabulary, features).

    Three int8 kernels can screen: the native one (native.py: the hidden state in float32,
    unrounded, float32 sums; on a Zen 3 as fast as FBGEMM's for one row, with a bound
    that only the weights' rounding widens); FBGEMM's (x86; 8-bit activations, 32-bit
    integer sums), fed each hidden state as two rows already on its 8-bit grid, the state
    and what that rounding left, so that the two rows together stand for it to about 16
    bits (on a Zen 4 about twice as fast as the next); or PyTorch's int8-weight kernel
    with the activations in bfloat16.
    """

    def __init__(
        self,
        weight: Tensor,
        split: int = ORDINARY_TOKENS,
        product: Callable[[Tensor, Tensor], Tensor] | None = None,
        kernel: str | None = None,
    ) -> None:
        """`product(hidden, weight)`: the float32 projection's kernel, for the deferred
        normalisers (many rows at once: a measured kernel does them 3x faster than MKL's
        default on a Zen 4). `kernel`: "native", "fbgemm" or "int8pack" (default: the
        first of supported_kernels())."""
        weight = weight.detach()
        self.weight = weight
        self.product = product or (lambda hidden, w: hidden @ w.T)
        self.split = split
        self.kernel = kernel or supported_kernels()[0]
        if self.kernel not in supported_kernels():
            raise ValueError(f"no {self.kernel} kernel for the logit screen here")
        if self.kernel == "fbgemm":
            # 32-bit integer sums are exact; the float products that undo the scales
            # round by a few 2^-24 of the value.
            self.output_rounding = self.accumulation = 2.0**-20
        elif self.kernel == "native":
            # float32 sums of int8 times float32 terms (features * 2^-24 of the magnitudes,
            # doubled), then one product by the scale (2^-24 of the value, doubled).
            self.output_rounding = 2.0**-23
            self.accumulation = weight.shape[1] * 2.0**-23
        else:
            # The kernel sums in float32 (features * 2^-24 of the magnitudes, doubled)
            # and rounds its output to bfloat16 (2^-9 of the value, doubled).
            self.output_rounding = 2.0**-8
            self.accumulation = weight.shape[1] * 2.0**-23
        # The int8 copy is made on first use: a model that only decodes beams never
        # needs it (made, it takes a quarter of the weight's memory, ~0.1 s for base).
        self._built = False

    def _build(self) -> None:
        with _BUILD_LOCK:
            if self._built:
                return
            ordinary = self.weight[: self.split]
            top = ordinary.abs().amax(dim=1).clamp_min(1e-30)
            if self.kernel in ("fbgemm", "native"):
                scale = top / 127
            else:
                # Exactly representable in bfloat16 (the kernel takes bfloat16 scales)
                # and rounded up, so that no weight is clipped.
                scale = (top / 127 * (1 + 2**-7)).to(torch.bfloat16)
            self.scale = scale
            q8 = torch.empty(ordinary.shape, dtype=torch.int8)
            residual = torch.empty(self.split)
            norm = torch.empty(self.split)
            for start in range(0, self.split, 4096):
                rows = ordinary[start : start + 4096]
                s = scale[start : start + 4096].float()[:, None]
                q = torch.round(rows / s).clamp_(-127, 127)
                q8[start : start + 4096] = q.to(torch.int8)
                rounded = q.mul_(s)
                norm[start : start + 4096] = torch.linalg.vector_norm(rounded, dim=1)
                residual[start : start + 4096] = torch.linalg.vector_norm(rows - rounded, dim=1)
            # Per token: |(w - w8) . x| <= residual |x| (weights rounded to 8 bits) and
            # |w8 . (x - x8)| <= norm |x - x8| (activations rounded by the kernel). Both
            # norms computed in float32, within 2^-14 of themselves: 2^-10 more.
            self.basis = torch.stack([residual, norm]).mul_(1 + 2**-10)
            # The widest bound of any token, per unit of the hidden state's norm and of
            # its error: each term at its largest factor, |screened logit| <= norm * |x8|
            # (and the kernel's rounding of it) in the output's rounding.
            largest, norm_most = self.basis.amax(dim=1).tolist()
            spill = norm_most * (1 + self.output_rounding) * self.output_rounding
            self._per_size = largest + norm_most * self.accumulation + spill
            self._per_error = norm_most + spill
            if self.kernel == "fbgemm":
                self._packed = quantize.pack_fbgemm(q8, scale)  # its own copy: q8 goes
            else:
                self.q = q8
            self._built = True

    def matches(self, weight: Tensor) -> bool:
        """Whether this screen was made from `weight` as it is now (not cast or moved)."""
        return (
            weight.dtype == self.weight.dtype
            and weight.device == self.weight.device
            and weight.data_ptr() == self.weight.data_ptr()
        )

    def approximate(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (rows, vocabulary) of `hidden` (rows, features): the ordinary tokens'
        from the int8 screen, the rest in float32; and |hidden - what the kernel used|
        per row (rows, 1), for the bound (`refine`)."""
        if not self._built:
            self._build()
        logits = torch.empty(hidden.shape[0], self.weight.shape[0], dtype=hidden.dtype)
        used = None  # the activations as the kernel took them, where it rounded them
        if self.kernel == "native":
            logits[:, : self.split] = native.int8_rows(hidden, self.q, self.scale, None)
        elif self.kernel == "fbgemm":
            logits[:, : self.split], used = quantize.two_row_product(hidden, self._packed)
        else:
            used = hidden.to(torch.bfloat16)
            logits[:, : self.split] = torch._weight_int8pack_mm(used, self.q, self.scale)
        logits[:, self.split :] = self.product(hidden, self.weight[self.split :])
        if used is None:
            return logits, hidden.new_zeros(hidden.shape[0], 1)
        return logits, torch.linalg.vector_norm(hidden - used.float(), dim=1, keepdim=True)

    def refine(self, logits: Tensor, hidden: Tensor, error: Tensor) -> None:
        """Recompute in float32, in place, every screened logit of `logits` (from
        `approximate(hidden)`, with its `error`; masked since) that could be its row's
        largest; masked (-inf) logits stay masked.

        A token can be the largest when its upper bound (screened value plus its bound)
        reaches the largest lower bound. Only tokens within two of the widest bounds of
        the screened maximum can: when they are few they are all recomputed, else their
        own bounds pick those that reach.
        """
        region = logits[:, : self.split]
        size = torch.linalg.vector_norm(hidden, dim=1, keepdim=True)
        widest = size * self._per_size + error * self._per_error
        top = region.amax(dim=1, keepdim=True)
        # A little room makes the comparison strict, so that a row with every ordinary
        # token masked (-inf everywhere) reaches nothing.
        near = region > top - widest * (2 + 2**-10)
        rows = region.shape[0]
        columns = (near[0] if rows == 1 else near.any(dim=0)).nonzero()[:, 0]
        if columns.numel() > FEW_CANDIDATES:
            values = region[:, columns]
            bound = self._bound(size, error, values, columns)
            lower = (values - bound).amax(dim=1, keepdim=True)
            columns = columns[((values + bound) >= lower).any(dim=0)]
        if columns.numel() == 0:
            return
        exact = hidden @ self.weight.index_select(0, columns).T
        if rows > 1:  # a column another row reaches may be masked in this one
            old = region[:, columns]
            exact = torch.where(old == float("-inf"), old, exact)
        region[:, columns] = exact

    def _bound(self, size: Tensor, error: Tensor, values: Tensor, columns: Tensor) -> Tensor:
        """The bound (rows, n) of the screened `values` (rows, n) of tokens `columns`
        (n,), for hidden states of norm `size` and `error` (rows, 1): weights rounded to
        8 bits, activations rounded by the kernel, its sums, and the rounding of its
        output."""
        basis = self.basis[:, columns]
        bound = size * basis[0] + (error + size * self.accumulation) * basis[1]
        return bound.add_(values.abs(), alpha=self.output_rounding)

    def log_probs(self, steps: DeferredSteps, suppress: Tensor, blank: Tensor) -> np.ndarray:
        """The float32 log-probabilities of the tokens chosen at `steps`, with the masks
        of their step: `suppress` (vocabulary,) always, `blank` at a first step, and every
        ordinary token where the timestamp rules masked them all."""
        out = []
        for start in range(0, len(steps.tokens), DEFERRED_CHUNK):
            end = start + DEFERRED_CHUNK
            hidden = torch.stack(steps.hidden[start:end])
            ordinary = self.product(hidden, self.weight[: self.split])
            ordinary.masked_fill_(suppress[None, : self.split], float("-inf"))
            first = torch.tensor(steps.first[start:end])
            ordinary.masked_fill_(first[:, None] & blank[None, : self.split], float("-inf"))
            ordinary.masked_fill_(torch.tensor(steps.masked[start:end])[:, None], float("-inf"))
            logits = torch.cat([ordinary, torch.stack(steps.rest[start:end])], dim=1)
            tokens = torch.tensor(steps.tokens[start:end])
            if native.available():  # as a step outside the screen takes them (engine.py)
                out.append(native.log_probs(logits, tokens)[1])
            else:
                out.append(logits.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0])
        return torch.cat(out).numpy()


@dataclass
class DeferredSteps:
    """A greedy row's screened steps, whose log-probabilities wait for the window's end."""

    hidden: list[Tensor] = field(default_factory=list)  # (features,) per step
    rest: list[Tensor] = field(default_factory=list)  # the float32 logits past the screen
    tokens: list[int] = field(default_factory=list)
    masked: list[bool] = field(default_factory=list)  # every screened token masked
    first: list[bool] = field(default_factory=list)  # the window's first sampled token
    screen: LogitScreen | None = None  # the screen that took them

    def add(self, hidden: Tensor, rest: Tensor, token: int, masked: bool, first: bool) -> None:
        self.hidden.append(hidden)
        self.rest.append(rest)
        self.tokens.append(token)
        self.masked.append(masked)
        self.first.append(first)


def add_in_order(total: float, values: np.ndarray) -> float:
    """`total` plus `values` one after the other in float32, the order of a sum kept per
    step."""
    acc = np.float32(total)
    for value in values.astype(np.float32):
        acc = np.float32(acc + value)
    return float(acc)
