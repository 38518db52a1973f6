"""The dynamic batcher alone: batches of one kind, full or at the oldest job's deadline, the queue bound, jobs
given up before their batch, closing (drains without waiting) and failing (hands back what was queued)."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Optional

import pytest
import torch

from engine.serving.batcher import Batcher, Job, QueueFull, Unavailable

LOOP = asyncio.new_event_loop()


def job(kind: str, tag: int, enqueued: Optional[float] = None) -> Job:
    made = Job(kind, {"x": torch.tensor([tag])}, LOOP, LOOP.create_future())
    if enqueued is not None:
        made.enqueued = enqueued
    return made


def tags(jobs) -> list:
    return [int(j.inputs["x"]) for j in jobs]


def test_a_full_batch_leaves_at_once_with_jobs_of_one_kind_oldest_first() -> None:
    batcher = Batcher(max_batch_size=3, max_wait_s=60, max_queue=10)
    now = time.monotonic()
    batcher.submit_all([job("vqa", 1, now - 2), job("text", 2, now - 3), job("vqa", 3, now - 1),
                        job("text", 4, now), job("text", 5, now)])
    assert tags(batcher.next_batch(idle_s=0)) == [2, 4, 5]  # the oldest job's kind; full, so no waiting
    began = time.monotonic()
    batcher.max_wait_s = 0.05
    assert tags(batcher.next_batch(idle_s=0)) == [1, 3]  # not full: leaves at the oldest job's deadline
    assert time.monotonic() - began < 5
    assert batcher.next_batch(idle_s=0.01) is None and batcher.depth == 0


def test_a_partial_batch_waits_for_the_oldest_jobs_deadline_and_takes_late_arrivals() -> None:
    batcher = Batcher(max_batch_size=4, max_wait_s=0.3, max_queue=10)
    batcher.submit_all([job("vqa", 1)])
    threading.Timer(0.05, lambda: batcher.submit_all([job("vqa", 2)])).start()
    began = time.monotonic()
    assert tags(batcher.next_batch(idle_s=1)) == [1, 2]
    assert time.monotonic() - began >= 0.25


def test_the_queue_bound_abandoned_jobs_close_and_fail() -> None:
    batcher = Batcher(max_batch_size=8, max_wait_s=60, max_queue=3)
    first = [job("vqa", i) for i in range(3)]
    batcher.submit_all(first)
    with pytest.raises(QueueFull):
        batcher.submit_all([job("vqa", 9)])
    with pytest.raises(QueueFull):  # all or nothing
        batcher.submit_all([job("vqa", 9), job("vqa", 10)])
    first[1].abandoned = True
    batcher.close()  # drains without waiting for the batch to fill
    assert tags(batcher.next_batch(idle_s=0)) == [0, 2]
    assert batcher.next_batch(idle_s=0) is None and batcher.closed
    with pytest.raises(Unavailable):
        batcher.submit_all([job("vqa", 11)])
    failing = Batcher(max_batch_size=8, max_wait_s=60, max_queue=3)
    failing.submit_all([job("vqa", 1), job("text", 2)])
    assert sorted(tags(failing.fail("a rank died"))) == [1, 2] and failing.depth == 0
    with pytest.raises(Unavailable, match="a rank died"):
        failing.submit_all([job("vqa", 3)])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 17, 31, 33])
def test_bucketed_batches_give_each_job_its_own_row_and_no_padding_row(n: int) -> None:
    from engine.runtime.graphs import DEFAULT_BUCKETS
    from engine.serving.metrics import ServerMetrics
    from engine.serving.runner import Runner

    class Channel:  # the group, as the runner sees it: each output row tags its input row
        sizes = []

        def step(self, op, kind, batch):
            self.sizes.append(batch["text_ids"].shape[0])
            return batch["text_ids"][:, :1].float() * 10 + batch["text_masks"][:, :1]

    def vqa_job(tag: int) -> Job:
        inputs = {"text_ids": torch.tensor([tag, 0]), "text_masks": torch.tensor([1, 0]), "image": torch.zeros(3)}
        return Job("vqa", inputs, LOOP, LOOP.create_future())

    batcher = Batcher(max_batch_size=40, max_wait_s=0, max_queue=64, buckets=DEFAULT_BUCKETS)
    runner = Runner(batcher, ServerMetrics(), timeout_s=60, on_fatal=lambda reason: None)
    runner.channel = Channel()
    jobs = [vqa_job(100 + i) for i in range(n)]
    batcher.submit_all(jobs)
    runner._run(batcher.next_batch(idle_s=0))
    results = LOOP.run_until_complete(asyncio.gather(*(j.future for j in jobs)))
    padded = n if n > 32 else min(b for b in DEFAULT_BUCKETS if b >= n)
    assert Channel.sizes == [padded] and batcher.padded_size(n) == padded
    assert [float(r.output) for r in results] == [10 * (100 + i) + 1 for i in range(n)]
    assert all(r.batch_size == n for r in results)
    assert Batcher(max_batch_size=40, max_wait_s=0, max_queue=1).padded_size(n) == n  # graphs off: no padding
