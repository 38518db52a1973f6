"""The shared evaluation loop in one process: shares, step counts, records, latency."""
from __future__ import annotations

import math

import pytest
import torch

from engine.runtime.distributed import ParallelContext
from engine.tasks.evaluation import dp_share, evaluate


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 5, 10, 11])
def test_shares_are_contiguous_disjoint_and_even(n: int, dp_size: int) -> None:
    shares = [dp_share(n, r, dp_size) for r in range(dp_size)]
    assert [i for share in shares for i in share] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert max(map(len, shares)) == math.ceil(n / dp_size)  # what every rank's step count is built on


class Squares(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "x": torch.tensor([float(i)])}


@pytest.mark.parametrize("workers", [0, 1])
def test_records_arrive_in_order_with_one_latency_sample_per_batch(workers: int) -> None:
    ctx = ParallelContext(rank=0, world_size=1, tp_size=1, device=torch.device("cpu"), backend=None)
    received = []

    def compute(batch: dict) -> list:
        return [{"index": i, "square": float(x) ** 2} for i, x in zip(batch["index"], batch["x"][:, 0])]

    stats = evaluate(ctx, Squares(), [1, 3, 4, 7, 9], compute, batch_size=2, num_workers=workers,
                     on_records=received.extend)
    assert [(r["index"], r["square"]) for r in received] == [(i, i * i) for i in (1, 3, 4, 7, 9)]
    assert stats.latency.batch_sizes == [2, 2, 1] and stats.samples == 5
    assert stats.latency_summary()["samples_per_s"] > 0
    assert evaluate(ctx, Squares(), [], compute, batch_size=2).latency_summary() is None
