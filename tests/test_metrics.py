from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.tasks.metrics import (
    LatencyStats,
    hit_rate,
    nlvr2_accuracy,
    question_vqa_score,
    retrieval_recall,
    vqa_score,
)

GOLDEN = Path("/work/shared/golden")


def test_vqa_score_by_hand():
    preds = [3, 2, 5, 0]
    labels = [[3, 5], [3, 5], [5], []]
    scores = [[1.0, 0.3], [0.6, 0.9], [0.3], []]
    # 1.0 (hit, full score) + 0 (label absent) + 0.3 + 0 (no labels at all)
    assert vqa_score(preds, labels, scores) == pytest.approx(1.3 / 4)
    assert question_vqa_score(5, [3, 5], [1.0, 0.3]) == pytest.approx(0.3)
    assert question_vqa_score(np.int64(3), np.array([3]), np.array([0.9])) == pytest.approx(0.9)


def test_vqa_score_rejects_bad_input():
    with pytest.raises(ValueError):
        question_vqa_score(1, [1, 2], [1.0])
    with pytest.raises(ValueError):
        vqa_score([1, 2], [[1]], [[1.0]])
    with pytest.raises(ValueError):
        vqa_score([], [], [])


def test_hit_rate_by_hand():
    preds = ["2", "red", "yes", "circle"]
    answers = [["2", "3"], ["blue"], ["yes"], []]
    assert hit_rate(preds, answers) == pytest.approx(2 / 4)


def test_vqa_metrics_match_published_pipeline():
    """Score the published pipeline's predictions against the published arrow file."""
    expected_path = GOLDEN / "vqa_e2e_expected.json"
    arrow_path = GOLDEN / "vqav2_arrow_published" / "vqav2_val.arrow"
    if not (expected_path.exists() and arrow_path.exists()):
        pytest.skip("golden VQA data not available")
    import pyarrow as pa

    expected = json.loads(expected_path.read_text())
    table = pa.ipc.open_file(pa.memory_map(str(arrow_path), "r")).read_all().to_pydict()
    truth = {}
    for qids, labels, scores, answers in zip(
        table["question_id"], table["answer_labels"], table["answer_scores"], table["answers"]
    ):
        for qid, lab, sc, ans in zip(qids, labels, scores, answers):
            truth[str(qid)] = (lab, sc, ans)
    preds = expected["predictions"]
    assert set(preds) == set(truth)
    qids = sorted(preds)
    score = vqa_score(
        [preds[q]["label"] for q in qids], [truth[q][0] for q in qids], [truth[q][1] for q in qids]
    )
    hits = hit_rate([preds[q]["answer"] for q in qids], [truth[q][2] for q in qids])
    assert score == pytest.approx(expected["vqa_score"], abs=1e-6)
    assert hits == pytest.approx(expected["hit_rate"], abs=1e-6)


def test_retrieval_recall_small_by_hand():
    # 3 images, 4 captions; image 0 has two captions.
    scores = np.array(
        [
            [0.9, 0.1, 0.8, 0.2],  # image 0: best caption 0 (its own)
            [0.7, 0.3, 0.2, 0.6],  # image 1: best caption 0 (image 0's); its own is 3rd
            [0.1, 0.2, 0.3, 0.4],  # image 2: best caption 3 (its own)
        ],
        dtype=np.float32,
    )
    r = retrieval_recall(scores, [0, 0, 1, 2])
    # Per caption (columns): best images 0, 1, 0, 1 → only caption 0 finds its image.
    assert r["ir_r1"] == pytest.approx(1 / 4)
    assert r["tr_r1"] == pytest.approx(2 / 3)
    # Fewer than 5 candidates on either axis: every candidate counts.
    for k in (5, 10):
        assert r[f"ir_r{k}"] == 1.0
        assert r[f"tr_r{k}"] == 1.0
    assert list(r) == ["ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10"]


def test_retrieval_recall_ranks_by_hand():
    """12 images with one caption each; distractors put each true match at a known rank.

    Caption j's true image scores 1; the images in D_j (the next c_j images,
    cyclically) score 2; all others 0. So caption j's image ranks c_j + 1 in its
    column, and image i's caption ranks 1 + #{j : i in D_j} in its row; ties
    among the 0s and 2s cannot move the true match across the cut.
    """
    n = 12
    c = [0] * n
    c[3], c[5], c[8] = 1, 5, 10
    scores = torch.zeros(n, n)
    for j in range(n):
        scores[j, j] = 1.0
        for m in range(1, c[j] + 1):
            scores[(j + m) % n, j] = 2.0
    r = retrieval_recall(scores, list(range(n)))
    # ir: caption j found within k iff c_j < k → 9, 10, 11 of 12.
    assert r["ir_r1"] == pytest.approx(9 / 12)
    assert r["ir_r5"] == pytest.approx(10 / 12)
    assert r["ir_r10"] == pytest.approx(11 / 12)
    # tr: D_3={4}, D_5={6..10}, D_8={9,10,11,0..6}: every image has 1 or 2 captions
    # above its own, so none is first, all are within 5.
    assert r["tr_r1"] == 0.0
    assert r["tr_r5"] == 1.0
    assert r["tr_r10"] == 1.0


def test_retrieval_recall_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    n_images, per_image = 15, 3
    n_texts = n_images * per_image
    text_to_image = torch.randperm(n_texts, generator=gen) % n_images
    scores = torch.randn(n_images, n_texts, generator=gen)  # continuous: no ties
    r = retrieval_recall(scores, text_to_image)
    s = scores.numpy()
    t2i = text_to_image.numpy()
    for k in (1, 5, 10):
        ir = np.mean([t2i[j] in np.argsort(-s[:, j])[:k] for j in range(n_texts)])
        tr = np.mean([np.any(t2i[np.argsort(-s[i])[:k]] == i) for i in range(n_images)])
        assert r[f"ir_r{k}"] == pytest.approx(ir, abs=1e-6)
        assert r[f"tr_r{k}"] == pytest.approx(tr, abs=1e-6)


def test_retrieval_recall_rejects_bad_input():
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros((2, 3)), [0, 1, 2])
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros(3), [0, 0, 0])


def test_nlvr2_accuracy():
    assert nlvr2_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(0.5)
    assert nlvr2_accuracy(torch.tensor([True, False]), np.array([1, 0])) == 1.0


def test_latency_stats_by_hand_and_against_numpy():
    stats = LatencyStats()
    times = [0.010, 0.020, 0.030, 0.040, 0.100]
    for t, n in zip(times, [2, 2, 2, 2, 1]):
        stats.add(t, n)
    s = stats.summary(wall_s=0.5)
    assert s["batches"] == 5 and s["samples"] == 9
    assert s["mean_ms"] == pytest.approx(40.0)
    assert s["min_ms"] == pytest.approx(10.0)
    assert s["max_ms"] == pytest.approx(100.0)
    # Linear interpolation between order statistics: p90 sits at 3.6 → 40 + 0.6·60.
    assert s["p50_ms"] == pytest.approx(30.0)
    assert s["p90_ms"] == pytest.approx(76.0)
    assert s["p99_ms"] == pytest.approx(97.6)
    assert s["samples_per_s"] == pytest.approx(18.0)

    rng = np.random.default_rng(0)
    data = rng.gamma(2.0, 0.01, size=257)
    stats = LatencyStats()
    for t in data:
        stats.add(t, 4)
    s = stats.summary()
    assert "samples_per_s" not in s
    for q in (50, 90, 99):
        assert s[f"p{q}_ms"] == pytest.approx(np.percentile(data * 1000, q))
    assert s["mean_ms"] == pytest.approx(data.mean() * 1000)


def test_latency_stats_rejects_empty_and_bad_values():
    with pytest.raises(ValueError):
        LatencyStats().summary()
    with pytest.raises(ValueError):
        LatencyStats().add(-1.0, 1)
    stats = LatencyStats()
    stats.add(0.1, 1)
    with pytest.raises(ValueError):
        stats.summary(wall_s=0)
