"""engine.serve over real HTTP: the golden VQA answers through every request format with 8 concurrent clients,
batching invariance, a client that disconnects, bad requests, truncation, metrics, the queue bound, SIGTERM,
and a rank that dies."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from PIL import Image

from _paths import GOLDEN, needs
from _run import shard_here
from _serve import Server, in_parallel, png_header
from _vqa_requests import ANSWERS, RAW, ask_chat, ask_form, ask_json, b64, val_questions

EXPECTED = GOLDEN / "vqa_e2e_expected.json"
CHECKPOINT = GOLDEN / "tiny_relpos_vqa9" / "checkpoint.pt"
LONG_QUESTION = ("does this image contain a really, really long question that keeps going and going well past "
                 "the forty token limit of the model's text encoder, on and on and on and on, longer than any real one?")

pytestmark = [needs(CHECKPOINT), needs(EXPECTED), needs(RAW)]
QUESTIONS = val_questions()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "shards"
    shard_here(CHECKPOINT, 2, out)
    return out


@pytest.fixture(scope="module")
def server(shards: Path):
    """One server for most checks: tp 2, batches of up to 8 that wait 200 ms to fill."""
    running = Server(2, ["--shards", shards, "--answers", ANSWERS, "--dtype", "fp32", "--max-batch-size", 8,
                         "--max-wait-ms", 200, "--max-image-bytes", 60_000, "--max-image-pixels", 1_000_000,
                         "--max-body-bytes", 200_000, "--timeout", 60])
    yield running
    running.kill()


def test_health_is_503_while_loading_then_200_and_models_lists_the_checkpoint(server: Server) -> None:
    assert server.first_health == 503
    assert server.get("/health")[0] == 200
    status, _, body = server.get("/v1/models")
    assert status == 200 and body["object"] == "list"
    (model,) = body["data"]
    assert model["object"] == "model" and model["id"] == "checkpoint"
    assert (model["family"], model["tasks"], model["tp"], model["dtype"], model["answers"]) == ("vlmo", ["vqa"], 2,
                                                                                          "fp32", 9)


def test_golden_answers_over_json_multipart_and_chat_with_8_concurrent_clients(server: Server) -> None:
    expected = json.loads(EXPECTED.read_text())["predictions"]
    calls = [(fmt, q) for q in QUESTIONS for fmt in (ask_json, ask_form, ask_chat)]
    replies = in_parallel([lambda f=f, q=q: f(server, q) for f, q in calls], clients=8)
    batch_sizes = []
    for (fmt, q), reply in zip(calls, replies):
        assert not isinstance(reply, Exception), reply
        status, _, body = reply
        assert status == 200, body
        want = expected[str(q["question_id"])]
        if fmt is ask_chat:
            assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
            assert body["choices"][0]["message"]["content"] == want["answer"], q
            batch_sizes.append(body["vlmo"]["batch_size"])
        else:
            assert (body["label"], body["answer"]) == (want["label"], want["answer"]), q
            assert body["top_k"][0] == {"answer": body["answer"], "label": body["label"],
                                        "probability": body["top_k"][0]["probability"]}
            assert len(body["top_k"]) == (5 if fmt is ask_json else 3)
            probabilities = [t["probability"] for t in body["top_k"]]
            assert probabilities == sorted(probabilities, reverse=True) and body["latency_ms"] > 0
            batch_sizes.append(body["batch_size"])
    assert len(QUESTIONS) == 65 and max(batch_sizes) > 1  # the dynamic batcher did batch


def test_batching_does_not_change_answers_and_a_disconnecting_client_does_not_break_its_batch(
        server: Server) -> None:
    # different images and question lengths, so the batch mixes padding lengths
    picks = QUESTIONS[::9][:7] + [dict(QUESTIONS[0], question=LONG_QUESTION)]
    alone = [ask_json(server, q) for q in picks]
    assert all(r[0] == 200 and r[2]["batch_size"] == 1 for r in alone), alone
    start = threading.Barrier(len(picks) + 1)

    def leave_early() -> None:  # sends a whole request, then hangs up without reading the answer
        body = json.dumps({"image": b64(picks[0]["bytes"]), "question": picks[0]["question"]}).encode()
        start.wait()
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(b"POST /v1/vqa HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def together(q: Dict[str, Any]):
        start.wait()
        return ask_json(server, q)

    quitter = threading.Thread(target=leave_early)
    quitter.start()
    batched = in_parallel([lambda q=q: together(q) for q in picks], clients=len(picks))
    quitter.join()
    assert max(r[2]["batch_size"] for r in batched) > 1
    for one, many in zip(alone, batched):
        assert many[0] == 200, many
        assert [(t["label"], t["answer"]) for t in many[2]["top_k"]] == [(t["label"], t["answer"])
                                                                          for t in one[2]["top_k"]]
        for a, b in zip(one[2]["top_k"], many[2]["top_k"]):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)
    assert server.get("/health")[0] == 200


def test_a_long_question_is_truncated_as_in_evaluation_and_says_so(server: Server) -> None:
    q = dict(QUESTIONS[0], question=LONG_QUESTION)
    status, _, body = ask_json(server, q)
    assert status == 200 and body["truncated"] is True and "truncated to the model's 40" in body["warning"]
    # what lies past the 40th token changes nothing
    status, _, longer = ask_json(server, dict(q, question=LONG_QUESTION + " and even more words here"))
    assert [t["label"] for t in longer["top_k"]] == [t["label"] for t in body["top_k"]]
    # equal up to rounding: the two may have shared their batches with different requests
    assert [t["probability"] for t in longer["top_k"]] == pytest.approx([t["probability"] for t in body["top_k"]],
                                                                        abs=1e-6)
    assert ask_json(server, QUESTIONS[0])[2]["truncated"] is False


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, format="PNG")
    return out.getvalue()


def test_bad_requests_get_4xx_with_an_error_and_the_server_keeps_answering(server: Server) -> None:
    q = QUESTIONS[0]
    image = b64(q["bytes"])
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"},
                                                      {"type": "image_url", "image_url": {"url": ""}}]}]}

    def chat_with(url: str) -> Dict[str, Any]:
        body = json.loads(json.dumps(chat))
        body["messages"][0]["content"][1]["image_url"]["url"] = url
        return body

    cases = [
        (400, server.post_json("/v1/vqa", {"image": b64(b"not an image at all"), "question": "what?"})),
        (400, server.post_json("/v1/vqa", {"image": b64(q["bytes"][: len(q["bytes"]) // 2]), "question": "what?"})),
        (400, server.post_json("/v1/vqa", {"image": "%%%not base64", "question": "what?"})),
        (400, server.post_json("/v1/vqa", {"question": "what?"})),
        (400, server.post_json("/v1/vqa", {"image": image})),
        (400, server.post_json("/v1/vqa", {"image": image, "question": "   "})),
        (400, server.post_json("/v1/vqa", {"image": image, "question": "what?", "top_k": 0})),
        (400, server.post_json("/v1/vqa", [1, 2])),
        (400, server.request("POST", "/v1/vqa", b'{"image": ', {"content-type": "application/json"})),
        (400, server.post_form("/v1/vqa", {"question": "what?"}, {})),
        (400, server.post_form("/v1/vqa", {"question": "what?"}, {"image": b"\x89PNG\r\n\x1a\nbroken"})),
        (400, server.post_json("/v1/chat/completions", chat_with("https://example.com/cat.jpg"))),
        (400, server.post_json("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})),
        (400, server.post_json("/v1/chat/completions", {"messages": "hi"})),
        (400, server.post_json("/v1/chat/completions", dict(chat_with("data:image/jpeg;base64," + image),
                                                            stream=True))),
        (404, server.post_json("/v1/embeddings", {"input": ["a cat"]})),
        (404, server.post_json("/v1/nlvr2", {"images": [image, image], "sentence": "two cats"})),
        (404, server.get("/v1/nothing")),
        (413, server.post_json("/v1/vqa", {"image": b64(b"\xff" * 70_000), "question": "what?"})),
        (413, server.post_form("/v1/vqa", {"question": "what?"}, {"image": _png(1500, 1000)})),
        (413, server.request("POST", "/v1/vqa", b"x" * 250_000, {"content-type": "application/json"})),
    ]
    for i, (want, (status, _, body)) in enumerate(cases):
        assert status == want and isinstance(body, dict) and set(body) == {"error"}, (i, status, body)
        assert body["error"]
    assert "remote image URLs are not fetched" in cases[11][1][2]["error"]
    assert "1500x1000 pixels" in cases[19][1][2]["error"]
    expected = json.loads(EXPECTED.read_text())["predictions"][str(q["question_id"])]
    assert ask_json(server, q)[2]["answer"] == expected["answer"]
    assert server.get("/health")[0] == 200


def test_metrics_count_requests_batches_and_the_queue(server: Server) -> None:
    ask_json(server, QUESTIONS[1])
    status, headers, text = server.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'vlmo_requests_total{endpoint="/v1/vqa",status="200"}' in text
    assert 'vlmo_requests_total{endpoint="/v1/vqa",status="413"}' in text or "status=\"413\"" not in text
    for name in ("vlmo_request_latency_seconds_bucket", "vlmo_batch_size_bucket", "vlmo_forward_seconds_bucket",
                 "vlmo_queue_depth"):
        assert name in text


def test_the_page_is_served(server: Server) -> None:
    status, headers, text = server.get("/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert 'id="image"' in text and 'id="question"' in text and "/v1/vqa" in text


def wait_for_queue(server: Server, depth: int, timeout: float = 60) -> None:
    """Poll /metrics until `depth` requests wait for a batch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [l for l in server.get("/metrics")[2].splitlines() if l.startswith("vlmo_queue_depth ")]
        if lines and float(lines[0].split()[1]) >= depth:
            return
        time.sleep(0.02)
    raise AssertionError(f"the queue never reached {depth}")


def ask_in_background(server: Server, questions: List[Dict[str, Any]]) -> tuple:
    replies: Dict[int, Any] = {}
    threads = [threading.Thread(target=lambda i=i, q=q: replies.__setitem__(i, ask_json(server, q)))
               for i, q in enumerate(questions)]
    for t in threads:
        t.start()
    return threads, replies


@pytest.mark.parametrize("target", ["server", "torchrun"])
def test_a_full_queue_gets_503_and_sigterm_finishes_in_flight_requests_then_exits(shards: Path, target: str) -> None:
    # Batches wait up to 3 s to fill: two queued requests are in flight when the third one and SIGTERM come.
    slow = Server(2, ["--shards", shards, "--answers", ANSWERS, "--max-batch-size", 4, "--max-wait-ms", 3000,
                      "--max-queue", 2])
    try:
        threads, replies = ask_in_background(slow, QUESTIONS[:2])
        wait_for_queue(slow, 2)
        status, headers, body = ask_json(slow, QUESTIONS[2])
        assert status == 503 and headers["retry-after"] == "1" and "queue is full" in body["error"]
        os.kill(slow.rank_pid(0) if target == "server" else slow.proc.pid, signal.SIGTERM)
        began = time.monotonic()
        code = slow.wait(timeout=30)
        assert time.monotonic() - began < 10, "".join(slow.log)
        # SIGTERM to the server: it exits 0; torchrun, signalled itself, reports the signal whatever its workers do
        assert code == (0 if target == "server" else 1), "".join(slow.log)
        for t in threads:
            t.join()
        expected = json.loads(EXPECTED.read_text())["predictions"]
        for i, q in enumerate(QUESTIONS[:2]):
            assert replies[i][0] == 200 and replies[i][2]["answer"] == expected[str(q["question_id"])]["answer"]
        assert not any(Path(f"/proc/{pid}").exists() for pid in slow.workers)
        with pytest.raises(OSError):
            slow.get("/health")
    finally:
        slow.kill()


def test_sigterm_with_more_queued_than_the_drain_allows_answers_503_and_every_rank_exits_0(shards: Path) -> None:
    from engine.serve import SHUTDOWN_MARGIN_S

    drain_s = 1.0
    server = Server(2, ["--shards", shards, "--answers", ANSWERS, "--max-batch-size", 1, "--max-wait-ms", 0,
                        "--drain-timeout", drain_s, "--timeout", 60])
    try:
        os.kill(server.rank_pid(1), signal.SIGSTOP)  # no step can finish now: the requests stay queued
        threads, replies = ask_in_background(server, QUESTIONS[:8])
        wait_for_queue(server, 7)
        ranks = [server.rank_pid(0), server.rank_pid(1)]
        os.kill(ranks[0], signal.SIGTERM)
        began = time.monotonic()
        time.sleep(drain_s + 0.5)
        os.kill(ranks[1], signal.SIGCONT)  # the step in flight (a ping or the first batch) can finish
        # the promise: every rank gone within the drain and the margin after SIGTERM (torchrun follows)
        assert all(_exited(pid, began + drain_s + SHUTDOWN_MARGIN_S - time.monotonic()) for pid in ranks)
        code = server.wait(timeout=30)
        for t in threads:
            t.join()
    finally:
        server.kill()
    assert code == 0, "".join(server.log)
    statuses = [replies[i][0] for i in range(8)]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 7, statuses
    for status, headers, body in replies.values():
        if status == 503:
            assert "shutting down" in body["error"] and headers["retry-after"] == "1"
    assert "Traceback" not in "".join(server.log) and "error" not in "".join(server.log).lower()


def _exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] if Path(f"/proc/{pid}").exists() else "X"
        if state in "ZX":  # exited, not yet reaped by torchrun
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_fails_pending_requests_with_503_and_the_server_exits_non_zero(
        shards: Path, fault: signal.Signals) -> None:
    timeout_s = 4
    doomed = Server(2, ["--shards", shards, "--answers", ANSWERS, "--max-wait-ms", 2000, "--timeout", timeout_s])
    try:
        threads, replies = ask_in_background(doomed, QUESTIONS[:1])
        wait_for_queue(doomed, 1)
        server_pid = doomed.rank_pid(0)
        os.kill(doomed.rank_pid(1), fault)
        hit = time.monotonic()
        threads[0].join()
        status, headers, body = replies[0]
        assert status == 503 and headers["retry-after"] == "1" and body["error"], "".join(doomed.log)
        assert _exited(server_pid, timeout_s + 10) and time.monotonic() - hit < timeout_s + 10
        if fault == signal.SIGKILL:
            assert doomed.wait(timeout=60) != 0
    finally:
        doomed.kill()


def test_the_web_page_in_a_headless_browser_shows_the_top_5_answers_and_the_latency(server: Server) -> None:
    from _browser import chromium_page

    q = QUESTIONS[3]
    image = RAW / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg"
    with chromium_page() as page:
        page.goto(server.url + "/")
        page.set_input_files("#image", str(image))
        page.wait_for_selector("#preview", state="visible")
        page.fill("#question", q["question"])
        page.click("#submit")
        page.wait_for_function("document.querySelectorAll('#answers .answer').length === 5")
        shown = {"rows": page.eval_on_selector_all("#answers .answer", "rows => rows.map(r => ["
                                                   "r.querySelector('.name').textContent, "
                                                   "parseFloat(r.querySelector('.fill').style.width)])"),
                 "latency": page.text_content("#latency")}
    expected = json.loads(EXPECTED.read_text())["predictions"][str(q["question_id"])]
    _, _, reply = ask_json(server, q)
    assert [name for name, _ in shown["rows"]] == [t["answer"] for t in reply["top_k"]]
    assert shown["rows"][0][0] == expected["answer"]
    widths = [w for _, w in shown["rows"]]
    assert widths == sorted(widths, reverse=True) and 0 < sum(widths) <= 100.5
    assert widths[0] == pytest.approx(100 * reply["top_k"][0]["probability"], abs=0.06)
    assert shown["latency"].startswith("server ") and " ms" in shown["latency"]


def test_engine_ask_prints_the_answer_and_top_k_and_refuses_bad_input_in_one_line(shards: Path,
                                                                                   tmp_path: Path) -> None:
    """At tp 1 in this process (test_serve_beit3 asks at tp 2)."""
    from _run import invoke_refused, run_here
    from engine.ask import main as ask_main

    q = QUESTIONS[5]
    image = RAW / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg"
    shard_here(CHECKPOINT, 1, tmp_path / "tp1")
    ran = run_here(ask_main, ["--shards", tmp_path / "tp1", "--answers", ANSWERS, "--image", image,
                              "--question", q["question"], "--device", "cpu", "--top-k", 3, "--json"])
    assert ran.returncode == 0, ran.stderr
    (line,) = ran.stdout.splitlines()
    result = json.loads(line)
    expected = json.loads(EXPECTED.read_text())["predictions"][str(q["question_id"])]
    assert (result["answer"], result["label"]) == (expected["answer"], expected["label"])
    assert len(result["top_k"]) == 3 and result["top_k"][0]["answer"] == expected["answer"]
    invoke_refused(ask_main, ["--shards", shards, "--answers", ANSWERS, "--image", ANSWERS, "--question", "what?"],
                   "cannot decode image", str(ANSWERS))
    invoke_refused(ask_main, ["--shards", shards, "--image", image, "--question", "what?"], "--answers")


def test_engine_ask_bounds_images_by_its_own_max_image_pixels(shards: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit its message names is its own option, and Pillow's guard agrees with it (a bomb far over it)."""
    from _run import invoke_refused
    from engine.ask import DEFAULT_MAX_PIXELS, main as ask_main

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # engine.ask sets it for its process
    photo = RAW / "val2014" / f"COCO_val2014_{QUESTIONS[0]['image_id']:012d}.jpg"
    base = ["--shards", shards, "--answers", ANSWERS, "--question", "what?", "--device", "cpu"]
    invoke_refused(ask_main, [*base, "--image", photo, "--max-image-pixels", 100], str(photo),
                   "pixels exceeds --max-image-pixels 100")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(60000, 60000))
    invoke_refused(ask_main, [*base, "--image", bomb], str(bomb),
                   f"image of 3600000000 pixels exceeds --max-image-pixels {DEFAULT_MAX_PIXELS} (a decompression bomb)")


def test_loadgen_reports_latency_percentiles_and_rate_against_the_server(server: Server, tmp_path: Path) -> None:
    from _run import run_here
    from engine.loadgen import main as loadgen_main

    out = tmp_path / "load.json"  # loadgen in this process: a client needs no process of its own here
    ran = run_here(loadgen_main, ["--url", server.url, "--data", GOLDEN / "vqav2_arrow_published", "--split", "val",
                                  "--requests", 12, "--rate", 40, "--concurrency", 4, "--endpoint", "chat",
                                  "--json", out])
    assert ran.returncode == 0, ran.stderr
    report = json.loads(out.read_text())
    assert (report["requests"], report["ok"], report["errors"], report["offered_rate"]) == (12, 12, {}, 40)
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] and report["requests_per_s"] > 0
    assert "req/s" in ran.stdout and "p99" in ran.stdout
    refused = run_here(loadgen_main, ["--url", server.url, "--data", tmp_path, "--requests", 1, "--rate", "inf"])
    assert refused.returncode == 1 and refused.stderr.startswith("error: missing arrow file")


def test_loadgen_arrivals_are_poisson_with_the_requested_rate() -> None:
    from engine.serving.client import arrival_times

    times = arrival_times(20000, 8.0, seed=1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and all(g >= 0 for g in gaps)
    mean = sum(gaps) / len(gaps)
    assert mean == pytest.approx(1 / 8, rel=0.03)
    # exponential gaps: standard deviation equals the mean, and P(gap > mean) = 1/e
    std = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert std == pytest.approx(mean, rel=0.05)
    assert sum(g > mean for g in gaps) / len(gaps) == pytest.approx(0.3679, abs=0.015)
    assert arrival_times(5, float("inf"), seed=0) == [0.0] * 5
    assert arrival_times(50, 8.0, seed=1) == times[:50]


def test_serve_refuses_in_one_line_before_loading(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from _run import invoke_refused
    from engine.serve import main as serve_main

    base = ["--shards", shards, "--answers", ANSWERS, "--device", "cpu"]
    for world in ("1", "4"):  # one server is one model copy: exactly tp processes
        monkeypatch.setenv("WORLD_SIZE", world)
        invoke_refused(serve_main, base, "cut for tp 2", "--nproc-per-node 2", f"not {world} processes")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    invoke_refused(serve_main, base[:2] + base[4:], "--answers: required for a VQA checkpoint")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        invoke_refused(serve_main, [*base, "--port", taken.getsockname()[1]], "cannot listen on 127.0.0.1:")
