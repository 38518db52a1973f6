"""The accelerators' attention (one batched call per layer with a key mask) on the CPU, forced: every golden case
of both families gives the published outputs, as the CPU's per-sample path does (engine.layers.attention)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _beit3 import BEIT3, TINY_HEADS
from _paths import GOLDEN
from _run import shard_here
from engine.forward import read_inputs, run_task
from engine.layers.attention import BATCHED, PER_SAMPLE
from engine.runtime.distributed import ParallelContext
from engine.runtime.loading import load_model
from engine.runtime.shards import read_manifest
from engine.tasks.cli import pick_task

CASES = sorted(p.parent for p in list(GOLDEN.glob("*/expected.safetensors")) + list(BEIT3.glob("*/expected.safetensors")))


def _heads(case_dir: Path) -> list:
    case = case_dir / "case.json"
    if case.is_file() and json.loads(case.read_text()).get("relative_position_bias"):
        return []  # in the relative-position table
    return ["--num-heads", TINY_HEADS if case_dir.parent == BEIT3 else json.loads(case.read_text())["num_heads"]]


@pytest.mark.skipif(not CASES, reason="../shared/golden has no model cases")
@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_batched_key_masking_gives_the_published_outputs(case_dir: Path, tmp_path: Path) -> None:
    checkpoint = next(case_dir.glob("checkpoint.pt*"))
    shard_here(checkpoint, 1, tmp_path, *_heads(case_dir))
    cfg = read_manifest(tmp_path).config
    task = pick_task(cfg, None)
    inputs = read_inputs(case_dir / "inputs.safetensors", task, cfg)
    if "padding_mask" not in inputs and "text_masks" in inputs:
        assert not bool(inputs["text_masks"].all()), "the inputs must hold padding for this test to mean anything"
    ctx = ParallelContext(rank=0, world_size=1, tp_size=1, device=torch.device("cpu"), backend=None)
    expected = load_file(str(case_dir / "expected.safetensors"))
    outputs = {}
    with torch.inference_mode():
        for masking in (BATCHED, PER_SAMPLE):
            outputs[masking] = run_task(load_model(tmp_path, ctx, "fp32", key_masking=masking), task, inputs)
    for name, want in expected.items():
        assert (outputs[BATCHED][name] - want).abs().max() <= 1e-4, name
        assert (outputs[BATCHED][name] - outputs[PER_SAMPLE][name]).abs().max() <= 1e-5, name
