"""The tensor-parallel sharding plan (DESIGN.md §5), written once.

The sharder cuts tensors with it, the loader checks shard shapes with it and
the merge tool undoes it. Each rule names how a full tensor maps to rank r of t.
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

import torch

from . import beit3_config
from .config import VLMoConfig

Shape = Tuple[int, ...]

_B3 = r"beit3\.encoder\.layers\.\d+\."
# (pattern, rule, why) — the first matching pattern wins; unmatched tensors are replicated.
PLAN: Tuple[Tuple[str, str, str], ...] = (
    (r"transformer\.blocks\.\d+\.attn\.qkv\.weight", "qkv_heads", "column-parallel: this rank's heads of q, k and v"),
    (r"transformer\.blocks\.\d+\.attn\.(q_bias|v_bias)", "rows", "this rank's heads"),
    (r"transformer\.blocks\.\d+\.attn\.proj\.weight", "columns", "row-parallel over heads; proj.bias added once"),
    (r"relative_position_bias_table", "table_heads", "this rank's heads of every layer"),
    (r"transformer\.blocks\.\d+\.mlp_(text|imag|vl)\.fc1\.(weight|bias)", "rows", "column-parallel FFN"),
    (r"transformer\.blocks\.\d+\.mlp_(text|imag|vl)\.fc2\.weight", "columns", "row-parallel FFN; fc2.bias added once"),
    # BEiT-3 (both Multiway experts, .A image and .B text, alike)
    (_B3 + r"self_attn\.(q_proj|k_proj|v_proj)\.[AB]\.(weight|bias)", "rows", "column-parallel: this rank's heads"),
    (_B3 + r"self_attn\.inner_attn_ln\.[AB]\.(weight|bias)", "rows",
     "Sub-LN over this rank's heads; mean and variance reduced across ranks"),
    (_B3 + r"self_attn\.out_proj\.[AB]\.weight", "columns", "row-parallel over heads; out_proj.bias added once"),
    (_B3 + r"ffn\.[AB]\.(fc1|ffn_layernorm)\.(weight|bias)", "rows",
     "column-parallel FFN; Sub-LN statistics reduced across ranks"),
    (_B3 + r"ffn\.[AB]\.fc2\.weight", "columns", "row-parallel FFN; fc2.bias added once"),
)
_COMPILED = tuple((re.compile(pattern), rule) for pattern, rule, _ in PLAN)


def rule_for(name: str) -> str:
    for pattern, rule in _COMPILED:
        if pattern.fullmatch(name):
            return rule
    return "replicate"


def check_degree(cfg: VLMoConfig, tp: int) -> None:
    """Refuse a tensor-parallel degree the model cannot be cut into."""
    if tp < 1:
        raise ValueError(f"the tensor-parallel degree must be at least 1, got {tp}")
    if cfg.num_heads % tp or cfg.ffn_dim % tp:
        raise ValueError(
            f"tp={tp} does not divide the model: it has {cfg.num_heads} attention heads and an FFN width of "
            f"{cfg.ffn_dim}; choose a tp that divides both (e.g. "
            f"{', '.join(str(d) for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0 and cfg.ffn_dim % d == 0)})"
        )


def full_shapes(cfg: VLMoConfig) -> Dict[str, Shape]:
    """Every tensor the engine needs from a checkpoint of this config, with its published shape."""
    if cfg.family == beit3_config.FAMILY:
        return beit3_config.full_shapes(cfg)
    D, F, L = cfg.embed_dim, cfg.ffn_dim, cfg.depth
    shapes: Dict[str, Shape] = {
        "transformer.cls_token": (1, 1, D),
        "transformer.patch_embed.proj.weight": (D, 3, cfg.patch_size, cfg.patch_size),
        "transformer.patch_embed.proj.bias": (D,),
        "transformer.norm.weight": (D,),
        "transformer.norm.bias": (D,),
        "text_embeddings.word_embeddings.weight": (cfg.vocab_size, D),
        "text_embeddings.position_embeddings.weight": (cfg.max_text_len, D),
        "text_embeddings.token_type_embeddings.weight": (2, D),
        "text_embeddings.LayerNorm.weight": (D,),
        "text_embeddings.LayerNorm.bias": (D,),
        "token_type_embeddings.weight": (cfg.num_token_types, D),
        "pooler.dense.weight": (D, D),
        "pooler.dense.bias": (D,),
    }
    if cfg.abs_pos_embed:
        shapes["transformer.pos_embed"] = (1, cfg.num_image_tokens, D)
    if cfg.relative_position_bias:
        shapes["relative_position_bias_table"] = (cfg.rel_table_rows, L * cfg.num_heads)
    for i in range(L):
        block = f"transformer.blocks.{i}."
        for norm in ("norm1", "norm2_text", "norm2_imag") + (("norm2_vl",) if cfg.has_vl_expert(i) else ()):
            shapes[block + norm + ".weight"] = (D,)
            shapes[block + norm + ".bias"] = (D,)
        shapes.update({
            block + "attn.qkv.weight": (3 * D, D),
            block + "attn.q_bias": (D,),
            block + "attn.v_bias": (D,),
            block + "attn.proj.weight": (D, D),
            block + "attn.proj.bias": (D,),
        })
        if cfg.layer_scale:
            shapes[block + "gamma_1"] = (D,)
            shapes[block + "gamma_2"] = (D,)
        for expert in ("text", "imag") + (("vl",) if cfg.has_vl_expert(i) else ()):
            mlp = f"{block}mlp_{expert}."
            shapes.update({mlp + "fc1.weight": (F, D), mlp + "fc1.bias": (F,),
                           mlp + "fc2.weight": (D, F), mlp + "fc2.bias": (D,)})
    if cfg.vqa_labels:
        shapes.update(_classifier("vqa_classifier", D, 2 * D, cfg.vqa_labels))
    if cfg.nlvr2:
        shapes.update(_classifier("nlvr2_classifier", 2 * D, 2 * D, 2))
    if cfg.retrieval:
        shapes["itc_text_proj.fc.weight"] = (D, D)
        shapes["itc_image_proj.fc.weight"] = (D, D)
    return shapes


def _classifier(prefix: str, d_in: int, hidden: int, d_out: int) -> Dict[str, Shape]:
    return {f"{prefix}.0.weight": (hidden, d_in), f"{prefix}.0.bias": (hidden,),
            f"{prefix}.1.weight": (hidden,), f"{prefix}.1.bias": (hidden,),
            f"{prefix}.3.weight": (d_out, hidden), f"{prefix}.3.bias": (d_out,)}


def _qkv_view(t: torch.Tensor, cfg: VLMoConfig) -> torch.Tensor:
    return t.view(3, cfg.num_heads, cfg.head_dim, t.shape[-1])


def _table_view(t: torch.Tensor, cfg: VLMoConfig) -> torch.Tensor:
    return t.view(t.shape[0], cfg.depth, cfg.num_heads)


def shard_tensor(name: str, full: torch.Tensor, cfg: VLMoConfig, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece of a full tensor, contiguous."""
    rule = rule_for(name)
    h = cfg.num_heads // tp
    if rule == "qkv_heads":
        piece = _qkv_view(full, cfg)[:, rank * h:(rank + 1) * h].reshape(-1, full.shape[-1])
    elif rule == "table_heads":
        piece = _table_view(full, cfg)[:, :, rank * h:(rank + 1) * h].reshape(full.shape[0], -1)
    elif rule == "rows":
        piece = full.chunk(tp, dim=0)[rank]
    elif rule == "columns":
        piece = full.chunk(tp, dim=1)[rank]
    else:
        piece = full
    return piece.contiguous()


def merge_tensor(name: str, pieces: Sequence[torch.Tensor], cfg: VLMoConfig) -> torch.Tensor:
    """Undo shard_tensor: the full tensor from every rank's piece, in rank order."""
    tp, rule = len(pieces), rule_for(name)
    h = cfg.num_heads // tp
    if rule == "qkv_heads":
        parts = [p.view(3, h, cfg.head_dim, p.shape[-1]) for p in pieces]
        return torch.cat(parts, dim=1).reshape(-1, pieces[0].shape[-1])
    if rule == "table_heads":
        parts = [p.view(p.shape[0], cfg.depth, h) for p in pieces]
        return torch.cat(parts, dim=2).reshape(pieces[0].shape[0], -1)
    if rule == "rows":
        return torch.cat(list(pieces), dim=0)
    if rule == "columns":
        return torch.cat(list(pieces), dim=1)
    return pieces[0]


def local_shape(name: str, full: Shape, tp: int) -> Shape:
    """The shape of one rank's piece of a tensor whose full shape is `full`."""
    rule = rule_for(name)
    if rule in ("qkv_heads", "rows"):
        return (full[0] // tp,) + tuple(full[1:])
    if rule in ("table_heads", "columns"):
        return (full[0], full[1] // tp) + tuple(full[2:])
    return tuple(full)


def local_shapes(cfg: VLMoConfig, tp: int) -> Dict[str, Shape]:
    return {name: local_shape(name, shape, tp) for name, shape in full_shapes(cfg).items()}


def plan_table() -> List[Tuple[str, str, str]]:
    """The plan as rows for documentation and `--help`."""
    return list(PLAN) + [("everything else", "replicate", "identical on every rank")]


