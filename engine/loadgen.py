"""`python -m engine.loadgen --url URL --data ARROW|--images DIR --requests N --rate R|inf`: load an engine.serve.

Requests arrive as a Poisson process of rate R per second (exponential gaps, seeded), as `vllm bench serve` and
MLPerf's Server scenario send them; `--rate inf` sends them all at once. At most --concurrency are in flight;
an arrival that finds them all busy waits for one (its latency is counted from when it is sent). Bodies are
encoded before the clock starts. Reports end-to-end latency p50/p90/p99 of the successful requests,
requests/s and errors by status; `--json` writes the report.
"""
from __future__ import annotations

import base64
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from .atomic import write_json
from .data.arrow_io import read_split
from .data.raw import DataError
from .tasks.metrics import percentiles_ms

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
DEFAULT_QUESTIONS = ("What is in the picture?", "What color is the shape?", "How many shapes are there?")


def samples_from_arrow(arrow_dir: Path, split: str) -> List[Tuple[bytes, str]]:
    """(image bytes, question) of every question of vqav2_{split}.arrow."""
    table = read_split(arrow_dir, "vqav2", split)
    images, questions = table.column("image").to_pylist(), table.column("questions").to_pylist()
    return [(image, q) for image, qs in zip(images, questions) for q in qs]


def samples_from_images(folder: Path, questions: Sequence[str]) -> List[Tuple[bytes, str]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p.read_bytes(), questions[i % len(questions)]) for i, p in enumerate(files)]


def request_body(endpoint: str, image: bytes, question: str) -> bytes:
    encoded = base64.b64encode(image).decode()
    if endpoint == "chat":
        return json.dumps({"model": "vlmo", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{encoded}"}},
            {"type": "text", "text": question}]}]}).encode()
    return json.dumps({"image": encoded, "question": question}).encode()


def arrival_times(n: int, rate: float, seed: int) -> List[float]:
    """Seconds after the start at which each request is due: Poisson arrivals, or all at 0 for rate inf."""
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def summary_ms(seconds: Sequence[float]) -> Dict[str, Optional[float]]:
    """percentiles_ms, or every field None when nothing succeeded."""
    return percentiles_ms(seconds) if seconds else dict.fromkeys(percentiles_ms([0.0]))


class Client:
    def __init__(self, url: str, path: str, timeout: float) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise click.UsageError(f"--url: expected http://HOST:PORT, got {url!r}")
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.path, self.timeout = path, timeout

    def post(self, body: bytes) -> Tuple[Any, float, Optional[float]]:
        """(status or the error's name, seconds, the server's forward time in ms when it says)."""
        began = time.perf_counter()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        forward_ms = None
        try:
            conn.request("POST", self.path, body=body, headers={"content-type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            status: Any = response.status
        except (OSError, http.client.HTTPException) as exc:
            status = type(exc).__name__
        finally:
            conn.close()
        seconds = time.perf_counter() - began
        if status == 200:
            forward_ms = _forward_ms(data)
        return status, seconds, forward_ms


def _forward_ms(data: bytes) -> Optional[float]:
    """engine.serve's `forward_ms` (top level, or under `vlmo` in OpenAI-shaped replies), if the reply has it."""
    try:
        reply = json.loads(data)
    except ValueError:
        return None
    value = reply.get("forward_ms", (reply.get("vlmo") or {}).get("forward_ms")) if isinstance(reply, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def run_load(client: Client, bodies: Sequence[bytes], rate: float, concurrency: int, seed: int) -> Dict[str, Any]:
    due = arrival_times(len(bodies), rate, seed)
    slots = threading.Semaphore(concurrency)
    outcomes: List[Tuple[Any, float, Optional[float]]] = []
    lock = threading.Lock()

    def send(body: bytes) -> None:
        try:
            result = client.post(body)
            with lock:
                outcomes.append(result)
        finally:
            slots.release()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for at, body in zip(due, bodies):
            wait = start + at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            slots.acquire()
            pool.submit(send, body)
    wall = time.perf_counter() - start
    ok = [(seconds, forward) for status, seconds, forward in outcomes if status == 200]
    errors = Counter(str(status) for status, _, _ in outcomes if status != 200)
    split = [(seconds, forward / 1e3) for seconds, forward in ok if forward is not None]
    return {"requests": len(bodies), "ok": len(ok), "errors": dict(errors), "wall_s": wall,
            "requests_per_s": len(ok) / wall if wall > 0 else None,
            "offered_rate": None if rate == float("inf") else rate, "concurrency": concurrency,
            "latency_ms": summary_ms([seconds for seconds, _ in ok]),
            # per request, what the server spent in its batch's forward and everything else end to end
            "forward_ms": summary_ms([forward for _, forward in split]),
            "outside_forward_ms": summary_ms([total - forward for total, forward in split])}


def summary_line(report: Dict[str, Any]) -> str:
    lat = report["latency_ms"]
    rate = "inf" if report["offered_rate"] is None else f"{report['offered_rate']:g}/s"
    errors = sum(report["errors"].values())
    latency = ("no successful request" if lat["p50"] is None else
               f"latency p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f}, p99 {lat['p99']:.1f}")
    inside = report["forward_ms"]["p50"]
    split = "" if inside is None else (f" (server forward p50 {inside:.1f} ms, the rest p50 "
                                       f"{report['outside_forward_ms']['p50']:.1f} ms)")
    return (f"{report['requests']} requests at rate {rate}, concurrency {report['concurrency']}: "
            f"{report['requests_per_s']:.2f} req/s, {latency}{split}, {errors} errors"
            + (f" {report['errors']}" if errors else ""))


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
    client = Client(url, "/v1/chat/completions" if endpoint == "chat" else "/v1/vqa", timeout_s)
    report = run_load(client, bodies, arrivals, concurrency, seed)
    click.echo(summary_line(report))
    if json_path:
        write_json(json_path, {"url": url, "endpoint": endpoint, **report}, indent=1)


if __name__ == "__main__":
    main(prog_name="python -m engine.loadgen")
