"""engine.bench splits the all-reduce time into the calls' own cost and each rank's wait for a slower peer."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.runtime.distributed import ParallelContext
from engine.runtime.health import Health
from engine.runtime.shm_allreduce import shared_memory_all_reduce
from engine.tasks.benchmark import allreduce_waits

WORLD, CALLS, LATE_S = 2, 5, 0.04


def test_split_by_hand() -> None:
    # call 0: rank 1 came last (0.1 s); call 1: rank 0 (0.2 s); call 2: both together (0.5 s)
    own, waits = allreduce_waits([[1.0, 0.2, 0.5], [0.1, 0.3, 0.5]])
    assert own == pytest.approx(0.8)
    assert waits == pytest.approx([0.9, 0.1])


def _late_calls(ctx: ParallelContext) -> dict:
    """CALLS all-reduces that rank 1 reaches late, each; the log and the total this rank kept of them."""
    ctx.comm_log, ctx.comm_seconds = [], {}
    tensor = torch.ones(64, 64)
    for _ in range(CALLS):
        if ctx.rank == 1:
            time.sleep(LATE_S)
        ctx.all_reduce_(tensor)
    return {"log": ctx.comm_log, "total": ctx.comm_seconds["activations"]}


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    ctx = ParallelContext(rank=rank, world_size=WORLD, tp_size=WORLD, device=torch.device("cpu"), backend="gloo")
    found = {"gloo": _late_calls(ctx)}
    ctx.shared = shared_memory_all_reduce(None, rank, WORLD, Health(rank, WORLD, 60.0, beat=False))
    if ctx.shared is not None:  # x86-64 hosts with /dev/shm
        found["shared-memory"] = _late_calls(ctx)
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump(found, handle)
    dist.destroy_process_group()


def test_the_early_rank_waits_for_the_late_one(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert "gloo" in ranks[0]
    for path in ranks[0]:
        logs = [r[path]["log"] for r in ranks]
        assert [len(log) for log in logs] == [CALLS, CALLS], path
        assert [sum(log) for log in logs] == pytest.approx([r[path]["total"] for r in ranks])
        own, (early, late) = allreduce_waits(logs)
        # rank 0 waited about LATE_S at each call (less at the first, reached at slightly different times);
        # rank 1, arriving last, hardly at all; and a 16 KiB sum costs far less than the delay
        assert early > (CALLS - 1) * LATE_S * 0.8, path
        assert late < early / 4 and own < early / 4, path
        assert own + early == pytest.approx(sum(logs[0])), path
