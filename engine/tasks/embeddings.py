"""The retrieval embeddings file (`engine.retrieval --save-embeddings`), for users who build a search index.

One safetensors file:

| tensor | what |
| --- | --- |
| `image_embeds` | float32 [I, D], L2-normalised image embeddings, in arrow row order |
| `image_rows` | int64 [I], each image's row in the split's arrow file |
| `text_embeds` | float32 [C, D], L2-normalised caption embeddings, in arrow order (rows, then captions) |
| `caption_index` | int64 [C], each caption's position among all captions of the split, flattened in that order |
| `text_image` | int64 [C], the row of `image_embeds` holding each caption's image |

and in the header metadata (strings): `image_ids` and `captions` (JSON lists, parallel to the rows of
`image_embeds` and `text_embeds`), `dataset`, `split`, `checkpoint_sha256`. It holds exactly what was
scored: images that did not decode, and their captions, are absent.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Union

import torch
from safetensors.torch import load_file, safe_open

from ..atomic import write_safetensors

FORMAT = "vlmo-tp-retrieval-embeddings"
FORMAT_VERSION = "1"


@dataclass
class Gallery:
    """The scored images and captions with their embeddings and ids."""

    image_embeds: torch.Tensor
    image_rows: List[int]
    image_ids: List[str]
    text_embeds: torch.Tensor
    caption_index: List[int]
    captions: List[str]
    text_image: List[int]


def save_embeddings(path: Union[str, Path], gallery: Gallery, info: Dict[str, str]) -> None:
    """Write the gallery atomically; `info` (dataset, split, checkpoint_sha256) goes into the metadata."""
    tensors = {
        "image_embeds": gallery.image_embeds.float().contiguous(),
        "image_rows": torch.tensor(gallery.image_rows, dtype=torch.int64),
        "text_embeds": gallery.text_embeds.float().contiguous(),
        "caption_index": torch.tensor(gallery.caption_index, dtype=torch.int64),
        "text_image": torch.tensor(gallery.text_image, dtype=torch.int64),
    }
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **info,
                "image_ids": json.dumps(gallery.image_ids, ensure_ascii=False),
                "captions": json.dumps(gallery.captions, ensure_ascii=False)}
    write_safetensors(path, tensors, metadata)


def load_embeddings(path: Union[str, Path]) -> Gallery:
    """Read a file written by save_embeddings."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    tensors = load_file(str(path))
    return Gallery(image_embeds=tensors["image_embeds"], image_rows=tensors["image_rows"].tolist(),
                   image_ids=json.loads(metadata["image_ids"]), text_embeds=tensors["text_embeds"],
                   caption_index=tensors["caption_index"].tolist(), captions=json.loads(metadata["captions"]),
                   text_image=tensors["text_image"].tolist())
