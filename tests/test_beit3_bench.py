"""engine.bench on a BEiT-3 checkpoint: the Sub-LN statistics all-reduces counted and timed apart, bf16 close to
fp32; and the random full-size builder's checkpoint reads back as the config it was built from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _paths import needs
from _beit3 import BEIT3, cut
from _run import run_here, run_torchrun
from engine.bench import main as bench_main
from engine.tools.beit3_assets import build_random_beit3, random_config
from engine.models.beit3.infer import infer_config as infer_beit3_config
from sharding.checkpoint import read_checkpoint
from sharding.weights import select_weights

TINY = BEIT3 / "tiny_beit3_vqa"


def _bench(shards: Path, tp: int, out: Path, *extra: object) -> dict:
    args = ["--shards", shards, "--device", "cpu", "--batch-size", 2, "--threads", 1, "--warmup", 1, "--iters", 2,
            "--json", out, *extra]
    # tp 1: one process, as `python -m engine.bench` runs there: this one
    ran = run_here(bench_main, args) if tp == 1 else run_torchrun(tp, "engine.bench", args)
    assert ran.returncode == 0, ran.stderr
    return json.loads(out.read_text())


@needs(TINY)
def test_bench_counts_subln_allreduces(tmp_path: Path) -> None:
    for tp in (1, 2):
        cut(TINY.name, tp, tmp_path / f"tp{tp}")
    two = _bench(tmp_path / "tp2", 2, tmp_path / "tp2.json", "--dtype", "fp32")
    assert two["model"]["family"] == "beit3" and two["task"] == "vqa"
    # per layer (4): after out_proj, after fc2, and one statistics reduction per Sub-LN
    assert two["allreduce_calls_per_forward"] == 4 * 4
    assert 0 < two["subln_allreduce_ms_per_forward"] <= two["allreduce_ms_per_forward"]
    one = _bench(tmp_path / "tp1", 1, tmp_path / "tp1.json", "--dtype", "bf16", "--check-fp32")
    assert one["allreduce_calls_per_forward"] == 0 and one["subln_allreduce_ms_per_forward"] == 0
    assert one["vs_fp32"]["top1_agreement"] == 1.0
    assert 0 < one["vs_fp32"]["max_abs_diff"]["vqa_logits"] < 0.05


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "irtr"])
def test_random_checkpoint_reads_back_as_built(tmp_path: Path, task: str) -> None:
    cfg = random_config("base", 64, task, num_labels=5, vocab_size=50, embed_dim=32, depth=2, num_heads=4,
                        ffn_dim=128)
    path = build_random_beit3(tmp_path / "random.pth", cfg)
    ckpt = read_checkpoint(path)
    inferred = infer_beit3_config(ckpt.state_dict, ckpt.hyper_parameters, {"num_heads": 4})
    assert inferred == cfg
    assert inferred.normalize_output == (task != "vqa")  # as the published VQA models are built
    _, skipped = select_weights(ckpt.state_dict, inferred)
    assert skipped == ["beit3.vision_embed.mask_token"] + (["logit_scale"] if task == "irtr" else [])
