"""`torchrun -m engine.retrieval` end to end on the golden mini COCO: the published recalls, data × tensor
parallel, the embeddings file, undecodable images and bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from _datatools import read_arrow
from _faults import overflowing_shards
from _paths import GOLDEN, needs
from _run import invoke_refused, run_torchrun, shard_here
from engine.tasks.embeddings import load_embeddings
from engine.tasks.metrics import RECALL_KS, retrieval_recall
from engine.retrieval import main as retrieval_main

ARROW = GOLDEN / "coco_arrow_published"
TEST_SPLIT = "coco_caption_karpathy_test.arrow"
EXPECTED = GOLDEN / "retrieval_e2e_expected.json"
CHECKPOINT = GOLDEN / "tiny_relpos_irtr_e2e" / "checkpoint.pt"
RECALLS = [f"{direction}_r{k}" for direction in ("ir", "tr") for k in RECALL_KS]

pytestmark = [needs(CHECKPOINT), needs(EXPECTED), needs(ARROW)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("irtr") / "shards"
    shard_here(CHECKPOINT, 2, out)
    return out


def _args(shards: Path, folder: Path, data: Path, *extra: object) -> list:
    return ["--shards", shards, "--data", data, "--dataset", "coco", "--split", "test",
            "--summary", folder / "summary.json", "--device", "cpu", "--dtype", "fp32",
            "--batch-size", 8, "--num-workers", 1, *extra]


def run_retrieval(nproc: int, shards: Path, folder: Path, *extra: object, data: Path = ARROW) -> dict:
    ran = run_torchrun(nproc, "engine.retrieval", _args(shards, folder, data, *extra))
    assert ran.returncode == 0, ran.stderr
    assert "image→text" in ran.stdout and "p99" in ran.stdout
    return json.loads((folder / "summary.json").read_text())


def assert_same_recalls(summary: dict, expected: dict) -> None:
    """All six recalls equal the published run's (every caption of the mini set is distinct, so no score ties
    decide image→text recall)."""
    for name in RECALLS:
        assert summary[name] == pytest.approx(expected[name], abs=1e-6), name


@pytest.fixture(scope="module")
def tp2(shards: Path, tmp_path_factory) -> tuple:
    folder = tmp_path_factory.mktemp("tp2")
    summary = run_retrieval(2, shards, folder, "--save-embeddings", folder / "embeddings.safetensors")
    return summary, folder / "embeddings.safetensors"


def test_tp2_reproduces_the_published_recalls(tp2: tuple) -> None:
    summary, embeddings = tp2
    expected = json.loads(EXPECTED.read_text())
    assert (summary["images"], summary["captions"]) == (expected["images"], expected["captions"])
    assert (summary["images_scored"], summary["captions_scored"]) == (expected["images"], expected["captions"])
    gallery = load_embeddings(embeddings)
    assert {k: summary[k] for k in RECALLS} == retrieval_recall(gallery.image_embeds @ gallery.text_embeds.t(),
                                                                gallery.text_image)
    assert_same_recalls(summary, expected)


def test_embeddings_file_holds_the_split_in_arrow_order(tp2: tuple) -> None:
    summary, embeddings = tp2
    table = read_arrow(ARROW / TEST_SPLIT)
    captions = table.column("caption").to_pylist()
    gallery = load_embeddings(embeddings)
    assert gallery.image_embeds.shape == (12, 64) and gallery.text_embeds.shape == (60, 64)
    assert gallery.image_embeds.dtype == gallery.text_embeds.dtype == torch.float32
    for embeds in (gallery.image_embeds, gallery.text_embeds):
        assert torch.allclose(embeds.norm(dim=1), torch.ones(len(embeds)), atol=1e-5)
    assert gallery.image_ids == table.column("image_id").to_pylist() and gallery.image_rows == list(range(12))
    assert gallery.captions == [c for row in captions for c in row] and gallery.caption_index == list(range(60))
    assert gallery.text_image == [row for row, texts in enumerate(captions) for _ in texts]
    assert summary["embeddings"] == str(embeddings)


def test_dp2_tp2_splits_the_work_and_gives_the_same_embeddings(shards: Path, tp2: tuple, tmp_path: Path) -> None:
    summary = run_retrieval(4, shards, tmp_path, "--batch-size", 4, "--save-embeddings", tmp_path / "e.safetensors")
    ours, theirs = load_embeddings(tmp_path / "e.safetensors"), load_embeddings(tp2[1])
    assert torch.allclose(ours.image_embeds, theirs.image_embeds, atol=1e-6)
    assert torch.allclose(ours.text_embeds, theirs.text_embeds, atol=1e-6)
    assert_same_recalls(summary, json.loads(EXPECTED.read_text()))
    assert (summary["run"]["tp"], summary["run"]["dp"]) == (2, 2)
    assert summary["latency"]["image"]["batches"] == 2 * 2  # 6 images per group, 4 a batch
    assert summary["latency"]["text"]["batches"] == 2 * 8  # 30 captions per group
    assert summary["latency"]["text"]["samples"] == 60


def test_undecodable_image_leaves_the_gallery_with_its_captions(shards: Path, tp2: tuple, tmp_path: Path) -> None:
    table = read_arrow(ARROW / TEST_SPLIT)
    bad, limit = 3, 6
    images = table.column("image").to_pylist()
    images[bad] = b"garbled" + images[bad][64:]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    data = tmp_path / "arrow"
    data.mkdir()
    with pa.ipc.new_file(str(data / TEST_SPLIT), table.schema) as writer:
        writer.write_table(table)
    summary = run_retrieval(2, shards, tmp_path, "--limit", limit, "--save-embeddings", tmp_path / "e.safetensors",
                            data=data)

    [error] = summary["image_errors"]
    assert (error["image_index"], error["image_id"], error["captions"]) == (bad, table["image_id"][bad].as_py(), 5)
    assert "cannot decode" in error["error"]
    assert (summary["images"], summary["captions"]) == (limit, 5 * limit)  # the first 6 rows, 5 captions each
    assert (summary["images_scored"], summary["captions_scored"]) == (limit - 1, 5 * (limit - 1))
    # Scored: the intact run's embeddings of those rows, less that image and its captions; nothing swapped in.
    ours, intact = load_embeddings(tmp_path / "e.safetensors"), load_embeddings(tp2[1])
    keep_images = [i for i in range(limit) if i != bad]
    keep_texts = [j for j, i in enumerate(intact.text_image) if i in keep_images]
    assert ours.image_rows == keep_images and ours.caption_index == keep_texts
    assert ours.image_ids == [intact.image_ids[i] for i in keep_images]
    assert ours.text_image == [keep_images.index(intact.text_image[j]) for j in keep_texts]
    assert torch.allclose(ours.image_embeds, intact.image_embeds[keep_images], atol=1e-6)
    assert torch.allclose(ours.text_embeds, intact.text_embeds[keep_texts], atol=1e-6)
    assert {k: summary[k] for k in RECALLS} == retrieval_recall(ours.image_embeds @ ours.text_embeds.t(),
                                                                ours.text_image)


@pytest.mark.parametrize("case", ["missing split", "no retrieval head"])
def test_bad_inputs_are_refused_before_any_work(case: str, shards: Path, tmp_path: Path) -> None:
    args = _args(shards, tmp_path, ARROW)
    if case == "missing split":
        args += ["--dataset", "f30k"]
        fragment = "f30k_caption_karpathy_test.arrow"
    else:
        vqa = tmp_path / "vqa"
        shard_here(GOLDEN / "tiny_relpos_vqa" / "checkpoint.pt", 1, vqa)
        args += ["--shards", vqa]
        fragment = "no retrieval head"
    invoke_refused(retrieval_main, args, fragment)
    assert not (tmp_path / "summary.json").exists()


def test_a_non_finite_embedding_is_an_error_naming_the_images(tmp_path: Path) -> None:
    shards = overflowing_shards(CHECKPOINT, ["itc_image_proj.fc.weight"], tmp_path)
    first = read_arrow(ARROW / TEST_SPLIT).column("image_id")[0].as_py()
    invoke_refused(retrieval_main, [*_args(shards, tmp_path, ARROW), "--num-workers", 0], "not finite",
                   f"image_id {first}")
    assert not (tmp_path / "summary.json").exists()


def test_an_unwritable_embeddings_path_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    invoke_refused(retrieval_main, [*_args(tmp_path / "no-shards", tmp_path, ARROW), "--save-embeddings",
                                    tmp_path / "file" / "e.safetensors"], "--save-embeddings", "is a file")
