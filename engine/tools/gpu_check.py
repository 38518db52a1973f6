"""`make gpu-check` (launch/gpu_check.sh runs `python -m engine.tools.gpu_check`): the engine on one or more GPUs,
as one command of at most about 8 minutes, writing OUT/gpu_check.json and printing a table.

1. environment: torch, CUDA, NCCL, the GPUs, and the serving packages this machine has.
2. parity: every golden case (VLMo and BEiT-3, ../shared/golden) cut at tp 1, and tp 2 where there are two
   GPUs, run in fp32, fp16 and bf16 with CUDA graphs off and on (engine.tools.gpu_worker), on the golden batch
   and on one sample fewer (padded to its bucket in the graph): fp32 within 1e-4 of the published outputs,
   fp16 and bf16 with the same top-1 answers.
3. bench: engine.bench's report on the random-weight VLMo-base 480 VQA model (the demo's) at batch 1, 8 and 32,
   fp16 and bf16, graphs on and off: latency, % of the measured matmul peak, device memory.
4. serving: engine.serve on that model, saturated (every request at once) with --max-batch-size 1 and with
   dynamic batching.

Each step has its share of the time budget; a step that fails or runs out of time is recorded as such and the
next one runs. The exit status is 1 when a step failed or a golden case missed its tolerance; the issue's
speed targets are reported (met or not), not enforced. `--device cpu --quick` runs every step on the CPU with
the demo's tiny model: a dry run of the check itself.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import click
import torch

from ..atomic import write_json
from .bench_study import launcher

REPO = Path(__file__).resolve().parents[2]
SERVING_PACKAGES = ("fastapi", "uvicorn", "multipart", "prometheus_client")
DTYPES = ("fp32", "fp16", "bf16")
FP32_TOLERANCE = 1e-4  # golden/README.md
BENCH_BATCHES = (1, 8, 32)
BENCH_DTYPES = ("fp16", "bf16")
# (step, seconds kept back for the steps after it) of the budget
RESERVES = {"parity": 300, "bench": 120, "serving": 0}
MIB = 1 << 20


class StepFailed(RuntimeError):
    """A step could not finish; the message says why (one line)."""


def environment(device: str) -> Dict[str, Any]:
    env: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "device": device,
                           "missing_serving_packages": [p for p in SERVING_PACKAGES
                                                        if importlib.util.find_spec(p) is None]}
    if device == "cuda":
        env["gpus"] = [{"name": torch.cuda.get_device_name(i),
                        "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / (1 << 30), 1)}
                       for i in range(torch.cuda.device_count())]
        env["nccl"] = _nccl_version()
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["cpus"] = os.cpu_count()
    return env


def _nccl_version() -> Optional[str]:
    """NCCL's version as torch reports it (a tuple in recent torch, an int such as 2708 in older ones)."""
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def golden_cases(golden: Path) -> List[Dict[str, Any]]:
    """Every golden model case: its checkpoint, inputs, expected outputs and the sharding options it needs."""
    cases = []
    for case_dir in sorted(p.parent for p in golden.glob("*/expected.safetensors")):
        checkpoint = case_dir / "checkpoint.pt"
        if checkpoint.is_file():
            case = json.loads((case_dir / "case.json").read_text())
            # without a relative-position table the head count is not in the weights (golden/README.md)
            extra = [] if case["relative_position_bias"] else ["--num-heads", str(case["num_heads"])]
            cases.append({"case": case_dir.name, "checkpoint": checkpoint, "dir": case_dir, "extra": extra})
    for case_dir in sorted(p.parent for p in (golden / "beit3").glob("tiny_beit3_*/expected.safetensors")):
        heads = json.loads((case_dir / "case.json").read_text())["architecture"]["num_heads"]
        cases.append({"case": case_dir.name, "checkpoint": case_dir / "checkpoint.pth", "dir": case_dir,
                      "extra": ["--num-heads", str(heads)]})
    return cases


def shard(checkpoint: Path, tp: int, out: Path, extra: Sequence[str]) -> Path:
    """`python -m sharding`, in this process; kept when already cut."""
    if (out / "manifest.json").is_file():
        return out
    from sharding.__main__ import main as sharding_main

    try:
        sharding_main.main(["--checkpoint", str(checkpoint), "--tp", str(tp), "--out", str(out), "--overwrite",
                            *extra], standalone_mode=False)
    except (click.ClickException, SystemExit) as exc:
        raise StepFailed(f"cannot shard {checkpoint} at tp {tp}: {exc}") from None
    return out


def run_worker(device: str, tp: int, plan: Dict[str, Any], work: Path, timeout_s: float, log: Path) -> Dict:
    """One torchrun launch of engine.tools.gpu_worker on tp ranks (at tp 1 the worker alone, without torchrun's
    seconds of start-up); rank 0's results."""
    plan_path, out = work / f"plan_tp{tp}.json", work / f"results_tp{tp}.json"
    write_json(plan_path, {"device": device, **plan}, indent=1)
    out.unlink(missing_ok=True)
    cmd = [*launcher(tp), "-m", "engine.tools.gpu_worker", str(plan_path), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with log.open("a") as sink:
        sink.write("$ " + " ".join(cmd) + "\n")
        sink.flush()
        try:
            ran = subprocess.run(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                 timeout=max(10.0, timeout_s))
        except subprocess.TimeoutExpired:
            raise StepFailed(f"tp {tp} did not finish within {timeout_s:.0f} s (see {log})") from None
    if ran.returncode or not out.is_file():
        raise StepFailed(f"tp {tp} failed with exit status {ran.returncode}: {_last_line(log)} (see {log})")
    return json.loads(out.read_text())


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def passed(row: Dict[str, Any]) -> bool:
    """fp32: every output within 1e-4 and the same answers; fp16/bf16: finite, the same top-1 answers."""
    if "error" in row or not row["finite"] or not row.get("top1_equal", True):
        return False
    return row["dtype"] != "fp32" or max(row["max_abs_error"].values()) <= FP32_TOLERANCE


def step_parity(device: str, tps: Sequence[int], golden: Path, quick: bool, work: Path,
                remaining: Callable[[], float], log: Path) -> Dict[str, Any]:
    cases = golden_cases(golden)
    if not cases:
        raise StepFailed(f"no golden cases under {golden} (copy the project's shared/golden there, or --golden)")
    if quick:  # the first case of each family: every code path, a third of the time
        cases = [c for i, c in enumerate(cases) if i == 0 or cases[i - 1]["dir"].parent != c["dir"].parent]
    rows, failed = [], []
    for tp in tps:
        with _quiet(log):
            cut = {c["case"]: shard(c["checkpoint"], tp, work / f"golden_tp{tp}" / c["case"], c["extra"])
                   for c in cases}
        items = [{"case": c["case"], "inputs": str(c["dir"] / "inputs.safetensors"),
                  "expected": str(c["dir"] / "expected.safetensors"), "dtypes": list(DTYPES),
                  "shards": str(cut[c["case"]])} for c in cases]
        try:
            rows += run_worker(device, tp, {"parity": items}, work, remaining() / len(tps), log)["parity"]
        except StepFailed as exc:  # the other degree still runs
            failed.append(str(exc))
    for row in rows:
        row["passed"] = passed(row)
    result = {"cases": [c["case"] for c in cases], "tps": list(tps), "rows": rows,
              "all_passed": bool(rows) and not failed and all(row["passed"] for row in rows)}
    return {**result, "error": "; ".join(failed)} if failed else result


def step_bench(device: str, shards: Path, quick: bool, work: Path, remaining: Callable[[], float],
               log: Path) -> Dict[str, Any]:
    spec = {"shards": str(shards), "task": "vqa", "batches": list(BENCH_BATCHES[:2] if quick else BENCH_BATCHES),
            "dtypes": list(BENCH_DTYPES), "warmup": 1 if quick else 5, "iters": 1 if quick else 20}
    reports = run_worker(device, 1, {"bench": spec}, work, remaining(), log)["bench"]
    return {"rows": [bench_row(r) for r in reports if "error" not in r], "reports": reports,
            "failed": [r for r in reports if "error" in r]}


def bench_row(report: Dict[str, Any]) -> Dict[str, Any]:
    """The table's numbers of one engine.bench report (rank 0's device memory)."""
    memory = (report.get("device_memory_per_rank") or [None])[0] or {}
    measured = {int(k): v for k, v in (memory.get("activations_bytes") or {}).get(report["task"], {}).items()}
    rows_run = min((b for b in measured if b >= report["batch_size"]), default=None)
    return {"dtype": report["dtype"], "batch": report["batch_size"], "mode": report["cuda_graphs"],
            "graphs": report["graphs_requested"], "graphs_ran": report["cuda_graphs"].startswith("graph"),
            "p50_ms": report["latency_ms"]["p50"], "min_ms": report["latency_ms"]["min"],
            "samples_per_s": report["samples_per_s"], "percent_of_peak": 100 * report["fraction_of_peak"],
            "peak_gflop_per_s": report["peak_gflop_per_s"],
            "weights_mib": report["weights_bytes_per_rank"][0] / MIB,
            "activations_mib": measured[rows_run] / MIB if rows_run is not None else None,
            "graph_pool_mib": memory["graph_pool_bytes"] / MIB if memory else None,
            "free_mib": memory["free_bytes"] / MIB if memory else None}


def step_serving(device: str, shards: Path, arrow: Path, dtype: str, quick: bool,
                 remaining: Callable[[], float], log: Path) -> Dict[str, Any]:
    missing = [p for p in SERVING_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise StepFailed(f"the server needs {', '.join(missing)}: install them from the wheel folder "
                         f"(README §GPU check: WHEELS=dir make gpu-check)")
    from ..serving.client import request_body, samples_from_arrow
    from .bench_serve import ServerProcess, load

    samples = samples_from_arrow(arrow, "val")
    n = 8 if quick else 256
    bodies = [request_body("vqa", *samples[i % len(samples)]) for i in range(n)]
    threads = max(1, min(8, (os.cpu_count() or 2) // 2))
    common = ["--max-queue", str(4 * n), "--preprocess-threads", str(threads)]
    saturated = {}
    for label, batch in (("batch_1", 1), ("dynamic", 32)):
        with log.open("a") as sink:
            try:
                server = ServerProcess(shards, arrow / "answer2label.txt", dtype, threads,
                                       [*common, "--max-batch-size", str(batch)], device=device, tp=1,
                                       up_within_s=max(30.0, remaining() / 2), log=sink)
            except click.ClickException as exc:
                raise StepFailed(f"the server did not start: {exc.message} (see {log})") from None
            try:
                load(server.url, bodies[:min(n, 64)], float("inf"), min(n, 64), f"warm-up, --max-batch-size {batch}")
                saturated[label] = load(server.url, bodies, float("inf"), n, f"saturated, --max-batch-size {batch}")
            except click.ClickException as exc:
                raise StepFailed(exc.message) from None
            finally:
                server.stop()
    gain = saturated["dynamic"]["requests_per_s"] / saturated["batch_1"]["requests_per_s"]
    return {"dtype": dtype, "requests": n, "saturated": saturated, "dynamic_batching_gain": gain}


def targets(report: Dict[str, Any]) -> Dict[str, Any]:
    """The issue's targets against what was measured (met None where the step did not give the number, and for
    the speed targets of a --quick run: they are for VLMo-base on a GPU, not the tiny model)."""
    rows = (report["steps"].get("bench") or {}).get("rows") or []
    b1 = [r["p50_ms"] for r in rows if r["batch"] == 1 and r["dtype"] == "fp16"]
    b32 = [r["percent_of_peak"] for r in rows if r["batch"] == 32]
    gain = (report["steps"].get("serving") or {}).get("dynamic_batching_gain")
    parity = (report["steps"].get("parity") or {}).get("all_passed")
    best_b1, best_b32 = (min(b1) if b1 else None), (max(b32) if b32 else None)
    if report["quick"]:
        best_b1 = best_b32 = gain = None
    return {"batch_1_fp16_ms": {"target": "<= 3", "measured": best_b1,
                                "met": None if best_b1 is None else best_b1 <= 3},
            "batch_32_percent_of_peak": {"target": ">= 50", "measured": best_b32,
                                         "met": None if best_b32 is None else best_b32 >= 50},
            "dynamic_batching_gain": {"target": ">= 5", "measured": gain, "met": None if gain is None else gain >= 5},
            "golden_parity": {"target": "fp32 <= 1e-4, fp16/bf16 top-1 equal", "met": parity}}


def table(report: Dict[str, Any]) -> List[str]:
    """The printed summary."""
    env = report["environment"]
    gpus = ", ".join(g["name"] for g in env.get("gpus", [])) or f"CPU ({env.get('cpus')} cores)"
    lines = [f"GPU check on {gpus}; torch {env['torch']} (CUDA {env['cuda']}, NCCL {env.get('nccl')}), "
             f"{report['wall_s']:.0f} s"]
    for name, step in report["steps"].items():
        if "error" in step:
            lines.append(f"{name}: FAILED: {step['error']}")
    parity = report["steps"].get("parity") or {}
    if "rows" in parity:
        lines.append("golden parity (rows passed / run; largest fp32 error):")
        groups: Dict[Tuple, List[Dict[str, Any]]] = {}
        for row in parity["rows"]:
            groups.setdefault((row["family"], row["tp"], row["dtype"], row["graphs"]), []).append(row)
        for (family, tp, dtype, graphs), rows in sorted(groups.items()):
            worst = max((max(r["max_abs_error"].values()) for r in rows if "error" not in r), default=float("nan"))
            modes = sorted({r["mode"].split(" (")[0] if "mode" in r else "failed" for r in rows})
            lines.append(f"  {family:<5} tp {tp} {dtype:<4} graphs {'on ' if graphs else 'off'} "
                         f"{sum(r['passed'] for r in rows)}/{len(rows)}  max error {worst:.1e}  ran: {'/'.join(modes)}")
    bench = report["steps"].get("bench") or {}
    if "rows" in bench:
        lines.append("engine.bench, VLMo VQA, tp 1 | dtype batch graphs (ran) | p50 ms  min ms  samples/s  %peak | "
                     "weights MiB  activations MiB  graph pool MiB")
        for r in bench["rows"]:
            ran = "graph" if r["graphs_ran"] else "eager"
            lines.append(f"  {r['dtype']:<4} {r['batch']:>3} {'on ' if r['graphs'] else 'off'} ({ran}) | "
                         f"{r['p50_ms']:7.2f} {r['min_ms']:7.2f} {r['samples_per_s']:9.1f} "
                         f"{r['percent_of_peak']:5.1f} | "
                         f"{r['weights_mib']:8.0f} {_mib(r['activations_mib']):>12} {_mib(r['graph_pool_mib']):>12}")
        for r in bench.get("failed", []):
            lines.append(f"  {r['dtype']:<4} {r['batch_size']:>3} {'on ' if r['graphs_requested'] else 'off'} "
                         f"FAILED: {r['error']}")
    for r in (parity.get("rows") or []):
        if "error" in r:
            lines.append(f"parity {r['case']} tp {r['tp']} {r['dtype']} batch {r['batch']} FAILED: {r['error']}")
    serving = report["steps"].get("serving") or {}
    if "saturated" in serving:
        sat = serving["saturated"]
        lines.append(f"serving ({serving['requests']} requests at once, {serving['dtype']}): --max-batch-size 1 "
                     f"{sat['batch_1']['requests_per_s']:.1f} req/s, dynamic batching "
                     f"{sat['dynamic']['requests_per_s']:.1f} req/s ({serving['dynamic_batching_gain']:.2f}x)")
    for name, t in report["targets"].items():
        measured = t.get("measured")
        shown = "" if measured is None else f" measured {measured:.2f}"
        lines.append(f"target {name} {t['target']}:{shown} -> "
                     f"{'met' if t['met'] else 'not met' if t['met'] is False else 'not measured'}"
                     + (" (a --quick run: the speed targets are for VLMo-base on a GPU)"
                        if report["quick"] and t["met"] is None else ""))
    return lines


def _mib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0f}"


@click.command()
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cpu: a dry run of the check on this machine's CPU (with --quick: in a minute or two).")
@click.option("--quick", is_flag=True, help="The demo's tiny model for bench and serving, one golden case per "
              "family, bench batches 1 and 8, one iteration, 8 requests: the dry run checks the check, not speed.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench/gpu_check"),
              show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".cache/gpu_check"), show_default=True,
              help="Shards and the demo's assets, built once and kept.")
@click.option("--golden", type=click.Path(path_type=Path), default=REPO.parent / "shared" / "golden",
              show_default=True, help="The golden cases (the project's shared/golden).")
@click.option("--tps", default=None, help="Tensor-parallel degrees of the parity step [default: 1, and 2 where "
              "there are two GPUs].")
@click.option("--steps", default="parity bench serving", show_default=True, help="Which steps to run.")
@click.option("--budget-s", type=click.FloatRange(min=60), default=450, show_default=True,
              help="Seconds the steps share (launch/gpu_check.sh stops the check at 480 s whatever happens).")
def main(device: str, quick: bool, out_dir: Path, workdir: Path, golden: Path, tps: Optional[str], steps: str,
         budget_s: float) -> None:
    """Golden parity, engine.bench and serving throughput on this machine's GPUs: OUT/gpu_check.json + a table."""
    began = time.monotonic()
    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device is visible to torch (for a dry run on the CPU: --device cpu "
                                   "--quick)")
    wanted = steps.split()
    unknown = sorted(set(wanted) - set(RESERVES))
    if unknown:
        raise click.ClickException(f"--steps: unknown {', '.join(unknown)}; choose from {', '.join(RESERVES)}")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    degrees = [int(t) for t in tps.split()] if tps else [1] + ([2] if gpus >= 2 else [])
    out_dir, workdir = out_dir.resolve(), workdir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "gpu_check.log"
    log.write_text("")
    report: Dict[str, Any] = {"environment": environment(device), "quick": quick, "steps": {}}
    lines: List[str] = []

    def remaining_for(step: str) -> Callable[[], float]:
        return lambda: budget_s - (time.monotonic() - began) - RESERVES[step]

    assets: Dict[str, Path] = {}

    def demo_assets() -> Dict[str, Path]:
        if not assets:
            from .demo_pipeline import prepare_assets

            try:
                with _quiet(log):
                    assets["arrow"], assets["shards"] = prepare_assets(workdir / "demo", "tiny" if quick else "base",
                                                                       images=6, tp=1)
            except (click.ClickException, OSError, RuntimeError) as exc:
                raise StepFailed(f"cannot build the demo's model and data: {exc} (see {log})") from None
        return assets

    serve_dtype = "fp16" if device == "cuda" else "fp32"
    runs = {"parity": lambda: step_parity(device, degrees, golden, quick, workdir, remaining_for("parity"), log),
            "bench": lambda: step_bench(device, demo_assets()["shards"], quick, workdir, remaining_for("bench"), log),
            "serving": lambda: step_serving(device, demo_assets()["shards"], demo_assets()["arrow"], serve_dtype,
                                            quick, remaining_for("serving"), log)}
    for name in RESERVES:
        if name not in wanted:
            continue
        click.echo(f"[{time.monotonic() - began:5.0f} s] {name}", err=True)
        started = time.monotonic()
        try:
            report["steps"][name] = runs[name]()
        except StepFailed as exc:
            report["steps"][name] = {"error": str(exc)}
        report["steps"][name]["wall_s"] = time.monotonic() - started
        lines = write_report(report, out_dir, began)  # after every step: a hard stop keeps what was done
    click.echo("\n".join(lines))
    click.echo(f"wrote {out_dir / 'gpu_check.json'} (log: {log})")
    failed = any("error" in s for s in report["steps"].values()) or \
        report["steps"].get("parity", {}).get("all_passed") is False or \
        bool(report["steps"].get("bench", {}).get("failed"))
    sys.exit(1 if failed else 0)


def write_report(report: Dict[str, Any], out_dir: Path, began: float) -> List[str]:
    """OUT/gpu_check.json and OUT/gpu_check.txt as they stand; the table's lines."""
    report["wall_s"] = time.monotonic() - began
    report["targets"] = targets(report)
    write_json(out_dir / "gpu_check.json", report, indent=1)
    lines = table(report)
    (out_dir / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    return lines


@contextlib.contextmanager
def _quiet(log: Path) -> Iterator[None]:
    """Send what asset building prints (stdout and stderr, its subprocesses' too) to the log."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("a") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, saved_fd in zip((1, 2), saved):
                os.dup2(saved_fd, fd)
                os.close(saved_fd)


if __name__ == "__main__":
    main(prog_name="python -m engine.tools.gpu_check")
