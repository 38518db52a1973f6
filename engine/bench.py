"""`torchrun --nproc N -m engine.bench`: latency, throughput and scaling of the sharded model on synthetic inputs
(engine.tasks.benchmark says how it measures). Rank 0 prints a summary and writes the JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import click

from .atomic import write_json
from .models.tasks import HEAD_TASKS
from .runtime.shards import read_manifest
from .tasks.benchmark import run_bench
from .tasks.calibration import Calibration, calibration_with_tokenizer, read_run_calibration
from .tasks.cli import engine_options, one_line_errors, pick_task, writable
from .tasks.frontend import calibrated_dtype


def summary_line(report: Dict[str, Any]) -> str:
    lat = report["latency_ms"]
    dtype = calibrated_dtype(report["dtype"], report.get("calibration"))
    return (f"tp {report['tp']} × {report['threads_per_rank']} threads, batch {report['batch_size']}, "
            f"{dtype}: {lat['mean']:.1f} ms mean (p50 {lat['p50']:.1f}, min {lat['min']:.1f}), "
            f"{report['samples_per_s']:.2f} samples/s, {report['achieved_gflop_per_s']:.0f} of "
            f"{report['peak_gflop_per_s']:.0f} GFLOP/s peak ({100 * report['fraction_of_peak']:.0f}%"
            + _roofline_text(report.get("int8_roofline")) + ")"
            + _attention_text(report["attention_per_rank"][0])
            + f", all-reduce {report['allreduce_ms_per_forward']:.1f} ms/forward" + _allreduce_text(report)
            + f"; {report['cuda_graphs']}"
            + (_agreement_text(report["vs_fp32"]) if "vs_fp32" in report else ""))


def _allreduce_text(report: Dict[str, Any]) -> str:
    if not report["allreduce_calls_per_forward"]:
        return ""
    parts = []
    if report["allreduce_own_ms_per_forward"] is not None:
        parts = [f"{report['allreduce_own_ms_per_forward']:.1f} moving data",
                 f"up to {max(report['allreduce_wait_ms_per_forward_per_rank']):.1f} waiting for a slower rank"]
    if report["subln_allreduce_ms_per_forward"]:
        parts.append(f"Sub-LN statistics {report['subln_allreduce_ms_per_forward']:.1f}")
    return f" ({', '.join(parts)})" if parts else ""


def _roofline_text(roofline: Optional[Dict[str, Any]]) -> str:
    if roofline is None:
        return ""
    return (f"; {100 * roofline['fraction']:.0f}% of a roofline with the int8 linears at that W8A8 peak and the rest "
            f"at the fp32 peak")


def _attention_text(attention: Optional[Dict[str, Any]]) -> str:
    if attention is None:
        return ""
    return (f", attention {attention['kernel']} {attention['ms_per_layer']:.1f} ms/layer "
            f"({100 * attention['fraction_of_peak']:.0f}% of peak, rank 0)")


def _agreement_text(vs: Dict[str, Any]) -> str:
    top1 = f"top-1 {100 * vs['top1_agreement']:.0f}%, " if "top1_agreement" in vs else ""
    return (f"; vs fp32: {top1}min cosine {min(vs['min_cosine'].values()):.5f}, "
            f"max |diff| {max(vs['max_abs_diff'].values()):.3g}")


@click.command()
@engine_options
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="Untimed iterations first (the first builds the position-bias cache).")
@click.option("--iters", type=click.IntRange(min=1), default=10, show_default=True, help="Timed iterations.")
@click.option("--task", type=click.Choice(HEAD_TASKS), default=None,
              help="Task forward to time [default: the checkpoint's only head].")
@click.option("--check-fp32", is_flag=True,
              help="Also run an fp32 copy of the shard on the same inputs and report the output deviation, "
                   "the per-sample cosine and the top-1 agreement.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="Run the forward as a per-batch-bucket CUDA graph where the device has them (CUDA; NPU graph "
                   "mode where torch_npu has it); elsewhere it runs eagerly and the report says why.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Write the report here (rank 0).")
@calibration_with_tokenizer("the arrow file of the timed task, e.g. DATA/vqav2_train.arrow for VQA; BEiT-3: with "
                            "--tokenizer")
@one_line_errors
def main(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
         batch_size: int, warmup: int, iters: int, task: Optional[str], check_fp32: bool, cuda_graphs: bool,
         json_path: Optional[Path], calibration_path: Optional[Path], calibration_samples: Optional[int],
         tokenizer_path: Optional[Path]) -> None:
    """Time the sharded model's forward on synthetic inputs and report latency, throughput and efficiency."""
    if json_path:
        writable("--json", json_path)
    calibration = _calibration(shard_dir, task, dtype, calibration_path, calibration_samples, tokenizer_path)
    report = run_bench(shard_dir, device, dtype, threads, timeout_s, batch_size, warmup, iters, task, check_fp32,
                       cuda_graphs, calibration)
    if report:
        click.echo(summary_line(report))
        if json_path:
            write_json(json_path, report, indent=1)


def _calibration(shard_dir: Path, task: Optional[str], dtype: Optional[str], path: Optional[Path],
                 samples: Optional[int], tokenizer_path: Optional[Path]) -> Optional[Calibration]:
    """--calibration's samples for the timed task, read before the shard loads (the timed inputs are synthetic)."""
    cfg = read_manifest(shard_dir).config
    return read_run_calibration(cfg, pick_task(cfg, task), dtype, path, samples, tokenizer_path)


if __name__ == "__main__":
    main(prog_name="python -m engine.bench")
