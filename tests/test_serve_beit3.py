"""engine.serve and engine.ask with a BEiT-3 checkpoint: over real HTTP at tp 2, every golden answer of the published
beit3 pipeline (golden/beit3/vqa_e2e_expected.json) through JSON and chat requests; truncation counted with the
SentencePiece model; a missing --tokenizer refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _paths import GOLDEN, needs
from _run import invoke_refused, run_torchrun, shard_here
from _serve import Server, in_parallel
from _vqa_requests import ANSWERS, RAW, ask_chat, ask_json, val_questions

BEIT3 = GOLDEN / "beit3"
CHECKPOINT = BEIT3 / "tiny_beit3_vqa9" / "checkpoint.pth"
EXPECTED = BEIT3 / "vqa_e2e_expected.json"
SPM = BEIT3 / "tokenizer.spm"
TOKENIZATION = BEIT3 / "tokenization_expected.json"

pytestmark = [needs(CHECKPOINT), needs(EXPECTED), needs(RAW), needs(SPM)]
QUESTIONS = val_questions()


def test_the_tokenizers_count_untruncated_tokens_as_the_published_tokenisation_does() -> None:
    from engine.data.spm import SentencePieceTokenizer
    from engine.data.text import TextTokenizer

    golden = json.loads(TOKENIZATION.read_text())
    spm = SentencePieceTokenizer(SPM, golden["max_len"])
    for text, padding in zip(golden["texts"], golden["padding_mask"]):
        if 1 in padding:  # not cut: the golden length is the whole text's
            assert spm.count(text) == padding.count(0), text
    long = golden["texts"][5]
    assert spm.count(long * 4) > golden["max_len"] == spm([long * 4])["text_masks"].sum()
    wordpiece = TextTokenizer(max_len=8)
    # [CLS] the cat sat [SEP] fits; eleven words do not, and all eleven are counted
    assert wordpiece.count("the cat sat") == 5 and wordpiece.count(" ".join(["cat"] * 11)) == 13


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve_beit3") / "shards"
    shard_here(CHECKPOINT, 2, out, "--num-heads", 4)
    return out


@pytest.fixture(scope="module")
def server(shards: Path):
    running = Server(2, ["--shards", shards, "--answers", ANSWERS, "--tokenizer", SPM, "--dtype", "fp32",
                         "--max-batch-size", 8, "--max-wait-ms", 50, "--timeout", 60])
    yield running
    running.kill()


def test_serve_answers_every_golden_question_as_the_published_beit3_does(server: Server) -> None:
    status, _, body = server.get("/v1/models")
    (model,) = body["data"]
    assert status == 200 and (model["family"], model["tasks"], model["tp"], model["answers"]) == ("beit3", ["vqa"],
                                                                                                   2, 9)
    assert (model["image_size"], model["max_text_len"]) == (64, 64)
    expected = json.loads(EXPECTED.read_text())["predictions"]
    calls = [(fmt, q) for q in QUESTIONS for fmt in (ask_json, ask_chat)]
    replies = in_parallel([lambda f=f, q=q: f(server, q) for f, q in calls], clients=4)
    failed = [reply for reply in replies if isinstance(reply, Exception) or reply[0] != 200]
    assert not failed, failed[:3]

    got = [body["choices"][0]["message"]["content"] if fmt is ask_chat else (body["label"], body["answer"],
                                                                          body["truncated"])
           for (fmt, _), (_, _, body) in zip(calls, replies)]
    want = [expected[str(q["question_id"])]["answer"] if fmt is ask_chat else (
        expected[str(q["question_id"])]["label"], expected[str(q["question_id"])]["answer"], False) for fmt, q in calls]
    assert got == want
    assert len(QUESTIONS) == len(expected) == 65


def test_a_long_question_is_cut_at_64_sentencepiece_tokens_and_says_so(server: Server) -> None:
    from engine.data.spm import SentencePieceTokenizer

    long = " ".join(q["question"] for q in QUESTIONS[:8])
    tokens = SentencePieceTokenizer(SPM).count(long)
    assert tokens > 64
    status, _, body = ask_json(server, dict(QUESTIONS[0], question=long))
    assert status == 200 and body["truncated"] is True
    assert f"the text is {tokens} tokens; truncated to the model's 64" in body["warning"]
    status, _, longer = ask_json(server, dict(QUESTIONS[0], question=long + " and more words past the end"))
    assert [t["label"] for t in longer["top_k"]] == [t["label"] for t in body["top_k"]]


def test_engine_ask_answers_with_the_tokenizer_and_both_commands_refuse_a_beit3_checkpoint_without_it(
        shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.ask import main as ask_main
    from engine.serve import main as serve_main

    q = QUESTIONS[7]
    image = RAW / "val2014" / f"COCO_val2014_{q['image_id']:012d}.jpg"
    ran = run_torchrun(2, "engine.ask", ["--shards", shards, "--answers", ANSWERS, "--tokenizer", SPM, "--image", image,
                                         "--question", q["question"], "--device", "cpu", "--json"])
    assert ran.returncode == 0, ran.stderr
    want = json.loads(EXPECTED.read_text())["predictions"][str(q["question_id"])]
    result = json.loads(ran.stdout)
    assert (result["answer"], result["label"]) == (want["answer"], want["label"])

    invoke_refused(ask_main, ["--shards", shards, "--answers", ANSWERS, "--image", image, "--question", "what?"],
                   "--tokenizer")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    invoke_refused(serve_main, ["--shards", shards, "--answers", ANSWERS, "--device", "cpu"], "--tokenizer")


@pytest.mark.parametrize("case", ["tiny_beit3_nlvr2", "tiny_beit3_retrieval"])
def test_the_served_nlvr2_and_embedding_kinds_give_the_published_beit3_outputs(case: str, tmp_path: Path) -> None:
    """The server's per-kind model call (text_masks, as evaluation passes them) on the golden inputs."""
    import torch
    from safetensors.torch import load_file

    from _beit3 import cut
    from engine.runtime.distributed import ParallelContext
    from engine.runtime.loading import load_model
    from engine.models.tasks import IMAGE_EMBEDDING, NLVR2, TEXT_EMBEDDING, served_tasks
    from engine.serving.tasks import ServedModel

    cfg = cut(case, 1, tmp_path)
    cpu = torch.device("cpu")
    served = ServedModel(load_model(tmp_path, ParallelContext(rank=0, world_size=1, tp_size=1, device=cpu,
                                                              backend=None), "fp32"), cpu)
    inputs = load_file(str(BEIT3 / case / "inputs.safetensors"))
    batch = {**inputs, "text_masks": 1 - inputs["padding_mask"]}  # BEiT-3's padding_mask is 1 on padding
    expected = load_file(str(BEIT3 / case / "expected.safetensors"))
    outputs = {NLVR2: "nlvr2_logits", TEXT_EMBEDDING: "text_feats", IMAGE_EMBEDDING: "image_feats"}
    kinds = served_tasks(cfg)
    assert kinds == ([NLVR2] if case.endswith("nlvr2") else [TEXT_EMBEDDING, IMAGE_EMBEDDING])
    with torch.inference_mode():
        for kind in kinds:
            assert (served.run(kind, batch) - expected[outputs[kind]]).abs().max() <= 1e-4, kind
