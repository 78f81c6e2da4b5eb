"""Workers as processes on this machine: each loads the model once; the coordinator hands
out files largest first as a worker has room, and gives the files of a worker that died to
another one (a new process takes its place)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from ..errors import SusurrusError
from .inputs import Item
from .worker import Worker, WorkerConfig, one_line

log = logging.getLogger("susurrus")


def _worker_main(config: WorkerConfig, label: str, conn: Connection) -> None:
    """A worker process: load the model, then transcribe the items that arrive on `conn`
    until None (or until the coordinator is gone), reporting on the same pipe.

    Each worker has a pipe of its own: a worker killed in the middle of a message can
    only break its own pipe (a queue shared by all would keep its lock forever)."""
    # Ctrl-C reaches the whole process group: the coordinator alone decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    sending = threading.Lock()  # the reading thread and this one both report

    def send(message: tuple) -> None:
        with sending:
            conn.send(message)

    try:
        worker = Worker(config, label)
    except BaseException as exc:
        send(("fatal", one_line(exc)))
        return
    send(("ready", os.getpid()))

    def items():
        while True:
            try:
                if not conn.poll(1.0):
                    if os.getppid() != parent:
                        return  # orphaned: nobody would read what it writes
                    continue
                item = conn.recv()
            except (EOFError, OSError):
                return  # the coordinator is gone
            if item is None:
                return
            send(("start", item.id))
            yield item

    try:
        for record in worker.process(items()):
            send(("done", record))
    except (BrokenPipeError, EOFError):
        pass  # the coordinator is gone: nobody to report to


@dataclass
class _Slot:
    label: str
    process: Any
    conn: Connection
    pid: int | None = None
    ready: bool = False
    closed: bool = False
    held: dict[int, Item] = field(default_factory=dict)


class LocalPool:
    """`workers` processes (spawned, so no state of the caller's is shared)."""

    def __init__(self, config: WorkerConfig, workers: int, retries: int) -> None:
        self.config = config
        self.workers = workers
        self.retries = retries
        # A worker holds the files on its engine plus one being read, no more: the rest
        # stay here for whichever worker frees up first.
        self.capacity = config.batch_size + 1

    def run(
        self,
        pending: list[Item],
        on_record: Callable[[Item, dict], None],
        on_start: Callable[[dict], None] | None = None,
    ) -> None:
        ctx = mp.get_context("spawn")
        slots: dict[str, _Slot] = {}
        todo = list(pending)  # largest first; retried files go back in order
        left = len(pending)
        spawned = 0
        # A worker that cannot even start (a crash at import) must not be restarted forever.
        spawn_limit = self.workers * (self.retries + 2)

        def spawn() -> None:
            nonlocal spawned
            label = f"local-{spawned}"
            spawned += 1
            ours, theirs = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=_worker_main, args=(self.config, label, theirs), daemon=True,
                name=f"susurrus-{label}",
            )
            process.start()
            theirs.close()  # so that the worker's death reads as the end of the pipe
            slots[label] = _Slot(label, process, ours)

        def handle(slot: _Slot, message: tuple) -> None:
            nonlocal left
            kind, payload = message
            label = slot.label
            if kind == "ready":
                slot.ready, slot.pid = True, payload
            elif kind == "fatal":
                raise SusurrusError(f"a worker could not start: {payload}")
            elif kind == "start" and on_start is not None and payload in slot.held:
                on_start({"worker": label, "pid": slot.pid, "path": slot.held[payload].path})
            elif kind == "done":
                item = slot.held.pop(payload["id"], None)
                if item is not None:
                    left -= 1
                    on_record(item, payload)

        def bury(slot: _Slot) -> None:
            """A worker died: its files go to the others, or fail after `retries` tries."""
            nonlocal left
            del slots[slot.label]
            code = slot.process.exitcode
            log.warning("worker %s (pid %s) died (exit code %s) holding %d file(s)",
                        slot.label, slot.pid, code, len(slot.held))
            for item in slot.held.values():
                item.attempts += 1
                if item.attempts > self.retries:
                    left -= 1
                    on_record(item, {
                        "status": "failed",
                        "error": f"the worker died (exit code {code}) on each of "
                        f"{item.attempts} tries",
                        "worker": slot.label,
                    })
                else:
                    todo.append(item)
            todo.sort(key=lambda item: (-item.size, item.id))

        finished = False
        next_check = 0.0
        for _ in range(min(self.workers, len(pending))):
            spawn()
        try:
            while left:
                for slot in slots.values():
                    while slot.ready and not slot.closed and todo and (
                        len(slot.held) < self.capacity
                    ):
                        item = todo.pop(0)
                        slot.held[item.id] = item
                        try:
                            slot.conn.send(item)
                        except OSError:
                            slot.closed = True  # the worker is dying: its files come back
                open_slots = {slot.conn: slot for slot in slots.values() if not slot.closed}
                for conn in wait(list(open_slots), timeout=0.5):
                    slot = open_slots[conn]
                    try:
                        handle(slot, conn.recv())
                    except (EOFError, OSError):
                        slot.closed = True
                if time.monotonic() < next_check:
                    continue
                # Every half second, even while messages keep coming: who died?
                next_check = time.monotonic() + 0.5
                for slot in list(slots.values()):
                    if slot.closed or not slot.process.is_alive():
                        # What it reported before dying is read first.
                        with contextlib.suppress(EOFError, OSError):
                            while not slot.closed and slot.conn.poll(0.1):
                                handle(slot, slot.conn.recv())
                        slot.process.join(timeout=5)
                        if slot.process.is_alive():
                            slot.process.kill()  # a broken pipe but alive: of no use
                            slot.process.join(timeout=5)
                        bury(slot)
                held = sum(len(slot.held) for slot in slots.values())
                while left and len(slots) < min(self.workers, len(todo) + held):
                    if spawned >= spawn_limit:
                        raise SusurrusError(f"workers keep dying ({spawned} started)")
                    spawn()
                if left and not slots:
                    raise SusurrusError("no worker left")
            finished = True
        finally:
            for slot in slots.values():
                with contextlib.suppress(Exception):
                    slot.conn.send(None)
            for slot in slots.values():
                # Interrupted: the workers' files are unfinished anyway (their progress is
                # saved after every window), so they stop now.
                slot.process.join(timeout=10 if finished else 0)
                if slot.process.is_alive():
                    slot.process.kill()
                    slot.process.join(timeout=5)
                slot.conn.close()
