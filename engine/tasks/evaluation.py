"""The data-parallel × tensor-parallel evaluation loop that the task front ends share.

Each tensor-parallel group (one model copy) takes a disjoint contiguous share of
the samples; every rank of a group loads the same batches, because the model's
all-reduces need identical inputs on the group's ranks. A callback turns a batch
into result records; after every step each group's records are gathered to rank
0, which hands them to `on_records` (e.g. a ResultsWriter) as they arrive, so a
run that dies keeps what it finished.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from torch.utils.data import DataLoader, Dataset, Subset

from ..data.datasets import collate
from ..runtime.distributed import ParallelContext
from .metrics import LatencyStats
from .progress import Progress

Batch = Dict[str, Any]
Record = Dict[str, Any]


def dp_share(n: int, dp_rank: int, dp_size: int) -> range:
    """Positions of data-parallel group `dp_rank`'s contiguous share of n items; shares differ by at most one."""
    return range(n * dp_rank // dp_size, n * (dp_rank + 1) // dp_size)


@dataclass
class EvalStats:
    """What one `evaluate` call measured. On rank 0 `latency` holds every group's batches."""

    latency: LatencyStats
    wall_s: float
    samples: int  # samples evaluated in this call by all groups (rank 0) or by this rank's group

    def latency_summary(self) -> Optional[Dict[str, float]]:
        """LatencyStats.summary with samples/s over the wall time; None when no batch ran."""
        return self.latency.summary(self.wall_s) if self.latency.times_s else None


def evaluate(
    ctx: ParallelContext,
    dataset: Dataset,
    indices: Sequence[int],
    compute: Callable[[Batch], List[Record]],
    *,
    batch_size: int,
    num_workers: int = 2,
    prefetch_factor: int = 2,
    collate_fn: Callable[[List[Any]], Batch] = collate,
    on_records: Optional[Callable[[List[Record]], None]] = None,
    label: str = "evaluating",
    unit: str = "samples",
) -> EvalStats:
    """Run `compute` over `dataset[indices]`, split across the data-parallel groups.

    Every rank calls this with the same `indices`. `compute(batch)` runs the model
    (all ranks of a group together) and returns the batch's records; its time,
    device-synchronised, is the batch's latency. Only each group's tensor-parallel
    rank 0 reports records; rank 0 receives them all, step by step, in `on_records`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    share = [indices[i] for i in dp_share(len(indices), ctx.dp_rank, ctx.dp_size)]
    # Every rank takes part in every step's gather, so all must agree on the step count:
    # the largest share's batch count, from arithmetic alone.
    steps = math.ceil(math.ceil(len(indices) / ctx.dp_size) / batch_size)
    workers = num_workers if share else 0
    loader = DataLoader(Subset(dataset, share), batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                        num_workers=workers, prefetch_factor=prefetch_factor if workers else None)
    latency = LatencyStats()
    done = 0
    start = time.perf_counter()
    batches = iter(loader)
    reporting = ctx.leads_tp_group
    with _progress(ctx, len(indices), label, unit) as bar:
        for _ in range(steps):
            batch = next(batches, None)
            records: List[Record] = []
            size = 0
            if batch is not None:
                size = len(next(iter(batch.values())))
                ctx.synchronize()
                began = time.perf_counter()
                records = compute(batch)
                ctx.synchronize()
                latency.add(time.perf_counter() - began, size)
            gathered = ctx.gather_objects((size if reporting else 0, records if reporting else []))
            if ctx.is_main:
                step_size = sum(n for n, _ in gathered)
                if on_records is not None:
                    on_records([r for _, group_records in gathered for r in group_records])
                bar.update(step_size)
                done += step_size
    wall_s = time.perf_counter() - start
    every_group = ctx.gather_objects(latency if reporting else None)
    if ctx.is_main:
        latency = _merged([s for s in every_group if s is not None])
    else:
        done = len(share)
    return EvalStats(latency=latency, wall_s=wall_s, samples=done)


def _merged(stats: List[LatencyStats]) -> LatencyStats:
    return LatencyStats(times_s=[t for s in stats for t in s.times_s],
                        batch_sizes=[b for s in stats for b in s.batch_sizes])


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def _progress(ctx: ParallelContext, total: int, label: str, unit: str) -> Iterator[Any]:
    """A progress bar with rate and time left on rank 0 (stderr, so stdout keeps only results); nothing elsewhere."""
    if not ctx.is_main:
        yield _NoBar()
        return
    bar = Progress(total, label, unit)
    try:
        yield bar
    finally:
        bar.close()
