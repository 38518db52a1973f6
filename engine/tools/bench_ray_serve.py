"""`python -m engine.tools.bench_ray_serve`: what Ray Serve adds per request, against engine.serve on the same shards.

Both servers run the demo's checkpoint at tp 2 side by side (engine.serve under torchrun; engine.ray_serve with one
replica on a local Ray), and take turns: each round sends --requests single-stream requests (one at a time) to one,
then to the other, so that a shared machine's load changes little between the two. Per round and server: the p50
end-to-end latency and the p50 time outside the request's own forward (HTTP, decoding, batching, and for Ray the
proxy's hop to the replica). The report gives min and median over the rounds, and Ray's overhead per request.
"""
from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from ..atomic import write_json
from ..serving.client import request_body, samples_from_arrow
from .bench_serve import TP, ServerProcess, asset_options, load, server_args
from .bench_study import _free_port
from .demo_pipeline import prepare_assets


class RayServerProcess(ServerProcess):
    """`python -m engine.ray_serve`, one replica of tp 2 on a local Ray of `cpus` CPUs; stopped with SIGTERM."""

    def __init__(self, shards: Path, answers: Path, dtype: str, threads: int, cpus: int) -> None:
        self.port = _free_port()
        self._start([sys.executable, "-m", "engine.ray_serve", *server_args(shards, answers, dtype, threads, self.port),
                     "--num-cpus", str(cpus), "--cpus-per-rank", str(cpus / TP), "--object-store-mb", "128"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # Ray's workers leave when its raylet does
                self.proc.wait()


def _stats(values: List[float]) -> Dict[str, float]:
    return {"min": min(values), "median": statistics.median(values)}


@click.command()
@asset_options("bench/ray_serve", "tiny", "tiny: a forward of milliseconds, where the per-request overhead shows; "
               "base: the real size.", "fp32")
@click.option("--threads", type=int, default=1, show_default=True, help="CPU threads per rank.")
@click.option("--requests", "n_requests", type=int, default=40, show_default=True,
              help="Single-stream requests per round and server.")
@click.option("--rounds", type=int, default=3, show_default=True)
def main(out_dir: Path, workdir: Path, model: str, dtype: str, threads: int, n_requests: int, rounds: int) -> None:
    """Per-request overhead of engine.ray_serve against engine.serve on the same shards; OUT/report.json."""
    out_dir, workdir = out_dir.resolve(), workdir.resolve()
    arrow, shards = prepare_assets(workdir, model, images=6, tp=TP)
    answers = arrow / "answer2label.txt"
    samples = samples_from_arrow(arrow, "val")
    bodies = [request_body("vqa", *samples[i % len(samples)]) for i in range(n_requests)]
    servers: Dict[str, Optional[ServerProcess]] = {"engine.serve": None, "engine.ray_serve": None}
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in servers}
    try:
        servers["engine.serve"] = ServerProcess(shards, answers, dtype, threads, [])
        servers["engine.ray_serve"] = RayServerProcess(shards, answers, dtype, threads, cpus=TP * threads)
        for server in servers.values():
            load(server.url, bodies[:4], float("inf"), 1, "warm-up")
        for r in range(rounds):
            for name, server in servers.items():
                runs[name].append(load(server.url, bodies, float("inf"), 1, f"round {r + 1}, {name}"))
    finally:
        for server in servers.values():
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()

    summary = {name: {"latency_p50_ms": _stats([run["latency_ms"]["p50"] for run in reports]),
                      "outside_forward_p50_ms": _stats([run["outside_forward_ms"]["p50"] for run in reports]),
                      "forward_p50_ms": _stats([run["forward_ms"]["p50"] for run in reports])}
               for name, reports in runs.items()}
    added = [ray["latency_ms"]["p50"] - plain["latency_ms"]["p50"]
             for ray, plain in zip(runs["engine.ray_serve"], runs["engine.serve"])]
    report = {"model": model, "dtype": dtype, "tp": TP, "threads_per_rank": threads, "requests": n_requests,
              "rounds": rounds, "summary": summary, "ray_added_p50_ms_per_round": added, "runs": runs,
              "load_average": os.getloadavg()}
    write_json(out_dir / "report.json", report, indent=1)
    click.echo(f"VLMo-{model} VQA (random weights), tp {TP} x {threads} thread(s), {dtype}, {rounds} rounds of "
               f"{n_requests} single-stream requests (min / median over the rounds)")
    for name, s in summary.items():
        click.echo(f"  {name:17s} p50 {s['latency_p50_ms']['min']:.1f} / {s['latency_p50_ms']['median']:.1f} ms; "
                   f"outside the forward {s['outside_forward_p50_ms']['min']:.1f} / "
                   f"{s['outside_forward_p50_ms']['median']:.1f} ms; forward {s['forward_p50_ms']['median']:.1f} ms")
    click.echo(f"  Ray Serve adds per request (p50, by round): {', '.join(f'{a:+.1f}' for a in added)} ms")
    click.echo(f"load average during the run: {', '.join(f'{x:.1f}' for x in report['load_average'])} on "
               f"{os.cpu_count()} cores (the machine is shared)")
    click.echo(f"wrote {out_dir / 'report.json'}")


if __name__ == "__main__":
    main(prog_name="python -m engine.tools.bench_ray_serve")
