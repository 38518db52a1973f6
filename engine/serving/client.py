"""An HTTP load client for engine.serve (engine.loadgen's and `make bench-serve`'s): request bodies from arrow
files or image folders, Poisson arrival times, a keep-alive client per worker, and the latency report."""
from __future__ import annotations

import base64
import http.client
import json
import random
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..data.arrow_io import read_split
from ..tasks.metrics import percentiles_ms

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
            raise ValueError(f"--url: expected http://HOST:PORT, got {url!r}")
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
