"""engine.index: the published text→image recalls from searching an index of the golden COCO test images (tp 2,
--data form), the golden image embeddings of VLMo and BEiT-3 from a folder of faulty files, a killed build that
resumes with each image once, `add`, approximate kinds, and what is refused."""
from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from _beit3 import BEIT3, cut
from _datatools import read_arrow
from _paths import GOLDEN, REPO, needs
from _run import _env, invoke_refused, run_torchrun, shard_here
from engine.data.karpathy import write_karpathy
from engine.index.__main__ import main as index_main
from engine.index.store import all_vectors, new_faiss, not_indexed, open_store, recall_vs_exact, work_dir
from engine.tasks.metrics import RECALL_KS

RAW = GOLDEN / "coco_raw"
CASE = GOLDEN / "tiny_relpos_irtr_e2e"
EXPECTED = GOLDEN / "retrieval_e2e_expected.json"
TEST_SPLIT = "coco_caption_karpathy_test.arrow"

pytestmark = [needs(CASE), needs(EXPECTED), needs(RAW)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("index-shards")
    for tp in (1, 2):
        shard_here(CASE / "checkpoint.pt", tp, root / f"tp{tp}")
    return {tp: root / f"tp{tp}" for tp in (1, 2)}


def invoke(*args: object) -> str:
    """`python -m engine.index ARGS` in this process (tp 1); its stdout."""
    result = CliRunner().invoke(index_main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def golden_pngs(case: Path, folder: Path, names: Sequence[str]) -> List[Path]:
    """The golden inputs' images (normalised [B, 3, 64, 64], on the uint8 grid) as lossless files: the engine's
    transform gives back exactly those tensors (no resize at 64 × 64)."""
    images = load_file(str(case / "inputs.safetensors"))["image"]
    paths = []
    for name, image in zip(names, images):
        pixels = ((image * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, lossless=True) if name.endswith(".webp") else Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def vectors_by_path(index: Path) -> dict:
    store = open_store(index)
    return dict(zip(store.items.column("path").to_pylist(), all_vectors(store.index)))


# ---------------------------------------------------------------- COCO, tp 2, --data form


@pytest.fixture(scope="module")
def coco(shards: dict, tmp_path_factory) -> dict:
    """An index of the COCO test split written from coco_raw, built and searched at tp 2 with every caption and
    one image as queries."""
    root = tmp_path_factory.mktemp("coco-index")
    write_karpathy("coco", RAW, root / "arrow")
    table = read_arrow(root / "arrow" / TEST_SPLIT)
    captions = [(c, image_id) for image_id, row in zip(table.column("image_id").to_pylist(),
                                                         table.column("caption").to_pylist()) for c in row]
    (root / "captions.txt").write_text("".join(c + "\n" for c, _ in captions))
    index = root / "index"
    built = run_torchrun(2, "engine.index", ["build", "--shards", shards[2], "--data", root / "arrow", "--dataset",
                                             "coco", "--split", "test", "--out", index, "--device", "cpu",
                                             "--batch-size", 4, "--num-workers", 1])
    assert built.returncode == 0, built.stderr
    query_image = RAW / "val2014" / table.column("image_id")[5].as_py()
    found = run_torchrun(2, "engine.index", ["search", "--shards", shards[2], "--index", index, "--queries",
                                             root / "captions.txt", "--image", query_image, "--top-k", 10, "--json",
                                             "--device", "cpu"])
    assert found.returncode == 0, found.stderr
    lines = [json.loads(line) for line in found.stdout.splitlines() if line.startswith("{")]
    return {"index": index, "table": table, "captions": captions, "results": lines, "image": query_image,
            "build_log": built.stdout + built.stderr}


def test_text_to_image_search_gives_the_published_recalls(coco: dict) -> None:
    expected = json.loads(EXPECTED.read_text())
    results = coco["results"][:-1]
    assert [r["query"]["text"] for r in results] == [c for c, _ in coco["captions"]]
    for k in RECALL_KS:
        hits = [image_id in [found["path"] for found in r["results"][:k]]
                for r, (_, image_id) in zip(results, coco["captions"])]
        assert sum(hits) / len(hits) == pytest.approx(expected[f"ir_r{k}"], abs=1e-6), k
    scores = [found["score"] for found in results[0]["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 10


def test_the_index_holds_each_image_of_the_split_with_its_checkpoint(coco: dict) -> None:
    store = open_store(coco["index"])
    table = coco["table"]
    assert sorted(store.items.column("path").to_pylist()) == sorted(table.column("image_id").to_pylist())
    for item in store.items.to_pylist():
        assert store.image_bytes(store.items.column("path").to_pylist().index(item["path"])) == \
            (RAW / "val2014" / item["path"]).read_bytes()
        assert item["format"] == "JPEG" and item["file"].endswith(TEST_SPLIT)
    manifest = json.loads((CASE.parent / "tiny_relpos_irtr_e2e" / "case.json").read_text())
    assert store.meta["count"] == 12 and store.meta["kind"] == "flat" and store.meta["dim"] == manifest["embed_dim"]
    assert store.meta["checkpoint"]["sha256"] and not_indexed(coco["index"]) == []
    assert "images/s" in coco["build_log"] and "ETA" in coco["build_log"]
    # the image query finds itself first, at inner product 1 (unit vectors)
    [best, *_] = coco["results"][-1]["results"]
    assert best["path"] == coco["image"].name and best["score"] == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- a folder of faulty files (VLMo), add, kinds


@pytest.fixture(scope="module")
def folder_index(shards: dict, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("folder-index")
    photos = root / "photos"
    good = golden_pngs(CASE, photos, ["a.png", "sub/b.png", "sub/deeper/c.webp", "d.png"])
    shutil.copy(good[0], photos / "sub" / "copy-of-a.png")  # same bytes
    (photos / "notes.txt").write_text("not an image\n")
    (photos / "empty.jpg").write_bytes(b"")
    jpeg = (RAW / "val2014").glob("*.jpg").__next__().read_bytes()
    (photos / "sub" / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 3])
    os.symlink("..", photos / "sub" / "loop")  # a folder link back up: a loop
    os.symlink("self", photos / "self")  # a link to itself
    os.symlink("nowhere.png", photos / "dangling.png")
    os.mkfifo(photos / "pipe")  # reading it would block for ever
    index = root / "index"
    out = invoke("build", "--shards", shards[1], "--images", photos, "--out", index, "--device", "cpu",
                 "--num-workers", 0, "--batch-size", 3)
    return {"root": root, "photos": photos, "good": good, "index": index, "out": out}


def test_a_folder_is_indexed_with_the_golden_embeddings_and_every_faulty_file_listed(folder_index: dict) -> None:
    photos, index = folder_index["photos"], folder_index["index"]
    vectors = vectors_by_path(index)
    expected = load_file(str(CASE / "expected.safetensors"))["image_feats"]
    assert sorted(vectors) == sorted(map(str, folder_index["good"]))
    for path, feats in zip(folder_index["good"], expected):
        assert np.abs(vectors[str(path)] - feats.numpy()).max() < 1e-4, path
    store = open_store(index)
    a = store.items.column("path").to_pylist().index(str(photos / "a.png"))
    assert store.item(a)["duplicates"] == [str(photos / "sub" / "copy-of-a.png")]
    assert store.image_bytes(a) == (photos / "a.png").read_bytes()
    reasons = {Path(s["path"]).relative_to(photos).as_posix(): s["reason"] for s in not_indexed(index)}
    assert set(reasons) == {"notes.txt", "empty.jpg", "sub/truncated.jpg", "sub/loop", "self", "dangling.png", "pipe"}
    for name, words in {"notes.txt": "not an image", "empty.jpg": "empty", "sub/truncated.jpg": "truncated",
                        "sub/loop": "loop", "self": "loop", "dangling.png": "broken", "pipe": "not a regular"}.items():
        assert words in reasons[name], (name, reasons[name])
    assert "4 images (flat), 1 duplicate files, 7 files not indexed" in folder_index["out"]
    assert all(f"not indexed: {photos / name}" in folder_index["out"] for name in reasons)
    described = json.loads(invoke("info", "--index", index, "--json"))
    assert described["not_indexed"] == not_indexed(index) and described["count"] == 4


def test_add_embeds_only_new_images_and_keeps_the_ids(folder_index: dict, shards: dict, tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(folder_index["index"], index)
    before = open_store(index).items.to_pylist()
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(folder_index["good"][1], more / "again-b.png")
    new = RAW / "val2014" / sorted(p.name for p in (RAW / "val2014").glob("*.jpg"))[0]
    shutil.copy(new, more / "new.jpg")
    out = invoke("add", "--shards", shards[1], "--images", more, "--index", index, "--device", "cpu",
                 "--num-workers", 0)
    assert "embedded 1 images" in out
    store = open_store(index)
    after = store.items.to_pylist()
    assert [i["path"] for i in after[:len(before)]] == [i["path"] for i in before]
    assert after[-1]["path"] == str(more / "new.jpg") and len(after) == len(before) + 1
    b = [i["path"] for i in after].index(str(folder_index["good"][1]))
    assert after[b]["duplicates"] == [str(more / "again-b.png")]
    found = json.loads(invoke("search", "--shards", shards[1], "--index", index, "--image", new, "--json",
                              "--device", "cpu").splitlines()[0])
    assert found["results"][0]["id"] == len(after) - 1 and found["results"][0]["score"] == pytest.approx(1, abs=1e-5)
    assert not work_dir(index).exists()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_measure_their_recall_against_exact_search(kind: str) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = new_faiss(kind, vectors)
    measured = recall_vs_exact(index, vectors, sample=200)
    # independently: brute-force top 10 in numpy for the same sampled queries
    queries = vectors[np.random.default_rng(0).choice(len(vectors), size=200, replace=False)]
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    _, found = index.search(queries, 10)
    assert measured["recall"] == pytest.approx(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))
    assert 0.5 < measured["recall"] <= 1.0
    assert recall_vs_exact(new_faiss("flat", vectors), vectors, sample=200)["recall"] == 1.0
    assert np.allclose(all_vectors(index), vectors)


def test_build_of_an_approximate_kind_prints_its_recall(folder_index: dict, shards: dict, tmp_path: Path) -> None:
    out = invoke("build", "--shards", shards[1], "--images", folder_index["photos"], "--out", tmp_path / "hnsw",
                 "--kind", "hnsw", "--device", "cpu", "--num-workers", 0)
    assert "recall@4 against exact search: 1.0000 over 4 sampled images (hnsw, M 32, ef_search 64)" in out
    assert open_store(tmp_path / "hnsw").meta["recall_vs_exact"]["recall"] == 1.0


# ---------------------------------------------------------------- a killed build


def test_a_killed_build_resumes_and_ends_with_each_image_once(shards: dict, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photos / f"{i:03d}.png")
    args = ["build", "--shards", shards[1], "--images", photos, "--out", tmp_path / "index", "--device", "cpu",
            "--batch-size", 1, "--chunk-size", 5, "--num-workers", 0]
    job = subprocess.Popen([sys.executable, "-m", "engine.index", *map(str, args)], cwd=REPO, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    chunk = work_dir(tmp_path / "index") / "chunk-000002.safetensors"
    try:
        deadline = time.monotonic() + 120
        while not chunk.exists():
            assert job.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "no chunk after 120 s"
            time.sleep(0.005)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert not (tmp_path / "index").exists()  # nothing that looks like an index
    other = tmp_path / "other"
    shard_here(GOLDEN / "tiny_relpos_irtr" / "checkpoint.pt", 1, other)
    invoke_refused(index_main, [*args, "--shards", other], "holds an interrupted build", "rerun that command")
    result = CliRunner().invoke(index_main, [str(a) for a in [*args, "--batch-size", 10]])  # the last one counts
    assert result.exit_code == 0, result.output
    assert "continuing the interrupted build" in result.output
    embedded = int(result.stdout.split("embedded ")[1].split()[0])
    assert 0 < embedded <= 60 - 15
    resumed = open_store(tmp_path / "index").items.column("path").to_pylist()
    assert sorted(resumed) == sorted(str(p) for p in photos.iterdir())  # each image once
    fresh = tmp_path / "fresh"
    invoke(*args[:5], "--out", fresh, *args[7:], "--chunk-size", 1000, "--batch-size", 10)
    ours, theirs = vectors_by_path(tmp_path / "index"), vectors_by_path(fresh)
    assert all(np.abs(ours[p] - theirs[p]).max() < 1e-6 for p in theirs)


# ---------------------------------------------------------------- BEiT-3


@needs(BEIT3)
def test_a_beit3_index_holds_the_golden_embeddings_and_ranks_by_the_golden_scores(tmp_path: Path) -> None:
    case = BEIT3 / "tiny_beit3_retrieval"
    cut("tiny_beit3_retrieval", 1, tmp_path / "shards")
    paths = golden_pngs(case, tmp_path / "photos", [f"{i}.png" for i in range(4)])
    invoke("build", "--shards", tmp_path / "shards", "--images", tmp_path / "photos", "--out", tmp_path / "index",
           "--device", "cpu", "--num-workers", 0)
    expected = load_file(str(case / "expected.safetensors"))
    vectors = vectors_by_path(tmp_path / "index")
    for path, feats in zip(paths, expected["image_feats"]):
        assert np.abs(vectors[str(path)] - feats.numpy()).max() < 1e-4
    texts = json.loads((case / "case.json").read_text())["texts"]
    out = invoke("search", "--shards", tmp_path / "shards", "--index", tmp_path / "index", "--tokenizer",
                 BEIT3 / "tokenizer.spm", *[a for t in texts for a in ("--text", t)], "--json", "--device", "cpu")
    scores = expected["text_feats"] @ expected["image_feats"].T
    for line, row in zip(out.splitlines(), scores):
        found = json.loads(line)["results"]
        assert [r["path"] for r in found] == [str(paths[i]) for i in row.argsort(descending=True)]
        assert [r["score"] for r in found] == pytest.approx(row.sort(descending=True).values.tolist(), abs=1e-4)
    # an image query reads no text: no --tokenizer needed; a text query without one is refused in one line
    out = invoke("search", "--shards", tmp_path / "shards", "--index", tmp_path / "index", "--image", paths[2],
                 "--json", "--device", "cpu")
    row = expected["image_feats"] @ expected["image_feats"][2]
    found = json.loads(out)["results"]
    assert [r["path"] for r in found] == [str(paths[i]) for i in row.argsort(descending=True)]
    assert found[0]["score"] == pytest.approx(1.0, abs=1e-4)
    refused = CliRunner().invoke(index_main, ["search", "--shards", str(tmp_path / "shards"), "--index",
                                              str(tmp_path / "index"), "--text", texts[0], "--device", "cpu"])
    assert refused.exit_code != 0 and "pass --tokenizer beit3.spm" in refused.output


# ---------------------------------------------------------------- refusals


def test_a_query_through_another_checkpoint_and_bad_arguments_are_refused(folder_index: dict, shards: dict,
                                                                           tmp_path: Path) -> None:
    other = tmp_path / "other"
    shard_here(GOLDEN / "tiny_relpos_irtr" / "checkpoint.pt", 1, other)
    index, photos = folder_index["index"], folder_index["photos"]
    invoke_refused(index_main, ["search", "--shards", other, "--index", index, "--text", "a dog"],
                   "was built with checkpoint", "cannot be compared")
    invoke_refused(index_main, ["add", "--shards", other, "--index", index, "--images", photos],
                   "was built with checkpoint")
    invoke_refused(index_main, ["build", "--shards", shards[1], "--images", photos, "--out", index],
                   "exists", "--overwrite")
    invoke_refused(index_main, ["build", "--shards", shards[1], "--images", photos / "a.png", "--out",
                                tmp_path / "x"], "not a folder")
    invoke_refused(index_main, ["search", "--shards", shards[1], "--index", index, "--image", photos / "notes.txt"],
                   "notes.txt", "cannot decode")
    invoke_refused(index_main, ["search", "--shards", shards[1], "--index", photos, "--text", "a"],
                   "not an index")
    vqa = tmp_path / "vqa"
    shard_here(GOLDEN / "tiny_relpos_vqa" / "checkpoint.pt", 1, vqa)
    invoke_refused(index_main, ["build", "--shards", vqa, "--images", photos, "--out", tmp_path / "y"],
                   "no retrieval head")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------- engine.serve --index


@pytest.fixture(scope="module")
def server(coco: dict, shards: dict):
    from _serve import Server

    running = Server(2, ["--shards", shards[2], "--index", coco["index"], "--dtype", "fp32", "--max-wait-ms", 50])
    yield running
    running.kill()


def test_search_over_http_answers_as_the_cli_does(server, coco: dict) -> None:
    from _vqa_requests import b64

    for line in coco["results"][:4]:
        status, _, reply = server.post_json("/v1/search", {"text": line["query"]["text"], "top_k": 10})
        assert status == 200, reply
        assert [(r["id"], r["path"]) for r in reply["results"]] == [(r["id"], r["path"]) for r in line["results"]]
        assert [r["score"] for r in reply["results"]] == pytest.approx([r["score"] for r in line["results"]],
                                                                       abs=1e-5)
        assert reply["latency_ms"] > 0
    status, _, reply = server.post_json("/v1/search", {"image": b64(coco["image"].read_bytes()), "top_k": 3})
    assert status == 200, reply
    assert [r["id"] for r in reply["results"]] == [r["id"] for r in coco["results"][-1]["results"][:3]]
    status, _, reply = server.post_json("/v1/search", {"text": "a red circle"})
    assert status == 200 and len(reply["results"]) == 10  # the default top_k


def test_only_indexed_images_are_served_by_id(server, coco: dict) -> None:
    [best] = server.post_json("/v1/search", {"text": coco["captions"][0][0], "top_k": 1})[2]["results"]
    status, kind, raw = _get_bytes(server, f"/v1/images/{best['id']}")
    assert (status, kind) == (200, "image/jpeg") and raw == (RAW / "val2014" / best["path"]).read_bytes()
    status, kind, small = _get_bytes(server, f"/v1/images/{best['id']}?max_side=32")
    thumbnail = Image.open(io.BytesIO(small))
    assert (status, kind, thumbnail.format) == (200, "image/jpeg", "JPEG") and max(thumbnail.size) <= 32
    for path in ("/v1/images/12", "/v1/images/999999", "/v1/images/-1", "/v1/images/abc",
                 "/v1/images/..%2F..%2Fetc%2Fpasswd", f"/v1/images/{RAW / 'val2014' / best['path']}"):
        status, _, reply = server.get(path)
        assert status == 404 and "error" in reply, (path, reply)
    status, _, reply = server.get(f"/v1/images/{best['id']}?max_side=0")
    assert status == 400 and "max_side" in reply["error"]
    for body in ({}, {"text": "a", "image": "b"}, {"text": ""}, {"text": "a", "top_k": 0}, {"image": "not base64!"}):
        status, _, reply = server.post_json("/v1/search", body)
        assert status == 400 and "error" in reply, (body, reply)


def _get_bytes(server, path: str) -> tuple:
    """(status, content type, body) of a GET whose body is not text."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("content-type"), response.read()
    finally:
        conn.close()


def test_the_search_page_in_a_headless_browser_shows_thumbnails_in_score_order(server, coco: dict) -> None:
    from _browser import chromium_page

    caption = coco["captions"][7][0]
    assert 'href="/search"' in server.get("/")[2]
    with chromium_page() as page:
        page.goto(server.url + "/search")
        page.fill("#query", caption)
        page.fill("#top_k", "5")
        page.click("#submit")
        page.wait_for_function(
            "document.querySelectorAll('#results figure.result').length === 5 && "
            "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        shown = page.eval_on_selector_all("#results figure.result", "figures => figures.map(f => [Number("
                                          "f.dataset.id), f.querySelector('.path').textContent, "
                                          "parseFloat(f.querySelector('.score').textContent)])")
    _, _, reply = server.post_json("/v1/search", {"text": caption, "top_k": 5})
    assert [(i, p) for i, p, _ in shown] == [(r["id"], r["path"]) for r in reply["results"]]
    assert [s for _, _, s in shown] == pytest.approx([round(r["score"], 4) for r in reply["results"]], abs=1e-4)


def test_serve_refuses_an_index_of_another_checkpoint_in_one_line(coco: dict, tmp_path: Path) -> None:
    from engine.serve import main as serve_main

    other = tmp_path / "other"
    shard_here(GOLDEN / "tiny_relpos_irtr" / "checkpoint.pt", 1, other)
    invoke_refused(serve_main, ["--shards", other, "--index", coco["index"], "--port", 0], "was built with checkpoint")
