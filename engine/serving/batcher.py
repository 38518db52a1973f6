"""The dynamic batcher: requests queue per kind; one engine thread takes batches and runs them on the group.

A batch holds jobs of one kind, up to --max-batch-size, and leaves when it is full or when its oldest job
has waited --max-wait-ms. The queue is bounded (--max-queue jobs waiting): a full queue refuses at once, so
that the client can retry elsewhere, instead of letting latency grow without limit. Jobs whose request gave
up (timed out) before their batch started are dropped; a job already in a batch always finishes with it, so
a client that goes away never changes what the others in its batch get.

With device graphs on (engine.runtime.graphs) a batch is rounded up to its bucket: `padded_size` says how many
rows it runs as; the runner pads with copies of the first job's inputs and gives each job its own row only.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Sequence

import torch

from ..runtime.graphs import bucket_for


class QueueFull(Exception):
    """The bounded queue is full: the request gets 503 with Retry-After."""


class Unavailable(Exception):
    """The server cannot answer: the model failed, or it is shutting down."""


@dataclass
class Job:
    kind: str
    inputs: Dict[str, torch.Tensor]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    abandoned: bool = False

    def resolve(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        """Hand the outcome to the request's event loop (called from the engine thread)."""
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)


@dataclass
class Result:
    """One job's output row and how it was computed."""
    output: torch.Tensor
    batch_size: int
    forward_ms: float


class Batcher:
    def __init__(self, max_batch_size: int, max_wait_s: float, max_queue: int,
                 buckets: Sequence[int] = ()) -> None:
        self.max_batch_size = max_batch_size
        self.buckets = tuple(sorted(buckets))
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queues: "OrderedDict[str, Deque[Job]]" = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self._failed: Optional[str] = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def padded_size(self, n: int) -> int:
        """The rows a batch of n jobs runs as: its bucket when there are buckets (graphs on), else n."""
        return (bucket_for(n, self.buckets) or n) if self.buckets else n

    def submit_all(self, jobs: List[Job]) -> None:
        """Queue a request's jobs, all or none."""
        with self._cond:
            if self._failed or self._closed:
                raise Unavailable(self._failed or "the server is shutting down")
            if self.depth + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs at most)")
            for job in jobs:
                self._queues.setdefault(job.kind, deque()).append(job)
            self._cond.notify()

    def next_batch(self, idle_s: float) -> Optional[List[Job]]:
        """The next batch; None after `idle_s` with nothing queued, or once closed and drained."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.depth or self._closed, timeout=idle_s) or not self.depth:
                return None
            queue = self._oldest_queue()
            # Wait for the batch to fill, at most until its oldest job has waited max_wait (not when closing).
            deadline = queue[0].enqueued + self.max_wait_s
            while len(queue) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(timeout=left):
                    break
            jobs = [queue.popleft() for _ in range(min(self.max_batch_size, len(queue)))]
        return [job for job in jobs if not job.abandoned] or self.next_batch(0)

    def _oldest_queue(self) -> Deque[Job]:
        return min((q for q in self._queues.values() if q), key=lambda q: q[0].enqueued)

    def close(self) -> None:
        """Take no new jobs; `next_batch` drains what is queued without waiting, then returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def fail(self, reason: str) -> List[Job]:
        """Refuse everything from now on; returns the queued jobs (the caller fails them)."""
        with self._cond:
            self._failed = reason
            jobs = [job for q in self._queues.values() for job in q]
            for q in self._queues.values():
                q.clear()
            self._cond.notify_all()
        return jobs
