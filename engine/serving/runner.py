"""Rank 0's engine thread (batches → the group → results) and the watchdog that turns a stuck step into an exit.

A step that raises (a peer died: its collective fails) or does not finish within --timeout (a peer hangs) is
fatal: every pending request gets 503, the HTTP server is told to stop, and the process exits non-zero.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, List, Optional, Sequence

import torch

from ..runtime.graphs import pad_rows
from .batcher import Batcher, Job, Result, Unavailable
from .group import PING, RUN, STOP, GroupChannel
from .metrics import ServerMetrics
from ..models.tasks import TASKS


def collate(jobs: List[Job], rows: int = 0) -> dict:
    """The jobs' inputs stacked, padded to `rows` with copies of the first job's (real inputs: finite outputs)."""
    return {name: pad_rows(torch.stack([job.inputs[name] for job in jobs]), rows)
            for name in TASKS[jobs[0].kind].inputs}


class Runner:
    def __init__(self, batcher: Batcher, metrics: ServerMetrics, timeout_s: float,
                 on_fatal: Callable[[str], None]) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.on_fatal = on_fatal
        self.channel: Optional[GroupChannel] = None  # set once the model is loaded
        self.failure: Optional[str] = None
        self._step_began: Optional[float] = None
        self._in_batch: List[Job] = []
        self._lock = threading.Lock()
        # Idle pings keep peers out of the collective timeout and notice a dead peer between requests.
        self.ping_every_s = max(0.05, min(5.0, timeout_s / 4))

    @property
    def ready(self) -> bool:
        return self.channel is not None and self.failure is None

    def loop(self) -> None:
        """The engine thread, once `channel` is set: run batches until the batcher is closed and drained."""
        jobs: Optional[List[Job]] = None
        with torch.inference_mode():
            try:
                while True:
                    jobs = self.batcher.next_batch(self.ping_every_s)
                    if jobs is None:
                        if self.batcher.closed:
                            self._timed(STOP)
                            return
                        self._timed(PING)
                    else:
                        self._run(jobs)
            except Exception as exc:  # a collective failed: a peer died, or the device did
                self.fail(f"the model failed: {exc}", jobs or [])

    def _timed(self, op: str, jobs: Optional[List[Job]] = None) -> Optional[torch.Tensor]:
        with self._lock:
            self._step_began, self._in_batch = time.monotonic(), jobs or []
        try:
            batch = collate(jobs, self.batcher.padded_size(len(jobs))) if jobs else None
            return self.channel.step(op, jobs[0].kind if jobs else None, batch)
        finally:
            with self._lock:
                self._step_began, self._in_batch = None, []

    def _run(self, jobs: List[Job]) -> None:
        began = time.perf_counter()
        outputs = self._timed(RUN, jobs)
        forward_ms = 1e3 * (time.perf_counter() - began)
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.forward_seconds.labels(jobs[0].kind).observe(forward_ms / 1e3)
        if outputs.shape[0] != self.batcher.padded_size(len(jobs)):  # never hand a job someone else's row
            raise RuntimeError(f"the model gave {outputs.shape[0]} rows for a batch of {len(jobs)} jobs")
        # the first len(jobs) rows are the jobs', in order; the rest are padding and go nowhere
        for job, row in zip(jobs, outputs[:len(jobs)]):
            job.resolve(Result(output=row, batch_size=len(jobs), forward_ms=forward_ms))

    def watch(self) -> None:
        """The watchdog thread: a step running longer than --timeout is fatal."""
        while self.failure is None:
            time.sleep(min(1.0, self.timeout_s / 10))
            with self._lock:
                began = self._step_began
            if began is not None and time.monotonic() - began > self.timeout_s:
                self.fail(f"a tensor-parallel rank did not finish a step within --timeout {self.timeout_s:g} s")

    def fail(self, reason: str, running: Sequence[Job] = ()) -> None:
        """Answer every pending request (queued, or in the batch that failed) with 503 and stop the server."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
            stuck = list(self._in_batch) + list(running)
        for job in stuck + self.batcher.fail(reason):
            job.resolve(error=Unavailable(reason))
        self.on_fatal(reason)
