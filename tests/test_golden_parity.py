"""Every golden model case, sharded at tp 1, 2 and 4 and run through torchrun + gloo, matches the published model.

One launch per degree runs every case (tests/_forward_many.py): start-up, not the model, is what costs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _paths import GOLDEN
from _run import forward_many, shard_here
from engine.runtime.shards import read_manifest

CASES = sorted(p.parent for p in GOLDEN.glob("*/expected.safetensors") if (p.parent / "checkpoint.pt").is_file())
DEGREES = (1, 2, 4)
TOLERANCE = 1e-4  # golden/README.md: fp32, any tensor-parallel degree


def _overrides(case: dict) -> list:
    # Without a relative-position table the head count is not in the weights (golden README).
    return [] if case["relative_position_bias"] else ["--num-heads", case["num_heads"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """tp -> work dir holding CASE/shards and CASE/out.safetensors for every case, run at that tp."""
    ran = {}

    def get(tp: int) -> Path:
        if tp not in ran:
            root = tmp_path_factory.mktemp(f"tp{tp}")
            for case_dir in CASES:
                case = json.loads((case_dir / "case.json").read_text())
                shard_here(case_dir / "checkpoint.pt", tp, root / case_dir.name / "shards", *_overrides(case))
            forward_many(tp, [{"shards": root / c.name / "shards", "inputs": c / "inputs.safetensors",
                               "out": root / c.name / "out.safetensors"} for c in CASES], root / "plan.json")
            ran[tp] = root
        return ran[tp]

    return get


@pytest.mark.skipif(not CASES, reason="../shared/golden has no model cases")
@pytest.mark.parametrize("tp", DEGREES)
@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_matches_published_outputs(case_dir: Path, tp: int, runs) -> None:
    case = json.loads((case_dir / "case.json").read_text())
    root = runs(tp) / case_dir.name
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
