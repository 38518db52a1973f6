"""Device graphs of a whole forward, one per (task, batch-size bucket): the launches of a small batch cost more
than its kernels on a GPU, so each bucket's forward is recorded once and replayed with one launch.

The runner wraps any `run(task, inputs) -> outputs` (a dict of [B, ...] tensors on the device, or one tensor),
knowing nothing of the model behind it. A batch of n samples runs in the graph of the smallest bucket b >= n:
its rows are copied into that graph's static input buffers, the b - n rows left are padding that repeats the
batch's first sample (a real input, so every op of a padding row stays finite: an all-padding text mask would
give a softmax over no keys), and only the first n output rows are returned, as copies (the next replay
overwrites the graph's own). Rows of a batch never mix in these models (attention is per sample, norms per
token), so padding changes no real row.

Capture follows what vLLM does for its decoder graphs: eager warm-up runs first, on the side stream the capture
then uses (lazy initialisation — cuBLAS workspaces, the tensor-parallel group's NCCL communicator, the model's
position-bias cache — must not happen inside a capture), and every graph shares one memory pool, so that the
smaller ones reuse the memory of the largest when it is captured first (the server's warm-up goes largest
first). At tp > 1 the model's all-reduce is captured into the graph: torch.distributed's NCCL backend records
its collective on its own stream joined to the capturing one by events, which CUDA captures as graph
dependencies, so a replay runs the all-reduce with the rest (every rank replays the same bucket at the same
step, as every rank runs the same forward). A forward that cannot be captured (it syncs with the host, e.g. the
CPU's per-sample key selection: CUDA's sync debug mode catches that in the warm-up, before any capture) is run
eagerly from then on, with the reason kept in `skipped`; so is a batch above the largest bucket.

On Ascend NPUs the same runs through torch_npu's graph mode (torch.npu.NPUGraph, torch.npu.graph) where that
torch_npu has it; elsewhere, and on the CPU, graphs are off with a one-line reason (`reason`).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import torch

from .memory import DeviceMemoryError, MemoryBudget

DEFAULT_BUCKETS: Tuple[int, ...] = (1, 2, 4, 8, 16, 32)
# The graph class of each device module (torch.cuda, torch.npu from torch_npu).
GRAPH_CLASSES = {"cuda": "CUDAGraph", "npu": "NPUGraph"}
WARMUP_RUNS = 2  # eager runs before a capture: the first initialises, the second runs as the capture will

Tensors = Dict[str, torch.Tensor]
Outputs = Union[torch.Tensor, Tensors]
Run = Callable[[str, Tensors], Outputs]


def bucket_for(n: int, buckets: Sequence[int]) -> Optional[int]:
    """The smallest bucket holding n rows; None above the largest (such a batch runs eagerly)."""
    ordered = sorted(buckets)
    at = bisect.bisect_left(ordered, n)
    return ordered[at] if at < len(ordered) else None


def graph_support(device: torch.device) -> Optional[str]:
    """None where whole-forward graphs can be captured on `device`; otherwise why not, in one line."""
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA graphs off: torch sees no CUDA device"
    if device.type == "npu":
        npu = getattr(torch, "npu", None)
        missing = [name for name in ("NPUGraph", "graph", "graph_pool_handle", "Stream", "stream")
                   if npu is None or not hasattr(npu, name)]
        return f"NPU graphs off: this torch_npu has no graph mode (torch.npu.{missing[0]})" if missing else None
    if not torch.cuda.is_available():
        return f"CUDA graphs off: no CUDA here (the device is {device.type})"
    return f"CUDA graphs off: the device is {device.type}, not cuda"


class Capture(Protocol):
    """Records `fn` once so that `replay()` reruns it on the same buffers: a device graph, or a test double."""

    def warm_up(self, fn: Callable[[], Outputs], runs: int) -> None: ...

    def capture(self, fn: Callable[[], Outputs]) -> Tuple[Outputs, Callable[[], None]]: ...


class DeviceGraphs:
    """torch.cuda / torch.npu graphs on one device: one side stream and one memory pool for every bucket."""

    def __init__(self, device: torch.device) -> None:
        self.module = getattr(torch, device.type)
        self.graph_class = getattr(self.module, GRAPH_CLASSES[device.type])
        self.stream = self.module.Stream(device=device)
        self.pool = self.module.graph_pool_handle()

    def warm_up(self, fn: Callable[[], Outputs], runs: int) -> None:
        """Eager runs on the capture stream; after the first (which may initialise lazily, syncing), CUDA's sync
        debug mode turns any host sync into an error here, before a capture would fail on it."""
        self.stream.wait_stream(self.module.current_stream())
        strict = getattr(self.module, "set_sync_debug_mode", None)
        with self.module.stream(self.stream):
            for run in range(runs):
                if run and strict:
                    before = self.module.get_sync_debug_mode()
                    strict("error")
                    try:
                        fn()
                    finally:
                        strict(before)
                else:
                    fn()
        self.module.current_stream().wait_stream(self.stream)
        self.module.synchronize()

    def capture(self, fn: Callable[[], Outputs]) -> Tuple[Outputs, Callable[[], None]]:
        graph = self.graph_class()
        # CUDA: only this thread's unsafe calls break the capture, not another thread's (NCCL's watchdog)
        mode = {"capture_error_mode": "thread_local"} if self.module is torch.cuda else {}
        with self.module.graph(graph, pool=self.pool, stream=self.stream, **mode):
            outputs = fn()
        return outputs, graph.replay


def rows(inputs: Tensors) -> int:
    """The batch size: every input's first dimension (they must agree)."""
    sizes = {int(t.shape[0]) for t in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"the inputs disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def pad_rows(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """`tensor` grown to `size` rows, the new rows repeating its first row (a real, finite sample)."""
    extra = size - tensor.shape[0]
    if extra <= 0:
        return tensor
    return torch.cat([tensor, tensor[:1].expand(extra, *tensor.shape[1:])])


def _as_dict(outputs: Outputs) -> Tensors:
    return outputs if isinstance(outputs, dict) else {"": outputs}


def _as_returned(outputs: Tensors, like: Outputs) -> Outputs:
    return outputs if isinstance(like, dict) else outputs[""]


@dataclass
class _Graph:
    inputs: Tensors  # static buffers, [bucket, ...] on the device
    outputs: Outputs  # what the captured forward wrote, [bucket, ...]
    replay: Callable[[], None]

    def __call__(self, inputs: Tensors, n: int) -> Outputs:
        for name, buffer in self.inputs.items():
            buffer[:n].copy_(inputs[name])
            if n < buffer.shape[0]:
                buffer[n:].copy_(inputs[name][:1].expand(buffer.shape[0] - n, *buffer.shape[1:]))
        self.replay()
        return _as_returned({k: v[:n].clone() for k, v in _as_dict(self.outputs).items()}, self.outputs)


class GraphRunner:
    """`run` behind per-bucket device graphs where the device has them; `run` itself, eagerly, elsewhere.

    `reason` says why graphs are off (None when on); `skipped` maps (task, bucket) to why that graph was not
    captured. `memory` bounds and reports the device memory of each forward (engine.runtime.memory).
    """

    def __init__(self, run: Run, device: torch.device, enabled: bool = True,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, capture: Optional[Capture] = None,
                 memory: Optional[MemoryBudget] = None) -> None:
        self.run = run
        self.device = device
        self.buckets = tuple(sorted(buckets))
        self.memory = memory or MemoryBudget(device)
        self.reason: Optional[str] = None if enabled else "CUDA graphs off: --no-cuda-graphs"
        if self.reason is None and capture is None:
            self.reason = graph_support(device)
            capture = DeviceGraphs(device) if self.reason is None else None
        self._capture = capture
        self._graphs: Dict[Tuple, _Graph] = {}
        self.skipped: Dict[Tuple[str, int], str] = {}

    @property
    def enabled(self) -> bool:
        return self.reason is None

    def captured(self) -> List[Tuple[str, int]]:
        """(task, bucket) of every graph held."""
        return sorted({(key[0], key[1]) for key in self._graphs})

    def mode(self, task: str, n: int) -> str:
        """How a batch of n runs: `graph (bucket b)`, or `eager` and why."""
        if not self.enabled:
            return f"eager ({self.reason})"
        bucket = bucket_for(n, self.buckets)
        if bucket is None:
            return f"eager (batch {n} is above the largest bucket, {self.buckets[-1]})"
        if (task, bucket) in self.skipped:
            return f"eager ({self.skipped[task, bucket]})"
        return f"graph (bucket {bucket})"

    def __call__(self, task: str, inputs: Tensors) -> Outputs:
        n = rows(inputs)
        bucket = bucket_for(n, self.buckets) if self.enabled else None
        if bucket is None or (task, bucket) in self.skipped:
            self.memory.admit(task, n, lambda batch: self.run(task, batch), inputs)
            return self.memory.measured_run(task, n, lambda: self.run(task, inputs))
        graph = self._graphs.get(self._key(task, bucket, inputs))
        if graph is None:
            graph = self._record(task, bucket, inputs)
            if graph is None:
                return self(task, inputs)
        return graph(inputs, n)

    def _key(self, task: str, bucket: int, inputs: Tensors) -> Tuple:
        # a graph is only good for the shapes (beyond the batch) and dtypes it was recorded with
        return (task, bucket, tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in inputs.items())))

    def _record(self, task: str, bucket: int, inputs: Tensors) -> Optional[_Graph]:
        self.memory.admit(task, bucket, lambda batch: self.run(task, batch), inputs)
        static = {name: pad_rows(t[:bucket].to(self.device), bucket).contiguous() for name, t in inputs.items()}
        try:
            self.memory.measured_run(task, bucket, lambda: self._capture.warm_up(lambda: self.run(task, static),
                                                                                  WARMUP_RUNS))
            with self.memory.pool_growth():
                outputs, replay = self._capture.capture(lambda: self.run(task, static))
        except DeviceMemoryError:
            raise
        except torch.cuda.OutOfMemoryError:
            raise DeviceMemoryError(f"capturing {task} at batch {bucket} ran out of device memory on "
                                    f"{self.device}: use smaller batch buckets or batches") from None
        except RuntimeError as exc:  # a host sync, an op the device cannot capture: run this bucket eagerly
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.skipped[task, bucket] = f"capture of {task} at batch {bucket} failed: {first[:200]}"
            return None
        bad = [name or "output" for name, t in _as_dict(outputs).items() if t.shape[:1] != (bucket,)]
        if bad:
            self.skipped[task, bucket] = f"{task}: {', '.join(bad)} not batched along dimension 0"
            return None
        graph = _Graph(static, outputs, replay)
        self._graphs[self._key(task, bucket, inputs)] = graph
        return graph
