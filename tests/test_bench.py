"""engine.bench on a tiny golden checkpoint: the report's fields are present and sane."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _paths import GOLDEN, needs
from _run import run_torchrun, shard

TINY = GOLDEN / "tiny_relpos_vqa"


def tiny_gflop() -> float:
    """tiny_relpos_vqa: D=64, 4 layers, FFN 256, image 64 → 4×4 patches + CLS = 17 tokens, text 40: N = 57; 3129 labels."""
    D, L, F, N, labels = 64, 4, 256, 57, 3129
    qkv_proj = 2 * N * D * 3 * D + 2 * N * D * D
    ffn = 2 * N * D * F + 2 * N * F * D  # every token through exactly one expert
    scores_and_mix = 2 * N * N * D + 2 * N * N * D
    patch_embed = 2 * 16 * (3 * 16 * 16) * D
    pooler, classifier = 2 * D * D, 2 * D * 2 * D + 2 * 2 * D * labels
    return (L * (qkv_proj + ffn + scores_and_mix) + patch_embed + pooler + classifier) / 1e9


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bench")
    shards = {}
    for tp in (1, 2):
        done = shard(TINY / "checkpoint.pt", tp, root / f"tp{tp}")
        assert done.returncode == 0, done.stderr
        shards[tp] = root / f"tp{tp}"
    return shards


def _bench(shards: Path, tp: int, out: Path, *extra: object) -> dict:
    ran = run_torchrun(tp, "engine.bench", ["--shards", shards, "--device", "cpu", "--batch-size", 3,
                                            "--threads", 1, "--warmup", 1, "--iters", 2, "--json", out, *extra])
    assert ran.returncode == 0, ran.stderr
    assert "samples/s" in ran.stdout
    return json.loads(out.read_text())


@needs(TINY)
@pytest.mark.parametrize("tp", [1, 2])
def test_bench_report_fields(tiny_shards, tp: int, tmp_path: Path) -> None:
    report = _bench(tiny_shards[tp], tp, tmp_path / "bench.json", "--dtype", "fp32")
    assert (report["tp"], report["threads_per_rank"], report["batch_size"], report["dtype"]) == (tp, 1, 3, "fp32")
    assert report["device"].startswith("cpu")
    latency = report["latency_ms"]
    assert set(latency) >= {"mean", "p50", "p90", "p99", "min"}
    assert 0 < latency["min"] <= latency["p50"] <= latency["p99"]
    assert latency["min"] <= latency["mean"]
    assert report["samples_per_s"] == pytest.approx(3 / (latency["mean"] / 1e3))
    assert report["gflop_per_sample"] == pytest.approx(tiny_gflop(), rel=1e-12)
    assert report["achieved_gflop_per_s"] == pytest.approx(report["gflop_per_sample"] * report["samples_per_s"])
    assert report["peak_gflop_per_s"] > 0
    assert len(report["weights_bytes_per_rank"]) == len(report["peak_rss_bytes_per_rank"]) == tp
    assert all(0 < w < rss for w, rss in zip(report["weights_bytes_per_rank"], report["peak_rss_bytes_per_rank"]))
    # per forward: one all-reduce after attention, one per expert FFN (layers 0-1 route text and image apart)
    assert report["allreduce_calls_per_forward"] == (0 if tp == 1 else 2 * 3 + 2 * 2)
    assert (report["allreduce_ms_per_forward"] > 0) == (tp > 1)


@needs(TINY)
def test_bench_weights_shrink_with_tp(tiny_shards, tmp_path: Path) -> None:
    one = _bench(tiny_shards[1], 1, tmp_path / "tp1.json", "--dtype", "fp32")
    two = _bench(tiny_shards[2], 2, tmp_path / "tp2.json", "--dtype", "fp32")
    assert max(two["weights_bytes_per_rank"]) < one["weights_bytes_per_rank"][0]
