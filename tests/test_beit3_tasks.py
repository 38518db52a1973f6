"""engine.retrieval and engine.nlvr2 run BEiT-3 shards (tp 2, SentencePiece via --tokenizer) and give what
engine.forward gives (tp 1) on the same texts and images tokenised and transformed independently."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from _datatools import read_arrow
from _paths import GOLDEN, needs
from _beit3 import BEIT3, cut
from _run import run_here, run_module, run_torchrun
from engine.data.image import load_image
from engine.data.spm import SentencePieceTokenizer
from engine.forward import main as forward_main
from engine.tasks.embeddings import load_embeddings
from engine.tasks.results import read_results
from test_nlvr2 import DEV, KEYS, _image_path, build_raw

SPM = BEIT3 / "tokenizer.spm"
COCO = GOLDEN / "coco_arrow_published"
IMAGE_SIZE = 64

pytestmark = [needs(BEIT3), needs(COCO)]


def _shards(case: str, tp: int, out: Path) -> Path:
    cut(case, tp, out)
    return out


def _forward(shards: Path, tensors: dict, folder: Path, task: str) -> dict:
    inputs, outputs = folder / f"{task}.in.safetensors", folder / f"{task}.out.safetensors"
    save_file(tensors, str(inputs))
    ran = run_here(forward_main, ["--shards", shards, "--inputs", inputs, "--out", outputs, "--task", task,
                                  "--device", "cpu", "--dtype", "fp32"])  # the reference: tp 1, in this process
    assert ran.returncode == 0, ran.stderr
    return load_file(str(outputs))


def _text(texts: list) -> dict:
    tokens = SentencePieceTokenizer(SPM, 64)(texts)
    return {"text_ids": tokens["text_ids"], "padding_mask": tokens["padding_mask"]}


def test_retrieval_embeddings_equal_engine_forward(tmp_path: Path) -> None:
    embeddings = tmp_path / "embeddings.safetensors"
    ran = run_torchrun(2, "engine.retrieval", [
        "--shards", _shards("tiny_beit3_retrieval", 2, tmp_path / "tp2"), "--data", COCO, "--dataset", "coco",
        "--tokenizer", SPM, "--limit", 3, "--save-embeddings", embeddings, "--summary", tmp_path / "s.json",
        "--device", "cpu", "--dtype", "fp32", "--batch-size", 4, "--num-workers", 0])
    assert ran.returncode == 0, ran.stderr
    gallery = load_embeddings(embeddings)
    table = read_arrow(COCO / "coco_caption_karpathy_test.arrow")
    images = torch.stack([load_image(table.column("image")[r].as_py(), IMAGE_SIZE) for r in gallery.image_rows])
    image_of = [gallery.image_rows[i] for i in gallery.text_image]
    caption_images = torch.stack([load_image(table.column("image")[r].as_py(), IMAGE_SIZE) for r in image_of])
    want = _forward(_shards("tiny_beit3_retrieval", 1, tmp_path / "tp1"),
                    {**_text(gallery.captions), "image": caption_images}, tmp_path, "irtr")
    assert torch.allclose(gallery.text_embeds, want["text_feats"], atol=1e-4)
    first = [gallery.text_image.index(i) for i in range(len(images))]  # one caption row per image
    assert torch.allclose(gallery.image_embeds, want["image_feats"][first], atol=1e-4)


def test_nlvr2_logits_equal_engine_forward(tmp_path: Path) -> None:
    raw, arrow = build_raw(tmp_path / "raw"), tmp_path / "arrow"
    assert run_module("engine.data", ["nlvr2", "--root", raw, "--out", arrow]).returncode == 0
    out = tmp_path / "dev.jsonl"
    ran = run_torchrun(2, "engine.nlvr2", ["--shards", _shards("tiny_beit3_nlvr2", 2, tmp_path / "tp2"), "--data",
                                           arrow, "--split", "dev", "--out", out, "--tokenizer", SPM, "--device",
                                           "cpu", "--dtype", "fp32", "--batch-size", 3, "--num-workers", 0])
    assert ran.returncode == 0, ran.stderr
    images = {f"image_{i}": torch.stack([load_image(_image_path(raw, pair, i).read_bytes(), IMAGE_SIZE)
                                         for pair, _ in KEYS]) for i in (0, 1)}
    want = _forward(_shards("tiny_beit3_nlvr2", 1, tmp_path / "tp1"), {**_text([s for _, s, _ in DEV]), **images},
                    tmp_path, "nlvr2")["nlvr2_logits"]
    records = read_results(out)
    assert [(r["identifier"], r["question_index"]) for r in records] == KEYS
    got = torch.tensor([r["logits"] for r in records])
    assert torch.allclose(got, want, atol=1e-4)
    assert [r["prediction"] for r in records] == ["True" if row.argmax() == 1 else "False" for row in want]
