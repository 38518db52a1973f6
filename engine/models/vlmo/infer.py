"""Infer a VLMoConfig from a checkpoint's weights and training hyper-parameters.

Shapes decide where they can (width, depth, experts, heads from the relative
position table, vocabulary, task heads); the hyper-parameters and the published
presets fill in the rest; CLI overrides win over both. What cannot be inferred
is an error that names the override to pass.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..inference import OVERRIDE_FLAGS, ConfigError, check_heads, layer_count, weight_shape
from .config import ARCH_PRESETS, INIT_TEXT_LEN, PATCH_SIZE, VLMoConfig

_BLOCK = re.compile(r"transformer\.blocks\.(\d+)\.")
# tensors of the vision-language expert, whose presence in a layer says the layer has one
_VL_EXPERT = re.compile(r"transformer\.blocks\.(\d+)\.(mlp_vl|norm2_vl)\.")


def recognises(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict holds VLMo weights (the multiway transformer under `transformer.`)."""
    return any(_BLOCK.match(k) for k in sd) or "transformer.cls_token" in sd


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> Tuple[int, ...]:
    return weight_shape(sd, key, "VLMo")


def _has(sd: Mapping[str, torch.Tensor], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in sd)


def _depth(sd: Mapping[str, torch.Tensor]) -> int:
    return layer_count(sd, _BLOCK, "transformer.blocks.*", "transformer blocks", "VLMo")


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
    # the inverse of VLMoConfig.rel_table_rows
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
    # any of the expert's tensors marks its layer: one that lacks the rest is then named as missing
    with_vl = sorted({int(m.group(1)) for k in sd if (m := _VL_EXPERT.match(k))})
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
        # a head is there when any of its tensors is: one that lacks the rest is then named as missing
        "vqa_labels": (_shape(sd, "vqa_classifier.3.weight")[0] if _has(sd, "vqa_classifier.") else None),
        "nlvr2": _has(sd, "nlvr2_classifier."),
        "retrieval": _has(sd, "itc_text_proj.", "itc_image_proj."),
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
    check_heads(cfg.embed_dim, cfg.num_heads)
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"image size {cfg.image_size} is not a multiple of the {cfg.patch_size}-pixel patch; "
                          f"check {OVERRIDE_FLAGS['image_size']}")
    if not 0 <= cfg.vlffn_start_layer_index <= cfg.depth:
        raise ConfigError(f"the vision-language experts cannot start at layer {cfg.vlffn_start_layer_index} of a "
                          f"{cfg.depth}-layer model; check {OVERRIDE_FLAGS['vlffn_start_layer_index']}")
