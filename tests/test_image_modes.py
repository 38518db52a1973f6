"""Images of every Pillow mode decode to the RGB picture a viewer shows (engine.data.image), through the files
that carry them; 8-bit RGB, grayscale and palette images stay exactly `convert("RGB")`, the published pipeline's."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.data import image as images
from engine.data.image import decode_image, load_image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def rgb(data: bytes) -> np.ndarray:
    image = decode_image(data)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# 16-bit levels and the 8-bit level a viewer shows for each: round(v * 255 / 65535)
LEVELS_16 = [0, 2570, 32896, 50000, 65535]
SHOWN_16 = [0, 10, 128, 195, 255]


def test_16_bit_grayscale_png_is_scaled_to_8_bits_not_saturated() -> None:
    data = encoded(Image.fromarray(np.array([LEVELS_16], dtype=np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # Pillow reads it as 16-bit
    pixels = rgb(data)
    assert pixels[0, :, 0].tolist() == SHOWN_16
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_every_wide_integer_mode_is_scaled_alike(mode: str) -> None:
    image = Image.fromarray(np.array([LEVELS_16], dtype=np.uint16)).convert("I")
    if mode != "I":
        image = Image.frombytes(mode, image.size, np.array(LEVELS_16, dtype=">u2" if mode.endswith("B")
                                                          else "<u2").tobytes())
    assert np.asarray(images.to_rgb(image))[0, :, 0].tolist() == SHOWN_16


def test_float_tiff_is_read_as_intensities() -> None:
    data = encoded(Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0, 2.0]], dtype=np.float32), "F"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    # the row's maximum is above 1: read as 0-255 levels, clipped
    assert rgb(data)[0, :, 0].tolist() == [0, 0, 0, 1, 2]
    unit = encoded(Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32), "F"), "TIFF")
    assert rgb(unit)[0, :, 0].tolist() == [0, 64, 128, 255]


def test_transparency_shows_the_white_background_in_every_alpha_mode() -> None:
    # black under alpha 0, 128 and 255: white, half grey, black (convert("RGB") gives black for all three)
    la = Image.fromarray(np.array([[[0, 0], [0, 128], [0, 255]]], dtype=np.uint8), "LA")
    assert rgb(encoded(la, "PNG"))[0, :, 0].tolist() == pytest.approx([255, 127, 0], abs=1)
    rgba = Image.fromarray(np.array([[[200, 0, 0, 0], [200, 0, 0, 255]]], dtype=np.uint8), "RGBA")
    assert rgb(encoded(rgba, "PNG"))[0].tolist() == [[255, 255, 255], [200, 0, 0]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    assert rgb(encoded(palette, "PNG", transparency=0))[0].tolist() == [[255, 255, 255], [0, 0, 255]]
    assert rgb(encoded(palette, "GIF", transparency=0))[0].tolist() == [[255, 255, 255], [0, 0, 255]]
    gray_keyed = Image.fromarray(np.array([[0, 90]], dtype=np.uint8), "L")  # tRNS: level 0 is transparent
    assert rgb(encoded(gray_keyed, "PNG", transparency=0))[0, :, 0].tolist() == [255, 90]
    premultiplied = Image.fromarray(np.array([[[0, 0, 0, 0]]], dtype=np.uint8), "RGBA").convert("RGBa")
    assert np.asarray(images.to_rgb(premultiplied)).tolist() == [[[255, 255, 255]]]


def test_cmyk_and_lab_give_their_colour() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert np.abs(rgb(encoded(cmyk, "JPEG", quality=95)) - [255, 0, 0]).max() <= 3
    assert np.abs(rgb(encoded(cmyk, "TIFF")) - [255, 0, 0]).max() == 0
    lab = Image.new("LAB", (2, 2), (255, 128, 128))  # L 100, a = b = 0: white
    assert np.asarray(images.to_rgb(lab)).min() >= 250


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "1"])
def test_8_bit_modes_stay_exactly_what_the_published_pipeline_gives(mode: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    image = Image.fromarray(noise, "RGB").convert(mode)
    for fmt in (("PNG", "JPEG") if mode in ("RGB", "L") else ("PNG",)):
        data = encoded(image, fmt)
        assert rgb(data).tolist() == np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int).tolist()


def test_the_evaluation_transform_of_a_16_bit_image_is_its_8_bit_picture() -> None:
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    wide = load_image(encoded(Image.fromarray(levels), "PNG"), 32)
    narrow = load_image(encoded(Image.fromarray(np.rint(levels / 257).astype(np.uint8), "L"), "PNG"), 32)
    assert wide.shape == (3, 32, 32) and float((wide - narrow).abs().max()) == 0.0
