"""Exact float32 greedy decoding without reading the whole float32 output projection per step.

A float32 decoding step of base spends a third of its time in the output projection
(51865 x 512 weights, 106 MB read per step). Greedy decoding only needs, per step, the
best token (after the token rules) and, once the window is done, the sum of the chosen
tokens' log-probabilities. So each step:

1. computes every ordinary text token's logit from an int8 copy of the weights (a quarter
   of the bytes, bfloat16 activations), with a proven bound on its distance from the
   float32 logit (`LogitScreen.approximate`);
2. after the suppressed tokens are masked, recomputes in float32 every token whose upper
   bound reaches the largest lower bound: the best token is always among them, so the
   choice and the timestamp rules (which compare the best text token) see float32 values
   (`LogitScreen.refine`). Usually one to five tokens; the special and timestamp tokens
   are always float32.
3. The softmax's normaliser needs every logit: it waits until the window is done, when
   the steps' hidden states go through the float32 weights in one matrix product, which
   reads them once for all steps (`LogitScreen.log_probs`).

Tokens are those of the plain float32 product; log-probabilities differ from it only by
the order of float sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

# Every Whisper vocabulary starts with its ordinary BPE tokens, at least this many; the
# tokens from here on (end of text, the other special tokens, the timestamps) are few and
# always computed in float32.
ORDINARY_TOKENS = 50256
# Rows of the deferred product at once: bounds its (rows, vocabulary) temporary.
DEFERRED_CHUNK = 64


def supported() -> bool:
    """Whether this PyTorch has the int8-weight kernel with bfloat16 activations."""
    return hasattr(torch, "_weight_int8pack_mm")


class LogitScreen:
    """The output projection's int8 screen for one float32 weight (vocabulary, features)."""

    def __init__(
        self,
        weight: Tensor,
        split: int = ORDINARY_TOKENS,
        product: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        """`product(hidden, weight)`: the float32 projection's kernel, for the deferred
        normalisers (many rows at once: a measured kernel does them 3x faster than MKL's
        default on a Zen 4)."""
        weight = weight.detach()
        self.weight = weight
        self.product = product or (lambda hidden, w: hidden @ w.T)
        self.split = split
        ordinary = weight[:split]
        top = ordinary.abs().amax(dim=1).clamp_min(1e-30)
        # One scale per row, exactly representable in bfloat16 (the kernel takes bfloat16
        # scales) and rounded up, so that no weight is clipped.
        scale = (top / 127 * (1 + 2**-7)).to(torch.bfloat16)
        self.scale = scale
        self.q = torch.empty(ordinary.shape, dtype=torch.int8)
        residual = torch.empty(split, dtype=torch.float64)
        norm = torch.empty(split, dtype=torch.float64)
        for start in range(0, split, 4096):  # no float64 copy of the whole matrix
            rows = ordinary[start : start + 4096].double()
            s = scale[start : start + 4096].double()[:, None]
            q = torch.round(rows / s).clamp_(-127, 127)
            self.q[start : start + 4096] = q.to(torch.int8)
            residual[start : start + 4096] = (rows - q * s).norm(dim=1)
            norm[start : start + 4096] = (q * s).norm(dim=1)
        # Per token: |(w - w8) . x| <= residual |x| (weights rounded to 8 bits) and
        # |w8 . (x - x16)| <= norm |x - x16| (activations rounded to bfloat16), plus the
        # float32 sums' own rounding, below features * 2^-24 * norm * |x| (doubled here).
        self.basis = torch.stack([residual * (1 + 1e-6), norm]).float()
        self.largest = self.basis.amax(dim=1)  # the largest of each term's factor
        self.accumulation = weight.shape[1] * 2.0**-23

    def matches(self, weight: Tensor) -> bool:
        """Whether this screen was made from `weight` as it is now (not cast or moved)."""
        return (
            weight.dtype == self.weight.dtype
            and weight.device == self.weight.device
            and weight.data_ptr() == self.weight.data_ptr()
        )

    def approximate(self, hidden: Tensor) -> Tensor:
        """Logits (rows, vocabulary) of `hidden` (rows, features): the ordinary tokens'
        from the int8 screen, the rest in float32."""
        rows16 = hidden.to(torch.bfloat16)
        logits = torch.empty(hidden.shape[0], self.weight.shape[0], dtype=hidden.dtype)
        logits[:, : self.split] = torch._weight_int8pack_mm(rows16, self.q, self.scale)
        logits[:, self.split :] = self.product(hidden, self.weight[self.split :])
        return logits

    def refine(self, logits: Tensor, hidden: Tensor) -> None:
        """Recompute in float32, in place, every screened logit of `logits` (from
        `approximate(hidden)`, masked since) that could be its row's largest; masked
        (-inf) logits stay masked.

        A token can be the largest when its upper bound (screened value plus its bound)
        reaches the largest lower bound. The per-token bounds are only computed for the
        tokens within reach of the screened maximum by the largest bound of any token.
        """
        region = logits[:, : self.split]
        size = torch.linalg.vector_norm(hidden, dim=1, keepdim=True)
        rounding = torch.linalg.vector_norm(hidden - hidden.to(torch.bfloat16).float(), dim=1,
                                            keepdim=True)
        # (rows, 2): the coefficients of the per-token bound's two terms.
        coefficients = torch.cat([size, rounding + size * self.accumulation], dim=1)
        # |screened logit| <= norm * |x16| (and the kernel's rounding of it, 2^-9): the
        # largest bound any token can have.
        magnitude = self.largest[1] * (size + rounding) * (1 + 2**-8)
        widest = coefficients @ self.largest[:, None] + magnitude * 2**-8
        top = region.amax(dim=1, keepdim=True)
        # Only tokens within two widest bounds of the screened maximum can reach the
        # maximum's lower bound. A row with every ordinary token masked reaches nothing.
        near = region >= torch.where(top > float("-inf"), top - 2 * widest, float("inf"))
        columns = (near.any(dim=0) if near.shape[0] > 1 else near[0]).nonzero()[:, 0]
        if columns.numel() == 0:
            return  # every ordinary token masked
        values = region[:, columns]
        bound = self._bound(coefficients, values, columns[None])
        lower = (values - bound).amax(dim=1, keepdim=True)
        reach = ((values + bound) >= lower) & (lower > float("-inf"))
        columns = columns[reach.any(dim=0)]
        exact = hidden @ self.weight.index_select(0, columns).T
        old = region[:, columns]
        region[:, columns] = torch.where(old == float("-inf"), old, exact)

    def _bound(self, coefficients: Tensor, values: Tensor, columns: Tensor) -> Tensor:
        """The bound of the screened `values` (rows, n) of tokens `columns` (rows or 1, n):
        weights rounded to 8 bits, activations to bfloat16, the float sums, and the
        kernel's output rounded to bfloat16 (2^-9 of the value, doubled)."""
        basis = self.basis[:, columns]  # (2, rows or 1, n)
        bound = coefficients[:, :1] * basis[0] + coefficients[:, 1:] * basis[1]
        return bound.add_(values.abs(), alpha=2**-8)

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
