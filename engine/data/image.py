"""Image decoding to RGB as a viewer shows the picture, and the evaluation transform (published
`square_transform`) without torchvision.

8-bit RGB, grayscale and palette images convert exactly as the published pipeline's `convert("RGB")` does (the
golden outputs depend on it). Other modes, which `convert("RGB")` gets wrong, are mapped as a viewer shows them:
16-bit grayscale (modes I;16* and I, which Pillow gives it) scaled to 8 bits (convert would saturate it to white),
float grayscale read as intensities in [0, 1] (or 0-255 when it goes above 1), transparency composited over white
(convert would drop the alpha and show whatever colour hides under transparent pixels), CMYK through its embedded
ICC profile when it has one.
"""
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


# Modes whose pixels are wider than 8 bits; the value of full brightness of each.
_WIDE_INTEGER = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}
_BACKGROUND = (255, 255, 255, 255)  # what shows through transparent pixels


def decode_image(data: bytes, upright: bool = False) -> Image.Image:
    """Decode image bytes (JPEG, PNG, TIFF, ...) of any mode to the RGB image a viewer shows; `upright` turns it as
    its EXIF orientation says (a camera's photo as it is shown; the published evaluation reads the pixels as
    stored)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return to_rgb(ImageOps.exif_transpose(image) if upright else image)
    except _DECODE_FAILURES as err:
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB picture of an image of any Pillow mode (see the module's docstring)."""
    mode = image.mode
    if mode in _WIDE_INTEGER:
        pixels = np.clip(np.asarray(image).astype(np.float64), 0, _WIDE_INTEGER[mode])
        return _gray(pixels * (255 / _WIDE_INTEGER[mode]))
    if mode == "F":
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        return _gray(pixels * (255 if pixels.max(initial=0) <= 1 else 1))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # La and RGBa hold premultiplied colour: their non-premultiplied twins first
        rgba = image.convert({"La": "LA", "RGBa": "RGBA"}.get(mode, mode)).convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, _BACKGROUND), rgba).convert("RGB")
    if mode == "CMYK" and image.info.get("icc_profile"):
        return _through_profile(image)
    return image.convert("RGB")


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")


def _through_profile(image: Image.Image) -> Image.Image:
    """CMYK to sRGB through the image's embedded profile, as colour-managed viewers show it."""
    try:
        from PIL import ImageCms

        profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        return ImageCms.profileToProfile(image, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # no LittleCMS in this Pillow, or a damaged profile: Pillow's own conversion
        return image.convert("RGB")


def square_transform(image: Image.Image, size: int) -> torch.Tensor:
    """Bicubic resize to size x size, scale to [0, 1], normalise with mean 0.5, std 0.5.

    The arithmetic follows torchvision's Resize / ToTensor / Normalize step by
    step (float32 divide by 255, subtract, divide) so results match bit for bit.
    """
    # decode_image's output is already the RGB picture: no second conversion (a copy per image) for it
    rgb = image if image.mode == "RGB" and "transparency" not in image.info else to_rgb(image)
    resized = rgb.resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float().div(255).sub(0.5).div(0.5)


def load_image(data: bytes, size: int) -> torch.Tensor:
    """Image bytes to a normalised [3, size, size] float32 tensor."""
    return square_transform(decode_image(data), size)
