"""The engine's decoding step with static shapes, replayed as a CUDA graph.

On a GPU, decoding one token of a large model launches hundreds of small kernels, and at
batch 1 the launches, not the arithmetic, set the pace. `StaticStep` runs the engine's one
step function (`engine.step.decoder_step`) over the whole preallocated table: every row
slot, every position, each row's position read from a device tensor and its attention
masked, so that the shapes never change and the step can be captured once and replayed for
every later token, whichever windows hold the rows.

Off a GPU the same object calls the function directly: the CPU tests run exactly what a
GPU captures.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .engine.step import RowTable, Run, decoder_step


class StaticStep:
    """One token for every row slot of `table` (windows of `group` rows each), the table's
    buffers at full size. Rows past the active ones compute and are ignored."""

    def __init__(self, table: RowTable, group: int) -> None:
        self.table = table
        self.rows = table.audio_capacity * group
        self.runs = (Run(0, self.rows, 0, table.audio_capacity, group),)
        device = table.device
        self.tokens = torch.zeros(self.rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.rows, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        if device.type == "cuda":
            self._capture()

    def _step(self) -> Tensor:
        t, n = self.table, self.rows
        return decoder_step(
            t.decoder,
            self.tokens,
            self.positions,
            [b[:n] for b in t.self_k],
            [b[:n] for b in t.self_v],
            t.cross_k,
            t.cross_v,
            self.runs,
        )

    def _capture(self) -> None:
        # Warm up on a side stream (lazy initialisation must not be captured), then
        # capture. The warm-up writes position 0 of free rows only (positions are zero).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Logits of the first `len(tokens)` rows, given their tokens (rows, 1) and
        positions (rows,)."""
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        # Free rows write their keys at position 0 of their own (unused) slots.
        self.positions[n:].zero_()
        if self.graph is None:
            return self._step()[:n]
        self.graph.replay()
        return self.logits[:n].clone()
