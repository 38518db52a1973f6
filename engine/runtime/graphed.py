"""A model whose task calls (vqa, nlvr2, text_features, image_features: the interface every family has) run
through per-bucket device graphs (engine.runtime.graphs); anything else is the model's own attribute."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .graphs import DEFAULT_BUCKETS, GraphRunner

Tensors = Dict[str, torch.Tensor]


def _call(model: nn.Module, task: str, x: Tensors) -> Tensors:
    """One task call of the model, inputs and outputs by name (what the graph runner records)."""
    if task == "vqa":
        logits, pooled = model.vqa(x["text_ids"], x["text_masks"], x["image"])
        return {"logits": logits, "pooled": pooled}
    if task == "nlvr2":
        return {"logits": model.nlvr2(x["text_ids"], x["text_masks"], x["image_0"], x["image_1"])}
    if task == "text_features":
        return {"features": model.text_features(x["text_ids"], x["text_masks"])}
    return {"features": model.image_features(x["image"])}


class GraphedModel:
    """`model` with its four task calls behind a GraphRunner (`graphs`); `reason` is why graphs are off."""

    def __init__(self, model: nn.Module, device: torch.device, enabled: bool = True,
                 buckets: Sequence[int] = DEFAULT_BUCKETS) -> None:
        self.model = model
        self.graphs = GraphRunner(lambda task, x: _call(model, task, x), device, enabled, buckets)

    @property
    def reason(self) -> Optional[str]:
        return self.graphs.reason

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def vqa(self, text_ids: torch.Tensor, text_masks: torch.Tensor,
            image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.graphs("vqa", {"text_ids": text_ids, "text_masks": text_masks, "image": image})
        return out["logits"], out["pooled"]

    def nlvr2(self, text_ids: torch.Tensor, text_masks: torch.Tensor, image_0: torch.Tensor,
              image_1: torch.Tensor) -> torch.Tensor:
        return self.graphs("nlvr2", {"text_ids": text_ids, "text_masks": text_masks, "image_0": image_0,
                                     "image_1": image_1})["logits"]

    def text_features(self, text_ids: torch.Tensor, text_masks: torch.Tensor) -> torch.Tensor:
        return self.graphs("text_features", {"text_ids": text_ids, "text_masks": text_masks})["features"]

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return self.graphs("image_features", {"image": image})["features"]
