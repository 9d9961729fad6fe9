"""Two CPU ranks in one gloo process group for a test module: ``ranks.run(fn, *args)`` runs
``fn(rank, *args)`` on every rank and returns the results by rank.

The workers are spawned once (a module-scoped fixture), rendezvous through a file store in a
temporary directory, and run each task with a fresh dynamo cache and ``torch.manual_seed(0)``. ``fn``
must be a module-level function (it is pickled by name). A task that raises on any rank fails the
test with that rank's traceback; a task that hangs (one rank waiting in a collective) fails it after
``timeout`` seconds and the workers are stopped.
"""

from __future__ import annotations

import datetime
import multiprocessing.connection
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank: int, world: int, store: str, conn: multiprocessing.connection.Connection) -> None:
    import torch.distributed as dist

    import bkcompile  # noqa: F401  (the backend and its dynamo settings, as in the parent)

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        while (task := conn.recv()) is not None:
            fn, args = task
            torch._dynamo.reset()
            torch.manual_seed(0)
            try:
                conn.send(("ok", fn(rank, *args)))
            except BaseException:  # the test reports it
                conn.send(("error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class Ranks:
    def __init__(self, world: int = WORLD) -> None:
        self.world = world
        self._dir = tempfile.TemporaryDirectory()
        context = mp.get_context("spawn")
        pipes = [context.Pipe() for _ in range(world)]
        self._conns = [parent for parent, _ in pipes]
        store = os.path.join(self._dir.name, "store")
        self._procs = [
            context.Process(target=_worker, args=(rank, world, store, child), daemon=True)
            for rank, (_, child) in enumerate(pipes)
        ]
        for proc in self._procs:
            proc.start()

    def run(self, fn: Callable, *args: Any, timeout: float = 240) -> list[Any]:
        for conn in self._conns:
            conn.send((fn, args))
        results, errors = [], []
        for rank, conn in enumerate(self._conns):
            if not conn.poll(timeout):
                self.close()
                pytest.fail(f"rank {rank} did not finish {fn.__name__} within {timeout} s")
            status, value = conn.recv()
            results.append(value)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            pytest.fail("\n".join(errors), pytrace=False)
        return results

    def close(self) -> None:
        for conn, proc in zip(self._conns, self._procs):
            if proc.is_alive():
                try:
                    conn.send(None)
                except OSError:
                    pass
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        self._dir.cleanup()
