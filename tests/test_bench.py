"""engine.bench on a tiny golden checkpoint (fields present and sane), and bf16 against fp32 on the golden VQA inputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _paths import GOLDEN, needs
from _run import forward_many, run_here, run_torchrun, shard_here
from engine.bench import main as bench_main, summary_line

TINY = GOLDEN / "tiny_relpos_vqa"
VQA_CASES = sorted(p.parent for p in GOLDEN.glob("tiny_*vqa*/inputs.safetensors")
                   if (p.parent / "checkpoint.pt").is_file())


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
        shard_here(TINY / "checkpoint.pt", tp, root / f"tp{tp}")
        shards[tp] = root / f"tp{tp}"
    return shards


def _bench(shards: Path, tp: int, out: Path, *extra: object) -> dict:
    args = ["--shards", shards, "--device", "cpu", "--batch-size", 3, "--threads", 1, "--warmup", 1, "--iters", 2,
            "--json", out, *extra]
    # tp 1: one process, as `python -m engine.bench` runs there: this one
    ran = run_here(bench_main, args) if tp == 1 else run_torchrun(tp, "engine.bench", args)
    assert ran.returncode == 0, ran.stderr
    assert "samples/s" in ran.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reports(tiny_shards, tmp_path_factory) -> dict:
    """tp -> engine.bench's bf16 report (tp 1 also checked against an fp32 copy): one launch per tp serves every
    test here."""
    root = tmp_path_factory.mktemp("reports")
    return {1: _bench(tiny_shards[1], 1, root / "tp1.json", "--dtype", "bf16", "--check-fp32"),
            2: _bench(tiny_shards[2], 2, root / "tp2.json", "--dtype", "bf16")}


@needs(TINY)
@pytest.mark.parametrize("tp", [1, 2])
def test_bench_report_fields(reports: dict, tp: int) -> None:
    report = reports[tp]
    assert (report["tp"], report["threads_per_rank"], report["batch_size"], report["dtype"]) == (tp, 1, 3, "bf16")
    assert report["device"].startswith("cpu")
    # no CUDA here: the forward ran eagerly, the report says why; no device memory to report on the CPU
    assert report["cuda_graphs"] == "eager (CUDA graphs off: no CUDA here (the device is cpu))"
    assert report["device_memory_per_rank"] == [None] * tp
    latency = report["latency_ms"]
    assert set(latency) >= {"mean", "p50", "p90", "p99", "min"}
    assert 0 < latency["min"] <= latency["p50"] <= latency["p99"]
    assert latency["min"] <= latency["mean"]
    assert report["samples_per_s"] == pytest.approx(3 / (latency["mean"] / 1e3))
    assert report["gflop_per_sample"] == pytest.approx(tiny_gflop(), rel=1e-12)
    assert report["achieved_gflop_per_s"] == pytest.approx(report["gflop_per_sample"] * report["samples_per_s"])
    assert report["peak_gflop_per_s"] > 0
    # the chosen attention kernel, timed apart at the model's shape (2 heads per rank at tp 1, 1 at tp 2)
    for kernel, attention, peak in zip(report["attention_kernel_per_rank"], report["attention_per_rank"],
                                       report["peak_gflop_per_s_per_rank"]):
        assert attention["kernel"] == kernel and attention["ms_per_layer"] > 0
        flop = 4 * 57 * 57 * 64 // tp  # q kᵀ and p v over N = 57 tokens, D = 64 split over the ranks' heads
        assert attention["gflop_per_s"] == pytest.approx(flop / attention["ms_per_layer"] / 1e6)
        assert attention["fraction_of_peak"] == pytest.approx(attention["gflop_per_s"] / peak)
    assert len(report["weights_bytes_per_rank"]) == len(report["peak_rss_bytes_per_rank"]) == tp
    assert all(0 < w < rss for w, rss in zip(report["weights_bytes_per_rank"], report["peak_rss_bytes_per_rank"]))
    # per forward of the 4 layers: one all-reduce after attention, one after the FFN, also in layers 0-1 where
    # text and image tokens go to their own experts (the multiway step reduces both at once)
    assert report["allreduce_calls_per_forward"] == (0 if tp == 1 else 2 * 4)
    assert (report["allreduce_ms_per_forward"] > 0) == (tp > 1)
    # the all-reduce time of the rank that waited longest: the calls' own cost plus its wait for the other
    waits = report["allreduce_wait_ms_per_forward_per_rank"]
    assert len(waits) == tp and min(waits) >= 0 and report["allreduce_own_ms_per_forward"] >= 0
    assert report["allreduce_own_ms_per_forward"] + max(waits) == pytest.approx(report["allreduce_ms_per_forward"])
    assert ("moving data" in summary_line(report)) == (tp > 1)


@needs(TINY)
def test_bench_weights_shrink_with_tp(reports: dict) -> None:
    one, two = reports[1], reports[2]
    assert max(two["weights_bytes_per_rank"]) < one["weights_bytes_per_rank"][0]
    assert one["vs_fp32"]["top1_agreement"] == 1.0
    assert 0 < one["vs_fp32"]["max_abs_diff"]["vqa_logits"] < 0.05


# Every case at tp 1; at tp 2 (bf16 all-reduce) the case with the closest top-2 margin (0.013).
BF16_CASES = [(case, 1) for case in VQA_CASES] + [(case, 2) for case in VQA_CASES if case == TINY]


@pytest.fixture(scope="module")
def bf16_outputs(tmp_path_factory) -> dict:
    """(case, tp) -> engine.forward's bf16 vqa_logits; one launch per tp runs all its cases."""
    root = tmp_path_factory.mktemp("bf16")
    found = {}
    for tp in sorted({tp for _, tp in BF16_CASES}):
        cases = [case for case, t in BF16_CASES if t == tp]
        for case_dir in cases:
            case = json.loads((case_dir / "case.json").read_text())
            shard_here(case_dir / "checkpoint.pt", tp, root / f"{case_dir.name}-tp{tp}",
                       *([] if case["relative_position_bias"] else ["--num-heads", case["num_heads"]]))
        forward_many(tp, [{"shards": root / f"{c.name}-tp{tp}", "inputs": c / "inputs.safetensors",
                           "out": root / f"{c.name}-tp{tp}.safetensors", "dtype": "bf16"} for c in cases],
                     root / f"plan-tp{tp}.json")
        found.update({(c, tp): load_file(str(root / f"{c.name}-tp{tp}.safetensors"))["vqa_logits"] for c in cases})
    return found


@pytest.mark.skipif(not VQA_CASES, reason="../shared/golden has no VQA model cases")
@pytest.mark.parametrize("case_dir,tp", BF16_CASES, ids=[f"{c.name}-tp{tp}" for c, tp in BF16_CASES])
def test_bf16_answers_equal_fp32(case_dir: Path, tp: int, bf16_outputs: dict) -> None:
    """bf16 gives the published fp32 model's top-1 answer on every golden VQA question."""
    want = load_file(str(case_dir / "expected.safetensors"))["vqa_logits"]
    got = bf16_outputs[(case_dir, tp)]
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max().item() < 0.05  # bf16 keeps 8 bits; the residual stream and head are fp32


@needs(TINY)
def test_bf16_runs_where_onednn_has_no_bf16(tiny_shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a CPU whose oneDNN has no bf16 GEMM (AVX2 only: packing a bf16 weight fails there), forced with
    ONEDNN_MAX_CPU_ISA=AVX2: bf16 runs unpacked, says so once, and stays within bf16's error of fp32."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    out = tmp_path / "out.safetensors"
    ran = run_torchrun(2, "engine.forward", ["--shards", tiny_shards[2], "--inputs", TINY / "inputs.safetensors",
                                             "--out", out, "--device", "cpu", "--dtype", "bf16"])
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.count("oneDNN has no bf16 matmul on this CPU") == 1, ran.stderr
    want = load_file(str(TINY / "expected.safetensors"))["vqa_logits"]
    got = load_file(str(out))["vqa_logits"]
    top2 = want.topk(2, dim=-1).values
    # torch's generic bf16 kernels round differently: a question whose top-2 margin is within two bf16 steps
    # near 1 (1/64) may go either way there (tiny_relpos_vqa's last: 0.013)
    decided = (top2[:, 0] - top2[:, 1] > 1 / 64).nonzero().flatten()
    assert len(decided) == len(want) - 1
    assert torch.equal(got[decided].argmax(-1), want[decided].argmax(-1))
    assert (got - want).abs().max().item() < 0.05

def _run_report(dtype: str, tp: int, batch: int, p50: float) -> dict:
    return {"dtype": dtype, "tp": tp, "batch_size": batch, "threads_per_rank": 1, "device": "cpu: test (1 thread)",
            "latency_ms": {"mean": p50, "p50": p50, "min": p50}, "samples_per_s": batch / (p50 / 1e3),
            "achieved_gflop_per_s": 100.0, "fraction_of_peak": 0.5, "allreduce_ms_per_forward": 0.0,
            "weights_bytes_per_rank": [100 // tp] * tp, "peak_rss_bytes_per_rank": [1000] * tp,
            "allreduce_wait_ms_per_forward_per_rank": [0.0] if tp == 1 else [0.25, 12.75]}


def test_study_speedups_table_and_figure(tmp_path: Path) -> None:
    from PIL import Image

    from engine.tools.bench_study import figure, speedups, table

    runs = [_run_report(d, tp, b, (2000.0 if tp == 1 else 1100.0) * b) for d in ("fp32", "bf16") for b in (1, 4)
            for tp in (1, 2)]
    scaling = speedups(runs)
    assert len(scaling) == 4 and all(s["speedup_p50"] == pytest.approx(2000 / 1100) for s in scaling)
    assert all(s["weights_ratio"] == 0.5 for s in scaling)
    assert table(runs, scaling).count("1.82x") == 4
    assert table(runs, scaling).count(" 12.8 ") == 4  # the tp 2 rows' longest wait at an all-reduce
    with Image.open(figure(runs, scaling, tmp_path / "scaling.png")) as png:
        assert png.size[0] > 1000 and png.size[1] > 300
