"""Infer a BEiT3Config from a beit3 checkpoint's weights and saved arguments.

Shapes decide width, depth, FFN width, vocabulary, image size (from the image position table), patch size,
whether the encoder ends in a LayerNorm (the published VQA models have none) and the task head. The head count
is not in the weights: it comes from the published sizes (base 768×12 → 12 heads, large 1024×24 → 16), else
`--num-heads`. The text length is beit3's `--num_max_bpe_tokens` (saved under `args`), default 64.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

import torch

from ..inference import OVERRIDE_FLAGS, ConfigError, check_heads, layer_count, weight_shape
from .config import HEADS_BY_SIZE, POSITION_OFFSET, PREFIX, BEiT3Config

_LAYER = re.compile(re.escape(PREFIX) + r"encoder\.layers\.(\d+)\.")
_VQA_HEAD = re.compile(r"pooler\.|head\.\d")  # Pooler, then Linear-LN-GELU-Linear
_NLVR2_HEAD = re.compile(r"head\.(norm|dense)\d")  # TwoLayerMLP
DEFAULT_TEXT_LEN = 64  # beit3's --num_max_bpe_tokens default


def recognises(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict holds BEiT-3 weights (torchscale's Multiway encoder under `beit3.`)."""
    return any(_LAYER.match(k) for k in sd) or f"{PREFIX}text_embed.weight" in sd


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple:
    return weight_shape(sd, key, "BEiT-3")


def _depth(sd: Mapping[str, torch.Tensor]) -> int:
    return layer_count(sd, _LAYER, f"{PREFIX}encoder.layers.*", "encoder layers", "BEiT-3")


def _image_size(sd: Mapping[str, torch.Tensor], patch: int) -> int:
    rows = _shape(sd, f"{PREFIX}encoder.embed_positions.A.weight")[0]
    grid = math.isqrt(max(rows - POSITION_OFFSET - 1, 0))  # rows = W² patches + CLS + fairseq's offset 2
    if grid * grid != rows - POSITION_OFFSET - 1 or not grid:
        raise ConfigError(f"{PREFIX}encoder.embed_positions.A.weight has {rows} rows: not a square patch grid "
                          f"plus CLS and 2")
    return grid * patch


def _num_heads(embed_dim: int, depth: int) -> int:
    if (embed_dim, depth) in HEADS_BY_SIZE:
        return HEADS_BY_SIZE[(embed_dim, depth)]
    raise ConfigError(f"the head count of a {embed_dim}-wide, {depth}-layer BEiT-3 is not in its weights and it is "
                      f"not a published size; pass {OVERRIDE_FLAGS['num_heads']}")


def infer_config(sd: Mapping[str, torch.Tensor], args: Optional[Mapping[str, Any]] = None,
                       overrides: Optional[Mapping[str, Any]] = None) -> BEiT3Config:
    """The config of a BEiT-3 checkpoint; `overrides` maps BEiT3Config field names to forced values."""
    args = dict(args or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    vocab_size, embed_dim = _shape(sd, f"{PREFIX}text_embed.weight")
    depth = _depth(sd)
    patch = _shape(sd, f"{PREFIX}vision_embed.proj.weight")[-1]
    fields = {
        "embed_dim": embed_dim, "depth": depth, "vocab_size": vocab_size, "patch_size": patch,
        "ffn_dim": _shape(sd, f"{PREFIX}encoder.layers.0.ffn.A.fc1.weight")[0],
        "text_positions": _shape(sd, f"{PREFIX}encoder.embed_positions.B.weight")[0],
        "normalize_output": any(k.startswith(f"{PREFIX}encoder.layer_norm.") for k in sd),
        # a head is there when any of its tensors is: one that lacks the rest is then named as missing
        "vqa_labels": _shape(sd, "head.3.weight")[0] if any(_VQA_HEAD.match(k) for k in sd) else None,
        "nlvr2": any(_NLVR2_HEAD.match(k) for k in sd),
        "retrieval": any(k.startswith(("vision_head.", "language_head.")) for k in sd),
    }
    for name, infer in (("num_heads", lambda: _num_heads(embed_dim, depth)),
                        ("image_size", lambda: _image_size(sd, patch)),
                        ("max_text_len", lambda: int(args.get("num_max_bpe_tokens", DEFAULT_TEXT_LEN)))):
        fields[name] = overrides[name] if name in overrides else infer()
    cfg = BEiT3Config(**fields)
    check_heads(cfg.embed_dim, cfg.num_heads)
    if cfg.max_text_len + POSITION_OFFSET > cfg.text_positions:
        raise ConfigError(f"a text length of {cfg.max_text_len} needs {cfg.max_text_len + POSITION_OFFSET} text "
                          f"positions, the checkpoint has {cfg.text_positions}; check "
                          f"{OVERRIDE_FLAGS['max_text_len']}")
    return cfg
