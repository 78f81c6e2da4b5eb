"""The decoding step as one call into the native kernels (csrc/step.c), where every
product and attention of the decoder was measured fastest through them.

A step through PyTorch calls about twelve operators a layer (layer norms, products,
attention, views, adds, the GELU), and on a small model each call costs more than its
arithmetic: tiny.en's step on a 2-core Zen 3 spent 1.4 of its 4.3 ms outside the
kernels, and its 384x384 products took 23 us in a step against 18 alone (the threads
wake again for every call). The native step runs every layer in one parallel region with
the same kernels, so its numbers are theirs: each product's sums and each attention's in
the same order as through `native.int8_rows_q16` / `float_rows` / `attention`; the layer norms
and the GELU (glibc's vector erff) differ from PyTorch's in the last bits only.

It takes the place of `decoder_step`'s loop only where that loop would have used the
native kernels for every part (`plan`): the kernel choice stays kernels.py's, made by
measurement, and anything else (a GPU, bfloat16 keys, another kernel forced or measured
faster, too many rows) keeps PyTorch's path. The keys and values may be stored in float16
(`auto`: half a window's memory), widened to float32 as the kernel reads them; this
step's own are rounded to float16 as it writes them, as PyTorch's cast rounds.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

from .. import kernels, native
from ..model import TextDecoder
from ..quantize import PER_ROW_MIN_ROWS, Int8Linear

if TYPE_CHECKING:
    from .step import Run

ENV_SWITCH = "SUSURRUS_NATIVE_STEP"  # 0: decoder steps through PyTorch's loop
ENABLED = os.environ.get(ENV_SWITCH, "1") != "0"
# The attention types the step reads (None: the model's float32).
NATIVE_KEYS = (None, torch.float32, torch.float16)


class NativeStep:
    """One decoder's weights laid out for `susurrus_decoder_step`; `__call__` runs a step."""

    def __init__(self, decoder: TextDecoder) -> None:
        self.decoder = decoder
        blocks = list(decoder.blocks)
        self.n_state = decoder.positional_embedding.shape[1]
        self.n_head = blocks[0].attn.n_head
        self.eps = decoder.ln.eps
        self.layers = (native.Layer * len(blocks))()
        # Each tensor the structures point to, with the table it was found in: kept alive,
        # and compared at each call (a tensor replaced or moved since makes a new plan;
        # one changed in place is read as it is now).
        self.tensors: list[tuple[dict, str, Tensor, Tensor]] = []
        # For the checks of the kernel choices at each call, kept cheap (a step of tiny.en
        # takes ~2 ms): the attention modules, the int8 layers and the float ones.
        self.attentions = [a for b in blocks for a in (b.attn, b.cross_attn)]
        self.int8: list[Int8Linear] = []
        self.float: list[nn.Linear] = []
        for layer, block in zip(self.layers, blocks):
            for name, norm in (("attn_ln", block.attn_ln), ("cross_ln", block.cross_attn_ln),
                               ("mlp_ln", block.mlp_ln)):
                setattr(layer, name + "_w", self._keep(norm, "weight"))
                setattr(layer, name + "_b", self._keep(norm, "bias"))
            for name, module in self.linears(block):
                if isinstance(module, Int8Linear):
                    self.int8.append(module)
                    weight, scale = self._keep(module, "weight_int8"), self._keep(module, "scale")
                    out, in_ = module.weight_int8.shape
                else:
                    self.float.append(module)
                    weight, scale = self._keep(module, "weight"), None
                    out, in_ = module.weight.shape
                setattr(layer, name,
                        native.Linear(weight, scale, self._keep(module, "bias"), out, in_))
        self.ln = self._keep(decoder.ln, "weight"), self._keep(decoder.ln, "bias")

    def _keep(self, module: nn.Module, name: str) -> int | None:
        """The address of `module`'s tensor `name` as the kernel reads it (float32 vectors
        converted here, once)."""
        table = module._parameters if name in module._parameters else module._buffers
        found = table.get(name)
        if found is None:
            return None
        t = found.detach()
        if t.dtype not in (torch.float32, torch.int8) or not t.is_contiguous():
            t = t.float().contiguous()
        self.tensors.append((table, name, found, t))
        return t.data_ptr()

    def current(self) -> bool:
        """Whether the decoder still holds the very tensors this plan points to."""
        return all(table.get(name) is found for table, name, found, _ in self.tensors)

    @staticmethod
    def linears(block: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
        return (("qkv", block.attn.qkv), ("out", block.attn.out),
                ("cross_query", block.cross_attn.query), ("cross_out", block.cross_attn.out),
                ("fc1", block.mlp[0]), ("fc2", block.mlp[2]))

    def all_native(self, n_rows: int) -> bool:
        """Whether each product and attention of a step of `n_rows` rows would take the
        native kernel in the loop (the choices kernels.py measured, or forced)."""
        attention = kernels.ATTENTION["native"]
        # Keys may be stored in float16 (the kernel widens them as it reads).
        if not all(a.step_kernel is attention and a.attention_dtype in NATIVE_KEYS
                   for a in self.attentions):
            return False
        if self.int8 and (n_rows >= PER_ROW_MIN_ROWS
                          or not all(m.step_kernel == "native" for m in self.int8)):
            return False
        if self.float:
            if n_rows > kernels.SPLIT_ROWS:
                return False
            product = kernels.CANDIDATES["native"]
            for m in self.float:
                choices = getattr(m, "kernel_choices", None)
                choices = None if choices is None else choices.get(torch.float32)
                if choices is None or kernels.pick(choices, n_rows) is not product:
                    return False
        return True

    def __call__(self, tokens: Tensor, positions: Tensor, same_position: int | None,
                 self_k: list[Tensor], self_v: list[Tensor], cross_k: list[Tensor],
                 cross_v: list[Tensor], runs: tuple[Run, ...]) -> Tensor | None:
        """The final hidden states (rows, n_state) of one token per row, as decoder_step's
        loop computes them; None where the caches are laid out otherwise than the kernel
        reads them (the loop then serves)."""
        decoder = self.decoder
        n_rows = tokens.shape[0]
        k0, v0, ck0, cv0 = self_k[0], self_v[0], cross_k[0], cross_v[0]
        dim = self.n_state // self.n_head
        wide = (torch.float32, torch.float16)
        if not (k0.dtype == v0.dtype and ck0.dtype == cv0.dtype and k0.dtype in wide
                and ck0.dtype in wide):
            return None
        strides = k0.stride()
        cross_strides = ck0.stride()
        if strides[2:] != (dim, 1) or cross_strides[2:] != (dim, 1):
            return None
        if any(t.stride() != strides or t.dtype != k0.dtype for t in (*self_k, *self_v)) or any(
            t.stride() != cross_strides or t.dtype != ck0.dtype for t in (*cross_k, *cross_v)
        ):
            return None
        if same_position is not None:
            pe = decoder.positional_embedding[same_position : same_position + 1]
        else:
            pe = decoder.positional_embedding[positions]
        x = (decoder.token_embedding(tokens[:, 0]).to(pe.dtype) + pe).contiguous()
        positions = positions.to(torch.int64).contiguous()
        frames = ck0.shape[2]
        keys = max(frames, k0.shape[2])
        scratch = (keys + 7) // 8 * 8 + 8
        threads = torch.get_num_threads()
        # Each thread's copy of a product's input rows rounded to 16 bits (the widest: fc2's).
        quant = native.quantized_floats(n_rows, 4 * self.n_state)
        work = torch.empty(n_rows * 10 * self.n_state + threads * (scratch + quant))
        tasks = _tasks(runs)
        # The caches' addresses go into a copy of the layers: the plan is the decoder's,
        # and other threads may be stepping their own tables with it at this moment.
        layers = type(self.layers).from_buffer_copy(self.layers)
        for layer, k, v, ck, cv in zip(layers, self_k, self_v, cross_k, cross_v):
            layer.self_k, layer.self_v = k.data_ptr(), v.data_ptr()
            layer.cross_k, layer.cross_v = ck.data_ptr(), cv.data_ptr()
        step = native.Step(
            rows=n_rows, state=self.n_state, heads=self.n_head, layers=len(self.layers),
            frames=frames, self_row=strides[0], self_head=strides[1],
            self_half=int(k0.dtype == torch.float16),
            cross_audio=cross_strides[0], cross_head=cross_strides[1],
            cross_half=int(ck0.dtype == torch.float16),
            positions=positions.data_ptr(), tasks=tasks.data_ptr(), n_tasks=tasks.shape[0],
            ln_w=self.ln[0], ln_b=self.ln[1], eps=self.eps, x=x.data_ptr(),
            work=work.data_ptr(), scratch=scratch, layer=layers, threads=threads,
            quant=quant,
        )
        native.decoder_step(step)
        return x


@functools.lru_cache(maxsize=64)
def _tasks(runs: tuple[Run, ...]) -> Tensor:
    """(audio, first row, rows) of each window's rows: the rows reading one audio."""
    found = [
        (audio, run.row_start + (audio - run.audio_start) * run.group, run.group)
        for run in runs
        for audio in range(run.audio_start, run.audio_end)
    ]
    return torch.tensor(found, dtype=torch.int64)


_plans: weakref.WeakKeyDictionary[TextDecoder, NativeStep | None] = weakref.WeakKeyDictionary()


def plan(decoder: TextDecoder, n_rows: int) -> NativeStep | None:
    """The native step for `n_rows` rows of `decoder`, if its loop would run every product
    and attention of this step through the native kernels; else None."""
    if not ENABLED or decoder.positional_embedding.device.type != "cpu":
        return None
    found = _plans.get(decoder, False)
    if found is False or (found is not None and not found.current()):
        found = _plans[decoder] = NativeStep(decoder) if shaped(decoder) else None
    if found is None or not found.all_native(n_rows):
        return None
    return found


def shaped(decoder: TextDecoder) -> bool:
    """Whether the decoder's layers are the ones the kernel knows: float32, a stacked
    self-attention projection, the exact GELU, one layer-norm epsilon, heads of a multiple
    of 8 numbers (the kernel's vectors)."""
    if not native.available() or decoder.positional_embedding.dtype != torch.float32:
        return False
    if decoder.positional_embedding.shape[1] // decoder.blocks[0].attn.n_head % 8:
        return False
    eps = decoder.ln.eps
    for block in decoder.blocks:
        if block.attn.qkv is None or block.cross_attn is None:
            return False
        gelu = block.mlp[1]
        if not isinstance(gelu, nn.GELU) or gelu.approximate != "none":
            return False
        norms = (block.attn_ln, block.cross_attn_ln, block.mlp_ln)
        if any(norm.eps != eps or norm.weight is None for norm in norms):
            return False
        for _, module in NativeStep.linears(block):
            if isinstance(module, Int8Linear):
                if not module.weight_int8.is_contiguous():
                    return False
            elif module.weight.dtype != torch.float32 or not module.weight.is_contiguous():
                return False
    return True
