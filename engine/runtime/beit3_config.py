"""The BEiT-3 model configuration (microsoft/unilm `beit3` on torchscale's Multiway encoder) and its tensors.

Carried in the shard manifest like VLMoConfig; its dict form has `"family": "beit3"`, which is how a
manifest says which model to build (engine.runtime.families).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

from .config import ModelConfigBase

Shape = Tuple[int, ...]

FAMILY = "beit3"
# The published sizes (modeling_utils._get_base_config / _get_large_config): (width, depth) -> heads.
HEADS_BY_SIZE: Dict[Tuple[int, int], int] = {(768, 12): 12, (1024, 24): 16}
# fairseq's position numbering, which torchscale keeps: the first token has position 2.
POSITION_OFFSET = 2
LAYERNORM_EPS = 1e-5  # torchscale's layernorm_eps default and nn.LayerNorm's, for the heads
PREFIX = "beit3."


@dataclass(frozen=True)
class BEiT3Config(ModelConfigBase):
    family: ClassVar[str] = FAMILY

    embed_dim: int
    depth: int
    num_heads: int
    ffn_dim: int
    image_size: int
    max_text_len: int = 64
    vocab_size: int = 64010
    patch_size: int = 16
    text_positions: int = 1024  # rows of embed_positions.B (torchscale's max_source_positions)
    # encoder.layer_norm after the last layer: the VQA and classification models are built without it
    normalize_output: bool = True
    vqa_labels: Optional[int] = None
    nlvr2: bool = False
    retrieval: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"family": FAMILY, **dataclasses.asdict(self)}


def _multiway(name: str, params: Dict[str, Shape]) -> Dict[str, Shape]:
    """A Multiway module's two experts: `.A` for image tokens, `.B` for text tokens."""
    return {f"{name}.{expert}.{suffix}": shape for expert in ("A", "B") for suffix, shape in params.items()}


def _norm(dim: int) -> Dict[str, Shape]:
    return {"weight": (dim,), "bias": (dim,)}


def _linear(d_out: int, d_in: int) -> Dict[str, Shape]:
    return {"weight": (d_out, d_in), "bias": (d_out,)}


def full_shapes(cfg: BEiT3Config) -> Dict[str, Shape]:
    """Every tensor the engine needs from a BEiT-3 checkpoint of this config, with its published name and shape."""
    D, F, P = cfg.embed_dim, cfg.ffn_dim, cfg.patch_size
    enc = PREFIX + "encoder."
    shapes: Dict[str, Shape] = {
        PREFIX + "text_embed.weight": (cfg.vocab_size, D),
        PREFIX + "vision_embed.cls_token": (1, 1, D),
        PREFIX + "vision_embed.proj.weight": (D, 3, P, P),
        PREFIX + "vision_embed.proj.bias": (D,),
        enc + "embed_positions.A.weight": (cfg.num_image_tokens + POSITION_OFFSET, D),
        enc + "embed_positions.B.weight": (cfg.text_positions, D),
    }
    for i in range(cfg.depth):
        layer = f"{enc}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update(_multiway(layer + "self_attn." + proj, _linear(D, D)))
        shapes.update(_multiway(layer + "self_attn.inner_attn_ln", _norm(D)))
        shapes.update(_multiway(layer + "self_attn_layer_norm", _norm(D)))
        shapes.update(_multiway(layer + "final_layer_norm", _norm(D)))
        ffn = {**{"fc1." + k: s for k, s in _linear(F, D).items()},
               **{"fc2." + k: s for k, s in _linear(D, F).items()},
               **{"ffn_layernorm." + k: s for k, s in _norm(F).items()}}
        shapes.update(_multiway(layer + "ffn", ffn))
    if cfg.normalize_output:
        shapes.update(_multiway(enc + "layer_norm", _norm(D)))
    if cfg.vqa_labels:
        shapes.update({"pooler.norm.weight": (D,), "pooler.norm.bias": (D,),
                       "pooler.dense.weight": (D, D), "pooler.dense.bias": (D,),
                       "head.0.weight": (2 * D, D), "head.0.bias": (2 * D,),
                       "head.1.weight": (2 * D,), "head.1.bias": (2 * D,),
                       "head.3.weight": (cfg.vqa_labels, 2 * D), "head.3.bias": (cfg.vqa_labels,)})
    if cfg.nlvr2:  # TwoLayerMLP over [image CLS, text CLS] of both passes: 4D -> 2D -> 2
        shapes.update({"head.norm1.weight": (4 * D,), "head.norm1.bias": (4 * D,),
                       "head.dense1.weight": (2 * D, 4 * D), "head.dense1.bias": (2 * D,),
                       "head.norm2.weight": (2 * D,), "head.norm2.bias": (2 * D,),
                       "head.dense2.weight": (2, 2 * D), "head.dense2.bias": (2,)})
    if cfg.retrieval:
        shapes.update({"vision_head.weight": (D, D), "language_head.weight": (D, D)})
    return shapes
