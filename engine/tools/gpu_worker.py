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

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import torch
from safetensors.torch import load_file

from ..atomic import write_json
from ..models.tasks import TASKS
from ..runtime.distributed import init_parallel
from ..runtime.graphed import task_graphs
from ..runtime.loading import load_model
from ..runtime.shards import read_manifest
from ..tasks.benchmark import bench_engine
from ..tasks.cli import Engine, pick_task

LOGITS = ("vqa_logits", "nlvr2_logits")
COLLECTIVE_TIMEOUT_S = 60.0  # a rank that fails alone stops the launch within this, not the default 10 minutes


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


@contextlib.contextmanager
def recorded(row: Dict[str, Any]) -> Iterator[None]:
    """A configuration that fails is a row with its error, and the next one runs (every rank fails alike: the
    same inputs and code; a rank failing alone makes its peers' collective time out, which ends the launch)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (the check reports every failure, whatever it is)
        row["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def parity(ctx, items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for item in items:
        shards = Path(item["shards"])
        manifest = read_manifest(shards)
        task = pick_task(manifest.config, None)
        inputs = load_file(item["inputs"])
        if "padding_mask" in inputs:  # BEiT-3's published convention (1 on padding), as engine.forward converts
            inputs["text_masks"] = 1 - inputs.pop("padding_mask")
        inputs = {name: inputs[name].to(ctx.device) for name in TASKS[task].inputs}
        expected = load_file(item["expected"])
        batch = next(iter(inputs.values())).shape[0]
        for dtype in item["dtypes"]:
            loading = {"case": item["case"], "family": manifest.config.family, "tp": ctx.tp_size, "dtype": dtype,
                       "graphs": False, "batch": batch}
            with recorded(loading):
                model = load_model(shards, ctx, dtype, manifest)
            if "error" in loading:
                rows.append(loading)
                continue
            for graphs in (False, True):
                runner = task_graphs(model, ctx.device, enabled=graphs)
                for n in sorted({batch, max(1, batch - 1)}, reverse=True):
                    row = {"case": item["case"], "family": manifest.config.family, "tp": ctx.tp_size,
                           "dtype": dtype, "graphs": graphs, "batch": n}
                    with recorded(row):
                        got = runner(task, {k: v[:n] for k, v in inputs.items()})
                        row.update(mode=runner.mode(task, n), **compare(got, {k: v[:n] for k, v in expected.items()}))
                    rows.append(row)
            del model
    return rows


def bench(ctx, spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    shards = Path(spec["shards"])
    manifest = read_manifest(shards)
    task = pick_task(manifest.config, spec.get("task"))
    reports = []
    for dtype in spec["dtypes"]:
        loading: Dict[str, Any] = {"dtype": dtype, "batch_size": 0, "graphs_requested": False}
        with recorded(loading):
            engine = Engine(ctx=ctx, model=load_model(shards, ctx, dtype, manifest), manifest=manifest,
                            dtype=dtype, load_s=0.0)
        if "error" in loading:
            reports.append(loading)
            continue
        for batch in spec["batches"]:
            for graphs in (True, False):
                row: Dict[str, Any] = {"dtype": dtype, "batch_size": batch, "graphs_requested": graphs}
                with recorded(row):
                    row.update(bench_engine(engine, shards, task, batch, spec["warmup"], spec["iters"],
                                            cuda_graphs=graphs))
                if ctx.is_main:
                    reports.append(row)
        del engine
    return reports


def main(plan_path: str, out_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    ctx = init_parallel(plan["device"], tp, timeout_s=COLLECTIVE_TIMEOUT_S)
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
