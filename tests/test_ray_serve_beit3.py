"""engine.ray_serve with a BEiT-3 checkpoint, on the local Ray the command starts itself: one replica at tp 2
answers every golden val question as the published beit3 pipeline does (JSON, multipart, the official OpenAI
client; 8 clients at once), and SIGTERM stops the application and that Ray with it."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from _paths import GOLDEN, needs
from _ray_serve import RayServer, expected_replies, golden_replies, session
from _run import shard_here
from _vqa_requests import ANSWERS, RAW, val_questions

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (make install installs it)")

BEIT3 = GOLDEN / "beit3"
CHECKPOINT = BEIT3 / "tiny_beit3_vqa9" / "checkpoint.pth"
EXPECTED = BEIT3 / "vqa_e2e_expected.json"
SPM = BEIT3 / "tokenizer.spm"
pytestmark = [needs(CHECKPOINT), needs(EXPECTED), needs(RAW), needs(SPM)]


def test_one_replica_at_tp_2_answers_every_golden_question_then_stops_with_its_ray(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shard_here(CHECKPOINT, 2, shards, "--num-heads", 4)
    server = RayServer(["--shards", shards, "--answers", ANSWERS, "--tokenizer", SPM, "--dtype", "fp32",
                        "--max-batch-size", 8, "--max-wait-ms", 50])
    try:
        (model,) = server.get("/v1/models")[2]["data"]
        assert (model["family"], model["tp"], model["max_text_len"]) == ("beit3", 2, 64)
        questions = val_questions()
        calls, got = golden_replies(server, questions)
        assert got == expected_replies(calls, json.loads(EXPECTED.read_text())["predictions"])
        assert len(questions) == 65
        assert len(server.ranks()) == 1  # rank 1, an actor of the command's own Ray
        assert server.stop() == 0, "".join(server.log)
        # the local Ray went down with the command: nothing of its session is left
        deadline = time.monotonic() + 30
        while session(server.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not session(server.proc.pid)
    finally:
        server.kill()
