"""`torchrun --nproc-per-node TP -m engine.tools.gpu_worker PLAN.json OUT.json`: the GPU check's work on one
launch of the tensor-parallel group (engine.tools.gpu_check writes the plan and reads rank 0's results).

A plan is {"device": ..., "parity": [...], "bench": {...} or null}:
- parity items (shards, inputs, expected, dtypes): each shard dir loaded once per dtype and run with graphs
  off and on, on all of the golden inputs and on all but the last (a batch that pads to its bucket); rank 0
  records each output's largest deviation from the published one and whether the top-1 answers agree;
- bench (shards, task, batches, dtypes, warmup, iters): engine.bench's report for every batch, dtype and
  graphs on/off, one model load per dtype.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch
from safetensors.torch import load_file

from ..atomic import write_json
from ..bench import bench_engine
from ..forward import read_inputs
from ..runtime.distributed import init_parallel
from ..runtime.graphed import task_graphs
from ..runtime.loading import load_model
from ..runtime.shards import read_manifest
from ..tasks.cli import Engine, pick_task

LOGITS = ("vqa_logits", "nlvr2_logits")


def compare(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Largest absolute deviation per output, top-1 agreement of the logits, finiteness."""
    result: Dict[str, Any] = {"max_abs_error": {}, "finite": True}
    for name, expected in want.items():
        value = got[name].float().cpu()
        result["max_abs_error"][name] = float((value - expected).abs().max())
        result["finite"] &= bool(torch.isfinite(value).all())
        if name in LOGITS:
            result["top1_equal"] = bool(torch.equal(value.argmax(-1), expected.argmax(-1)))
    return result


def parity(ctx, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for item in items:
        shards = Path(item["shards"])
        manifest = read_manifest(shards)
        task = pick_task(manifest.config, None)
        inputs = {k: v.to(ctx.device) for k, v in read_inputs(Path(item["inputs"]), task, manifest.config).items()}
        if "padding_mask" in inputs:  # BEiT-3's published convention (1 on padding), as engine.forward converts
            inputs["text_masks"] = 1 - inputs.pop("padding_mask")
        expected = load_file(item["expected"])
        batch = next(iter(inputs.values())).shape[0]
        for dtype in item["dtypes"]:
            model = load_model(shards, ctx, dtype, manifest)
            for graphs in (False, True):
                runner = task_graphs(model, ctx.device, enabled=graphs)
                for n in sorted({batch, max(1, batch - 1)}, reverse=True):
                    got = runner(task, {k: v[:n] for k, v in inputs.items()})
                    row = {"case": item["case"], "family": manifest.config.family, "tp": ctx.tp_size,
                           "dtype": dtype, "graphs": graphs, "batch": n,
                           "mode": runner.mode(task, n),
                           **compare(got, {k: v[:n] for k, v in expected.items()})}
                    rows.append(row)
            del model
    return rows


def bench(ctx, spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    shards = Path(spec["shards"])
    manifest = read_manifest(shards)
    task = pick_task(manifest.config, spec.get("task"))
    reports = []
    for dtype in spec["dtypes"]:
        engine = Engine(ctx=ctx, model=load_model(shards, ctx, dtype, manifest), manifest=manifest, dtype=dtype,
                        load_s=0.0)
        for batch in spec["batches"]:
            for graphs in (True, False):
                report = bench_engine(engine, shards, task, batch, spec["warmup"], spec["iters"],
                                      cuda_graphs=graphs)
                if report:
                    reports.append({**report, "graphs_requested": graphs})
        del engine
    return reports


def main(plan_path: str, out_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = init_parallel(plan["device"], tp)
    with torch.inference_mode():
        results = {"parity": parity(ctx, plan.get("parity") or []),
                   "bench": bench(ctx, plan["bench"]) if plan.get("bench") else []}
    if ctx.is_main:
        write_json(Path(out_path), results, indent=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as engine.tasks.cli does: no interpreter teardown racing the backend's threads


if __name__ == "__main__":
    main(*sys.argv[1:3])
