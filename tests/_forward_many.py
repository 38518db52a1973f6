"""`torchrun --nproc-per-node TP tests/_forward_many.py PLAN.json`: engine.forward over several shard dirs in one launch.

Most of a test's time is process start-up (interpreters, torch, the gloo rendezvous), so the tests that
check many cases at one tp start the world once here: for each item of the plan (shards, inputs, out, task,
dtype; every shard dir cut for this tp) the model is loaded and run with engine.forward's own functions and
rank 0 writes the outputs, as `python -m engine.forward` would.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import torch

from engine.atomic import write_safetensors
from engine.forward import check_finite_outputs, read_inputs, run_task
from engine.runtime.distributed import init_parallel
from engine.runtime.loading import load_model
from engine.runtime.shards import read_manifest
from engine.tasks.cli import pick_task


def run_plan(plan: List[Dict[str, str]]) -> None:
    """Every item of the plan in this process (at tp 1 alone: tests/_run.py's forward_many calls it directly)."""
    ctx = None
    for item in plan:
        shards = Path(item["shards"])
        manifest = read_manifest(shards)
        ctx = ctx or init_parallel("cpu", manifest.tp)
        task = pick_task(manifest.config, item.get("task"))
        inputs = read_inputs(Path(item["inputs"]), task, manifest.config)
        model = load_model(shards, ctx, item.get("dtype", "fp32"), manifest)
        with torch.inference_mode():
            outputs = run_task(model, task, inputs)
        check_finite_outputs(outputs)
        if ctx.is_main:
            write_safetensors(item["out"], {k: v.float().contiguous() for k, v in outputs.items()})


def main(plan_path: str) -> None:
    run_plan(json.loads(Path(plan_path).read_text()))
    sys.stdout.flush()
    # As engine.tasks.cli.one_line_errors does: no interpreter teardown racing gloo's threads.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
