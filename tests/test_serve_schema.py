"""engine.serve's API schema and the failures that are no fault of the server: /openapi.json and /docs with the
models of every endpoint, schemathesis against a served VQA, NLVR2 and retrieval checkpoint (no 5xx, no response
outside the schema), deep JSON, 405 with Allow, decompression bombs, a client that disconnects mid-upload, and a
16-bit image answered as the 8-bit picture it shows."""
from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from PIL import Image

from _head_servers import CHECKPOINTS, COCO
from _paths import needs
from _run import _env
from _serve import Server, png_header
from _vqa_requests import ANSWERS, b64, val_questions

pytestmark = [needs(path) for path in CHECKPOINTS.values()] + [needs(ANSWERS), needs(COCO)]
POSTS = ("/v1/vqa", "/v1/chat/completions", "/v1/nlvr2", "/v1/embeddings", "/v1/search")
GETS = ("/", "/health", "/metrics", "/v1/models", "/search", "/v1/images/{ident}")


@pytest.fixture(scope="module")
def servers(head_servers) -> Dict[str, Server]:
    """A tp-1 server per head; the retrieval one also serves an image index (the search endpoints)."""
    return head_servers.servers


def answered(server: Server, path: str) -> float:
    """How many requests to `path` the server answered with 200 (its /metrics)."""
    found = re.search(rf'vlmo_requests_total\{{endpoint="{re.escape(path)}",status="200"\}} (\S+)',
                      server.get("/metrics")[2])
    return float(found.group(1)) if found else 0.0


def test_schemathesis_finds_no_server_error_and_no_response_outside_the_schema(servers: Dict[str, Server],
                                                                               tmp_path: Path) -> None:
    # Every check but "a schema-valid request is accepted": random strings are valid base64-image strings to the
    # schema, not images. Negative cases (schema-violating bodies) must get a documented 4xx.
    cache = tmp_path  # schemathesis keeps its cache in the working directory
    answered_paths = {"vqa": "/v1/vqa", "nlvr2": "/v1/nlvr2", "irtr": "/v1/search"}  # the examples reach the model
    before = {task: answered(server, answered_paths[task]) for task, server in servers.items()}
    runs = {task: subprocess.Popen(
        [str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/openapi.json",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--mode", "all",
         "--phases", "examples,coverage,fuzzing", "--max-examples", "8", "--seed", "1", "--no-color"],
        cwd=cache, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for task, server in servers.items()}
    operations = len(POSTS) + len(GETS)
    for task, run in runs.items():
        output = run.communicate(timeout=240)[0]
        assert run.returncode == 0, f"{task}:\n{output}"
        assert f"{operations} selected / {operations} total" in output, output
        assert " passed" in output and "failed" not in output, output
    for task, server in servers.items():
        metrics = server.get("/metrics")[2]
        assert 'status="500"' not in metrics and "Traceback" not in "".join(server.log), task
        assert answered(server, answered_paths[task]) > before[task], (task, metrics)


def test_openapi_and_docs_describe_every_endpoint_with_its_models(servers: Dict[str, Server]) -> None:
    status, _, schema = servers["vqa"].get("/openapi.json")
    assert status == 200 and schema["openapi"].startswith("3.")
    components = schema["components"]["schemas"]

    def resolved(ref: str) -> dict:
        return components[ref.rsplit("/", 1)[1]]

    assert set(schema["paths"]) == {*GETS, *POSTS}
    for path in POSTS:
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert resolved(body["$ref"])["properties"], path
        reply = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert "latency_ms" in json.dumps(resolved(reply["$ref"])) or "vlmo" in resolved(reply["$ref"])["properties"]
        for refusal in ("400", "404", "413", "503"):
            error = operation["responses"][refusal]["content"]["application/json"]["schema"]
            assert error["$ref"].endswith("/ErrorBody") and resolved(error["$ref"])["required"] == ["error"]
    assert "multipart/form-data" in schema["paths"]["/v1/vqa"]["post"]["requestBody"]["content"]
    assert schema["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    status, headers, page = servers["vqa"].get("/docs")
    assert status == 200 and headers["content-type"].startswith("text/html") and "/openapi.json" in page


def test_a_wrong_method_gets_405_with_allow(servers: Dict[str, Server]) -> None:
    for method, path, allowed in (("GET", "/v1/vqa", "POST"), ("DELETE", "/v1/embeddings", "POST"),
                                  ("POST", "/health", "GET")):
        status, headers, body = servers["vqa"].request(method, path)
        assert status == 405 and allowed in headers["allow"] and set(body) == {"error"}, (method, path)


def test_json_nested_2000_deep_is_a_400_json_error_on_every_endpoint(servers: Dict[str, Server]) -> None:
    deep = ("[" * 2000 + "]" * 2000).encode()
    deep_field = ('{"question": ' + "[" * 5000 + "]" * 5000 + "}").encode()
    for task, path in (("vqa", "/v1/vqa"), ("vqa", "/v1/chat/completions"), ("nlvr2", "/v1/nlvr2"),
                       ("irtr", "/v1/embeddings")):
        for body in (deep, deep_field):
            status, _, reply = servers[task].request("POST", path, body, {"content-type": "application/json"})
            assert status == 400 and set(reply) == {"error"} and "nested too deeply" in reply["error"], (path, reply)


@pytest.mark.parametrize("pixels", [(1200, 1000), (20000, 20000), (60000, 60000)],
                         ids=["over the limit", "over Pillow's own", "far over"])
def test_a_decompression_bomb_gets_413_whatever_its_size(servers: Dict[str, Server], pixels) -> None:
    bomb = png_header(*pixels)
    server = servers["vqa"]
    for status, _, reply in (server.post_json("/v1/vqa", {"image": b64(bomb), "question": "what?"}),
                             server.post_form("/v1/vqa", {"question": "what?"}, {"image": bomb})):
        assert status == 413 and "--max-image-pixels" in reply["error"], reply
    status, _, reply = servers["irtr"].post_json("/v1/embeddings", {"images": [b64(bomb)]})
    assert status == 413, reply


def test_a_client_that_disconnects_mid_upload_is_counted_499_never_500(servers: Dict[str, Server]) -> None:
    server = servers["vqa"]
    starts = {"application/json": b'{"image": "' + b"A" * 5000,
              "multipart/form-data; boundary=x": b'--x\r\nContent-Disposition: form-data; name="image"; '
                                                 b'filename="a.jpg"\r\n\r\n' + b"\xff" * 5000}
    for kind, start in starts.items():
        with socket.create_connection((server.host, server.port)) as conn:
            conn.sendall(f"POST /v1/vqa HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
                         f"Content-Length: 100000\r\n\r\n".encode() + start)
    # the server notices the closed connection while it reads the body
    deadline = time.monotonic() + 10
    while '/v1/vqa",status="499"} 2.0' not in server.get("/metrics")[2] and time.monotonic() < deadline:
        time.sleep(0.05)
    metrics = server.get("/metrics")[2]
    assert '/v1/vqa",status="499"} 2.0' in metrics, metrics
    assert 'status="500"' not in metrics
    log = "".join(server.log)
    assert "Traceback" not in log and "Exception in ASGI" not in log, log
    assert server.get("/health")[0] == 200


def test_a_16_bit_image_gets_the_answer_of_the_8_bit_picture_it_shows(servers: Dict[str, Server]) -> None:
    (question, *_) = val_questions()
    picture = np.asarray(Image.open(io.BytesIO(question["bytes"])).convert("L"))

    def png(array: np.ndarray) -> str:
        out = io.BytesIO()
        Image.fromarray(array).save(out, "PNG")
        return b64(out.getvalue())

    replies = [servers["vqa"].post_json("/v1/vqa", {"image": png(image), "question": question["question"],
                                                    "top_k": 9})
               for image in (picture, picture.astype(np.uint16) * 257)]
    (s8, _, eight), (s16, _, sixteen) = replies
    assert s8 == s16 == 200, replies
    assert sixteen["top_k"] == eight["top_k"]
