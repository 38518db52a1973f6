"""`python -m engine.demo` (make demo) drives the whole pipeline; here with the tiny model so it takes seconds."""
from __future__ import annotations

import json
from pathlib import Path

from _run import run_module


def test_demo_runs_the_vqa_pipeline_and_says_the_weights_are_random(tmp_path: Path) -> None:
    ran = run_module("engine.demo", ["--model", "tiny", "--workdir", tmp_path])
    assert ran.returncode == 0, ran.stderr
    assert "RANDOM" in ran.stdout and "VQA score" in ran.stdout
    for step in ("python -m engine.data vqav2", "make shard", "torchrun --standalone --nproc-per-node 2 -m engine.vqa"):
        assert step in ran.stderr
    [summary_path] = (tmp_path / "results").glob("*.summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["questions"] == summary["answered"] == 18
    assert (summary["run"]["tp"], summary["latency"]["batches"]) == (2, 9)
