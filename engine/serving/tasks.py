"""The model behind the server: a request becomes one *job* of a *kind* (a served task of the task table).

Jobs of one kind are stacked into a batch and every rank of the tensor-parallel group calls
`ServedModel.run(kind, batch)` on the same batch: one float32 output row per job, on the CPU.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..models import MultiwayModel
from ..models.tasks import TASKS


class ServedModel:
    def __init__(self, model: MultiwayModel, device: torch.device) -> None:
        self.model = model
        self.device = device

    def run(self, kind: str, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return TASKS[kind].first_output(self.model, batch, self.device).float().cpu()
