"""`make bench` (python -m engine.tools.bench_study): the tensor-parallel scaling study of a full-size VLMo-base 480.

1. Builds once under .cache/bench/ a random-weight VLMo-base 480 VQA checkpoint in the
   published format and its shards at every tp of the study.
2. For each dtype and batch size, runs `torchrun -m engine.bench` at each tp with the same
   threads per rank (tp 1 vs tp 2 on one core each: what a second chip buys), one after
   another so that the pair sees the same machine; optionally also tp 1 with more threads
   (--reference-threads: the same cores used by one process instead of two).
3. Checks bf16 against fp32 on the golden VQA inputs (same top-1 answer, logit deviation).
4. Writes bench/report.json, bench/scaling.png and prints a table.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import click
import torch
from safetensors.torch import load_file

from ..atomic import atomic_path, write_json
from ..options import NumberList, checked_folders
from ..runtime.shards import MANIFEST
from .demo_assets import build_random_checkpoint
from ..runtime.distributed import init_parallel
from ..models.tasks import TASKS, VQA
from ..runtime.loading import load_model

CHECKPOINT_NAME = "vlmo_base_patch16_480_vqa_random_seed0.pt"


def build_assets(cache: Path, tps: Sequence[int]) -> Dict[int, Path]:
    """The random VLMo-base 480 VQA checkpoint and its shards at each tp (kept between runs)."""
    checkpoint = build_random_checkpoint(cache / CHECKPOINT_NAME, arch="vlmo_base_patch16", image_size=480,
                                         task="vqa", seed=0)
    shards = {}
    for tp in tps:
        out = cache / f"shards_tp{tp}"
        if not (out / MANIFEST).is_file():
            _run([sys.executable, "-m", "sharding", "--checkpoint", checkpoint, "--tp", tp, "--out", out,
                  "--overwrite"])
        shards[tp] = out
    return shards


def _run(cmd: List[Any]) -> None:
    cmd = [str(c) for c in cmd]
    click.echo("$ " + " ".join(cmd), err=True)
    subprocess.run(cmd, check=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(tp: int) -> List[str]:
    """torchrun on tp ranks of this machine, on a free port; a `-m module` command follows."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp), "--master-port",
            str(_free_port())]


def launcher(tp: int) -> List[str]:
    """What starts a `-m module` command on tp ranks of this machine: torchrun, or at tp 1 the interpreter alone
    (torchrun's launcher adds seconds of start-up, and one process needs no rendezvous)."""
    return [sys.executable] if tp == 1 else torchrun(tp)


def run_bench(shards: Path, tp: int, dtype: str, batch: int, threads: int, warmup: int, iters: int,
              out: Path) -> Dict[str, Any]:
    """One `torchrun -m engine.bench` run; its JSON report."""
    _run([*torchrun(tp), "-m", "engine.bench", "--shards", shards, "--device", "cpu", "--dtype", dtype,
          "--batch-size", batch, "--threads", threads, "--warmup", warmup, "--iters", iters, "--json", out])
    return json.loads(out.read_text())


def golden_vqa_agreement(golden: Path, dtype: str = "bf16") -> Dict[str, Dict[str, Any]]:
    # `dtype` as resolved (auto is never passed here: the runs report what it picked)
    """Per golden VQA case: does `dtype` give fp32's top-1 answers, and how far apart are the logits."""
    results = {}
    ctx = init_parallel("cpu", 1)
    for case in sorted(p.parent for p in golden.glob("tiny_*vqa*/inputs.safetensors")):
        if not (case / "checkpoint.pt").is_file():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "sharding", "--checkpoint", str(case / "checkpoint.pt"),
                            "--tp", "1", "--out", tmp, "--overwrite", *_golden_overrides(case)],
                           check=True, capture_output=True)
            inputs = load_file(str(case / "inputs.safetensors"))
            logits = {}
            for name in ("fp32", dtype):
                model = load_model(Path(tmp), ctx, name)
                with torch.inference_mode():
                    logits[name] = TASKS[VQA].first_output(model, inputs, ctx.device).float()
        top1 = logits["fp32"].argmax(-1), logits[dtype].argmax(-1)
        first, second = logits["fp32"].topk(2, dim=-1).indices.unbind(-1)
        rows = torch.arange(len(first))
        results[case.name] = {
            "questions": int(top1[0].numel()),
            "top1_equal": bool(torch.equal(*top1)),
            "max_abs_logit_diff": float((logits[dtype] - logits["fp32"]).abs().max()),
            "logit_range": float(logits["fp32"].max() - logits["fp32"].min()),
            # how close the call was: fp32's best minus second-best answer, in fp32 and in this dtype
            "min_top2_margin_fp32": float((logits["fp32"][rows, first] - logits["fp32"][rows, second]).min()),
            f"min_top2_margin_{dtype}": float((logits[dtype][rows, first] - logits[dtype][rows, second]).min()),
        }
    return results


def _golden_overrides(case: Path) -> List[str]:
    spec = json.loads((case / "case.json").read_text())
    return [] if spec["relative_position_bias"] else ["--num-heads", str(spec["num_heads"])]


def speedups(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """tp > 1 against tp 1 at the same dtype, batch and threads per rank."""
    base = {(r["dtype"], r["batch_size"], r["threads_per_rank"]): r for r in runs if r["tp"] == 1}
    rows = []
    for r in runs:
        ref = base.get((r["dtype"], r["batch_size"], r["threads_per_rank"]))
        if r["tp"] > 1 and ref:
            rows.append({"dtype": r["dtype"], "batch_size": r["batch_size"], "tp": r["tp"],
                         "threads_per_rank": r["threads_per_rank"],
                         "speedup_mean": ref["latency_ms"]["mean"] / r["latency_ms"]["mean"],
                         "speedup_p50": ref["latency_ms"]["p50"] / r["latency_ms"]["p50"],
                         "speedup_min": ref["latency_ms"]["min"] / r["latency_ms"]["min"],
                         "weights_ratio": max(r["weights_bytes_per_rank"]) / max(ref["weights_bytes_per_rank"])})
    return rows


def table(runs: List[Dict[str, Any]], scaling: List[Dict[str, Any]]) -> str:
    speed = {(s["dtype"], s["batch_size"], s["tp"]): s["speedup_p50"] for s in scaling}
    head = (f"{'dtype':5} {'batch':>5} {'tp':>3} {'thr':>3} {'p50 ms':>9} {'min ms':>9} {'ms/sample':>9} "
            f"{'samples/s':>9} {'GFLOP/s':>8} {'%peak':>6} {'allred ms':>9} {'waited':>6} {'MB/rank':>8} "
            f"{'RSS MB':>7} {'vs tp1':>6}")
    lines = [head, "-" * len(head)]
    for r in runs:
        lat = r["latency_ms"]
        gain = speed.get((r["dtype"], r["batch_size"], r["tp"]))
        waits = r.get("allreduce_wait_ms_per_forward_per_rank")  # of the all-reduce time, the longest wait
        waited = f"{max(waits):.1f}" if waits and r["tp"] > 1 else ""
        lines.append(
            f"{r['dtype']:5} {r['batch_size']:>5} {r['tp']:>3} {r['threads_per_rank']:>3} {lat['p50']:>9.1f} "
            f"{lat['min']:>9.1f} {lat['p50'] / r['batch_size']:>9.1f} {r['samples_per_s']:>9.2f} "
            f"{r['achieved_gflop_per_s']:>8.0f} {100 * r['fraction_of_peak']:>5.0f}% "
            f"{r['allreduce_ms_per_forward']:>9.1f} {waited:>6} {max(r['weights_bytes_per_rank']) / 2**20:>8.0f} "
            f"{max(r['peak_rss_bytes_per_rank']) / 2**20:>7.0f} {f'{gain:.2f}x' if gain else '':>6}".rstrip())
    return "\n".join(lines)


# One colour per dtype; tp > 1 dashed with squares, the more-threads tp 1 reference with triangles.
COLOURS = {"fp32": "tab:blue", "bf16": "tab:orange", "fp16": "tab:green", "int8": "tab:red"}


def figure(runs: List[Dict[str, Any]], scaling: List[Dict[str, Any]], path: Path) -> Path:
    """Latency and throughput against batch for each (dtype, tp), and the speed-up of tp > 1 over tp 1."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    batches = sorted({r["batch_size"] for r in runs})
    base_threads = min(r["threads_per_rank"] for r in runs)
    panels = 3 if scaling else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.4), dpi=110, squeeze=False)
    latency, throughput = axes[0][0], axes[0][1]

    def order(key: tuple) -> tuple:  # by dtype; within it tp 1, tp 2, ..., then the more-threads reference
        dtype, tp, threads = key
        return list(COLOURS).index(dtype) if dtype in COLOURS else 9, threads > base_threads, tp

    for dtype, tp, threads in sorted({(r["dtype"], r["tp"], r["threads_per_rank"]) for r in runs}, key=order):
        mine = sorted((r for r in runs if (r["dtype"], r["tp"], r["threads_per_rank"]) == (dtype, tp, threads)),
                      key=lambda r: r["batch_size"])
        style = dict(color=COLOURS.get(dtype, "tab:gray"), linestyle="--" if tp > 1 else "-",
                     marker="s" if tp > 1 else "^" if threads > base_threads else "o",
                     label=f"{dtype}, tp {tp} x {threads} thread{'s' if threads > 1 else ''}")
        x = [r["batch_size"] for r in mine]
        latency.plot(x, [r["latency_ms"]["p50"] / 1e3 for r in mine], **style)
        throughput.plot(x, [r["samples_per_s"] for r in mine], **style)
    _axes(latency, "Latency per batch (p50)", "seconds", batches)
    _axes(throughput, "Throughput", "samples / s", batches)
    if scaling:
        gains = axes[0][2]
        for dtype, tp in sorted({(s["dtype"], s["tp"]) for s in scaling}):
            mine = sorted((s for s in scaling if (s["dtype"], s["tp"]) == (dtype, tp)), key=lambda s: s["batch_size"])
            gains.plot([s["batch_size"] for s in mine], [s["speedup_p50"] for s in mine], linestyle="--", marker="s",
                       color=COLOURS.get(dtype, "tab:gray"),
                       label=f"{dtype}, tp {tp} x {mine[0]['threads_per_rank']} thread")
        ideal = max(s["tp"] for s in scaling)
        gains.axhline(ideal, color="gray", linestyle=":", label="ideal")
        _axes(gains, "Speed-up of tp 2 over tp 1", "x faster", batches)
        gains.set_ylim(0, 1.1 * max([ideal] + [s["speedup_p50"] for s in scaling]))
        gains.legend(fontsize=8)
    handles, labels = latency.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    device = runs[0]["device"].split(" (")[0]
    fig.suptitle(f"VLMo-base 480 VQA forward, {device}: tensor-parallel scaling", y=0.02, va="bottom", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.92))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _axes(ax: Any, title: str, y_label: str, batches: Sequence[int]) -> None:
    """Batch sizes on a log-2 x axis, labelled as they are; y from 0."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel(y_label)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.grid(True, color="0.9")


@click.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench"), show_default=True)
@click.option("--cache", type=click.Path(path_type=Path), default=Path(".cache/bench"), show_default=True)
@click.option("--tps", type=NumberList(int, 1), default="1 2", show_default=True,
              help="Tensor-parallel degrees, space-separated.")
@click.option("--batches", type=NumberList(int, 1), default="1 4 8", show_default=True)
@click.option("--dtypes", default="auto int8", show_default=True,
              help="auto: the faster of fp32 and bf16 here (engine.runtime.dtypes); rows show what it picked.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per rank, the same at every tp [default: cores / the largest tp].")
@click.option("--reference-threads", type=click.IntRange(min=1), default=None,
              help="Also run tp 1 with this many threads (e.g. all cores: one process on the cores tp 2 uses).")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run every configuration this many times and keep the fastest (p50): for a shared machine.")
@click.option("--golden", type=click.Path(path_type=Path), default=Path("../shared/golden"), show_default=True,
              help="Golden VQA cases to check each non-fp32 dtype's answers against fp32's on (skipped when absent).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=3, show_default=True)
def main(out_dir: Path, cache: Path, tps: List[int], batches: List[int], dtypes: str, threads: Optional[int],
         reference_threads: Optional[int], repeats: int, golden: Path, warmup: int, iters: int) -> None:
    """Run the scaling study and write OUT/report.json, OUT/scaling.png and OUT/runs/*.json (the last run of each)."""
    checked_folders(out=out_dir, cache=cache)
    tp_list, batch_list, dtype_list = list(tps), list(batches), dtypes.split()
    threads = threads or max(1, (os.cpu_count() or 1) // max(tp_list))
    configs = [(tp, threads) for tp in tp_list]
    if reference_threads and (1, reference_threads) not in configs:
        configs.append((1, reference_threads))
    shards = build_assets(cache, sorted({tp for tp, _ in configs}))
    runs = []
    for dtype in dtype_list:
        for batch in batch_list:
            best: Dict[tuple, Dict[str, Any]] = {}
            for _ in range(repeats):  # each round runs every tp once, so a pair sees the same machine
                for tp, thr in configs:
                    path = out_dir / "runs" / f"{dtype}-b{batch}-tp{tp}-{thr}thread.json"
                    run = run_bench(shards[tp], tp, dtype, batch, thr, warmup, iters, path)
                    if (tp, thr) not in best or run["latency_ms"]["p50"] < best[(tp, thr)]["latency_ms"]["p50"]:
                        best[(tp, thr)] = run
            runs += [best[config] for config in configs]
    scaling = speedups(runs)
    ran = sorted({r["dtype"] for r in runs} - {"fp32"})  # auto as resolved
    agreement = {d: golden_vqa_agreement(golden, d) for d in ran} if golden.is_dir() else {}
    report = {"runs": runs, "scaling": scaling, "golden_vs_fp32": agreement,
              "settings": {"tps": tp_list, "batches": batch_list, "dtypes": dtype_list, "threads_per_rank": threads,
                           "reference_threads": reference_threads, "repeats": repeats, "warmup": warmup,
                           "iters": iters}}
    write_json(out_dir / "report.json", report, indent=1)
    figure(runs, scaling, out_dir / "scaling.png")
    click.echo(table(runs, scaling))
    for dtype, cases in agreement.items():
        for name, g in cases.items():
            click.echo(f"{dtype} vs fp32 on golden {name}: top-1 {'equal' if g['top1_equal'] else 'DIFFERENT'} "
                       f"({g['questions']} questions), max |logit diff| {g['max_abs_logit_diff']:.3f} "
                       f"(logit range {g['logit_range']:.2f}), closest top-2 margin "
                       f"{g['min_top2_margin_fp32']:.4f} in fp32, {g[f'min_top2_margin_{dtype}']:.4f} in {dtype}")
    click.echo(f"wrote {out_dir / 'report.json'} and {out_dir / 'scaling.png'}")


if __name__ == "__main__":
    main(prog_name="python -m engine.tools.bench_study")
