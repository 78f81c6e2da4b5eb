"""The decoding step every decode runs, and the table of rows it runs over.

A row is one hypothesis of one window (one row for greedy decoding, `beam_size` rows for
beam search, `best_of` for sampling). Rows of any window sit side by side in one table;
each row has its own position, so windows that joined at different steps (continuous
batching) advance together. The audio's cross-attention keys and values are kept once per
window; a window's rows are contiguous and ask them as one group.

`decoder_step` is the one function that advances rows by a token: eagerly over the active
prefix of the table (the key length cut to what the rows have filled), or, on a GPU,
captured as a CUDA graph over the whole table (see graphs.py), with the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import KVCache, TextDecoder
from . import native_step

# The self-attention cache grows in steps of this many positions (a reallocation each time).
LENGTH_STEP = 64


@dataclass(frozen=True)
class Run:
    """Consecutive windows whose rows come in groups of the same size: rows [row_start,
    row_end) attend, `group` rows per window, to audios [audio_start, audio_end)."""

    row_start: int
    row_end: int
    audio_start: int
    audio_end: int
    group: int


def decoder_step(
    decoder: TextDecoder,
    tokens: Tensor,
    positions: Tensor,
    self_k: list[Tensor],
    self_v: list[Tensor],
    cross_k: list[Tensor],
    cross_v: list[Tensor],
    runs: tuple[Run, ...],
    same_position: int | None = None,
    hidden_only: bool = False,
) -> Tensor:
    """Logits (rows, n_vocab) of one new token per row (with `hidden_only`, the final
    hidden states (rows, n_state) the logits come from).

    `tokens` (rows, 1) go to `positions` (rows,) of the self-attention buffers (rows,
    heads, length, head_dim); each row attends to its positions up to its own. With
    `same_position` (every row at that position, known by the caller) the step writes a
    slice and attends without a mask: the arithmetic of the plain cached decoder.
    """
    n_rows = tokens.shape[0]
    # Where every part of this loop would run through the native kernels, one call does
    # the whole step (native_step.py).
    fused = native_step.plan(decoder, n_rows)
    if fused is not None:
        hidden = fused(tokens, positions, same_position, self_k, self_v, cross_k, cross_v, runs)
        if hidden is not None:
            return hidden if hidden_only else decoder.logits(hidden)
    # The rows stay (rows, n_state) through the step, one position each: the layers
    # then need no reshapes, and a head split or merge is one view (a few operator calls
    # fewer per layer, and a step of a small model is mostly such calls).
    if same_position is not None:
        pe = decoder.positional_embedding[same_position : same_position + 1]
        mask = None
    else:
        pe = decoder.positional_embedding[positions]
        keys = torch.arange(self_k[0].shape[2], device=tokens.device)
        mask = (keys <= positions[:, None])[:, None, None, :]
        rows = torch.arange(n_rows, device=tokens.device)
    x = decoder.token_embedding(tokens[:, 0]).to(pe.dtype) + pe
    # One run over every row and audio (one window, or windows in groups of one size
    # side by side): its rows and audios need no cut.
    whole = len(runs) == 1 and runs[0].row_start == 0 and runs[0].row_end == n_rows and (
        runs[0].audio_start == 0 and runs[0].audio_end == cross_k[0].shape[0]
    )
    for i, block in enumerate(decoder.blocks):
        attn = block.attn
        q, k, v = (y.view(n_rows, attn.n_head, 1, -1) for y in attn.project_qkv(block.attn_ln(x)))
        cache_k, cache_v = self_k[i], self_v[i]
        if same_position is not None:
            cache_k[:, :, same_position : same_position + 1] = k
            cache_v[:, :, same_position : same_position + 1] = v
            end = same_position + 1
            out = attn.sdpa(q, cache_k[:, :, :end], cache_v[:, :, :end])
        else:
            cache_k[rows, :, positions] = k[:, :, 0].to(cache_k.dtype)
            cache_v[rows, :, positions] = v[:, :, 0].to(cache_v.dtype)
            out = attn.sdpa(q, cache_k, cache_v, attn_mask=mask)
        x = x + attn.out(out.reshape(n_rows, -1))
        h = block.cross_attn_ln(x)
        if whole:
            x = x + block.cross_attn.attend(h, cross_k[i], cross_v[i])
        else:
            parts = [
                block.cross_attn.attend(
                    h[run.row_start : run.row_end],
                    cross_k[i][run.audio_start : run.audio_end],
                    cross_v[i][run.audio_start : run.audio_end],
                )
                for run in runs
            ]
            x = x + (parts[0] if len(parts) == 1 else torch.cat(parts))
        x = x + block.mlp(block.mlp_ln(x))
    hidden = decoder.ln(x)
    return hidden if hidden_only else decoder.logits(hidden)


class RowTable:
    """Self-attention caches of the active rows and cross-attention keys/values of the
    active windows, both kept as a prefix of preallocated buffers.

    Buffers grow when more rows, windows or positions are needed (up to the engine's
    capacity) and never shrink while decoding goes on; rows that leave are filled by rows
    moved from the end, so only those are copied. Once nothing decodes, the engine gives
    them back (`release`).
    """

    def __init__(self, decoder: TextDecoder, n_audio_ctx: int, full: bool = False) -> None:
        self.decoder = decoder
        self.n_ctx = decoder.positional_embedding.shape[0]
        attn = decoder.blocks[0].attn
        self.n_head = attn.n_head
        self.head_dim = decoder.positional_embedding.shape[1] // attn.n_head
        own = decoder.positional_embedding.dtype
        self.self_dtype = attn.attention_dtype or own
        self.cross_dtype = decoder.blocks[0].cross_attn.attention_dtype or own
        self.device = decoder.positional_embedding.device
        self.n_audio_ctx = n_audio_ctx
        self.full = full  # every buffer at full length (a CUDA graph's shapes never change)
        self.self_k: list[Tensor] = []
        self.self_v: list[Tensor] = []
        self.cross_k: list[Tensor] = []
        self.cross_v: list[Tensor] = []
        self.row_capacity = self.audio_capacity = self.length_capacity = 0
        self.n_rows = self.n_audio = 0
        # The last views handed out, with what they were asked for; dropped whenever the
        # buffers are replaced.
        self._views: tuple[tuple[int, ...], tuple[list[Tensor], ...]] | None = None

    def reserve(
        self, rows: int, audios: int, length: int, *, row_limit: int = 0, audio_limit: int = 0
    ) -> None:
        """Room for `rows` rows of `length` positions and `audios` windows. A buffer that
        grows doubles (fewer copies as windows join one by one), but not past `row_limit`
        rows or `audio_limit` windows (0: no limit) where the caller knows it needs no more."""
        if rows > self.row_capacity or length > self.length_capacity:
            new_rows = self.row_capacity
            if rows > self.row_capacity:
                doubled = 2 * self.row_capacity
                new_rows = max(rows, min(doubled, row_limit) if row_limit else doubled)
            new_length = self.n_ctx if self.full else min(
                self.n_ctx, -(-max(length, self.length_capacity) // LENGTH_STEP) * LENGTH_STEP
            )
            shape = (new_rows, self.n_head, new_length, self.head_dim)
            n = self.n_rows
            for buffers in (self.self_k, self.self_v):
                # Zeros: a step's keys past a row's own position are read (and masked out),
                # and masking garbage could still bring NaN in.
                self._regrow(buffers, shape, self.self_dtype, torch.zeros,
                             lambda new, old: new[:n, :, : old.shape[2]].copy_(old[:n]))
            self.row_capacity, self.length_capacity = new_rows, new_length
        if audios > self.audio_capacity:
            doubled = 2 * self.audio_capacity
            audios = max(audios, min(doubled, audio_limit) if audio_limit else doubled)
            # (audio, head, time, dim), as cross_kv makes them (see there).
            shape = (audios, self.n_head, self.n_audio_ctx, self.head_dim)
            a = self.n_audio
            # Only the filled windows are read, except by a step over the full table (whose
            # free slots must hold numbers): slots not written yet need not take memory.
            make = torch.zeros if self.full else torch.empty
            for buffers in (self.cross_k, self.cross_v):
                self._regrow(buffers, shape, self.cross_dtype, make,
                             lambda new, old: new[:a].copy_(old[:a]))
            self.audio_capacity = audios

    def _regrow(self, buffers: list[Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                make: Callable[..., Tensor], keep: Callable[[Tensor, Tensor], object]) -> None:
        """Each layer's buffer replaced by a new one of `shape` (what `keep(new, old)`
        copies survives), one layer at a time: beside the buffers of every layer, the old
        and the new buffer of only one layer are held at once, not of all."""
        self._views = None  # (they would also hold every old buffer till the next step)
        for i in range(len(self.decoder.blocks)):
            new = make(shape, dtype=dtype, device=self.device)
            if i < len(buffers):
                keep(new, buffers[i])
                buffers[i] = new  # the old one goes now
            else:
                buffers.append(new)

    def release(self) -> None:
        """Give the buffers back if the table is empty; the next window allocates anew."""
        if self.n_rows or self.n_audio:
            return
        self.self_k, self.self_v, self.cross_k, self.cross_v = [], [], [], []
        self.row_capacity = self.audio_capacity = self.length_capacity = 0
        self._views = None

    def next_audio(self) -> tuple[list[Tensor], list[Tensor]]:
        """The cross-attention keys and values of the next window to join, (1, heads,
        time, head_dim) per layer, as views into the table (reserved beforehand): its audio
        is projected straight into its place instead of into a copy first."""
        a = self.n_audio
        if a >= self.audio_capacity:
            raise RuntimeError("no room reserved for another window")
        return [b[a : a + 1] for b in self.cross_k], [b[a : a + 1] for b in self.cross_v]

    def append(self, cache: KVCache, length: int, copies: int = 1) -> tuple[int, int]:
        """Add the rows of a prefilled cache (its first `length` positions), or its one
        row `copies` times, and its audio (unless it is already in place: `next_audio`);
        returns (first row, audio index)."""
        rows = cache.self_k[0].shape[0] * copies
        self.reserve(self.n_rows + rows, self.n_audio + 1, length + 1)
        r, a = self.n_rows, self.n_audio
        for buffers, source in ((self.self_k, cache.self_k), (self.self_v, cache.self_v)):
            for buf, src in zip(buffers, source):
                buf[r : r + rows, :, :length] = src[:, :, :length]  # one row broadcasts
        for buffers, source in ((self.cross_k, cache.cross_k), (self.cross_v, cache.cross_v)):
            for buf, src in zip(buffers, source):
                if src.data_ptr() != buf[a].data_ptr():
                    buf[a] = src[0]
        self.n_rows += rows
        self.n_audio += 1
        return r, a

    def move(self, rows_from: list[int], rows_to: list[int], audios: list[tuple[int, int]],
             length: int) -> None:
        """Copy rows (the first `length` positions) and audios (from, to) to new places."""
        if rows_from:
            src = torch.tensor(rows_from, device=self.device)
            dst = torch.tensor(rows_to, device=self.device)
            for buf in (*self.self_k, *self.self_v):
                filled = buf[:, :, :length]
                filled.index_copy_(0, dst, filled.index_select(0, src))
        for a, b in audios:
            for buf in (*self.cross_k, *self.cross_v):
                buf[b] = buf[a]

    def reorder(self, sources: list[int], length: int) -> None:
        """Row i becomes the old row sources[i] (beam search), over the active rows."""
        moved = [row for row, source in enumerate(sources) if source != row]
        if moved:
            self.move([sources[r] for r in moved], moved, [], length)

    def views(self, rows: int, audios: int, length: int | None) -> tuple[list[Tensor], ...]:
        """The first `rows` rows, their self-attention buffers cut to `length` positions
        (None: all), and the first `audios` windows' keys and values. Kept while the
        buffers are: a window decoding at one position per step (whose step cuts the
        length itself) asks the same views every step, a few dozen slices fewer a step."""
        key = (rows, audios, -1 if length is None else length)
        if self._views is not None and self._views[0] == key:
            return self._views[1]
        cut = slice(None) if length is None else slice(0, length)
        views = (
            [b[:rows, :, cut] for b in self.self_k],
            [b[:rows, :, cut] for b in self.self_v],
            [b[:audios] for b in self.cross_k],
            [b[:audios] for b in self.cross_v],
        )
        self._views = key, views
        return views
