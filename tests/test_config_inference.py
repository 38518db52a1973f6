"""Config inference from weights: what it reads, and the flag it names when it cannot."""
from __future__ import annotations

import pytest
import torch

from engine.models.vlmo.config import VLMoConfig
from engine.models.inference import ConfigError
from engine.models.vlmo.infer import infer_config
from engine.runtime.plan import check_degree, full_shapes


def _weights(cfg: VLMoConfig) -> dict:
    return {name: torch.zeros(shape) for name, shape in full_shapes(cfg).items()}


def _cfg(**changes) -> VLMoConfig:
    base = dict(embed_dim=32, depth=3, num_heads=4, vlffn_start_layer_index=2, image_size=48,
                relative_position_bias=True, abs_pos_embed=False, layer_scale=True, vqa_labels=5)
    base.update(changes)
    return VLMoConfig(**base)


def test_round_trip_from_shapes_alone() -> None:
    # no hyper-parameters: heads from the table width, image size from its row count (T0 = 196)
    cfg = _cfg()
    assert infer_config(_weights(cfg)) == cfg


def test_published_base_plus_shapes_give_its_heads() -> None:
    cfg = _cfg(embed_dim=544, depth=24, num_heads=16, vlffn_start_layer_index=21, image_size=64,
               relative_position_bias=False, abs_pos_embed=True, layer_scale=False, vqa_labels=None,
               vocab_size=50)
    assert infer_config(_weights(cfg)) == cfg


def test_unknown_abs_pos_model_names_the_heads_flag() -> None:
    cfg = _cfg(relative_position_bias=False, abs_pos_embed=True)
    with pytest.raises(ConfigError, match="--num-heads"):
        infer_config(_weights(cfg))
    assert infer_config(_weights(cfg), overrides={"num_heads": 4}) == cfg


def test_hyper_parameters_and_overrides() -> None:
    cfg = _cfg(nlvr2=True, num_token_types=3, vqa_labels=None)
    assert infer_config(_weights(cfg), {"image_size": 48, "max_text_len": 40}) == cfg
    with pytest.raises(ConfigError, match="--image-size"):
        infer_config(_weights(cfg), overrides={"image_size": 50})


def test_vl_experts_must_fill_the_top_layers() -> None:
    weights = _weights(_cfg())
    for suffix in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        weights[f"transformer.blocks.0.mlp_vl.{suffix}"] = torch.zeros(1)
    with pytest.raises(ConfigError, match="top layers"):
        infer_config(weights)


def test_degree_must_divide_heads_and_ffn() -> None:
    check_degree(_cfg(), 4)
    with pytest.raises(ValueError, match="tp=3 does not divide"):
        check_degree(_cfg(), 3)
