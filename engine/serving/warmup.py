"""The served model on an accelerator: the task table's calls behind per-bucket device graphs
(engine.runtime.graphed), each graph captured before the server takes requests, and every batch size the server
can form checked against the device's memory (a --max-batch-size that would not fit stops the start-up with one
line)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..models import ModelConfig
from ..models.tasks import TASKS
from ..runtime.graphed import task_graphs
from ..runtime.graphs import DEFAULT_BUCKETS, GraphRunner, bucket_for
from ..tasks.cli import Engine
from .tasks import ServedModel


class GraphedServedModel(ServedModel):
    """ServedModel whose task calls go through `graphs` (a GraphRunner over the task table)."""

    def __init__(self, graphs: GraphRunner, model, device: torch.device) -> None:
        super().__init__(model, device)
        self.graphs = graphs

    def run(self, kind: str, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        task = TASKS[kind]
        inputs = {name: batch[name].to(self.device) for name in task.inputs}
        return self.graphs(kind, inputs)[task.outputs[0]].float().cpu()


def example_inputs(cfg: ModelConfig, kind: str, batch: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """Inputs of the task's shapes for warming up (their values do not matter to a graph or a memory peak): a
    two-token text and blank images."""
    T, S = cfg.max_text_len, cfg.image_size
    shapes = {"text_ids": (batch, T), "text_masks": (batch, T)}
    inputs = {name: torch.zeros(shapes.get(name, (batch, 3, S, S)), device=device,
                                dtype=torch.long if name in shapes else torch.float32)
              for name in TASKS[kind].inputs}
    if "text_masks" in inputs:
        inputs["text_masks"][:, :2] = 1
    return inputs


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
    device = engine.ctx.device
    graphs = task_graphs(engine.model, device, enabled=cuda_graphs)
    served = GraphedServedModel(graphs, engine.model, device)
    if graphs.enabled or graphs.memory.tracked:
        for kind in kinds:
            for size in warm_sizes(max_batch_size, graphs.enabled):
                served.run(kind, example_inputs(engine.manifest.config, kind, size, device))
    skipped = sorted(set(graphs.skipped.values()))
    note = graphs.reason or (f"{len(graphs.skipped)} graphs not captured, run eagerly: {skipped[0]}"
                             if skipped else None)
    return served, bool(graphs.captured()), note
