"""Helpers for the tests that spawn gloo process groups (context parallel): a free port,
a worker loop that runs named checks and records each one's outcome per rank, and
``spawn_checks`` that runs it on ``world`` processes and returns every rank's record.

Each check's outcome is written to a JSON file per rank, so a failing check names itself
(with its traceback) without hanging the others.
"""

from __future__ import annotations

import datetime
import json
import socket
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_checks(rank: int, world: int, port: int, path: str, checks: list[str],
                 run_check: Callable[[str, int, int], None], timeout_s: int = 60) -> None:
    """Join the gloo group, run every check, write {check: "ok" | traceback} to path.rank."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results = {}
    try:
        for name in checks:
            try:
                run_check(name, rank, world)
                results[name] = "ok"
            except Exception:  # noqa: BLE001  (recorded, reported by the test of that check)
                results[name] = traceback.format_exc()
        dist.barrier()
    finally:
        Path(f"{path}.{rank}").write_text(json.dumps(results))
        dist.destroy_process_group()


def spawn_checks(worker: Callable, world: int, directory: Path) -> list[dict]:
    """Run ``worker(rank, world, port, path)`` (a module-level function that calls
    ``serve_checks``) on ``world`` processes; returns each rank's {check: outcome}."""
    path = str(directory / "res")
    mp.spawn(worker, args=(world, free_port(), path), nprocs=world, join=True)
    return [json.loads(Path(f"{path}.{r}").read_text()) for r in range(world)]
