"""The evaluation image transform (published `square_transform`) without torchvision."""
from __future__ import annotations

import io
import struct

import numpy as np
import torch
from PIL import Image, ImageOps

# What Pillow's decoders raise on corrupt or hostile data.
_DECODE_FAILURES = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class ImageDecodeError(Exception):
    """Image bytes that Pillow cannot decode; callers report and skip the sample."""


def decode_image(data: bytes, upright: bool = False) -> Image.Image:
    """Decode image bytes (JPEG, PNG, ...) to an RGB image; `upright` turns it as its EXIF orientation says (a
    camera's photo as it is shown; the published evaluation reads the pixels as stored)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (ImageOps.exif_transpose(image) if upright else image).convert("RGB")
    except _DECODE_FAILURES as err:
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {err}") from None


def square_transform(image: Image.Image, size: int) -> torch.Tensor:
    """Bicubic resize to size x size, scale to [0, 1], normalise with mean 0.5, std 0.5.

    The arithmetic follows torchvision's Resize / ToTensor / Normalize step by
    step (float32 divide by 255, subtract, divide) so results match bit for bit.
    """
    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float().div(255).sub(0.5).div(0.5)


def load_image(data: bytes, size: int) -> torch.Tensor:
    """Image bytes to a normalised [3, size, size] float32 tensor."""
    return square_transform(decode_image(data), size)
