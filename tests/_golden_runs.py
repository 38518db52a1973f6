"""Every golden model case of both families (VLMo and BEiT-3) cut at one tp and run in one launch of
tests/_forward_many.py, shared by test_golden_parity and test_beit3_parity through conftest's `golden_runs`:
the launch (interpreters, torch, the gloo rendezvous), not the tiny models, is what costs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict

from _beit3 import BEIT3, TINY_HEADS
from _paths import GOLDEN
from _run import forward_many, shard_here

VLMO_CASES = sorted(p.parent for p in GOLDEN.glob("*/expected.safetensors") if (p.parent / "checkpoint.pt").is_file())
BEIT3_CASES = sorted(p.parent for p in BEIT3.glob("tiny_beit3_*/expected.safetensors"))


def _cut(case_dir: Path, out: Path, tp: int) -> None:
    if case_dir in BEIT3_CASES:
        shard_here(case_dir / "checkpoint.pth", tp, out, "--num-heads", TINY_HEADS)
        return
    case = json.loads((case_dir / "case.json").read_text())
    # Without a relative-position table the head count is not in the weights (golden README).
    shard_here(case_dir / "checkpoint.pt", tp, out, *([] if case["relative_position_bias"] else
                                                       ["--num-heads", case["num_heads"]]))


def golden_runs(mktemp: Callable[[str], Path]) -> Callable[[int], Path]:
    """tp -> a folder holding CASE/shards and CASE/out.safetensors for every case, run at that tp (on first use)."""
    ran: Dict[int, Path] = {}

    def get(tp: int) -> Path:
        if tp not in ran:
            root = mktemp(f"golden-tp{tp}")
            for case_dir in VLMO_CASES + BEIT3_CASES:
                _cut(case_dir, root / case_dir.name / "shards", tp)
            forward_many(tp, [{"shards": root / c.name / "shards", "inputs": c / "inputs.safetensors",
                               "out": root / c.name / "out.safetensors"} for c in VLMO_CASES + BEIT3_CASES],
                         root / "plan.json")
            ran[tp] = root
        return ran[tp]

    return get
