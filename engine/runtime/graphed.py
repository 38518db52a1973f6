"""The task table's calls (engine.models.tasks) behind per-bucket device graphs: `task_graphs(model, device)` is a
GraphRunner whose `run(task, inputs)` is `TASKS[task].run(model, inputs)`, outputs named as the table names them.
The graph runner itself knows nothing of the model; this is where the two meet."""
from __future__ import annotations

from typing import Sequence

import torch

from ..models import MultiwayModel
from ..models.tasks import TASKS
from .graphs import DEFAULT_BUCKETS, GraphRunner


def task_graphs(model: MultiwayModel, device: torch.device, enabled: bool = True,
                buckets: Sequence[int] = DEFAULT_BUCKETS) -> GraphRunner:
    """runner(task, inputs) -> {output name: tensor}: each task's forward, graphed per bucket where the device
    has graphs (inputs: the task's, on the device)."""
    return GraphRunner(lambda task, inputs: TASKS[task].run(model, inputs), device, enabled, buckets)
