"""Every golden model case, sharded at tp 1, 2 and 4 and run through torchrun + gloo, matches the published model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _paths import GOLDEN
from _run import run_torchrun, shard
from engine.runtime.shards import read_manifest

CASES = sorted(p.parent for p in GOLDEN.glob("*/expected.safetensors") if (p.parent / "checkpoint.pt").is_file())
TOLERANCE = 1e-4  # golden/README.md: fp32, any tensor-parallel degree


def _overrides(case: dict) -> list:
    # Without a relative-position table the head count is not in the weights (golden README).
    return [] if case["relative_position_bias"] else ["--num-heads", case["num_heads"]]


@pytest.mark.skipif(not CASES, reason="../shared/golden has no model cases")
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_matches_published_outputs(case_dir: Path, tp: int, tmp_path: Path) -> None:
    case = json.loads((case_dir / "case.json").read_text())
    shards = tmp_path / "shards"
    done = shard(case_dir / "checkpoint.pt", tp, shards, *_overrides(case))
    assert done.returncode == 0, done.stderr

    cfg = read_manifest(shards).config
    inferred = {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
                "vlffn_start_layer_index": cfg.vlffn_start_layer_index, "image_size": cfg.image_size,
                "relative_position_bias": cfg.relative_position_bias, "abs_pos_embed": cfg.abs_pos_embed,
                "layer_scale": cfg.layer_scale}
    assert inferred == {k: case[k] for k in inferred}

    out = tmp_path / "out.safetensors"
    ran = run_torchrun(tp, "engine.forward", ["--shards", shards, "--inputs", case_dir / "inputs.safetensors",
                                              "--out", out, "--device", "cpu", "--dtype", "fp32"])
    assert ran.returncode == 0, ran.stderr
    expected, got = load_file(str(case_dir / "expected.safetensors")), load_file(str(out))
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        error = (got[name] - want).abs().max().item()
        assert error <= TOLERANCE, f"{name}: max abs error {error:.2e} at tp={tp}"
    if "vqa_logits" in expected:  # the answers themselves, not just closeness
        assert torch.equal(got["vqa_logits"].argmax(-1), expected["vqa_logits"].argmax(-1))
