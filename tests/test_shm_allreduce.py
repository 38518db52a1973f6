"""The shared-memory all-reduce: gloo's sums, the same bits on every rank, and gloo where it does not fit."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.runtime.health import Health
from engine.runtime.shm_allreduce import shared_memory_all_reduce

WORLD = 3


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    fast = shared_memory_all_reduce(None, rank, WORLD, Health(rank, WORLD, 60.0), capacity_bytes=4096)
    results = {}
    for step, dtype in enumerate([torch.float32, torch.bfloat16, torch.float32]):  # both slot sets, twice
        gen = torch.Generator().manual_seed(100 * step + rank)
        mine = torch.randn(7, 33, generator=gen).to(dtype)
        want = mine.clone()
        dist.all_reduce(want)
        got = mine.clone()
        assert fast(got)
        results[f"got{step}"], results[f"want{step}"] = got, want
    results["too_big"] = torch.tensor(fast(torch.zeros(4096 // 4 + 1)))  # over capacity: caller uses gloo
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not os.path.isdir("/dev/shm"),
                    reason="the shared-memory all-reduce runs on x86-64 hosts with /dev/shm only")
def test_sums_match_gloo_and_agree_across_ranks(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for step in range(3):
        for r in ranks:
            # gloo may add in another order: a bf16 step at |x| ≈ 5 is 1/32
            assert torch.allclose(r[f"got{step}"].float(), r[f"want{step}"].float(), atol=0.07 if step == 1 else 1e-5)
            assert torch.equal(r[f"got{step}"], ranks[0][f"got{step}"])  # tensor-parallel ranks stay identical
    assert not any(bool(r["too_big"]) for r in ranks)
