"""Request payloads to model inputs, with evaluation's own functions (engine.data) so answers match it exactly.

Images arrive as raw bytes, base64 or `data:` URIs; they are bounded in bytes and in pixels (checked from the
header, before anything is decoded) and then go through `decode_image` + `square_transform`, the functions the
evaluation datasets use. Texts go through the checkpoint family's tokenizer, the one evaluation uses
(engine.tasks.tokenizers: WordPiece for VLMo, SentencePiece for BEiT-3); a text longer than the model's window is
truncated as in evaluation, and the caller is told by how much.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from PIL import Image
from ..data.image import ImageDecodeError, decode_image, square_transform
from ..tasks.tokenizers import Tokenizer

_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w=.+-]+)*);base64,", re.IGNORECASE)


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP code (400 malformed, 413 too large)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int
    max_image_pixels: int


def image_bytes_from_text(value: object, field: str, limits: Limits) -> bytes:
    """The bytes of a base64 string or a base64 `data:` URI; remote URLs are refused (the server fetches nothing)."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{field}: expected a base64 image or a data URI")
    text = value.strip()
    if text.lower().startswith(("http://", "https://", "file:", "ftp://")):
        raise RequestError(f"{field}: remote image URLs are not fetched; send the image itself as a "
                           f"data URI (data:image/jpeg;base64,...)")
    match = _DATA_URI.match(text)
    if match:
        text = text[match.end():]
    elif text.lower().startswith("data:"):
        raise RequestError(f"{field}: only base64 data URIs are accepted (data:image/...;base64,...)")
    # base64 holds 3 bytes per 4 characters: refuse an oversized image before decoding it
    if len(text) // 4 * 3 > limits.max_image_bytes + 3:
        raise RequestError(f"{field}: image larger than --max-image-bytes {limits.max_image_bytes}", 413)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field}: not valid base64") from None
    return check_image_size(data, field, limits)


def check_image_size(data: bytes, field: str, limits: Limits) -> bytes:
    if not data:
        raise RequestError(f"{field}: empty image")
    if len(data) > limits.max_image_bytes:
        raise RequestError(f"{field}: image of {len(data)} bytes exceeds --max-image-bytes "
                           f"{limits.max_image_bytes}", 413)
    return data


def _check_pixels(data: bytes, field: str, limits: Limits) -> None:
    """Refuse a decompression bomb from its header alone (Image.open reads no pixel data)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as exc:  # Pillow raises many types on hostile headers; all mean "not an image"
        raise RequestError(f"{field}: cannot decode image ({len(data)} bytes): {exc}") from None
    if width * height > limits.max_image_pixels:
        raise RequestError(f"{field}: image of {width}x{height} pixels exceeds --max-image-pixels "
                           f"{limits.max_image_pixels}", 413)


def image_tensor(data: bytes, field: str, size: int, limits: Limits, upright: bool = False) -> torch.Tensor:
    """[3, size, size] normalised, exactly as the evaluation datasets make it (`upright`: as engine.index reads
    photos, turned as their EXIF orientation says)."""
    _check_pixels(data, field, limits)
    try:
        return square_transform(decode_image(data, upright), size)
    except ImageDecodeError as exc:
        raise RequestError(f"{field}: {exc}") from None


@dataclass(frozen=True)
class TokenizedText:
    tensors: Dict[str, torch.Tensor]  # text_ids, text_masks: [max_len]
    tokens: int  # before truncation, the family's start and end tokens included

    @property
    def truncated(self) -> bool:
        return self.tokens > self.tensors["text_ids"].shape[0]


class TextPreprocessor:
    """Evaluation's tokenizer, plus the untruncated length (to tell the client what was cut)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.max_len = tokenizer.max_len

    def __call__(self, text: object, field: str) -> TokenizedText:
        if not isinstance(text, str):
            raise RequestError(f"{field}: expected a string")
        if not text.strip():
            raise RequestError(f"{field}: empty text")
        encoded = self.tokenizer([text])
        tokens = int(encoded["text_masks"][0].sum())
        if tokens == self.max_len:  # it filled the window: count what truncation may have cut (a second pass)
            tokens = self.tokenizer.count(text)
        # the model inputs evaluation's datasets give both families (BEiT-3 derives its padding mask from text_masks)
        return TokenizedText(tensors={k: encoded[k][0] for k in ("text_ids", "text_masks")}, tokens=tokens)

    def note(self, text: TokenizedText) -> Optional[str]:
        """What the response says about a truncated text, or None."""
        if not text.truncated:
            return None
        return (f"the text is {text.tokens} tokens; truncated to the model's {self.max_len} "
                f"as in evaluation")
