"""Properties no golden case covers: tp = 3 on a 6-head model agrees with tp = 1, for every head and
route (joint with and without VL experts, text-only, image-only), relative or absolute positions."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from _run import forward_many, shard_here
from engine.models.vlmo.config import VLMoConfig
from engine.runtime.plan import full_shapes

BASE = dict(embed_dim=48, depth=3, num_heads=6, vlffn_start_layer_index=2, image_size=48, vocab_size=200,
            layer_scale=True, vqa_labels=7, nlvr2=True, retrieval=True, num_token_types=3)
VARIANTS = {
    "relpos": dict(relative_position_bias=True, abs_pos_embed=False),
    "abspos": dict(relative_position_bias=False, abs_pos_embed=True, layer_scale=False),
}


def _spread_weights(cfg: VLMoConfig, seed: int) -> dict:
    """Random weights with enough spread that every part of the model moves the outputs."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in full_shapes(cfg).items():
        tensor = torch.randn(shape, generator=gen)
        if name.endswith(("norm1.weight", "_text.weight", "_imag.weight", "_vl.weight", "LayerNorm.weight",
                          "norm.weight", "classifier.1.weight")) and len(shape) == 1:
            tensor = 1 + 0.1 * tensor
        elif "gamma" in name:
            tensor = 0.5 + 0.2 * torch.rand(shape, generator=gen)
        elif "relative_position_bias_table" in name:
            tensor = 0.5 * tensor
        else:
            tensor = tensor / max(shape[-1], 1) ** 0.5
        weights[name] = tensor
    return weights


def _inputs(cfg: VLMoConfig, batch: int = 3) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (batch, cfg.max_text_len), generator=gen)
    masks = torch.zeros(batch, cfg.max_text_len, dtype=torch.long)
    for row, length in enumerate((5, 17, cfg.max_text_len)[:batch]):
        masks[row, :length] = 1
    image = lambda: torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen)  # noqa: E731
    return {"text_ids": ids * masks, "text_masks": masks, "image": image(), "image_0": image(), "image_1": image()}


# Absolute positions change only the embeddings, so one task covers them.
RUNS = [("relpos", "vqa"), ("relpos", "nlvr2"), ("relpos", "irtr"), ("abspos", "vqa")]
DEGREES = (3,)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    """(variant, task, tp) -> outputs of engine.forward; one launch per degree runs every variant and task."""
    root = tmp_path_factory.mktemp("consistency")
    for variant in VARIANTS:
        cfg = VLMoConfig(**{**BASE, **VARIANTS[variant]})
        hyper = {"config": {"image_size": cfg.image_size, "max_text_len": cfg.max_text_len}}
        (root / variant).mkdir()
        torch.save({"state_dict": _spread_weights(cfg, seed=7), "hyper_parameters": hyper},
                   root / variant / "checkpoint.pt")
        save_file(_inputs(cfg), str(root / variant / "inputs.safetensors"))
    found = {}
    for tp in (1, *DEGREES):
        for variant in VARIANTS:
            shard_here(root / variant / "checkpoint.pt", tp, root / variant / f"tp{tp}", "--num-heads", 6)
        forward_many(tp, [{"shards": root / v / f"tp{tp}", "inputs": root / v / "inputs.safetensors",
                           "out": root / v / f"{task}-tp{tp}.safetensors", "task": task} for v, task in RUNS],
                     root / f"plan-tp{tp}.json")
        found.update({(v, task, tp): load_file(str(root / v / f"{task}-tp{tp}.safetensors")) for v, task in RUNS})
    return found


@pytest.mark.parametrize("variant,task", RUNS)
def test_higher_degrees_match_tp1(outputs: dict, variant: str, task: str) -> None:
    reference = outputs[(variant, task, 1)]
    for tp in DEGREES:
        got = outputs[(variant, task, tp)]
        for name, want in reference.items():
            assert want.abs().max() > 1e-3, f"{name} is degenerate"  # the check below must be able to fail
            assert (got[name] - want).abs().max().item() <= 1e-4, f"{name} at tp={tp}"
