"""The model families the engine runs, and how a manifest's config says which one it holds.

A BEiT-3 config's dict carries `"family": "beit3"`; a dict without the field is VLMo's (every manifest
written before BEiT-3 was supported).
"""
from __future__ import annotations

from typing import Any, Dict, Union

from .beit3_config import BEiT3Config
from .config import VLMoConfig

ModelConfig = Union[VLMoConfig, BEiT3Config]
FAMILIES = {"vlmo": VLMoConfig, "beit3": BEiT3Config}


def config_from_dict(data: Dict[str, Any]) -> ModelConfig:
    """The config a manifest describes; ValueError for an unknown family or unknown fields."""
    family = data.get("family", "vlmo")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} (this engine runs {', '.join(sorted(FAMILIES))})")
    return FAMILIES[family].from_dict({k: v for k, v in data.items() if k != "family"})
