"""Image search over HTTP (`engine.serve --index INDEX`): the request → job, the lookup, and the indexed images.

POST /v1/search takes `{"text": "..."}` or `{"image": base64 or data URI}` and `top_k` (default 10); the query goes
through the batcher as a text or image embedding job, as /v1/embeddings does, and rank 0 looks its vector up in
the index (engine.index.store) exactly as `python -m engine.index search` does. GET /v1/images/{id} serves only
images of the index, by id, never a path from the request, and only while their file holds the indexed bytes.
"""
from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ..data.image import decode_image
from ..index.store import ChangedImage, Store, check_checkpoint, open_store
from ..models.tasks import IMAGE_EMBEDDING, TEXT_EMBEDDING
from ..runtime.shards import Manifest
from .payloads import Prepared, Preprocessor, parse_json, top_k_of
from .preprocess import RequestError, image_bytes_from_text, image_tensor

DEFAULT_TOP_K = 10
THUMBNAIL_SIDES = (16, 2048)  # the range of ?max_side=


class SearchIndex:
    """The index rank 0 serves; lookups are serialised (an HNSW search adjusts its breadth to top_k)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, manifest: Manifest, shards: Path) -> "SearchIndex":
        """The index at `path`, refused (one line) when another checkpoint built it."""
        store = open_store(path)
        check_checkpoint(store.meta["checkpoint"], manifest, path, shards)
        return cls(store)

    def describe(self) -> Dict[str, Any]:
        meta = self.store.meta
        return {"images": len(self.store), "kind": meta["kind"], "dim": meta["dim"]}

    def search(self, vector: torch.Tensor, top_k: int) -> List[Dict[str, Any]]:
        with self._lock:
            return self.store.search(vector.numpy()[None].astype(np.float32), top_k)[0]

    def image(self, ident: str, max_side: Optional[str]) -> Tuple[bytes, str]:
        """(bytes, media type) of indexed image `ident`, or a JPEG thumbnail of at most max_side pixels a side."""
        if not ident.isdigit() or int(ident) >= len(self.store):
            raise RequestError(f"no image {ident!r} in the index (ids are 0..{len(self.store) - 1})", 404)
        try:
            data = self.store.image_bytes(int(ident))
        except ChangedImage as exc:
            raise RequestError(str(exc), 404) from None
        if max_side is None:
            Image.init()  # Image.MIME fills as the format plugins load
            return data, Image.MIME.get(str(self.store.item(int(ident))["format"]).upper(), "application/octet-stream")
        low, high = THUMBNAIL_SIDES
        if not max_side.isdigit() or not low <= int(max_side) <= high:
            raise RequestError(f"max_side: expected an integer from {low} to {high}, got {max_side!r}")
        side = int(max_side)
        image = decode_image(data, upright=True)
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue(), "image/jpeg"


def search_job(preprocessor: Preprocessor, index: SearchIndex, body: bytes) -> Tuple[Prepared, int]:
    """The embedding job of a POST /v1/search body, and its top_k."""
    data = parse_json(body)
    text, image = data.get("text"), data.get("image")
    if (text is None) == (image is None):
        raise RequestError("send either 'text' (a query text) or 'image' (a base64 image or data URI)")
    value = data.get("top_k")
    top_k = DEFAULT_TOP_K if value is None else top_k_of(value, len(index.store))
    if text is not None:
        tokens = preprocessor.text(text, "text")
        note = preprocessor.text.note(tokens)
        return Prepared(TEXT_EMBEDDING, tokens.tensors, tokens.tokens, [f"text: {note}"] if note else []), top_k
    data_bytes = image_bytes_from_text(image, "image", preprocessor.limits)
    tensor = image_tensor(data_bytes, "image", preprocessor.image_size, preprocessor.limits, upright=True)
    return Prepared(IMAGE_EMBEDDING, {"image": tensor}), top_k
