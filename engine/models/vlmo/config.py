"""The VLMo model configuration: one dataclass, carried in the shard manifest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional

from ..base import ModelConfigBase

PATCH_SIZE = 16
MLP_RATIO = 4
# Text length of the checkpoint VLMo's relative-position table was first built for.
INIT_TEXT_LEN = 196

# The published architectures (timm registrations in the published multiway_transformer.py).
ARCH_PRESETS: Dict[str, Dict[str, Any]] = {
    "vlmo_base_patch16": dict(
        embed_dim=768, depth=12, num_heads=12, vlffn_start_layer_index=10,
        relative_position_bias=True, abs_pos_embed=False, layer_scale=True,
    ),
    "vlmo_base_plus_patch16": dict(
        embed_dim=544, depth=24, num_heads=16, vlffn_start_layer_index=21,
        relative_position_bias=False, abs_pos_embed=True, layer_scale=False,
    ),
    "vlmo_large_patch16": dict(
        embed_dim=1024, depth=24, num_heads=16, vlffn_start_layer_index=21,
        relative_position_bias=True, abs_pos_embed=False, layer_scale=True,
    ),
}


@dataclass(frozen=True)
class VLMoConfig(ModelConfigBase):
    family: ClassVar[str] = "vlmo"  # not a field; manifests written before BEiT-3 carry none

    embed_dim: int
    depth: int
    num_heads: int
    vlffn_start_layer_index: int
    image_size: int
    relative_position_bias: bool
    abs_pos_embed: bool
    layer_scale: bool
    max_text_len: int = 40
    vocab_size: int = 30522
    mlp_ratio: int = MLP_RATIO
    patch_size: int = PATCH_SIZE
    max_text_len_of_initckpt: int = INIT_TEXT_LEN
    num_token_types: int = 2
    vqa_labels: Optional[int] = None
    nlvr2: bool = False
    retrieval: bool = False

    @property
    def ffn_dim(self) -> int:
        return self.embed_dim * self.mlp_ratio

    @property
    def num_image_distances(self) -> int:
        """Nr: relative distances between patches, plus 3 for the CLS cases."""
        return (2 * self.grid - 1) ** 2 + 3

    @property
    def rel_table_rows(self) -> int:
        """R = Nr + 2·T0 + 2."""
        return self.num_image_distances + 2 * self.max_text_len_of_initckpt + 2

    def has_vl_expert(self, layer: int) -> bool:
        return layer >= self.vlffn_start_layer_index

