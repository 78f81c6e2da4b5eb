"""The same workers as Ray actors, on a local Ray cluster or one joined by address: each
actor loads the model once; files go out largest first, `batch_size` per call (decoded side
by side on the actor's engine); the files of an actor that died go to another one."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

from ..errors import SusurrusError
from .inputs import Item
from .worker import Worker, WorkerConfig, one_line

log = logging.getLogger("susurrus")

CALLS_PER_ACTOR = 2  # one decoding, one queued behind it: no idle gap between calls


class _Actor:
    def __init__(self, config: WorkerConfig, label: str) -> None:
        self.worker = Worker(config, label)

    def pid(self) -> int:
        return os.getpid()

    def run(self, items: list[Item]) -> list[dict]:
        return list(self.worker.process(items))


def connect(address: str | None, num_cpus: int | None = None) -> Any:
    """Join the cluster at `address` (`auto`, `ray://host:10001`, `host:6379`), or start a
    local one; a caller that already initialised Ray keeps its own."""
    try:
        import ray
    except ImportError:
        raise SusurrusError(
            "--ray needs Ray: pip install 'susurrus[ray]' (or pip install ray)"
        ) from None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
        }
        if address:
            kwargs["address"] = address
        elif num_cpus:
            kwargs["num_cpus"] = num_cpus
        try:
            ray.init(**kwargs)
        except Exception as exc:  # ConnectionError, RuntimeError...: one line, no traceback
            raise SusurrusError(f"could not start or join a Ray cluster: {one_line(exc)}") from None
    return ray


class RayPool:
    def __init__(self, config: WorkerConfig, workers: int | None, retries: int,
                 gpus_per_worker: float, address: str | None) -> None:
        self.ray = connect(address)
        self.config = config
        self.retries = retries
        self.gpus = gpus_per_worker
        self.cpus = max(1, config.threads or 1)
        if workers is None:
            resources = self.ray.cluster_resources()
            if self.gpus:
                workers = int(resources.get("GPU", 0) // self.gpus)
            else:
                workers = int(resources.get("CPU", 1) // self.cpus)
        self.workers = max(1, workers)
        self.prefix = f"susurrus-{uuid.uuid4().hex[:8]}"

    def run(
        self,
        pending: list[Item],
        on_record: Callable[[Item, dict], None],
        on_start: Callable[[dict], None] | None = None,
    ) -> None:
        ray = self.ray
        from ray.exceptions import GetTimeoutError, RayActorError

        remote = ray.remote(_Actor)
        actors: dict[str, Any] = {}
        calls: dict[Any, tuple[str, list[Item]]] = {}  # object ref -> (actor, its files)
        todo = list(pending)
        left = len(pending)
        spawned = 0
        spawn_limit = self.workers * (self.retries + 2)
        chunk = max(1, self.config.batch_size)

        def spawn() -> None:
            nonlocal spawned
            label = f"{self.prefix}-{spawned}"
            spawned += 1
            # Restarts are ours (a new actor, the files retried), so Ray does not restart it.
            actors[label] = remote.options(
                name=label, num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0,
            ).remote(self.config, label)

        def give_back(label: str, files: list[Item], why: str) -> None:
            nonlocal left
            for item in files:
                item.attempts += 1
                if item.attempts > self.retries:
                    left -= 1
                    on_record(item, {
                        "status": "failed",
                        "error": f"the worker died on each of {item.attempts} tries ({why})",
                        "worker": label,
                    })
                else:
                    todo.append(item)
            todo.sort(key=lambda item: (-item.size, item.id))

        for _ in range(min(self.workers, len(pending))):
            spawn()
        try:
            while left:
                for label, actor in list(actors.items()):
                    busy = sum(1 for owner, _ in calls.values() if owner == label)
                    while todo and busy < CALLS_PER_ACTOR:
                        files, todo[:] = todo[:chunk], todo[chunk:]
                        calls[actor.run.remote(files)] = (label, files)
                        busy += 1
                        if on_start is not None:
                            for item in files:
                                on_start({"worker": label, "actor": label, "path": item.path})
                if not calls:
                    raise SusurrusError("no worker left")
                done, _ = ray.wait(list(calls), num_returns=1, timeout=1.0)
                for ref in done:
                    label, files = calls.pop(ref)
                    try:
                        records = ray.get(ref, timeout=60)
                    except (RayActorError, GetTimeoutError) as exc:
                        why = one_line(exc)[:300]
                        log.warning("worker %s died holding %d file(s): %s", label, len(files),
                                    why)
                        if actors.pop(label, None) is not None:
                            while len(actors) < self.workers and spawned < spawn_limit:
                                spawn()
                        give_back(label, files, why)
                        continue
                    except Exception as exc:  # the call itself failed: recorded, never lost
                        records = [{"id": item.id, "status": "failed", "error": one_line(exc),
                                    "worker": label} for item in files]
                    by_id = {item.id: item for item in files}
                    for record in records:
                        left -= 1
                        on_record(by_id[record["id"]], record)
                if left and not actors and spawned >= spawn_limit:
                    raise SusurrusError(f"workers keep dying ({spawned} started)")
        finally:
            for actor in actors.values():
                try:
                    ray.kill(actor)
                except Exception:  # already gone
                    pass
