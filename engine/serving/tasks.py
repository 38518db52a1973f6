"""The model behind the server: one small interface per task, so another model family (BEiT-3) can plug in.

A request becomes one *job* of a *kind*; jobs of one kind are stacked into a batch and every rank of the
tensor-parallel group calls `ServedModel.run(kind, batch)` on the same batch. Each kind names its input
tensors (unbatched shapes come from the model) and gives one float32 output row per job.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..runtime.families import ModelConfig

VQA, NLVR2, TEXT_EMBEDDING, IMAGE_EMBEDDING = "vqa", "nlvr2", "text_embedding", "image_embedding"

INPUTS: Dict[str, Tuple[str, ...]] = {
    VQA: ("text_ids", "text_masks", "image"),
    NLVR2: ("text_ids", "text_masks", "image_0", "image_1"),
    TEXT_EMBEDDING: ("text_ids", "text_masks"),
    IMAGE_EMBEDDING: ("image",),
}


def served_kinds(cfg: ModelConfig) -> List[str]:
    """The job kinds this checkpoint's heads can answer."""
    kinds = []
    if cfg.vqa_labels:
        kinds.append(VQA)
    if cfg.nlvr2:
        kinds.append(NLVR2)
    if cfg.retrieval:
        kinds += [TEXT_EMBEDDING, IMAGE_EMBEDDING]
    return kinds


class ServedModel:
    """The task heads behind `run(kind, batch) -> [B, ...] float32 on the CPU`; VLMo and BEiT-3 models share their
    signatures (text_ids, text_masks, images), as evaluation calls them."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device

    def run(self, kind: str, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = {name: batch[name].to(self.device) for name in INPUTS[kind]}
        if kind == VQA:
            out, _ = self.model.vqa(x["text_ids"], x["text_masks"], x["image"])
        elif kind == NLVR2:
            out = self.model.nlvr2(x["text_ids"], x["text_masks"], x["image_0"], x["image_1"])
        elif kind == TEXT_EMBEDDING:
            out = self.model.text_features(x["text_ids"], x["text_masks"])
        else:
            out = self.model.image_features(x["image"])
        return out.float().cpu()
