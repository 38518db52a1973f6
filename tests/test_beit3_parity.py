"""Every BEiT-3 golden case, sharded at tp 1, 2 and 4 and run through torchrun + gloo (tp 1: one process alone),
matches the published model (golden/README.md §BEiT-3); one launch per tp runs all the cases, VLMo's too
(tests/_golden_runs.py)."""
from __future__ import annotations

import json
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

from _paths import needs
from _beit3 import BEIT3
from _golden_runs import BEIT3_CASES as CASES
from engine.runtime.shards import read_manifest

TOLERANCE = 1e-4
TASKS = {"vqa": "vqa", "nlvr2": "nlvr2", "retrieval": "irtr"}


@needs(BEIT3)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_case_matches_published_outputs(tp: int, golden_runs) -> None:
    assert len(CASES) == 4
    root = golden_runs(tp)
    for case_dir in CASES:
        case = json.loads((case_dir / "case.json").read_text())
        manifest = read_manifest(root / case_dir.name / "shards")
        cfg, arch = manifest.config, case["architecture"]
        assert manifest.tp == tp
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.ffn_dim, cfg.vocab_size, cfg.image_size,
                cfg.max_text_len) == tuple(arch[k] for k in ("embed_dim", "depth", "num_heads", "ffn_dim",
                                                              "vocab_size", "image_size", "max_text_len"))
        assert cfg.tasks == (TASKS[case["task"]],)
        expected: Dict[str, torch.Tensor] = load_file(str(case_dir / "expected.safetensors"))
        got = load_file(str(root / case_dir.name / "out.safetensors"))
        for name, want in expected.items():
            assert got[name].shape == want.shape, (case_dir.name, name)
            error = (got[name] - want).abs().max().item()
            assert error <= TOLERANCE, f"{case_dir.name} {name}: max abs error {error:.2e} at tp={tp}"
