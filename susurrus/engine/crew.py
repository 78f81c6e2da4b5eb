"""An encoder window computed by a crew of threads, for a machine where another process
takes a core.

PyTorch splits each product between its OpenMP threads in shares fixed in advance, and
every product ends at a barrier where the threads spin before they sleep. When another
process takes one of the cores, the thread that shares it delivers its share late at
every barrier while the other spins on a core the busy process could use: base's
encoder (auto) on a 2-core AMD EPYC (Zen 3) with a busy loop on one core took 1.19 s a
window at 2 threads and 1.16 s at 1, against 0.60 s idle.

Here the window is cut into parts (rows of the per-row layers, heads of the attention)
that `size` threads, at one OpenMP thread each, take from a queue: a stage (a few
products) ends at one wait instead of one per product, and a waiting thread sleeps. The
same busy machine encodes base's window in 0.98 s this way (tiny.en float32: 0.43 s
against 0.50 at 1 thread). Idle, PyTorch's own threads stay 4-7% faster, so the engine
asks for a crew only while its thread policy finds the machine busy (threads.py).

Each part is the arithmetic the whole-window products do for those rows or that head (a
row's sums do not depend on how many rows a product has, and each head's attention is
its own), so the features are `AudioEncoder.forward`'s numbers; tests/test_crew.py checks
that they are equal.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import AudioEncoder, ResidualAttentionBlock

Task = Callable[[], None]


class Crew:
    """`size` threads of one torch thread each that run lists of tasks for their caller."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a crew needs at least one thread, got {size}")
        self.size = size
        self._tasks: queue.SimpleQueue[tuple[Task, _Latch] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"susurrus-crew-{i}", daemon=True)
            for i in range(size)
        ]
        # Each thread sets its thread count before the constructor returns: torch's setter
        # also resets process-wide state (its own thread pool), which is not to happen
        # while the caller's products run.
        self._ready = threading.Barrier(size + 1)
        for thread in self._threads:
            thread.start()
        self._ready.wait()

    def _serve(self) -> None:
        # OpenMP thread counts belong to the calling thread: this one's products stay on it.
        torch.set_num_threads(1)
        self._ready.wait()
        while True:
            item = self._tasks.get()
            if item is None:
                return
            task, latch = item
            try:
                with torch.inference_mode():
                    task()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                latch.fail(exc)
            finally:
                latch.count_down()

    def run(self, tasks: Sequence[Task]) -> None:
        """Run every task on the crew and return once all are done; the first error of a
        task is raised here (the others still run to their end)."""
        latch = _Latch(len(tasks))
        for task in tasks:
            self._tasks.put((task, latch))
        latch.wait()

    def close(self) -> None:
        """Let the threads end (tasks already handed over are done first)."""
        for _ in self._threads:
            self._tasks.put(None)


class _Latch:
    """Counts a run's tasks down; the caller waits for zero."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._done = threading.Condition()
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        with self._done:
            if self.error is None:
                self.error = exc

    def count_down(self) -> None:
        with self._done:
            self._count -= 1
            if self._count <= 0:
                self._done.notify_all()

    def wait(self) -> None:
        with self._done:
            while self._count > 0:
                self._done.wait()
        if self.error is not None:
            raise self.error


def spans(length: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` near-equal spans covering range(length) (fewer if short)."""
    step = -(-length // max(1, min(parts, length)))
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def encode(encoder: AudioEncoder, mel: Tensor, crew: Crew, parts: int | None = None) -> Tensor:
    """`encoder(mel)` for each window of `mel` (windows, n_mels, frames), computed by
    `crew`: the same features, each stage in `parts` spans of rows (default: one per
    thread, measured fastest both idle and busy; more let a thread that gets more of its
    core take more of them, at a fixed cost per part)."""
    if mel.shape[0] != 1:
        return torch.cat([encode(encoder, m[None], crew, parts) for m in mel])
    parts = parts or crew.size
    dtype = encoder.conv1.weight.dtype
    pe = encoder.positional_embedding
    frames = mel.shape[-1]
    if frames != 2 * pe.shape[0]:
        raise ValueError(f"the encoder takes {2 * pe.shape[0]} mel frames (30 s), got {frames}")
    conv1, conv2 = encoder.conv1, encoder.conv2
    # The convolutions' zero padding made once, then each span a convolution without
    # padding over its frames and their neighbours.
    padded = F.pad(mel.to(dtype), (1, 1))
    first = padded.new_empty(1, conv1.out_channels, frames)

    def convolve_first(start: int, end: int) -> None:
        window = padded[..., start : end + 2]
        first[..., start:end] = F.gelu(F.conv1d(window, conv1.weight, conv1.bias))

    crew.run([_bind(convolve_first, span) for span in spans(frames, parts)])
    between = F.pad(first, (1, 1))
    x = pe.new_empty(1, pe.shape[0], conv2.out_channels)

    def convolve_second(start: int, end: int) -> None:
        window = between[..., 2 * start : 2 * end + 1]
        out = F.gelu(F.conv1d(window, conv2.weight, conv2.bias, stride=2))
        x[:, start:end] = out.transpose(1, 2).to(pe.dtype) + pe[start:end]

    rows = spans(pe.shape[0], parts)
    crew.run([_bind(convolve_second, span) for span in rows])
    for block in encoder.blocks:
        _block(block, x, rows, crew)
    out = torch.empty_like(x)

    def finish(start: int, end: int) -> None:
        out[:, start:end] = encoder.ln_post(x[:, start:end])

    crew.run([_bind(finish, span) for span in rows])
    return out


def _block(
    block: ResidualAttentionBlock, x: Tensor, rows: list[tuple[int, int]], crew: Crew
) -> None:
    """One encoder block on `x` (1, length, n_state) in place: `block(x)`'s arithmetic."""
    attn = block.attn
    length, n_state = x.shape[1], x.shape[2]
    qkv: list[Tensor] = []  # queries, keys, values (1, length, n_state), made by the first span
    lock = threading.Lock()

    def project(start: int, end: int) -> None:
        q, k, v = attn.project_qkv(block.layer_input(block.attn_ln(x[:, start:end])))
        with lock:
            if not qkv:
                qkv.extend(q.new_empty(1, length, n_state) for _ in range(3))
        for buffer, part in zip(qkv, (q, k, v)):
            buffer[:, start:end] = part

    crew.run([_bind(project, span) for span in rows])
    heads = attn.split_heads
    q, k, v = heads(qkv[0]), heads(qkv[1]), heads(qkv[2])
    mixed = qkv[0].new_empty(1, attn.n_head, length, n_state // attn.n_head)

    def attend(head: int) -> None:
        part = slice(head, head + 1)
        mixed[:, part] = attn.sdpa(q[:, part], k[:, part], v[:, part])

    crew.run([_bind(attend, (head,)) for head in range(attn.n_head)])
    merged = attn.merge_heads(mixed)

    def rest(start: int, end: int) -> None:
        y = x[:, start:end] + attn.out(merged[:, start:end])
        x[:, start:end] = y + block.mlp(block.layer_input(block.mlp_ln(y)))

    crew.run([_bind(rest, span) for span in rows])


def _bind(function: Callable[..., None], args: tuple) -> Task:
    return lambda: function(*args)
