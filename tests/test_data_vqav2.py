"""VQAv2 writer and dataset: parity with the published writer's files, answer
normalisation, and bad inputs."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest
import torch

from _datatools import assert_one_line_error, read_arrow, rows_by
from _paths import GOLDEN
from _run import run_module
from engine.data.answers import answer_labels, answer_score, normalize_answer, score_answers
from engine.data.datasets import VQADataset, collate
from engine.data.text import TextTokenizer

RAW = GOLDEN / "vqav2_raw"
PUBLISHED = GOLDEN / "vqav2_arrow_published"
SPLITS = ("train", "val", "trainable_val", "rest_val", "test", "test-dev")
LABELLED = SPLITS[:4]

pytestmark = pytest.mark.skipif(not RAW.exists(), reason=f"shared test data {RAW} is not present")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqav2_arrow")
    result = run_module("engine.data", ["vqav2", "--root", RAW, "--out", out])
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("split", SPLITS)
def test_tables_match_published(written, split):
    ours, published = read_arrow(written / f"vqav2_{split}.arrow"), read_arrow(PUBLISHED / f"vqav2_{split}.arrow")
    assert ours.column_names == published.column_names
    if published.num_rows:  # pandas gave the published empty table null-typed columns
        assert ours.schema.equals(published.schema.remove_metadata())
    # The published writer shuffles rows: compare them by image.
    assert rows_by(ours, "image_id") == rows_by(published, "image_id")


def test_answer_table_matches_published(written):
    ours = (written / "answer2label.txt").read_bytes()
    assert ours == (PUBLISHED / "answer2label_recovered.txt").read_bytes()


def test_nothing_but_outputs_left(written):
    expected = {f"vqav2_{s}.arrow" for s in SPLITS} | {"answer2label.txt"}
    expected |= {f"vqav2_{s}.official.arrow" for s in LABELLED}
    assert {p.name for p in written.iterdir()} == expected


@pytest.mark.parametrize("split", LABELLED)
def test_official_annotations_beside_each_labelled_split(written, split):
    # Independent expectation: the official annotation file's entries, in the arrow file's question order.
    source = "train" if split == "train" else "val"
    annotations = json.loads((RAW / f"v2_mscoco_{source}2014_annotations.json").read_text())["annotations"]
    by_id = {a["question_id"]: a for a in annotations}
    question_ids = [q for row in read_arrow(written / f"vqav2_{split}.arrow").column("question_id").to_pylist()
                    for q in row]
    official = read_arrow(written / f"vqav2_{split}.official.arrow").to_pylist()
    assert [o["question_id"] for o in official] == question_ids
    if not official:  # trainable_val: the mini val set has fewer rows than rest_val takes
        return
    for o in official:
        a = by_id[o["question_id"]]
        assert o["answers"] == [x["answer"] for x in a["answers"]] and len(o["answers"]) == 10
        assert (o["answer_type"], o["question_type"]) == (a["answer_type"], a["question_type"])
    dataset = VQADataset(written, split, TextTokenizer(None, 40), 32)
    item = dataset[len(dataset) - 1]
    assert item["human_answers"] == official[-1]["answers"] and item["answer_type"] == official[-1]["answer_type"]


def test_rest_val_is_the_last_rows_of_val(tmp_path, monkeypatch):
    from engine.data import vqav2

    monkeypatch.setattr(vqav2, "REST_VAL_ROWS", 3)
    vqav2.write_vqav2(RAW, tmp_path)
    ids = read_arrow(tmp_path / "vqav2_val.arrow").column("image_id").to_pylist()
    assert read_arrow(tmp_path / "vqav2_trainable_val.arrow").column("image_id").to_pylist() == ids[:-3]
    assert read_arrow(tmp_path / "vqav2_rest_val.arrow").column("image_id").to_pylist() == ids[-3:]


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Yes!", "yes"),
        ("Two", "2"),
        ("the red one", "red 1"),
        ("dont know", "don't know"),
        ("somebody'd", "somebodyd"),  # published table quirk
        ("1,000", "1000"),
        ("3.5 m.", "3.5 m"),
        ("left-side", "left side"),
        ("left - side", "left side"),
        ("(a) b,c", "b c"),
        ("." * 40 + "x", "." * 8 + "x"),  # only 32 periods go, as published
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_labels_and_scores():
    majors = ["Yes"] * 9 + ["no"] * 8 + ["two"] * 4 + ["2"] * 5
    assert answer_labels(majors) == ["yes", "2"]
    assert [answer_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    # Raw annotator answers are looked up without normalising, by first appearance.
    assert score_answers(["2", "yes", "Yes", "2", "two", "yes", "2", "2"], {"yes": 0, "2": 1}) == ([1, 0], [1.0, 0.6])


def _copy_raw(tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(RAW, root)
    return root


def _assert_failed_cleanly(result, out, *fragments):
    assert_one_line_error(result, *fragments)
    assert not list(out.glob("*.arrow")) and not list(out.glob("*.txt"))


def test_missing_json_file(tmp_path):
    root = _copy_raw(tmp_path)
    (root / "v2_mscoco_val2014_annotations.json").unlink()
    out = tmp_path / "out"
    result = run_module("engine.data", ["vqav2", "--root", root, "--out", out])
    _assert_failed_cleanly(result, out, "v2_mscoco_val2014_annotations.json", "missing")


def test_malformed_json_file(tmp_path):
    root = _copy_raw(tmp_path)
    path = root / "v2_OpenEnded_mscoco_test2015_questions.json"
    path.write_text(path.read_text()[:-20])
    out = tmp_path / "out"
    result = run_module("engine.data", ["vqav2", "--root", root, "--out", out])
    _assert_failed_cleanly(result, out, str(path), "malformed JSON")


def test_json_without_expected_keys(tmp_path):
    root = _copy_raw(tmp_path)
    path = root / "v2_OpenEnded_mscoco_train2014_questions.json"
    path.write_text(json.dumps({"info": {}}))
    out = tmp_path / "out"
    result = run_module("engine.data", ["vqav2", "--root", root, "--out", out])
    _assert_failed_cleanly(result, out, str(path))


def test_missing_image(tmp_path):
    root = _copy_raw(tmp_path)
    image = root / "test2015" / "COCO_test2015_000000000540.jpg"
    image.unlink()
    out = tmp_path / "out"
    result = run_module("engine.data", ["vqav2", "--root", root, "--out", out])
    _assert_failed_cleanly(result, out, str(image))


def test_undecodable_image_is_marked_not_swapped(tmp_path):
    table = read_arrow(PUBLISHED / "vqav2_val.arrow")
    broken_row = 1
    images = table.column("image").to_pylist()
    images[broken_row] = b"\xff\xd8 not a jpeg"
    table = table.set_column(0, "image", pa.array(images, pa.binary()))
    with pa.ipc.new_file(str(tmp_path / "vqav2_val.arrow"), table.schema) as writer:
        writer.write_table(table)

    dataset = VQADataset(tmp_path, "val", TextTokenizer(), image_size=32)
    batch = collate([dataset[i] for i in range(len(dataset))])
    broken_qids = table.column("question_id")[broken_row].as_py()
    assert batch["question_id"] == [q for row in table.column("question_id").to_pylist() for q in row]
    for qid, ok, error, image in zip(batch["question_id"], batch["image_ok"], batch["image_error"], batch["image"]):
        assert bool(ok) == (qid not in broken_qids)
        assert (error is None) == bool(ok)
        if not ok:
            assert "cannot decode image" in error and torch.count_nonzero(image) == 0


def test_dataset_items_follow_rows_and_questions():
    dataset = VQADataset(PUBLISHED, "val", TextTokenizer(), image_size=32)
    table = read_arrow(PUBLISHED / "vqav2_val.arrow")
    row = table.slice(2, 1).to_pylist()[0]
    first = sum(len(q) for q in table.column("question_id").to_pylist()[:2])
    item = dataset[first + 1]
    assert item["question_id"] == row["question_id"][1]
    assert item["image_id"] == row["image_id"]
    assert item["text"] == row["questions"][1]
    assert item["answers"] == row["answers"][1]
    assert item["answer_labels"] == row["answer_labels"][1]
    assert item["answer_scores"] == row["answer_scores"][1]
    assert item["image"].shape == (3, 32, 32) and item["image_ok"]


def test_test_split_items_have_no_answers():
    dataset = VQADataset(PUBLISHED, "test-dev", TextTokenizer(), image_size=16)
    assert len(dataset) == 12
    item = dataset[len(dataset) - 1]
    assert item["answers"] == item["answer_labels"] == item["answer_scores"] == []


def test_dataloader_workers(written):
    dataset = VQADataset(written, "rest_val", TextTokenizer(), image_size=16)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=collate)
    qids = [q for batch in loader for q in batch["question_id"]]
    assert qids == [dataset[i]["question_id"] for i in range(len(dataset))]


def test_missing_split_file(tmp_path):
    from engine.data.raw import DataError

    with pytest.raises(DataError, match="vqav2_val.arrow"):
        VQADataset(tmp_path, "val", TextTokenizer(), image_size=16)
