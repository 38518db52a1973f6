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
