"""The task table: what each task takes, which model call answers it, what it gives, and the head it needs.

engine.forward, engine.bench, engine.serve, engine.ask and the task front ends (engine.vqa, nlvr2, retrieval)
all dispatch through it. Inputs are named as in golden/*/inputs.safetensors, outputs as in
golden/*/expected.safetensors; `text_masks` is 1 on real tokens (a family whose published code passes a
padding mask says so in its `text_mask_input`, and engine.forward converts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from .base import ModelConfigBase, MultiwayModel

VQA, NLVR2, IRTR, TEXT_EMBEDDING, IMAGE_EMBEDDING = "vqa", "nlvr2", "irtr", "text_embedding", "image_embedding"
NLVR2_LABELS = ("False", "True")  # class 0 and 1 of the NLVR2 head, as the arrow files' `answers` spell them
Inputs = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Task:
    name: str
    head: str  # the checkpoint's task head it needs (ModelConfigBase.tasks)
    title: str  # for messages
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]  # the first is what the server returns
    call: Callable[[MultiwayModel, Inputs], Tuple[torch.Tensor, ...]]
    served: bool = True  # a job kind of engine.serve

    def run(self, model: MultiwayModel, inputs: Inputs) -> Dict[str, torch.Tensor]:
        return dict(zip(self.outputs, self.call(model, inputs)))

    def first_output(self, model: MultiwayModel, inputs: Inputs, device: torch.device) -> torch.Tensor:
        """The first output (what the server returns and the front ends record), the inputs moved to `device`."""
        return self.call(model, {name: inputs[name].to(device) for name in self.inputs})[0]


_TEXT = ("text_ids", "text_masks")
TASKS: Dict[str, Task] = {task.name: task for task in (
    Task(VQA, VQA, "VQA", _TEXT + ("image",), ("vqa_logits", "cls_feats"),
         lambda m, x: m.vqa(x["text_ids"], x["text_masks"], x["image"])),
    Task(NLVR2, NLVR2, "NLVR2", _TEXT + ("image_0", "image_1"), ("nlvr2_logits",),
         lambda m, x: (m.nlvr2(x["text_ids"], x["text_masks"], x["image_0"], x["image_1"]),)),
    Task(IRTR, IRTR, "retrieval", _TEXT + ("image",), ("text_feats", "image_feats"),
         lambda m, x: (m.text_features(x["text_ids"], x["text_masks"]), m.image_features(x["image"])),
         served=False),
    Task(TEXT_EMBEDDING, IRTR, "text embedding", _TEXT, ("text_feats",),
         lambda m, x: (m.text_features(x["text_ids"], x["text_masks"]),)),
    Task(IMAGE_EMBEDDING, IRTR, "image embedding", ("image",), ("image_feats",),
         lambda m, x: (m.image_features(x["image"]),)),
)}
# The task of each head, as engine.forward and engine.bench run them.
HEAD_TASKS = (VQA, NLVR2, IRTR)


def served_tasks(cfg: ModelConfigBase) -> List[str]:
    """The job kinds engine.serve answers with this checkpoint's heads."""
    return [task.name for task in TASKS.values() if task.served and task.head in cfg.tasks]
