"""`make bench-serve` (python -m engine.tools.bench_serve): engine.serve under load, on the demo's VLMo-base 480.

1. The demo's assets (random-weight VLMo-base 480 VQA checkpoint sized to the synthetic answer table, its tp 2
   shards, the synthetic VQAv2 arrow), built once under .cache/demo/.
2. `engine.bench` batch 1 at tp 2: the forward alone.
3. A server with --max-batch-size 1: saturated throughput (every request at once).
4. A server with dynamic batching: saturated throughput, against (3); single-stream latency (one request at a
   time) against (2) — the server's overhead —; then latency at Poisson rates below saturation.
5. OUT/report.json, OUT/latency_vs_rate.png and a table.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import click

from ..options import NumberList, checked_folders
from ..serving.client import Client, request_body, run_load, samples_from_arrow, summary_line
from .demo_pipeline import prepare_assets
from ..atomic import atomic_path, write_json
from ..options import option_group
from .bench_study import _free_port, launcher, run_bench

TP = 2


def server_args(shards: Path, answers: Path, dtype: str, threads: int, port: int, device: str = "cpu") -> List[str]:
    """The options engine.serve and engine.ray_serve are benchmarked with."""
    return ["--shards", str(shards), "--answers", str(answers), "--device", device, "--dtype", dtype, "--threads",
            str(threads), "--port", str(port),
            "--request-timeout", "3600"]  # a saturated queue of full-size requests waits minutes


class ServerProcess:
    """`torchrun -m engine.serve` in its own session (at tp 1 `python -m engine.serve`: torchrun's launcher would
    add seconds of start-up); stopped as a user stops it, with SIGTERM to rank 0."""

    def __init__(self, shards: Path, answers: Path, dtype: str, threads: int, extra: Sequence[str],
                 device: str = "cpu", tp: int = TP, up_within_s: float = 600, log=None) -> None:
        self.port = _free_port()
        args = server_args(shards, answers, dtype, threads, self.port, device)
        self._start([*launcher(tp), "-m", "engine.serve", *args, *extra], up_within_s, log)

    def _start(self, cmd: List[str], up_within_s: float = 600, log=None) -> None:
        click.echo("$ " + " ".join(cmd), err=True)
        self.proc = subprocess.Popen(cmd, start_new_session=True, stderr=log)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + up_within_s
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise click.ClickException(f"the server did not come up (exit status {self.proc.poll()})")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as reply:
                return reply.status == 200
        except OSError:
            return False

    def _workers(self) -> List[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in children.read_text().split()] if children.exists() else []

    def _rank_zero(self) -> Optional[int]:
        if self.proc.args[1:3] == ["-m", "engine.serve"]:  # no launcher: the server itself
            return self.proc.pid
        return next((pid for pid in self._workers()
                     if b"RANK=0" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")), None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            server = self._rank_zero()
            if server is not None:
                os.kill(server, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                workers = self._workers()  # in sessions of their own: a killpg of torchrun misses them
                os.killpg(self.proc.pid, signal.SIGKILL)
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait()


def load(url: str, bodies: List[bytes], rate: float, concurrency: int, label: str) -> Dict[str, Any]:
    report = run_load(Client(url, "/v1/vqa", 600.0), bodies, rate, concurrency, seed=0)
    click.echo(f"{label}: {summary_line(report)}", err=True)
    if report["errors"]:
        raise click.ClickException(f"{label}: requests failed: {report['errors']}")
    return report


def figure(dynamic: List[Dict[str, Any]], saturated: Dict[str, Dict[str, Any]], path: Path, model: str) -> Path:
    """Latency (p50, p99) and achieved throughput against the offered Poisson rate."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    rates = [r["offered_rate"] for r in dynamic]
    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(9.6, 4.2), dpi=110)
    for q, style in ((50, dict(color="tab:orange", marker="o")), (99, dict(color="tab:blue", marker="s",
                                                                             linestyle="--"))):
        latency.plot(rates, [r["latency_ms"][f"p{q}"] / 1e3 for r in dynamic], label=f"p{q}", **style)
    latency.set(title="End-to-end latency vs offered load", xlabel="offered requests / s (Poisson)",
                ylabel="seconds", ylim=(0, None))
    latency.legend(fontsize=8)
    throughput.plot(rates, [r["requests_per_s"] for r in dynamic], color="tab:green", marker="o", label="achieved")
    throughput.axhline(saturated["dynamic"]["requests_per_s"], color="gray", linestyle=":",
                       label="saturated (all requests at once)")
    throughput.set(title="Throughput vs offered load", xlabel="offered requests / s (Poisson)",
                   ylabel="requests / s", ylim=(0, None))
    throughput.legend(fontsize=8)
    for ax in (latency, throughput):
        ax.grid(alpha=0.3)
    fig.suptitle(f"engine.serve, random VLMo-{model} VQA, tp {TP}, dynamic batching", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def asset_options(out: str, model: str, model_help: str, dtype: str) -> Callable:
    """--out, --workdir, --model, --dtype of the serving benchmarks, with their defaults."""
    return option_group([
        click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path(out), show_default=True),
        click.option("--workdir", type=click.Path(path_type=Path), default=Path(".cache/demo"), show_default=True,
                     help="Where the demo's assets are built (shared with make demo / make serve)."),
        click.option("--model", type=click.Choice(["base", "tiny"]), default=model, show_default=True,
                     help=model_help),
        click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default=dtype, show_default=True,
                     help="auto: the faster of fp32 and bf16 on this CPU, measured at load."),
    ])


@click.command()
@asset_options("bench/serve", "base", "tiny: the demo's 64-wide model, to check the benchmark itself in seconds.",
               "auto")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads per rank [default: cores / 2].")
@click.option("--single", "n_single", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests of the single-stream run (one at a time).")
@click.option("--saturate", "n_saturate", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests of each saturated run (all at once).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Of the dynamic-batching server.")
@click.option("--fractions", type=NumberList(float, 0, 1), default="0.3 0.6 0.8 0.95", show_default=True,
              help="Poisson rates to try, as fractions of the saturated throughput.")
@click.option("--per-rate", type=click.IntRange(min=1), default=16, show_default=True, help="Requests at each rate.")
@click.option("--iters", type=click.IntRange(min=1), default=5, show_default=True, help="engine.bench timed iterations.")
def main(out_dir: Path, workdir: Path, model: str, dtype: str, threads: Optional[int], n_single: int, n_saturate: int,
         max_batch_size: int, fractions: List[float], per_rate: int, iters: int) -> None:
    """Server overhead, dynamic-batching throughput and latency vs rate; OUT/report.json and a figure."""
    checked_folders(out=out_dir, workdir=workdir)
    threads = threads or max(1, (os.cpu_count() or 1) // TP)
    out_dir, workdir = out_dir.resolve(), workdir.resolve()
    arrow, shards = prepare_assets(workdir, model, images=6, tp=TP)
    answers = arrow / "answer2label.txt"
    samples = samples_from_arrow(arrow, "val")

    def bodies(n: int) -> List[bytes]:
        return [request_body("vqa", *samples[i % len(samples)]) for i in range(n)]

    forward = run_bench(shards, TP, dtype, 1, threads, 2, iters, out_dir / "engine_bench_b1.json")
    dtype = forward["dtype"]  # auto as engine.bench resolved it: the servers run the same
    # The two saturated runs back to back, so that a shared machine's load changes little between them.
    saturated = {}
    server = ServerProcess(shards, answers, dtype, threads, ["--max-batch-size", "1"])
    try:
        load(server.url, bodies(2), float("inf"), 1, "warm-up")
        saturated["batch_1"] = load(server.url, bodies(n_saturate), float("inf"), n_saturate,
                                    "saturated, --max-batch-size 1")
    finally:
        server.stop()
    server = ServerProcess(shards, answers, dtype, threads, ["--max-batch-size", str(max_batch_size)])
    try:
        load(server.url, bodies(2), float("inf"), 1, "warm-up")
        saturated["dynamic"] = load(server.url, bodies(n_saturate), float("inf"), n_saturate,
                                    f"saturated, --max-batch-size {max_batch_size}")
        single = load(server.url, bodies(n_single), float("inf"), 1, "single stream")
        ceiling = saturated["dynamic"]["requests_per_s"]
        by_rate = [load(server.url, bodies(per_rate), f * ceiling, n_saturate, f"Poisson {f:g} x saturated")
                   for f in fractions]
    finally:
        server.stop()

    # Against engine.bench as asked (p50, and min: on a shared machine the least disturbed run of each); and,
    # robust to a busy machine, each request's own time outside its forward against the forward.
    overhead = {"p50": single["latency_ms"]["p50"] / forward["latency_ms"]["p50"] - 1,
                "min": single["latency_ms"]["min"] / forward["latency_ms"]["min"] - 1,
                "outside_forward_per_request": single["outside_forward_ms"]["p50"] / single["forward_ms"]["p50"]}
    gain = saturated["dynamic"]["requests_per_s"] / saturated["batch_1"]["requests_per_s"]
    report = {"dtype": dtype, "tp": TP, "threads_per_rank": threads, "engine_bench_batch_1": forward["latency_ms"],
              "single_stream": single, "server_overhead": overhead, "saturated": saturated,
              "dynamic_batching_gain": gain, "latency_vs_rate": by_rate,
              "load_average": os.getloadavg()}
    write_json(out_dir / "report.json", report, indent=1)
    plot = figure(by_rate, saturated, out_dir / "latency_vs_rate.png", model)
    click.echo(f"VLMo-{model} VQA (random weights), tp {TP} x {threads} thread(s), {dtype}, "
               f"{forward['device']}")
    click.echo(f"  engine.bench batch 1      p50 {forward['latency_ms']['p50']:.1f} ms, min "
               f"{forward['latency_ms']['min']:.1f} ms")
    click.echo(f"  server, single stream     p50 {single['latency_ms']['p50']:.1f} ms, min "
               f"{single['latency_ms']['min']:.1f} ms  (overhead {100 * overhead['p50']:+.1f} % at p50, "
               f"{100 * overhead['min']:+.1f} % at min)")
    click.echo(f"  per request               forward p50 {single['forward_ms']['p50']:.1f} ms, the rest p50 "
               f"{single['outside_forward_ms']['p50']:.1f} ms ({100 * overhead['outside_forward_per_request']:.1f} "
               f"% of the forward)")
    click.echo(f"  saturated, dynamic        {saturated['dynamic']['requests_per_s']:.3f} req/s "
               f"(--max-batch-size {max_batch_size})")
    click.echo(f"  saturated, batch 1        {saturated['batch_1']['requests_per_s']:.3f} req/s  "
               f"(dynamic batching {gain:.2f}x)")
    for r in by_rate:
        lat = r["latency_ms"]
        click.echo(f"  Poisson {r['offered_rate']:.3f}/s         p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f}, "
                   f"p99 {lat['p99']:.0f}; {r['requests_per_s']:.3f} req/s")
    click.echo(f"load average during the run: {', '.join(f'{x:.1f}' for x in report['load_average'])} "
               f"on {os.cpu_count()} cores (the machine is shared)")
    click.echo(f"wrote {out_dir / 'report.json'} and {plot}")


if __name__ == "__main__":
    main(prog_name="python -m engine.tools.bench_serve")
