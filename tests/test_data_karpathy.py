"""COCO / Flickr30k Karpathy writer and retrieval datasets."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from _datatools import assert_one_line_error, image_bytes, read_arrow, rows_by, write_file
from _paths import GOLDEN, needs
from _run import run_module
from engine.data.datasets import KarpathyImageDataset, KarpathyTextDataset, collate
from engine.data.karpathy import write_karpathy
from engine.data.text import TextTokenizer

COCO_RAW = GOLDEN / "coco_raw"
COCO_PUBLISHED = GOLDEN / "coco_arrow_published"
COCO_SPLITS = ("train", "val", "restval", "test")


@pytest.fixture(scope="module")
def coco_written(tmp_path_factory):
    if not COCO_RAW.exists():
        pytest.skip(f"shared test data {COCO_RAW} is not present")
    out = tmp_path_factory.mktemp("coco_arrow")
    result = run_module("engine.data", ["coco", "--root", COCO_RAW, "--out", out])
    assert result.returncode == 0, result.stderr
    return out


@needs(COCO_PUBLISHED)
@pytest.mark.parametrize("split", COCO_SPLITS)
def test_coco_matches_published(coco_written, split):
    name = f"coco_caption_karpathy_{split}.arrow"
    ours, published = read_arrow(coco_written / name), read_arrow(COCO_PUBLISHED / name)
    assert ours.schema.equals(published.schema.remove_metadata())
    assert rows_by(ours, "image_id") == rows_by(published, "image_id")


def test_coco_writes_only_its_files(coco_written):
    assert {p.name for p in coco_written.iterdir()} == {f"coco_caption_karpathy_{s}.arrow" for s in COCO_SPLITS}


def _f30k_raw(root):
    images = {
        "1.jpg": ("train", ["A dog.", "A brown dog."]),
        "2.jpg": ("test", ["Two cats."]),
        "3.jpg": ("val", ["A bird."]),
        "4.jpg": ("test", []),  # no captions: left out
        "5.jpg": ("extra", ["Unused."]),  # not a written split: left out
        "6.jpg": ("test", ["A car.", "A red car."]),
    }
    entries = [
        {"filename": name, "split": split, "sentences": [{"raw": c, "tokens": []} for c in captions]}
        for name, (split, captions) in images.items()
    ]
    write_file(root / "karpathy" / "dataset_flickr30k.json", json.dumps({"images": entries, "dataset": "flickr30k"}))
    for i, name in enumerate(images):
        write_file(root / "flickr30k-images" / name, image_bytes((40 * i, 0, 0)))
    return root


def test_f30k_content(tmp_path):
    root = _f30k_raw(tmp_path / "raw")
    out = tmp_path / "out"
    result = run_module("engine.data", ["f30k", "--root", root, "--out", out])
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {f"f30k_caption_karpathy_{s}.arrow" for s in ("train", "val", "test")}
    test = read_arrow(out / "f30k_caption_karpathy_test.arrow").to_pylist()
    image = {name: (root / "flickr30k-images" / name).read_bytes() for name in ("2.jpg", "6.jpg")}
    assert test == [
        {"image": image["2.jpg"], "caption": ["Two cats."], "image_id": "2.jpg", "split": "test"},
        {"image": image["6.jpg"], "caption": ["A car.", "A red car."], "image_id": "6.jpg", "split": "test"},
    ]
    train = read_arrow(out / "f30k_caption_karpathy_train.arrow")
    assert train.column("caption").to_pylist() == [["A dog.", "A brown dog."]]


def test_retrieval_datasets(tmp_path):
    root = _f30k_raw(tmp_path / "raw")
    write_karpathy("f30k", root, tmp_path / "out")
    images = KarpathyImageDataset(tmp_path / "out", "f30k", "test", image_size=16)
    texts = KarpathyTextDataset(tmp_path / "out", "f30k", "test", TextTokenizer())
    image_batch = collate([images[i] for i in range(len(images))])
    assert image_batch["image_id"] == ["2.jpg", "6.jpg"] and image_batch["image"].shape == (2, 3, 16, 16)
    assert image_batch["image_ok"].all()
    text_batch = collate([texts[i] for i in range(len(texts))])
    assert text_batch["text"] == ["Two cats.", "A car.", "A red car."]
    assert text_batch["image_index"] == [0, 1, 1] and text_batch["caption_index"] == [0, 1, 2]
    assert text_batch["text_ids"].shape == (3, 40)
    loader = torch.utils.data.DataLoader(images, batch_size=1, num_workers=2, collate_fn=collate)
    assert [b["image_index"][0] for b in loader] == [0, 1]


def test_missing_image_names_the_file(tmp_path):
    if not COCO_RAW.exists():
        pytest.skip(f"shared test data {COCO_RAW} is not present")
    root = tmp_path / "raw"
    shutil.copytree(COCO_RAW, root)
    (root / "val2014" / "COCO_val2014_000000000277.jpg").unlink()
    out = tmp_path / "out"
    result = run_module("engine.data", ["coco", "--root", root, "--out", out])
    assert_one_line_error(result, "COCO_val2014_000000000277.jpg", "missing")
    assert not list(out.glob("*.arrow"))


def test_malformed_annotations(tmp_path):
    root = _f30k_raw(tmp_path / "raw")
    path = root / "karpathy" / "dataset_flickr30k.json"
    path.write_text("{not json")
    out = tmp_path / "out"
    assert_one_line_error(run_module("engine.data", ["f30k", "--root", root, "--out", out]), str(path))
    assert not list(out.glob("*.arrow"))


def test_existing_arrow_files_are_replaced_only_with_overwrite(coco_written, tmp_path):
    out = tmp_path / "arrow"
    shutil.copytree(coco_written, out)
    (out / "coco_caption_karpathy_val.arrow").write_bytes(b"an older file")
    before = sorted(p.name for p in out.iterdir())
    refused = run_module("engine.data", ["coco", "--root", COCO_RAW, "--out", out])
    assert_one_line_error(refused, "coco_caption_karpathy_", "already exists", "--overwrite")
    assert (out / "coco_caption_karpathy_val.arrow").read_bytes() == b"an older file"
    assert sorted(p.name for p in out.iterdir()) == before  # nothing staged is left behind
    replaced = run_module("engine.data", ["coco", "--root", COCO_RAW, "--out", out, "--overwrite"])
    assert replaced.returncode == 0, replaced.stderr
    assert read_arrow(out / "coco_caption_karpathy_val.arrow").num_rows > 0
    assert sorted(p.name for p in out.iterdir()) == before
