"""The prepared GPU check (engine.tools.gpu_check) end to end in its CPU dry mode: every step runs and reports,
so that the one command on a GPU machine does not fail on the check's own mistakes."""
from __future__ import annotations

import configparser
import json
from pathlib import Path

import pytest
import torch

from _paths import GOLDEN, REPO, needs
from _run import run_here


@needs(GOLDEN)
def test_the_dry_run_runs_every_step_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    from engine.tools.gpu_check import main

    ran = run_here(main, ["--device", "cpu", "--quick", "--tps", "1 2", "--out", out, "--workdir", tmp_path / "work",
                          "--golden", GOLDEN])  # in this process: its steps run in processes of their own
    assert ran.returncode == 0, ran.stdout + ran.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert set(report["steps"]) == {"parity", "bench", "serving"}
    assert not [name for name, step in report["steps"].items() if "error" in step]
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["device"] == "cpu"

    parity = report["steps"]["parity"]
    assert parity["all_passed"]
    # the first case of each family, fp32/fp16/bf16, graphs off and on, the golden batch and one fewer, tp 1 and 2
    assert {(r["family"], r["tp"], r["dtype"], r["graphs"]) for r in parity["rows"]} == \
        {(f, tp, d, g) for f in ("vlmo", "beit3") for tp in (1, 2) for d in ("fp32", "fp16", "bf16") for g in (0, 1)}
    assert {r["batch"] for r in parity["rows"]} == {3, 4}
    assert all(max(r["max_abs_error"].values()) <= 1e-4 for r in parity["rows"] if r["dtype"] == "fp32")
    # no CUDA here: graphs requested, skipped with the reason
    assert {r["mode"] for r in parity["rows"]} == {"eager (CUDA graphs off: no CUDA here (the device is cpu))",
                                                   "eager (CUDA graphs off: --no-cuda-graphs)"}

    rows = report["steps"]["bench"]["rows"]
    assert [(r["dtype"], r["batch"], r["graphs"]) for r in rows] == \
        [(d, b, g) for d in ("fp16", "bf16") for b in (1, 8) for g in (True, False)]
    assert all(r["p50_ms"] > 0 and r["percent_of_peak"] > 0 and not r["graphs_ran"] for r in rows)
    assert all(r["activations_mib"] is None for r in rows)  # the CPU has no device memory to report

    serving = report["steps"]["serving"]
    saturated = serving["saturated"]
    assert set(saturated) == {"batch_1", "dynamic"}
    # 8 requests on a CPU say nothing of the GPU's gain (no target is claimed below); the gain is their ratio
    assert serving["dynamic_batching_gain"] == pytest.approx(
        saturated["dynamic"]["requests_per_s"] / saturated["batch_1"]["requests_per_s"])
    assert not any(s["errors"] for s in serving["saturated"].values())
    # a dry run does not claim the speed targets either way
    assert [t["met"] for t in report["targets"].values()] == [None, None, None, True]
    printed = (out / "gpu_check.txt").read_text()
    assert "golden parity" in printed and "engine.bench, VLMo VQA, tp 1" in printed and "dynamic batching" in printed
    assert printed in ran.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_gpu_run_is_refused_in_one_line(tmp_path: Path) -> None:
    from engine.tools.gpu_check import main

    ran = run_here(main, ["--out", tmp_path])  # in this process: the refusal comes before any step runs
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines() == ["Error: no CUDA device is visible to torch (for a dry run on the "
                                               "CPU: --device cpu --quick)"]


def test_the_wheel_list_is_setup_cfg_without_torch_plus_the_serve_extra() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    wanted = [line for line in cfg["options"]["install_requires"].split() if not line.startswith("torch")]
    wanted += cfg["options.extras_require"]["serve"].split()
    listed = [line for line in (REPO / "launch" / "gpu-check-requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert listed == wanted
