"""`python -m engine.demo` (what `make demo` runs): the whole VQAv2 pipeline on this machine in a few minutes.

Builds once, cached under --workdir, a randomly initialised VLMo-base 480 VQA
checkpoint in the published format and a small synthetic VQAv2 download; then
runs the same commands a user runs on real data — the arrow writer, the sharder
and `torchrun -m engine.vqa` — and prints the summary. The weights are random,
so the accuracy it prints means nothing; the point is the pipeline and its speed.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import click

from .data.vqav2 import ANSWER_TABLE
from .tools.demo_pipeline import prepare_assets, run_step

@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path(".cache/demo"),
              show_default=True, help="Where the generated checkpoint, data, shards and results are kept.")
@click.option("--model", type=click.Choice(["base", "tiny"]), default="base", show_default=True,
              help="base: full-size VLMo-base, 480×480 images; tiny: a 64-wide 2-layer model (seconds).")
@click.option("--images", type=click.IntRange(min=1), default=6, show_default=True,
              help="val2014 images of the synthetic download (3 questions each).")
@click.option("--tp", type=click.IntRange(min=1), default=2, show_default=True,
              help="Tensor-parallel degree: shards cut and processes launched.")
@click.option("--device", type=click.Choice(["auto", "npu", "cuda", "cpu"]), default="cpu", show_default=True,
              help="Passed to engine.vqa (npu/cuda need --tp chips on this machine).")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--serve", is_flag=True, help="Instead of evaluating, serve the checkpoint over HTTP (engine.serve, "
              "http://127.0.0.1:8000; what `make serve` runs).")
def main(workdir: Path, model: str, images: int, tp: int, device: str, batch_size: int, serve: bool) -> None:
    """Evaluate a random-weight VLMo on synthetic VQAv2 questions with tensor parallelism, end to end."""
    started = time.perf_counter()
    python = sys.executable
    arrow, shards = prepare_assets(workdir, model, images, tp)
    if serve:
        args = ["-m", "engine.serve", "--shards", str(shards), "--answers", str(arrow / ANSWER_TABLE),
                "--device", device]
        run_step([python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp), *args],
             f"torchrun --standalone --nproc-per-node {tp} {shlex.join(args)}")
        return

    results = workdir / "results" / f"vqav2_val_{model}_tp{tp}.jsonl"
    results.unlink(missing_ok=True)  # a fresh run each time, so the latency is measured again
    args = ["-m", "engine.vqa", "--shards", str(shards), "--data", str(arrow), "--split", "val",
            "--out", str(results), "--batch-size", str(batch_size), "--device", device]
    run_step([python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp), *args],
         f"torchrun --standalone --nproc-per-node {tp} {shlex.join(args)}")

    click.echo(f"""
Demo finished in {time.perf_counter() - started:.0f} s. Results: {results}; summary: {results.with_suffix('.summary.json')}

The checkpoint's weights are RANDOM, so the VQA score and hit rate above mean nothing:
the demo shows the pipeline and its speed on this machine, not accuracy.

To evaluate a real fine-tuned checkpoint (vlmo_base_patch16_480_vqa.pt from microsoft/unilm, folder vlmo):
  python -m engine.data vqav2 --root VQAV2_DOWNLOAD --out arrow/
  make shard CKPT=vlmo_base_patch16_480_vqa.pt TP=2 OUT=shards/
  torchrun --nproc-per-node 2 -m engine.vqa --shards shards/ --data arrow/ --split rest_val
(launch/README.md: NPU, GPU and multi-node launches.)""")


if __name__ == "__main__":
    main(prog_name="python -m engine.demo")
