"""Tokenizer and image transform against the published preprocessing."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from _datatools import image_bytes
from _paths import GOLDEN, SHARED, needs
from engine.data.datasets import VQADataset, collate
from engine.data.image import ImageDecodeError, decode_image, load_image, square_transform
from engine.data.raw import DataError
from engine.data.text import DEFAULT_VOCAB, TextTokenizer

PREPROCESSED = GOLDEN / "vqav2_val_preprocessed.safetensors"


@needs(PREPROCESSED)
def test_val_questions_and_images_match_published_preprocessing():
    from safetensors.torch import load_file

    expected = load_file(str(PREPROCESSED))
    dataset = VQADataset(GOLDEN / "vqav2_arrow_published", "val", TextTokenizer(), image_size=480)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["question_id"] == expected["question_id"].tolist()
    assert batch["text_ids"].dtype == batch["text_masks"].dtype == torch.int64
    assert torch.equal(batch["text_ids"], expected["text_ids"])
    assert torch.equal(batch["text_masks"], expected["text_masks"])

    # The first question of each of the first three rows.
    first = [batch["image_id"].index(image_id) for image_id in expected["image_id"].tolist()]
    torch.testing.assert_close(batch["image"][first], expected["image_480"], atol=1e-6, rtol=0)


def test_truncation_and_padding():
    tokenizer = TextTokenizer()
    out = tokenizer(["a cat " * 30, "A Cat"])
    assert out["text_ids"].shape == out["text_masks"].shape == (2, 40)
    cls, sep, cat = (tokenizer._tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "cat"))
    assert out["text_ids"][0, 0] == cls and out["text_ids"][0, 39] == sep and out["text_masks"][0].all()
    assert out["text_ids"][1, :4].tolist() == [cls, tokenizer._tokenizer.token_to_id("a"), cat, sep]
    assert out["text_masks"][1].tolist() == [1] * 4 + [0] * 36
    assert out["text_ids"][1, 4:].eq(0).all()


def test_max_len_and_vocab_override(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    out = TextTokenizer(vocab, max_len=6)(["Hello big World"])
    assert out["text_ids"].tolist() == [[2, 5, 1, 6, 3, 0]]
    assert out["text_masks"].tolist() == [[1, 1, 1, 1, 1, 0]]


def test_missing_vocab_names_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.txt"):
        TextTokenizer(tmp_path / "nope.txt")


@needs(SHARED / "data" / "bert-base-uncased-vocab.txt")
def test_packaged_vocab_is_the_shared_one():
    assert DEFAULT_VOCAB.read_bytes() == (SHARED / "data" / "bert-base-uncased-vocab.txt").read_bytes()


def test_square_transform_arithmetic():
    pixels = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = square_transform(image, 5)
    resized = np.asarray(image.resize((5, 5), Image.BICUBIC), dtype=np.float32)
    assert out.shape == (3, 5, 5) and out.dtype == torch.float32
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), (resized / 255 - 0.5) / 0.5, atol=1e-6)


def test_decode_converts_to_rgb():
    gray = io.BytesIO()
    Image.new("L", (4, 4), 128).save(gray, format="PNG")
    assert decode_image(gray.getvalue()).mode == "RGB"
    assert load_image(image_bytes((255, 0, 0)), 8).shape == (3, 8, 8)


@pytest.mark.parametrize("data", [b"", b"not an image", image_bytes((1, 2, 3))[:40]])
def test_undecodable_bytes_raise_decode_error(data):
    with pytest.raises(ImageDecodeError):
        load_image(data, 8)
