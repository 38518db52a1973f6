"""A BEiT-3 checkpoint with random weights in the published format, for benchmarks and demos.

The layout is the engine's own list of a BEiT-3's tensors (engine.models.checkpoint_layout, the
published key names and shapes) plus what the published models also save and the engine skips
(`vision_embed.mask_token`, retrieval's `logit_scale`); the file is what beit3's `save_model` writes:
`{"model": state_dict, "epoch": ..., "args": argparse.Namespace(...)}`. The published VQA models have no
final encoder LayerNorm (`normalize_output=False` in modeling_finetune); NLVR2 and retrieval have one.

    python -m engine.tools.beit3_assets --out beit3_base_patch16_480_vqa_random.pth
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Dict, Optional

import click
import torch

from ..atomic import write_torch
from ..models.beit3.config import HEADS_BY_SIZE, PREFIX, BEiT3Config
from ..runtime.plan import full_shapes

SIZES = {"base": (768, 12), "large": (1024, 24)}
TASKS = ("vqa", "nlvr2", "irtr")
_STD = 0.02


def random_config(size: str = "base", image_size: int = 480, task: str = "vqa", num_labels: int = 3129,
                  vocab_size: int = 64010, **overrides: Any) -> BEiT3Config:
    """A published size (FFN 4× wide) for `task`, with fields overridden (e.g. a tiny model for tests)."""
    if size not in SIZES or task not in TASKS:
        raise ValueError(f"size must be one of {', '.join(SIZES)} and task one of {', '.join(TASKS)}")
    width, depth = SIZES[size]
    fields: Dict[str, Any] = dict(embed_dim=width, depth=depth, num_heads=HEADS_BY_SIZE[(width, depth)],
                                  ffn_dim=4 * width, image_size=image_size, vocab_size=vocab_size,
                                  normalize_output=task != "vqa", vqa_labels=num_labels if task == "vqa" else None,
                                  nlvr2=task == "nlvr2", retrieval=task == "irtr")
    fields.update(overrides)
    return BEiT3Config(**fields)


def random_state_dict(cfg: BEiT3Config, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Every tensor of the published layout: LayerNorm weights near 1, everything else N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(full_shapes(cfg))
    shapes[PREFIX + "vision_embed.mask_token"] = (1, 1, cfg.embed_dim)
    state: Dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        is_norm_weight = len(shape) == 1 and name.endswith(".weight")  # every 1-D weight is a LayerNorm's
        state[name] = torch.empty(shape).normal_(1.0 if is_norm_weight else 0.0, _STD, generator=gen)
    if cfg.retrieval:
        state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return state


def build_random_beit3(path: Path, cfg: BEiT3Config, seed: int = 0, model_name: Optional[str] = None) -> Path:
    """Write a random-weight checkpoint as beit3's save_model does (cached: kept if present)."""
    path = Path(path)
    if path.exists():
        return path
    args = argparse.Namespace(model=model_name or f"beit3_random_{cfg.embed_dim}_patch16_{cfg.image_size}",
                              input_size=cfg.image_size, num_max_bpe_tokens=cfg.max_text_len, seed=seed)
    write_torch(path, {"model": random_state_dict(cfg, seed), "epoch": 0, "args": args})
    return path


@click.command()
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(sorted(SIZES)), default="base", show_default=True)
@click.option("--image-size", type=int, default=480, show_default=True)
@click.option("--task", type=click.Choice(TASKS), default="vqa", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(out_path: Path, size: str, image_size: int, task: str, seed: int) -> None:
    """Write a random-weight BEiT-3 checkpoint of a published size in the published format."""
    cfg = random_config(size, image_size, task)
    build_random_beit3(out_path, cfg, seed, f"beit3_{size}_patch16_{image_size}_{task}")
    click.echo(f"wrote {out_path}")


if __name__ == "__main__":
    main(prog_name="python -m engine.tools.beit3_assets")
