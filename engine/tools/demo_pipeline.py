"""The demo's pipeline steps, as a user runs them on real data: the synthetic VQAv2 download, its arrow files, the
random checkpoint and its shards, each built once under the work folder and then reused (`make demo`,
`make serve` and `make bench-serve` share them)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import click

from ..data.vqav2 import ANSWER_TABLE, read_answer_table
from .demo_assets import build_random_checkpoint, build_synthetic_vqav2

# A 64-wide, 2-layer model at 64×64 pixels: the same pipeline in seconds (tests, a first look).
TINY = dict(embed_dim=64, depth=2, num_heads=4, vlffn_start_layer_index=1)
SEED = 0


def run_step(command: List[str], shown: str) -> None:
    """Run one step as a user would, echoing it; a failed step ends the demo with its exit status."""
    click.secho(f"$ {shown}", bold=True, err=True)
    done = subprocess.run(command)
    if done.returncode != 0:
        raise click.ClickException(f"step failed (exit status {done.returncode}): {shown}")


def _cached(path: Path, what: str) -> bool:
    if path.exists():
        click.echo(f"using the cached {what} {path}", err=True)
        return True
    return False


def prepare_assets(workdir: Path, model: str, images: int, tp: int) -> Tuple[Path, Path]:
    """The synthetic VQAv2 arrow folder and the random checkpoint's shards at `tp` (built once, then cached)."""
    python = sys.executable
    tiny = model == "tiny"
    image_size = 64 if tiny else 480

    raw = workdir / f"vqav2_raw_{images}x3_seed{SEED}"
    if not _cached(raw, "synthetic VQAv2 download"):
        click.echo(f"drawing a synthetic VQAv2 download (official layout): {raw}", err=True)
        build_synthetic_vqav2(raw, n_images=images, questions_per_image=3, seed=SEED)

    arrow = workdir / f"vqav2_arrow_{images}x3_seed{SEED}"
    if not _cached(arrow, "arrow files"):
        run_step([python, "-m", "engine.data", "vqav2", "--root", str(raw), "--out", str(arrow)],
             f"python -m engine.data vqav2 --root {raw} --out {arrow}")

    # The classifier is sized to the synthetic answer table, as fine-tuning sizes it to the real one.
    labels = len(read_answer_table(arrow / ANSWER_TABLE))
    checkpoint = workdir / f"vlmo_{model}_patch16_{image_size}_vqa{labels}_random_seed{SEED}.pt"
    if not _cached(checkpoint, "random checkpoint"):
        click.echo(f"building a random-weight VLMo-{model} VQA checkpoint (published format): {checkpoint}", err=True)
        build_random_checkpoint(checkpoint, image_size=image_size, num_labels=labels, seed=SEED,
                                **(TINY if tiny else {}))

    shards = workdir / f"shards_{checkpoint.stem}_tp{tp}"
    if not _cached(shards, "shards"):
        run_step([python, "-m", "sharding", "--checkpoint", str(checkpoint), "--tp", str(tp), "--out", str(shards)],
             f"make shard CKPT={checkpoint} TP={tp} OUT={shards}")

    return arrow, shards
