"""The whole VQAv2 pipeline with a BEiT-3 checkpoint: the mini download → `engine.data vqav2` → arrow,
`python -m sharding` at tp 2, `torchrun -m engine.vqa --tokenizer tokenizer.spm`, every answer as the published
beit3 pipeline gives it (golden/beit3/vqa_e2e_expected.json)."""
from __future__ import annotations

import json
from pathlib import Path

from _paths import GOLDEN, needs
from _run import invoke_refused, run_module, run_torchrun, shard
from engine.tasks.results import read_results
from engine.vqa import main as vqa_main

BEIT3 = GOLDEN / "beit3"
CHECKPOINT = BEIT3 / "tiny_beit3_vqa9" / "checkpoint.pth"
EXPECTED = BEIT3 / "vqa_e2e_expected.json"
ANSWERS = GOLDEN / "vqav2_arrow_published" / "answer2label_recovered.txt"
RAW = GOLDEN / "vqav2_raw"

pytestmark = [needs(CHECKPOINT), needs(EXPECTED), needs(RAW)]


def test_vqav2_pipeline_gives_every_published_answer(tmp_path: Path) -> None:
    arrow = tmp_path / "arrow"
    made = run_module("engine.data", ["vqav2", "--root", RAW, "--out", arrow])
    assert made.returncode == 0, made.stderr
    shards = tmp_path / "shards"
    cut = shard(CHECKPOINT, 2, shards, "--num-heads", 4)
    assert cut.returncode == 0, cut.stderr
    assert "BEiT-3" in cut.stdout

    out = tmp_path / "results.jsonl"
    ran = run_torchrun(2, "engine.vqa", ["--shards", shards, "--data", arrow, "--answers", ANSWERS, "--out", out,
                                         "--tokenizer", BEIT3 / "tokenizer.spm", "--split", "val", "--device", "cpu",
                                         "--dtype", "fp32", "--batch-size", 8, "--num-workers", 1])
    assert ran.returncode == 0, ran.stderr
    expected = json.loads(EXPECTED.read_text())
    records = read_results(out)
    assert len(records) == expected["questions"] == len(expected["predictions"])
    for r in records:
        assert {"label": r["label"], "answer": r["answer"]} == expected["predictions"][str(r["question_id"])], r

    # without the SentencePiece model a BEiT-3 checkpoint is refused, before anything loads
    invoke_refused(vqa_main, ["--shards", shards, "--data", arrow, "--answers", ANSWERS, "--split", "val",
                              "--out", tmp_path / "other.jsonl"], "--tokenizer")
