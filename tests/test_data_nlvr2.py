"""NLVR2 writer (checked against what the published writer's code produces) and dataset."""
from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest
import torch

from _datatools import assert_one_line_error, image_bytes, read_arrow, write_file
from _run import run_module
from engine.data.datasets import NLVR2Dataset, collate
from engine.data.nlvr2 import write_nlvr2
from engine.data.raw import DataError
from engine.data.text import TextTokenizer

SENTENCES = {
    "train": [
        ("train-10-0-0", "There are two dogs.", "True", 3),
        ("train-10-0-1", "One image shows a cat.", "False", 3),
        ("train-11-1-0", "Nothing is red.", "False", 7),
    ],
    "dev": [  # a pair's sentences need not be adjacent
        ("dev-5-0-0", "The left image has a bird.", "True", None),
        ("dev-6-2-0", "Both images are blue.", "False", None),
        ("dev-5-0-1", "The right image has no bird.", "True", None),
    ],
    "test1": [("test1-1-0-3", "A train is visible.", "True", None)],
    "balanced/balanced_dev": [("dev-6-2-0", "Both images are blue.", "False", None)],
}


def _image_path(root, pair, directory, i):
    folder = root / "images" / "train" / str(directory) if pair.startswith("train") else root / pair.split("-")[0]
    return folder / f"{pair}-img{i}.png"


def _raw(root):
    """A miniature NLVR2 download; images are JPEG or PNG bytes under .png names, as in the real one."""
    for n, (name, sentences) in enumerate(SENTENCES.items()):
        lines = []
        for identifier, sentence, label, directory in sentences:
            record = {"identifier": identifier, "sentence": sentence, "label": label, "validation": {}}
            if directory is not None:
                record["directory"] = directory
            lines.append(json.dumps(record))
            pair = identifier.rsplit("-", 1)[0]
            for i in (0, 1):
                fmt = "PNG" if i else "JPEG"
                write_file(_image_path(root, pair, directory, i), image_bytes((10 * n, 100 * i, len(pair)), fmt=fmt))
        write_file(root / "nlvr2" / "data" / f"{name}.json", "\n".join(lines) + "\n")
    return root


def _pair(root, pair, directory, questions, answers):
    return {
        "image_0": _image_path(root, pair, directory, 0).read_bytes(),
        "image_1": _image_path(root, pair, directory, 1).read_bytes(),
        "questions": questions,
        "answers": answers,
        "identifier": pair,
    }


def test_writer_content(tmp_path):
    root = _raw(tmp_path / "raw")
    out = tmp_path / "out"
    result = run_module("engine.data", ["nlvr2", "--root", root, "--out", out])
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {f"nlvr2_{s}.arrow" for s in ("train", "dev", "test1", "balanced_dev")}

    expected = {
        "train": [
            _pair(root, "train-10-0", 3, ["There are two dogs.", "One image shows a cat."], ["True", "False"]),
            _pair(root, "train-11-1", 7, ["Nothing is red."], ["False"]),
        ],
        "dev": [
            _pair(
                root, "dev-5-0", None,
                ["The left image has a bird.", "The right image has no bird."], ["True", "True"],
            ),
            _pair(root, "dev-6-2", None, ["Both images are blue."], ["False"]),
        ],
        "test1": [_pair(root, "test1-1-0", None, ["A train is visible."], ["True"])],
        "balanced_dev": [_pair(root, "dev-6-2", None, ["Both images are blue."], ["False"])],
    }
    schema = pa.schema(
        [("image_0", pa.binary()), ("image_1", pa.binary()), ("questions", pa.list_(pa.string())),
         ("answers", pa.list_(pa.string())), ("identifier", pa.large_string())]
    )
    for split, rows in expected.items():
        table = read_arrow(out / f"nlvr2_{split}.arrow")
        assert table.schema.equals(schema)
        assert table.to_pylist() == rows  # no shuffling in the published NLVR2 writer: same order


def test_dataset_items(tmp_path):
    root = _raw(tmp_path / "raw")
    write_nlvr2(root, tmp_path / "out")
    dataset = NLVR2Dataset(tmp_path / "out", "dev", TextTokenizer(), image_size=16)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["identifier"] == ["dev-5-0", "dev-5-0", "dev-6-2"]
    assert batch["question_index"] == [0, 1, 0]
    assert dataset.keys() == list(zip(batch["identifier"], batch["question_index"]))
    assert batch["label"].tolist() == [True, True, False]
    assert batch["image_0"].shape == batch["image_1"].shape == (3, 3, 16, 16)
    assert not torch.equal(batch["image_0"], batch["image_1"])
    assert batch["image_ok"].all() and batch["text_ids"].shape == (3, 40)


def test_undecodable_second_image_is_marked(tmp_path):
    root = _raw(tmp_path / "raw")
    _image_path(root, "dev-6-2", None, 1).write_bytes(b"garbage")
    write_nlvr2(root, tmp_path / "out")
    dataset = NLVR2Dataset(tmp_path / "out", "dev", TextTokenizer(), image_size=16)
    item = dataset[2]
    assert item["identifier"] == "dev-6-2" and not item["image_ok"]
    assert item["image_error"].startswith("image_1: ")
    assert dataset[0]["image_ok"]


def test_missing_json(tmp_path):
    root = _raw(tmp_path / "raw")
    (root / "nlvr2" / "data" / "test1.json").unlink()
    out = tmp_path / "out"
    assert_one_line_error(run_module("engine.data", ["nlvr2", "--root", root, "--out", out]), "test1.json")
    assert not list(out.glob("*.arrow"))


def test_missing_image(tmp_path):
    root = _raw(tmp_path / "raw")
    missing = _image_path(root, "train-11-1", 7, 1)
    missing.unlink()
    out = tmp_path / "out"
    result = run_module("engine.data", ["nlvr2", "--root", root, "--out", out])
    assert_one_line_error(result, str(missing), "train-11-1")
    assert not list(out.glob("*.arrow"))


def test_malformed_line_names_file_and_line(tmp_path):
    root = _raw(tmp_path / "raw")
    path = root / "nlvr2" / "data" / "dev.json"
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(DataError, match=re.escape(f"{path} line 4")):
        write_nlvr2(root, tmp_path / "out")
