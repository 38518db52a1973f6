"""`torchrun -m engine.nlvr2` end to end on a mini NLVR2 download built here: predictions checked one by one
against `engine.forward` on tensors prepared independently from the raw files, accuracy, resuming,
undecodable images and bad inputs."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from _datatools import read_arrow, write_file
from _faults import overflowing_shards
from _paths import GOLDEN, needs
from _run import invoke_refused, run_here, run_module, run_torchrun, shard_here
from engine.data.image import load_image
from engine.data.text import TextTokenizer
from engine.forward import main as forward_main
from engine.nlvr2 import main as nlvr2_main
from engine.tasks.results import read_results

CHECKPOINT = GOLDEN / "tiny_relpos_nlvr2" / "checkpoint.pt"
IMAGE_SIZE = 64  # the checkpoint's

# Sentences of the dev split in file order: (NLVR2 sentence identifier, sentence, label). Pairs have 1-3.
DEV = [
    ("dev-1-0-0", "The left image contains more red than the right image.", "True"),
    ("dev-1-0-1", "Both images show exactly one animal.", "False"),
    ("dev-2-1-0", "There are two dogs in total.", "False"),
    ("dev-3-0-0", "The right image is darker than the left one.", "True"),
    ("dev-3-0-1", "One image shows a bird perched on a branch, and the other image shows a bird flying "
                  "over water with several boats, a lighthouse and a long pier in the background.", "False"),
    ("dev-3-0-2", "No image has a blue sky.", "True"),
    ("dev-4-2-0", "At least one image is mostly green.", "True"),
    ("dev-5-1-0", "Each image has a person.", "False"),
]
OTHER = {"train": [("train-9-0-0", "A cat.", "True")], "test1": [("test1-7-0-0", "A train.", "False")]}
KEYS = [(s[0].rsplit("-", 1)[0], qi) for s, qi in zip(DEV, [0, 1, 0, 0, 1, 2, 0, 0])]

pytestmark = needs(CHECKPOINT)


def _noise_image(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(40 + 8 * (seed % 5), 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _image_path(root: Path, pair: str, i: int) -> Path:
    split = pair.split("-")[0]
    folder = root / "images" / "train" / "0" if split == "train" else root / split
    return folder / f"{pair}-img{i}.png"


def build_raw(root: Path) -> Path:
    """A mini NLVR2 download in the layout the published writer reads (JPEG bytes under .png names, as real)."""
    for split, sentences in {"dev": DEV, **OTHER}.items():
        lines = []
        for identifier, sentence, label in sentences:
            lines.append(json.dumps({"identifier": identifier, "sentence": sentence, "label": label, "directory": 0}))
            pair = identifier.rsplit("-", 1)[0]
            for i in (0, 1):
                path = _image_path(root, pair, i)
                if not path.exists():  # a pair's later sentences share its images
                    write_file(path, _noise_image(2 * sum(map(ord, pair)) + i, "JPEG" if i else "PNG"))
        write_file(root / "nlvr2" / "data" / f"{split}.json", "\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("nlvr2")
    raw, arrow, shards = build_raw(folder / "raw"), folder / "arrow", folder / "shards"
    written = run_module("engine.data", ["nlvr2", "--root", raw, "--out", arrow])
    assert written.returncode == 0, written.stderr
    shard_here(CHECKPOINT, 2, shards)
    shard_here(CHECKPOINT, 1, folder / "shards_tp1")
    return {"folder": folder, "raw": raw, "arrow": arrow, "shards": shards, "shards_tp1": folder / "shards_tp1"}


def _args(setup: dict, out: Path, *extra: object) -> list:
    return ["--shards", setup["shards"], "--data", setup["arrow"], "--split", "dev", "--out", out,
            "--device", "cpu", "--dtype", "fp32", "--batch-size", 3, "--num-workers", 1, *extra]


def run_nlvr2(setup: dict, out: Path, *extra: object, nproc: int = 2) -> dict:
    ran = run_torchrun(nproc, "engine.nlvr2", _args(setup, out, *extra))
    assert ran.returncode == 0, ran.stderr
    assert "accuracy" in ran.stdout and "p99" in ran.stdout
    return json.loads(out.with_suffix(".summary.json").read_text())


@pytest.fixture(scope="module")
def independent(setup: dict) -> dict:
    """Logits per (identifier, question_index) from engine.forward on tensors made from the raw files (at tp 1, in
    this process: engine.nlvr2 runs at tp 2, whose forward test_golden_parity checks against the published one)."""
    tokens = TextTokenizer()([sentence for _, sentence, _ in DEV])
    images = {f"image_{i}": torch.stack([load_image(_image_path(setup["raw"], pair, i).read_bytes(), IMAGE_SIZE)
                                         for pair, _ in KEYS]) for i in (0, 1)}
    inputs, outputs = setup["folder"] / "inputs.safetensors", setup["folder"] / "outputs.safetensors"
    save_file({**tokens, **images}, str(inputs))
    ran = run_here(forward_main, ["--shards", setup["shards_tp1"], "--inputs", inputs, "--out", outputs,
                                  "--task", "nlvr2", "--device", "cpu", "--dtype", "fp32"])
    assert ran.returncode == 0, ran.stderr
    return dict(zip(KEYS, load_file(str(outputs))["nlvr2_logits"]))


@pytest.fixture(scope="module")
def full_run(setup: dict) -> Path:
    out = setup["folder"] / "dev.jsonl"
    run_nlvr2(setup, out)
    return out


def assert_matches_independent(records: list, independent: dict) -> None:
    for r in records:
        logits = independent[(r["identifier"], r["question_index"])]
        assert torch.allclose(torch.tensor(r["logits"]), logits, atol=1e-4)
        assert r["prediction"] == ("True" if logits.argmax() == 1 else "False")
        assert r["correct"] == (r["prediction"] == r["label"])


def test_predictions_and_accuracy_match_engine_forward(full_run: Path, independent: dict) -> None:
    records = read_results(full_run)
    assert [(r["identifier"], r["question_index"]) for r in records] == KEYS  # one group: file order
    assert [(r["sentence"], r["label"]) for r in records] == [(s, label) for _, s, label in DEV]
    assert_matches_independent(records, independent)
    labels = torch.tensor([label == "True" for _, _, label in DEV])
    predicted = torch.stack([independent[k] for k in KEYS]).argmax(1) == 1
    summary = json.loads(full_run.with_suffix(".summary.json").read_text())
    assert summary["accuracy"] == pytest.approx((predicted == labels).float().mean().item(), abs=1e-12)
    assert (summary["sentences"], summary["predicted"], summary["image_errors"]) == (8, 8, [])
    assert summary["latency"]["batches"] == 3 and summary["latency"]["samples"] == 8  # batches of 3
    assert (summary["run"]["tp"], summary["run"]["dp"]) == (2, 1)


def test_rerun_completes_a_cut_results_file(setup: dict, full_run: Path, tmp_path: Path) -> None:
    lines = full_run.read_bytes().splitlines(keepends=True)
    keep = len(lines) // 2
    out = tmp_path / "dev.jsonl"
    out.write_bytes(b"".join(lines[:keep]) + lines[keep][:20])  # and a crash in the middle of a line
    summary = run_nlvr2(setup, out)
    records = read_results(out)
    assert sorted((r["identifier"], r["question_index"]) for r in records) == sorted(KEYS)  # each exactly once
    assert summary["run"]["sentences"] == len(lines) - keep
    full = {(r["identifier"], r["question_index"]): r["prediction"] for r in read_results(full_run)}
    assert {(r["identifier"], r["question_index"]): r["prediction"] for r in records} == full
    assert summary["accuracy"] == json.loads(full_run.with_suffix(".summary.json").read_text())["accuracy"]


def test_undecodable_image_is_reported_and_excluded(setup: dict, independent: dict, tmp_path: Path) -> None:
    table = read_arrow(setup["arrow"] / "nlvr2_dev.arrow")
    bad_pair = "dev-3-0"
    row = table.column("identifier").to_pylist().index(bad_pair)
    images = table.column("image_1").to_pylist()
    images[row] = b"not an image"
    table = table.set_column(table.schema.get_field_index("image_1"), "image_1", pa.array(images, pa.binary()))
    data = tmp_path / "arrow"
    data.mkdir()
    with pa.ipc.new_file(str(data / "nlvr2_dev.arrow"), table.schema) as writer:
        writer.write_table(table)
    out = tmp_path / "dev.jsonl"
    summary = run_nlvr2(setup, out, "--data", data, nproc=4)  # dp 2 x tp 2

    errors = sorted((e["identifier"], e["question_index"]) for e in summary["image_errors"])
    assert errors == [(bad_pair, i) for i in range(3)]
    assert all(e["error"].startswith("image_1: ") for e in summary["image_errors"])
    records = read_results(out)
    assert sorted((r["identifier"], r["question_index"]) for r in records) == sorted(KEYS)
    assert all("prediction" not in r for r in records if r["identifier"] == bad_pair)
    answered = [r for r in records if r["identifier"] != bad_pair]
    assert_matches_independent(answered, independent)
    assert (summary["sentences"], summary["predicted"]) == (8, 5)
    assert summary["accuracy"] == pytest.approx(np.mean([r["correct"] for r in answered]), abs=1e-12)
    assert (summary["run"]["tp"], summary["run"]["dp"]) == (2, 2)


@pytest.mark.parametrize("case", ["missing split", "no NLVR2 head"])
def test_bad_inputs_are_refused_before_any_work(case: str, setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "dev.jsonl"
    args = _args(setup, out)
    if case == "missing split":
        args += ["--split", "test2"]
        fragment = "nlvr2_test2.arrow"
    else:
        irtr = tmp_path / "irtr"
        shard_here(GOLDEN / "tiny_relpos_irtr" / "checkpoint.pt", 1, irtr)
        args += ["--shards", irtr]
        fragment = "no NLVR2 head"
    invoke_refused(nlvr2_main, args, fragment)
    assert not out.exists()


def test_a_non_finite_output_is_an_error_naming_the_sentences_never_a_prediction(setup: dict, tmp_path: Path) -> None:
    shards = overflowing_shards(CHECKPOINT, ["nlvr2_classifier.3.weight"], tmp_path)
    out = tmp_path / "dev.jsonl"
    invoke_refused(nlvr2_main, [*_args(setup, out), "--shards", shards, "--num-workers", 0],
                   "not finite", f"identifier {KEYS[0][0]}, question_index 0")
    assert read_results(out) == []
