"""engine.ray_serve on one local Ray cluster (2 CPUs) shared by the module: one replica at tp 2 and, separately, two
replicas at tp 1 answer every golden VQAv2 question as the published pipeline does (JSON, multipart, the official
OpenAI client; 8 clients at once); per-replica /health and metrics; SIGTERM drains; a killed rank's replica
answers 503 while the other replica keeps answering, and Ray's replacement answers within 60 s; refusals."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Dict, Set

import pytest

from _int8_replies import compare_replies, val_logits
from _paths import GOLDEN, needs
from _ray_serve import Cluster, RayServer, expected_replies, golden_replies
from _run import invoke_refused, run_module, shard_here
from _serve import in_parallel, png_header
from _vqa_requests import ANSWERS, RAW, ask_json, b64, val_questions

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (make install installs it)")

EXPECTED = GOLDEN / "vqa_e2e_expected.json"
CHECKPOINT = GOLDEN / "tiny_relpos_vqa9" / "checkpoint.pt"
pytestmark = [needs(CHECKPOINT), needs(EXPECTED), needs(RAW)]
QUESTIONS = val_questions()
COMMON = ["--answers", ANSWERS, "--dtype", "fp32", "--timeout", 20]


def predictions() -> dict:
    return json.loads(EXPECTED.read_text())["predictions"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Dict[int, Path]:
    out = {}
    for tp in (1, 2):
        out[tp] = tmp_path_factory.mktemp("ray_serve") / f"tp{tp}"
        shard_here(CHECKPOINT, tp, out[tp])
    return out


@pytest.fixture(scope="module")
def cluster():
    running = Cluster()
    yield running
    running.stop()


def replica_metrics(server: RayServer) -> Dict[str, float]:
    """replica → its /v1/vqa 200 count, from one /metrics answer (the proxy picks the replica)."""
    text = server.get("/metrics")[2]
    found = re.findall(r'vlmo_requests_total\{endpoint="/v1/vqa",replica="([^"]+)",status="200"\} (\S+)', text)
    return {replica: float(count) for replica, count in found}


def seen_replicas(server: RayServer, tries: int = 30) -> Set[str]:
    return {server.get("/health")[2].get("replica") for _ in range(tries)} - {None}


class TestOneReplicaAtTp2:
    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, shards, cluster):
        running = RayServer(["--shards", shards[2], *COMMON, "--max-batch-size", 8, "--max-wait-ms", 1000,
                             "--max-body-bytes", 200_000], cluster)
        yield running
        running.kill()

    def test_every_golden_question_over_json_multipart_and_openai_with_8_clients(self, server: RayServer) -> None:
        status, _, body = server.get("/v1/models")
        (model,) = body["data"]
        assert status == 200 and (model["family"], model["tp"], model["dtype"], model["answers"]) == ("vlmo", 2,
                                                                                                      "fp32", 9)
        status, _, health = server.get("/health")
        assert status == 200 and health["status"] == "ok" and health["replicas"] == {"running": 1}
        calls, got = golden_replies(server, QUESTIONS)
        assert got == expected_replies(calls, predictions())
        assert len(QUESTIONS) == 65
        # the replica batched: its batch-size histogram saw batches of more than one request
        text = server.get("/metrics")[2]
        assert float(re.search(r'vlmo_batch_size_bucket\{le="1.0",replica="[^"]+"\} (\S+)', text).group(1)) < \
            float(re.search(r'vlmo_batch_size_count\{replica="[^"]+"\} (\S+)', text).group(1))

    def test_the_replicas_bounds_and_errors_are_engine_serves(self, server: RayServer) -> None:
        cases = [(413, server.request("POST", "/v1/vqa", b"x" * 250_000, {"content-type": "application/json"})),
                 (400, server.post_json("/v1/vqa", {"question": "what?"})),
                 (404, server.post_json("/v1/nlvr2", {"images": [], "sentence": "two cats"})),
                 (404, server.get("/v1/nothing"))]
        for want, (status, _, body) in cases:
            assert status == want and set(body) == {"error"}, (want, status, body)
        # Pillow's own bomb guard is the replica's --max-image-pixels (default 40 M): it refuses an image over
        # twice that in Image.open, as in engine.serve; with Pillow's default (89.5 M) the header check would answer
        status, _, body = server.post_json("/v1/vqa", {"image": b64(png_header(9000, 9000)), "question": "what?"})
        assert status == 413 and body["error"] == ("image: image of 81000000 pixels exceeds --max-image-pixels "
                                                   "40000000 (a decompression bomb)"), body

    def test_sigterm_answers_the_requests_in_flight_then_exits_0(self, server: RayServer) -> None:
        replies: Dict[int, tuple] = {}
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, ask_json(server, QUESTIONS[i])))
                   for i in range(2)]
        for t in threads:
            t.start()
        # both wait in the batcher (a batch of 8 waits up to 1 s to fill) when SIGTERM comes
        server.wait_until(lambda: "vlmo_queue_depth" in (text := server.get("/metrics")[2]) and re.search(
            r'vlmo_queue_depth\{replica="[^"]+"\} 2\.0', text), 30, every=0.02)
        assert server.stop() == 0, "".join(server.log)
        for t in threads:
            t.join()
        want = predictions()
        for i in range(2):
            assert replies[i][0] == 200 and replies[i][2]["answer"] == want[str(QUESTIONS[i]["question_id"])]["answer"]
        assert any(line.startswith("draining:") for line in server.log)
        # the cluster's proxy stays; with no application it answers in engine.serve's shape too
        status, _, body = server.get("/health")
        assert status == 404 and set(body) == {"error"}, body
        server.wait_until(lambda: not server.ranks(), 30)  # the group's other rank stopped with its replica


def test_two_replicas_at_tp_1_answer_every_golden_question_each_with_its_own_metrics(shards, cluster) -> None:
    server = RayServer(["--shards", shards[1], *COMMON, "--replicas", 2, "--max-batch-size", 8,
                        "--max-wait-ms", 50], cluster)
    try:
        calls, got = golden_replies(server, QUESTIONS)
        assert got == expected_replies(calls, predictions())
        assert server.get("/health")[2]["replicas"] == {"running": 2}
        # each replica counts what it answered, under its own label; together every VQA request once
        counts: Dict[str, float] = {}
        server.wait_until(lambda: counts.update(replica_metrics(server)) or len(counts) == 2, 30, every=0.05)
        assert sum(counts.values()) == 2 * len(QUESTIONS) and min(counts.values()) > 0, counts
        assert seen_replicas(server) == set(counts)
        assert server.stop() == 0
    finally:
        server.kill()


def test_a_rank_that_dies_or_hangs_fails_its_replica_with_503_the_other_answers_and_ray_replaces_it(
        shards, cluster) -> None:
    timeout_s = 6  # a hung rank is noticed by the --timeout watchdog
    # Serve stops a failed replica after three failed health checks in a row: 1.5 s after its fault here (6 s by
    # default)
    server = RayServer(["--shards", shards[2], *COMMON, "--replicas", 2, "--cpus-per-rank", 0.5, "--max-wait-ms", 5,
                        "--timeout", timeout_s, "--health-check-period", 0.5], cluster)
    want = predictions()
    try:
        for fault, questions in ((signal.SIGKILL, QUESTIONS[:20]), (signal.SIGSTOP, QUESTIONS[20:40])):
            before = server.wait_until(lambda: len(seen := seen_replicas(server, 10)) == 2 and seen, 30)
            ranks = server.ranks()
            assert len(ranks) == 2, ranks  # rank 1 of each replica
            os.kill(ranks[0], fault)
            began = time.monotonic()
            during = in_parallel([lambda q=q: (time.monotonic(), ask_json(server, q)) for q in questions], 4)
            statuses = []
            for q, reply in zip(questions, during):
                assert not isinstance(reply, Exception), reply  # none hung (the client gives up after 60 s)
                _, (status, headers, body) = reply
                statuses.append(status)
                if status == 200:  # the other replica
                    assert body["answer"] == want[str(q["question_id"])]["answer"]
                else:
                    assert status == 503 and headers["retry-after"] == "1" and set(body) == {"error"}, body
            assert 200 in statuses and max(t for t, _ in during) - began < timeout_s + 20, (fault, statuses)

            # Ray replaces the failed replica: two running again, one of them new, and it answers right
            def replaced() -> bool:
                now = seen_replicas(server, 10)
                return len(now) == 2 and bool(now - before) and server.get("/health")[2]["replicas"] == {
                    "running": 2}

            server.wait_until(replaced, 60)
            assert time.monotonic() - began < 60, fault
            assert len(server.ranks()) == 2  # the failed rank went with its replica; the new one has its own
            after = in_parallel([lambda q=q: ask_json(server, q) for q in questions], 4)
            assert [(s, b["answer"]) for s, _, b in after] == [(200, want[str(q["question_id"])]["answer"])
                                                               for q in questions]
            new = server.wait_until(lambda: {r: n for r, n in replica_metrics(server).items() if r not in before},
                                    30, every=0.05)
            assert sum(new.values()) > 0  # the replacement itself answered some of them
    finally:
        server.kill()


def test_int8_calibrated_replica_at_tp_2_answers_as_int8_calibrated_here(shards, cluster) -> None:
    """Every rank of the replica reads --calibration again on its node: the replica's model card names the samples
    it read, and its answers are those of a tp-1 int8 model calibrated on them in this process."""
    from engine.data.vqav2 import answer_table
    from engine.runtime.shards import read_manifest
    from engine.tasks.calibration import read_calibration
    from engine.tasks.tokenizers import make_tokenizer

    arrow = GOLDEN / "vqav2_arrow_published"
    train = arrow / "vqav2_train.arrow"
    cfg = read_manifest(shards[1]).config
    calibration = read_calibration(train, 16, "int8", "vqa", cfg, make_tokenizer(cfg, None, None))
    logits = val_logits(shards[1], arrow, "int8", calibration.batches())
    server = RayServer(["--shards", shards[2], *COMMON, "--dtype", "int8", "--calibration", train,
                        "--calibration-samples", 16, "--max-wait-ms", 1], cluster)
    try:
        assert any(line.startswith("ready: ") and f"on cpu, int8 calibrated on 16 samples of {train})" in line
                   for line in server.log), server.log
        (card,) = server.get("/v1/models")[2]["data"]
        assert card["dtype"] == "int8" and card["calibration"] == calibration.identity
        # tp 2 rounds each rank's share of a row-parallel input apart: tp 1's logits move by a few hundredths
        table = answer_table(ANSWERS, cfg.vqa_labels)
        answers = {q: table[int(row.argmax())] for q, row in logits.items()}
        compare_replies(server, answers, logits, 0.02, 0.09)
        assert server.stop() == 0
    finally:
        server.kill()


def test_the_group_spec_carries_the_commands_engine_settings_which_each_rank_applies(monkeypatch) -> None:
    """Set or unset where the command runs, so on every rank, whatever the rank's node had."""
    from engine.serving.ray_app import GroupSpec, launch_settings

    monkeypatch.setenv("VLMO_INT8_SMOOTHING", "0")
    monkeypatch.setenv("VLMO_TP_SHM", "0")
    monkeypatch.delenv("VLMO_INT8_FLOAT_LAYERS", raising=False)
    settings = launch_settings()
    assert settings == {"VLMO_INT8_SMOOTHING": "0", "VLMO_INT8_FLOAT_LAYERS": None, "VLMO_TP_SHM": "0"}
    monkeypatch.setenv("VLMO_INT8_SMOOTHING", "1")  # as a node's raylet might have them
    monkeypatch.setenv("VLMO_INT8_FLOAT_LAYERS", "3")
    monkeypatch.delenv("VLMO_TP_SHM")
    GroupSpec(Path("s"), None, 2, "cpu", "int8", 1, 20.0, settings=settings).apply_settings()
    assert launch_settings() == settings


def test_every_rank_of_a_replica_takes_the_commands_int8_settings_not_its_raylets(shards, cluster,
                                                                                  monkeypatch) -> None:
    """VLMO_INT8_FLOAT_LAYERS=4 where only the command runs (the cluster's raylet, whose environment Ray's workers
    get, lacks it): int8 keeps all 4 layers of the checkpoint in fp32, on both ranks of a tp-2 replica, so the
    replies are fp32's; a rank that quantised its half would move the probabilities by about 1e-3."""
    from engine.data.vqav2 import answer_table
    from engine.runtime.shards import read_manifest

    raylet = Path(f"/proc/{cluster.proc.pid}/environ").read_bytes().split(b"\0")
    assert not any(v.startswith(b"VLMO_INT8_FLOAT_LAYERS=") for v in raylet)
    cfg = read_manifest(shards[1]).config
    assert cfg.depth == 4
    logits = val_logits(shards[1], GOLDEN / "vqav2_arrow_published", "fp32")
    table = answer_table(ANSWERS, cfg.vqa_labels)
    monkeypatch.setenv("VLMO_INT8_FLOAT_LAYERS", "4")
    server = RayServer(["--shards", shards[2], *COMMON, "--dtype", "int8", "--max-wait-ms", 1], cluster)
    try:
        (card,) = server.get("/v1/models")[2]["data"]
        assert card["dtype"] == "int8" and card["int8_variant"] == {"smoothing": None, "float_layers": 4}, card
        # tp 2 against tp 1 in fp32: the probabilities agree within 1e-6 (measured)
        compare_replies(server, {q: table[int(row.argmax())] for q, row in logits.items()}, logits, 1e-4, 1e-4)
    finally:
        server.kill()


def test_refusals_come_in_one_line(shards, cluster, monkeypatch) -> None:
    from engine.ray_serve import main

    base = ["--shards", shards[2], "--answers", ANSWERS, "--device", "cpu"]
    invoke_refused(main, ["--shards", shards[2]], "--answers: required for a VQA checkpoint")
    with monkeypatch.context() as env:  # before Ray starts, not from the ranks once the deploy began
        env.setenv("VLMO_INT8_FLOAT_LAYERS", "one")
        invoke_refused(main, [*base, "--dtype", "int8"], "VLMO_INT8_FLOAT_LAYERS='one'", "a number of layers")
    invoke_refused(main, [*base, "--autoscale", "3:1"], "--autoscale 3:1", "MIN <= MAX")
    invoke_refused(main, [*base, "--autoscale", "two"], "expected MIN:MAX")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        invoke_refused(main, [*base, "--port", taken.getsockname()[1]], "cannot listen on 127.0.0.1:")
    # against the cluster: a group that no node can hold is refused before anything deploys
    ran = run_module("engine.ray_serve", [*base, "--address", cluster.address, "--cpus-per-rank", 2], timeout=120)
    errors = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert ran.returncode == 1 and len(errors) == 1, ran.stderr
    assert "one replica needs 2 x {'CPU': 2.0} on one node and the largest node of the Ray cluster holds 1" in errors[0]


def test_the_shipped_serve_configs_are_serve_configs_of_the_commands_options() -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from _paths import REPO
    from engine.ray_serve import build_params, parse_autoscale

    service = yaml.safe_load((REPO / "launch" / "rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    configs = [yaml.safe_load((REPO / "launch" / "ray_serve.yaml").read_text()),
               yaml.safe_load(service["spec"]["serveConfigV2"])]
    for config in configs:
        (app,) = ServeDeploySchema(**config).applications
        assert (app.import_path, app.route_prefix) == ("engine.ray_serve:build", "/")
        params = build_params(app.args)
        assert (params["shard_dir"], params["device"], params["replicas"]) == (Path("/models/vlmo/shards_tp2"),
                                                                             "cuda", 2)
    assert parse_autoscale(build_params(configs[1]["applications"][0]["args"])["autoscale"]) == (1, 4)
    params = build_params({"shards": "s", "dtype": "int8", "calibration": "/data/vqav2_train.arrow",
                           "calibration_samples": 8, "health_check_period": 0.5})  # --calibration too, and the rest
    assert (params["calibration_path"], params["calibration_samples"]) == (Path("/data/vqav2_train.arrow"), 8)
    assert (params["health_check_s"], build_params(app.args)["health_check_s"]) == (0.5, 2.0)
