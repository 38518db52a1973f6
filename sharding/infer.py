"""Infer a VLMoConfig from a checkpoint's weights and training hyper-parameters.

Shapes decide where they can (width, depth, experts, heads from the relative
position table, vocabulary, task heads); the hyper-parameters and the published
presets fill in the rest; CLI overrides win over both. What cannot be inferred
is an error that names the override to pass.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from engine.runtime.config import ARCH_PRESETS, INIT_TEXT_LEN, PATCH_SIZE, VLMoConfig

from engine.runtime.plan import full_shapes

# CLI option that overrides each inferred field.
OVERRIDE_FLAGS = {
    "num_heads": "--num-heads",
    "image_size": "--image-size",
    "max_text_len": "--max-text-len",
    "vlffn_start_layer_index": "--vl-start-layer",
}
_BLOCK = re.compile(r"transformer\.blocks\.(\d+)\.")


class ConfigError(ValueError):
    """The checkpoint does not say enough, or contradicts itself."""


def weight_shape(sd: Mapping[str, torch.Tensor], key: str, family: str = "VLMo") -> Tuple[int, ...]:
    if key not in sd:
        raise ConfigError(f"missing weight {key}: this does not look like a {family} checkpoint")
    return tuple(sd[key].shape)


def layer_count(sd: Mapping[str, torch.Tensor], layer: "re.Pattern[str]", keys: str, noun: str,
                family: str = "VLMo") -> int:
    """How many layers `layer` (a regex capturing the index) numbers, refusing gaps."""
    layers = {int(m.group(1)) for k in sd if (m := layer.match(k))}
    if not layers:
        raise ConfigError(f"no {keys} weights: this does not look like a {family} checkpoint")
    if layers != set(range(len(layers))):
        missing = sorted(set(range(max(layers) + 1)) - layers)
        raise ConfigError(f"{noun} {missing} are missing")
    return len(layers)


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> Tuple[int, ...]:
    return weight_shape(sd, key)


def _depth(sd: Mapping[str, torch.Tensor]) -> int:
    return layer_count(sd, _BLOCK, "transformer.blocks.*", "transformer blocks")


def _num_heads(sd: Mapping[str, torch.Tensor], hyper: Mapping[str, Any], embed_dim: int, depth: int) -> int:
    if "relative_position_bias_table" in sd:
        columns = sd["relative_position_bias_table"].shape[1]
        if columns % depth:
            raise ConfigError(f"relative_position_bias_table has {columns} columns, not a multiple of depth {depth}")
        return columns // depth
    # the named preset first, then any preset of the same shape
    named = ARCH_PRESETS.get(str(hyper.get("model_arch", "")))
    for preset in ([named] if named else []) + list(ARCH_PRESETS.values()):
        if (preset["embed_dim"], preset["depth"]) == (embed_dim, depth):
            return preset["num_heads"]
    raise ConfigError(f"cannot infer the number of attention heads of a {embed_dim}-wide, {depth}-layer model "
                      f"without a relative position table; pass {OVERRIDE_FLAGS['num_heads']}")


def _image_size(sd: Mapping[str, torch.Tensor], hyper: Mapping[str, Any], text_len0: int) -> int:
    if "image_size" in hyper:
        return int(hyper["image_size"])
    if "transformer.pos_embed" in sd:
        grid = math.isqrt(sd["transformer.pos_embed"].shape[1] - 1)
        return grid * PATCH_SIZE
    if "relative_position_bias_table" in sd:
        # R = (2W-1)² + 3 + 2·T0 + 2
        side = sd["relative_position_bias_table"].shape[0] - 5 - 2 * text_len0
        root = math.isqrt(max(side, 0))
        if root * root == side and root % 2 == 1:
            return (root + 1) // 2 * PATCH_SIZE
    raise ConfigError(f"cannot infer the image size; pass {OVERRIDE_FLAGS['image_size']}")


def _vl_start(sd: Mapping[str, torch.Tensor], depth: int) -> int:
    with_vl = sorted({i for i in range(depth) if f"transformer.blocks.{i}.mlp_vl.fc1.weight" in sd})
    start = with_vl[0] if with_vl else depth
    if with_vl != list(range(start, depth)):
        raise ConfigError(f"vision-language experts must fill the top layers, found them in layers {with_vl}")
    return start


def infer_config(sd: Mapping[str, torch.Tensor], hyper: Optional[Mapping[str, Any]] = None,
                 overrides: Optional[Mapping[str, Any]] = None) -> VLMoConfig:
    """The model config of a checkpoint; `overrides` maps VLMoConfig field names to forced values."""
    hyper = dict(hyper or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    embed_dim = _shape(sd, "transformer.cls_token")[-1]
    depth = _depth(sd)
    text_len0 = int(hyper.get("max_text_len_of_initckpt", INIT_TEXT_LEN))
    fields: Dict[str, Any] = {
        "embed_dim": embed_dim,
        "depth": depth,
        "vocab_size": _shape(sd, "text_embeddings.word_embeddings.weight")[0],
        "mlp_ratio": _shape(sd, "transformer.blocks.0.mlp_text.fc1.weight")[0] // embed_dim,
        "relative_position_bias": "relative_position_bias_table" in sd,
        "abs_pos_embed": "transformer.pos_embed" in sd,
        "layer_scale": "transformer.blocks.0.gamma_1" in sd,
        "max_text_len_of_initckpt": text_len0,
        "num_token_types": _shape(sd, "token_type_embeddings.weight")[0],
        "vqa_labels": sd["vqa_classifier.3.weight"].shape[0] if "vqa_classifier.3.weight" in sd else None,
        "nlvr2": any(k.startswith("nlvr2_classifier.") for k in sd),
        "retrieval": "itc_text_proj.fc.weight" in sd or "itc_image_proj.fc.weight" in sd,
    }
    for name, infer in (
        ("num_heads", lambda: _num_heads(sd, hyper, embed_dim, depth)),
        ("image_size", lambda: _image_size(sd, hyper, text_len0)),
        ("max_text_len", lambda: int(hyper.get("max_text_len",
                                               _shape(sd, "text_embeddings.position_embeddings.weight")[0]))),
        ("vlffn_start_layer_index", lambda: _vl_start(sd, depth)),
    ):
        fields[name] = overrides[name] if name in overrides else infer()
    cfg = VLMoConfig(**fields)
    _check_consistent(cfg)
    return cfg


def _check_consistent(cfg: VLMoConfig) -> None:
    if cfg.embed_dim % cfg.num_heads:
        raise ConfigError(f"{cfg.num_heads} heads do not divide the width {cfg.embed_dim}; "
                          f"check {OVERRIDE_FLAGS['num_heads']}")
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"image size {cfg.image_size} is not a multiple of the {cfg.patch_size}-pixel patch; "
                          f"check {OVERRIDE_FLAGS['image_size']}")


def select_weights(sd: Mapping[str, torch.Tensor], cfg: VLMoConfig) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The tensors the engine needs, checked against the config, and the names it ignores.

    Missing tensors and shape mismatches are errors that name every offender.
    """
    expected = full_shapes(cfg)
    missing = sorted(set(expected) - set(sd))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ConfigError(f"missing weights: {shown}")
    wrong = [f"{k} is {tuple(sd[k].shape)}, expected {expected[k]}" for k in expected
             if tuple(sd[k].shape) != expected[k]]
    if wrong:
        hint = (f" (if the image size or head count was guessed wrong, pass {OVERRIDE_FLAGS['image_size']} "
                f"or {OVERRIDE_FLAGS['num_heads']})")
        raise ConfigError("weights do not match the inferred config: " + "; ".join(wrong[:4]) + hint)
    unknown = sorted(set(sd) - set(expected))
    return {k: sd[k] for k in expected}, unknown
