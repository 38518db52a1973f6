"""`python -m engine.loadgen --url URL --data ARROW|--images DIR --requests N --rate R|inf`: load an engine.serve.

Requests arrive as a Poisson process of rate R per second (exponential gaps, seeded), as `vllm bench serve` and
MLPerf's Server scenario send them; `--rate inf` sends them all at once. At most --concurrency are in flight;
an arrival that finds them all busy waits for one (its latency is counted from when it is sent). Bodies are
encoded before the clock starts. Reports end-to-end latency p50/p90/p99 of the successful requests,
requests/s and errors by status; `--json` writes the report.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Tuple

import click

from .atomic import write_json
from .data.raw import DataError
from .serving.client import (DEFAULT_QUESTIONS, Client, request_body, run_load, samples_from_arrow,
                             samples_from_images, summary_line)

def parse_rate(value: str) -> float:
    if value.strip().lower() in ("inf", "infinity"):
        return float("inf")
    try:
        rate = float(value)
    except ValueError:
        raise click.BadParameter(f"expected a number of requests per second or 'inf', got {value!r}") from None
    if not rate > 0:
        raise click.BadParameter(f"must be positive, got {value!r}")
    return rate


@click.command()
@click.option("--url", required=True, help="The server, e.g. http://127.0.0.1:8000.")
@click.option("--data", "arrow_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with vqav2_SPLIT.arrow: its images and questions.")
@click.option("--split", default="val", show_default=True, help="Split of --data.")
@click.option("--images", "image_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of image files, asked --question in turn.")
@click.option("--question", "questions", multiple=True, help="Question(s) for --images [default: three generic].")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), required=True, help="Requests to send.")
@click.option("--rate", required=True, help="Mean arrivals per second (Poisson), or inf (all at once).")
@click.option("--concurrency", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most requests in flight.")
@click.option("--endpoint", type=click.Choice(["vqa", "chat"]), default="vqa", show_default=True,
              help="/v1/vqa (JSON, base64 image) or /v1/chat/completions (OpenAI, data URI).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the arrival times.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
              help="Seconds a request may take before it counts as an error.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here.")
def main(url: str, arrow_dir: Optional[Path], split: str, image_dir: Optional[Path], questions: Tuple[str, ...],
         n_requests: int, rate: str, concurrency: int, endpoint: str, seed: int, timeout_s: float,
         json_path: Optional[Path]) -> None:
    """Send N VQA requests to an engine.serve with Poisson arrivals; report latency percentiles and req/s."""
    if (arrow_dir is None) == (image_dir is None):
        raise click.UsageError("pass one of --data ARROW or --images DIR")
    arrivals = parse_rate(rate)
    try:
        samples = (samples_from_arrow(arrow_dir, split) if arrow_dir is not None
                   else samples_from_images(image_dir, questions or DEFAULT_QUESTIONS))
    except (DataError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if not samples:
        raise click.UsageError(f"no images or questions found in {arrow_dir or image_dir}")
    bodies = [request_body(endpoint, *samples[i % len(samples)]) for i in range(n_requests)]
    try:
        client = Client(url, "/v1/chat/completions" if endpoint == "chat" else "/v1/vqa", timeout_s)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    report = run_load(client, bodies, arrivals, concurrency, seed)
    click.echo(summary_line(report))
    if json_path:
        write_json(json_path, {"url": url, "endpoint": endpoint, **report}, indent=1)


if __name__ == "__main__":
    main(prog_name="python -m engine.loadgen")
