"""The BEiT-3 model configuration (microsoft/unilm `beit3` on torchscale's Multiway encoder), carried in the
shard manifest; its dict form has `"family": "beit3"`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

from ..base import ModelConfigBase

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
