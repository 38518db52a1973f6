"""Every golden model case, sharded at tp 1, 2 and 4 and run through torchrun + gloo (tp 1: one process alone),
matches the published model.

One launch per degree runs every case, BEiT-3's too (tests/_golden_runs.py): start-up, not the model, is what costs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _golden_runs import VLMO_CASES as CASES
from engine.runtime.shards import read_manifest

DEGREES = (1, 2, 4)
TOLERANCE = 1e-4  # golden/README.md: fp32, any tensor-parallel degree


@pytest.mark.skipif(not CASES, reason="../shared/golden has no model cases")
@pytest.mark.parametrize("tp", DEGREES)
@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_matches_published_outputs(case_dir: Path, tp: int, golden_runs) -> None:
    case = json.loads((case_dir / "case.json").read_text())
    root = golden_runs(tp) / case_dir.name
    cfg = read_manifest(root / "shards").config
    inferred = {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                "vlffn_start_layer_index": cfg.vlffn_start_layer_index, "image_size": cfg.image_size,
                "relative_position_bias": cfg.relative_position_bias, "abs_pos_embed": cfg.abs_pos_embed,
                "layer_scale": cfg.layer_scale}
    assert inferred == {k: case[k] for k in inferred}
    assert read_manifest(root / "shards").tp == tp

    expected, got = load_file(str(case_dir / "expected.safetensors")), load_file(str(root / "out.safetensors"))
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        error = (got[name] - want).abs().max().item()
        assert error <= TOLERANCE, f"{name}: max abs error {error:.2e} at tp={tp}"
    if "vqa_logits" in expected:  # the answers themselves, not just closeness
        assert torch.equal(got["vqa_logits"].argmax(-1), expected["vqa_logits"].argmax(-1))
