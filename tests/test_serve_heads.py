"""engine.serve for retrieval and NLVR2 checkpoints (tp 1, `python -m`; the session's servers, conftest's
`head_servers`): /v1/embeddings equals what `engine.retrieval --save-embeddings` writes for the same images and
captions, in both OpenAI encodings, and /v1/nlvr2 equals the model run on evaluation's preprocessing."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _datatools import read_arrow
from _head_servers import CHECKPOINTS, COCO
from _paths import GOLDEN, needs
from _run import run_here
from engine.retrieval import main as retrieval_main

RAW_VAL = GOLDEN / "vqav2_raw" / "val2014"

pytestmark = [needs(COCO), needs(CHECKPOINTS["irtr"]), needs(CHECKPOINTS["nlvr2"]), needs(RAW_VAL)]
LIMIT = 3  # images of the test split (and their captions)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def retrieval(head_servers):
    return head_servers.shards["irtr"], head_servers.servers["irtr"]


def test_embeddings_equal_engine_retrieval_save_embeddings(retrieval, tmp_path: Path) -> None:
    shards, server = retrieval
    saved = tmp_path / "embeddings.safetensors"
    ran = run_here(retrieval_main, ["--shards", shards, "--data", COCO, "--dataset", "coco", "--split", "test",
                                    "--limit", LIMIT, "--device", "cpu", "--num-workers", 0,
                                    "--summary", tmp_path / "summary.json", "--save-embeddings", saved])
    assert ran.returncode == 0, ran.stderr
    want = load_file(str(saved))
    with safe_open(str(saved), framework="pt") as handle:
        captions = json.loads(handle.metadata()["captions"])
    table = read_arrow(COCO / "coco_caption_karpathy_test.arrow")
    images = [table.column("image")[row].as_py() for row in want["image_rows"].tolist()]

    status, _, body = server.post_json("/v1/embeddings", {"model": "x", "images": [b64(i) for i in images]})
    assert status == 200 and body["object"] == "list", body
    got = torch.tensor([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    assert torch.allclose(got, want["image_embeds"], atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(images)), atol=1e-5)

    status, _, body = server.post_json("/v1/embeddings", {"input": captions, "encoding_format": "base64"})
    assert status == 200 and [d["index"] for d in body["data"]] == list(range(len(captions))), body
    got = torch.from_numpy(np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                                     for d in body["data"]]))
    assert torch.allclose(got, want["text_embeds"], atol=1e-5)
    assert body["usage"]["prompt_tokens"] > len(captions)

    status, _, one = server.post_json("/v1/embeddings", {"input": captions[1]})
    assert status == 200 and torch.allclose(torch.tensor(one["data"][0]["embedding"]), want["text_embeds"][1],
                                            atol=1e-5)
    # images inside `input`, as multimodal embedding clients send them, mixed with texts
    mixed = [captions[0], "data:image/jpeg;base64," + b64(images[1]), {"image": b64(images[2])},
             {"image_url": {"url": "data:image/jpeg;base64," + b64(images[0])}}, {"text": captions[2]}]
    status, _, body = server.post_json("/v1/embeddings", {"input": mixed})
    assert status == 200, body
    got = torch.tensor([d["embedding"] for d in body["data"]])
    wanted = torch.stack([want["text_embeds"][0], want["image_embeds"][1], want["image_embeds"][2],
                          want["image_embeds"][0], want["text_embeds"][2]])
    assert torch.allclose(got, wanted, atol=1e-5)


def test_embeddings_refuse_bad_inputs_and_other_heads(retrieval) -> None:
    _, server = retrieval
    for body in ({}, {"input": []}, {"input": [1, 2]}, {"input": [{"video": "x"}]}, {"input": ["a"], "images": ["b"]}, {"images": ["%%"]},
                 {"input": ["a"], "encoding_format": "int8"}):
        status, _, reply = server.post_json("/v1/embeddings", body)
        assert status == 400 and set(reply) == {"error"}, (body, reply)
    status, _, reply = server.post_json("/v1/vqa", {"image": "", "question": "what?"})
    assert status == 404 and "no VQA head" in reply["error"]
    status, _, models = server.get("/v1/models")
    assert models["data"][0]["tasks"] == ["text_embedding", "image_embedding"]


def test_nlvr2_equals_the_model_on_evaluation_preprocessing(head_servers) -> None:
    from engine.data.image import load_image
    from engine.data.text import TextTokenizer
    from engine.runtime.distributed import ParallelContext
    from engine.runtime.loading import load_model

    shards, server = head_servers.shards["nlvr2"], head_servers.servers["nlvr2"]
    paths = sorted(RAW_VAL.iterdir())[:2]
    pair = [p.read_bytes() for p in paths]
    sentence = "The left image contains exactly two shapes."
    model = load_model(shards, ParallelContext(rank=0, world_size=1, tp_size=1, device=torch.device("cpu"),
                                               backend=None), "fp32")
    size = model.cfg.image_size
    text = TextTokenizer(None, model.cfg.max_text_len)([sentence])
    with torch.inference_mode():
        logits = model.nlvr2(text["text_ids"], text["text_masks"], load_image(pair[0], size)[None],
                             load_image(pair[1], size)[None])[0]
    expected = dict(zip(("False", "True"), logits.softmax(-1).tolist()))

    status, _, body = server.post_json("/v1/nlvr2", {"images": [b64(b) for b in pair], "sentence": sentence})
    assert status == 200, body
    assert body["label"] == ("True" if logits[1] > logits[0] else "False")
    assert body["probabilities"] == pytest.approx(expected, abs=1e-5)
    status, _, form = server.post_form("/v1/nlvr2", {"sentence": sentence}, {"image_0": pair[0], "image_1": pair[1]})
    assert status == 200 and form["label"] == body["label"], form
    status, _, reply = server.post_json("/v1/nlvr2", {"images": [b64(pair[0])], "sentence": sentence})
    assert status == 400 and reply["error"].startswith("images: List should have at least 2 items")
