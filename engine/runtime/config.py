"""The VLMo model configuration: one dataclass, carried in the shard manifest."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional

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


class ModelConfigBase:
    """What the model families' configs share: derived sizes, the task heads present, the manifest's dict form."""

    embed_dim: int
    num_heads: int
    image_size: int
    patch_size: int
    vqa_labels: Optional[int]
    nlvr2: bool
    retrieval: bool

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid(self) -> int:
        """W: patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """n = W² + 1 (the CLS token)."""
        return self.grid ** 2 + 1

    @property
    def tasks(self) -> tuple:
        """Task heads present in the checkpoint, in a fixed order."""
        found = []
        if self.vqa_labels:
            found.append("vqa")
        if self.nlvr2:
            found.append("nlvr2")
        if self.retrieval:
            found.append("irtr")
        return tuple(found)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown model config fields: {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class VLMoConfig(ModelConfigBase):
    family: ClassVar[str] = "vlmo"  # not a field: VLMo manifests carry no family (engine.runtime.families)

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

