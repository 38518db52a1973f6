"""Device memory per rank: what a forward's activations take at each batch size, what the graph pool holds, and a
bound that refuses a batch which would not fit, in one line, before it runs out of memory.

Activations are measured, not modelled: the peak allocation above the resting one during a forward (the
caching allocator's peak counter). A batch size not measured yet is estimated from the largest one measured
for its task, in proportion to the rows (every activation of these encoders, attention scores included, grows
linearly with the batch), and admitted if that fits in what the device has free plus what the allocator holds
unused. A task's first batch is preceded by a one-sample forward to have a measurement. On the CPU nothing is
tracked (the host's memory is the operating system's to bound).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterator, Optional, Protocol, TypeVar

import torch

GIB = 1 << 30
HEADROOM = 0.9  # admit a batch into at most this share of the memory available: fragmentation, workspaces
T = TypeVar("T")


class DeviceMemoryError(RuntimeError):
    """A batch that does not fit in the device's memory; the message is the line to print."""


class DeviceStats(Protocol):
    def free(self) -> int: ...

    def total(self) -> int: ...

    def allocated(self) -> int: ...

    def reserved(self) -> int: ...

    def reset_peak(self) -> None: ...

    def peak(self) -> int: ...


class _ModuleStats:
    """torch.cuda's (or torch_npu's torch.npu) allocator counters for one device."""

    def __init__(self, module, device: torch.device) -> None:
        self.module, self.device = module, device

    def free(self) -> int:
        return self.module.mem_get_info(self.device)[0]

    def total(self) -> int:
        return self.module.mem_get_info(self.device)[1]

    def allocated(self) -> int:
        return self.module.memory_allocated(self.device)

    def reserved(self) -> int:
        return self.module.memory_reserved(self.device)

    def reset_peak(self) -> None:
        self.module.synchronize(self.device)
        self.module.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        self.module.synchronize(self.device)
        return self.module.max_memory_allocated(self.device)


def device_stats(device: torch.device) -> Optional[DeviceStats]:
    """The device's memory counters; None on the CPU or where the device module has none."""
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    needed = ("mem_get_info", "memory_allocated", "memory_reserved", "reset_peak_memory_stats",
              "max_memory_allocated", "synchronize")
    if module is None or not all(hasattr(module, name) for name in needed):
        return None
    return _ModuleStats(module, device)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


class MemoryBudget:
    """Measured activation peaks per (task, batch), the graph pool's size, and the admission check."""

    def __init__(self, device: torch.device, stats: Optional[DeviceStats] = None) -> None:
        self.device = device
        self.stats = stats if stats is not None else device_stats(device)
        self.activations: Dict[str, Dict[int, int]] = {}
        self.graph_pool_bytes = 0

    @property
    def tracked(self) -> bool:
        return self.stats is not None

    def measured_run(self, task: str, n: int, fn: Callable[[], T]) -> T:
        """fn(), recording its peak allocation above the resting one as the activations of `task` at batch n (once
        per size: the counters cost a device sync)."""
        if self.stats is None or n in self.activations.get(task, {}):
            return fn()
        self.stats.reset_peak()
        resting = self.stats.allocated()
        try:
            out = fn()
        except torch.cuda.OutOfMemoryError:
            raise DeviceMemoryError(f"{task} at batch {n} ran out of device memory on {self.device} "
                                    f"({self._state()}): use a smaller batch") from None
        seen = self.activations.setdefault(task, {})
        seen[n] = max(seen.get(n, 0), self.stats.peak() - resting)
        return out

    def estimate(self, task: str, n: int) -> Optional[int]:
        """Activation bytes of `task` at batch n: measured, or scaled from the largest batch measured."""
        seen = self.activations.get(task)
        if not seen:
            return None
        if n in seen:
            return seen[n]
        largest = max(seen)
        return math.ceil(seen[largest] * n / largest)

    def available(self) -> int:
        """What a forward can still take: the device's free memory plus what the allocator holds unused."""
        return self.stats.free() + self.stats.reserved() - self.stats.allocated()

    def admit(self, task: str, n: int, run: Callable[[Dict[str, torch.Tensor]], object],
              inputs: Dict[str, torch.Tensor]) -> None:
        """Refuse (DeviceMemoryError, one line) a batch of n whose estimated activations do not fit.

        `run(batch)` runs the task; it is called on the first sample of `inputs` when the task has no
        measurement yet.
        """
        if self.stats is None:
            return
        if task not in self.activations:
            first = {k: v[:1] for k, v in inputs.items()}
            self.measured_run(task, 1, lambda: run(first))
        if n in self.activations[task]:  # it ran before: it fits
            return
        need, left = self.estimate(task, n), self.available()
        if need > HEADROOM * left:
            largest = max(self.activations[task])
            raise DeviceMemoryError(
                f"a {task} batch of {n} needs about {gib(need)} of activations on {self.device} (measured "
                f"{gib(self.activations[task][largest])} at batch {largest}), {gib(left)} is available: use a "
                f"smaller batch (engine.bench --batch-size, engine.serve --max-batch-size)")

    @contextlib.contextmanager
    def pool_growth(self) -> Iterator[None]:
        """Count what the allocator reserves during the block (a graph capture) as graph pool memory."""
        before = self.stats.reserved() if self.stats else 0
        yield
        if self.stats:
            self.graph_pool_bytes += max(0, self.stats.reserved() - before)

    def _state(self) -> str:
        return f"{gib(self.stats.allocated())} allocated, {gib(self.stats.free())} free of {gib(self.stats.total())}"

    def report(self) -> Optional[Dict[str, object]]:
        """The numbers for a report (None on the CPU)."""
        if self.stats is None:
            return None
        return {"activations_bytes": {task: dict(sorted(seen.items())) for task, seen in self.activations.items()},
                "graph_pool_bytes": self.graph_pool_bytes, "allocated_bytes": self.stats.allocated(),
                "reserved_bytes": self.stats.reserved(), "free_bytes": self.stats.free(),
                "total_bytes": self.stats.total()}
