"""Every BEiT-3 golden case, sharded at tp 1, 2 and 4 and run through torchrun + gloo, matches the published
model (golden/README.md §BEiT-3); one launch per tp runs all the cases."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

from _paths import needs
from _run import forward_many
from _beit3 import BEIT3, cut

CASES = sorted(p.parent for p in BEIT3.glob("tiny_beit3_*/expected.safetensors"))
TOLERANCE = 1e-4
TASKS = {"vqa": "vqa", "nlvr2": "nlvr2", "retrieval": "irtr"}


@needs(BEIT3)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_case_matches_published_outputs(tp: int, tmp_path: Path) -> None:
    assert len(CASES) == 4
    items, outs = [], {}
    for case_dir in CASES:
        case = json.loads((case_dir / "case.json").read_text())
        cfg = cut(case_dir.name, tp, tmp_path / case_dir.name)
        arch = case["architecture"]
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.ffn_dim, cfg.vocab_size, cfg.image_size,
                cfg.max_text_len) == tuple(arch[k] for k in ("embed_dim", "depth", "num_heads", "ffn_dim",
                                                              "vocab_size", "image_size", "max_text_len"))
        assert cfg.tasks == (TASKS[case["task"]],)
        outs[case_dir] = tmp_path / f"{case_dir.name}.out.safetensors"
        items.append({"shards": tmp_path / case_dir.name, "inputs": case_dir / "inputs.safetensors",
                      "out": outs[case_dir]})
    forward_many(tp, items, tmp_path / "plan.json")
    for case_dir, out in outs.items():
        expected: Dict[str, torch.Tensor] = load_file(str(case_dir / "expected.safetensors"))
        got = load_file(str(out))
        for name, want in expected.items():
            assert got[name].shape == want.shape, (case_dir.name, name)
            error = (got[name] - want).abs().max().item()
            assert error <= TOLERANCE, f"{case_dir.name} {name}: max abs error {error:.2e} at tp={tp}"
        if "vqa_logits" in expected:
            assert torch.equal(got["vqa_logits"].argmax(-1), expected["vqa_logits"].argmax(-1))
