"""The served model on an accelerator: task calls behind per-bucket device graphs (engine.runtime.graphed), each
graph captured before the server takes requests, and every batch size the server can form checked against the
device's memory (a --max-batch-size that would not fit stops the start-up with one line)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..bench import synthetic_inputs
from ..runtime.graphed import GraphedModel
from ..runtime.graphs import DEFAULT_BUCKETS, bucket_for
from ..tasks.cli import Engine
from .tasks import IMAGE_EMBEDDING, NLVR2, TEXT_EMBEDDING, VQA, ServedModel

# the engine.bench task whose synthetic inputs hold a kind's inputs
BENCH_TASK = {VQA: "vqa", NLVR2: "nlvr2", TEXT_EMBEDDING: "irtr", IMAGE_EMBEDDING: "irtr"}


def warm_sizes(max_batch_size: int, graphs: bool, buckets: Sequence[int] = DEFAULT_BUCKETS) -> List[int]:
    """Batch sizes to run before serving, largest first (the graph pool then fits the smaller graphs): with graphs,
    every bucket a batch can pad to, and --max-batch-size itself above the largest (it runs eagerly); without,
    --max-batch-size (the memory check)."""
    if not graphs:
        return [max_batch_size]
    top = bucket_for(max_batch_size, buckets)
    sizes = {b for b in buckets if top is None or b <= top} | ({max_batch_size} if top is None else set())
    return sorted(sizes, reverse=True)


def served_model(engine: Engine, kinds: Sequence[str], max_batch_size: int,
                 cuda_graphs: bool) -> Tuple[ServedModel, bool, Optional[str]]:
    """The ServedModel to serve with, warmed up; whether batches should pad to the buckets (graphs were
    captured); and a note when graphs are off or some were skipped. On the CPU nothing is run ahead (no graphs,
    no device memory to bound)."""
    model = GraphedModel(engine.model, engine.ctx.device, enabled=cuda_graphs)
    served = ServedModel(model, engine.ctx.device)
    if model.reason is None or model.graphs.memory.tracked:
        cfg = engine.manifest.config
        for kind in kinds:
            for size in warm_sizes(max_batch_size, model.reason is None):
                served.run(kind, synthetic_inputs(cfg, BENCH_TASK[kind], size, engine.ctx.device))
    skipped = sorted(set(model.graphs.skipped.values()))
    note = model.reason or (f"{len(model.graphs.skipped)} graphs not captured, run eagerly: {skipped[0]}"
                            if skipped else None)
    return served, bool(model.graphs.captured()), note
