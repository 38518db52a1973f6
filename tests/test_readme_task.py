"""The README's "Adding a task" sketch, run as written: a complete resumable command, checked against the hit rate
the published pipeline gives on the golden mini VQAv2 (golden/vqa_e2e_expected.json)."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

from click.testing import CliRunner

from _paths import GOLDEN, REPO, needs
from _run import shard_here

CHECKPOINT = GOLDEN / "tiny_relpos_vqa9" / "checkpoint.pt"
ARROW = GOLDEN / "vqav2_arrow_published"
EXPECTED = GOLDEN / "vqa_e2e_expected.json"

pytestmark = [needs(CHECKPOINT), needs(ARROW), needs(EXPECTED)]


def _sketch() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Adding a task"):readme.index("## Adding a model family")]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_task_sketch_runs_and_scores_like_the_published_pipeline(tmp_path: Path) -> None:
    module_path = tmp_path / "mytask.py"
    module_path.write_text(_sketch())
    spec = importlib.util.spec_from_file_location("engine.mytask", module_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["engine.mytask"] = module
    try:
        spec.loader.exec_module(module)  # as engine/mytask.py: its relative imports are the engine's
        shard_here(CHECKPOINT, 1, tmp_path / "shards")
        out = tmp_path / "results.jsonl"
        args = ["--shards", tmp_path / "shards", "--data", ARROW, "--split", "val", "--device", "cpu",
                "--num-workers", 0, "--out", out]
        ran = CliRunner().invoke(module.main, [str(a) for a in args])
    finally:
        del sys.modules["engine.mytask"]
    assert ran.exit_code == 0, ran.output
    expected = json.loads(EXPECTED.read_text())
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["hit_rate"] == expected["hit_rate"]
    assert len(out.read_text().splitlines()) == expected["questions"]
