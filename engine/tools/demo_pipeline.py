"""The demo's pipeline steps, as a user runs them on real data: the synthetic VQAv2 download, its arrow files, the
random checkpoint and its shards, each built once under the work folder and then reused (`make demo`,
`make serve` and `make bench-serve` share them)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

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


def serve_step(command: List[str], shown: str) -> None:
    """Run the server until Ctrl-C, then stop it the quiet way: SIGTERM to its ranks (they drain and exit 0).

    Ctrl-C must reach this process alone: a SIGINT of its own makes torchrun print a traceback and exit 1, and
    makes `make` report an interrupt and exit 130, for a normal stop. So torchrun runs in a session of its own,
    and this process takes the terminal's foreground for the time the server runs (as a shell does for a job).
    """
    click.secho(f"$ {shown}", bold=True, err=True)
    job = subprocess.Popen(command, start_new_session=True)
    with _terminal_foreground():
        try:
            try:
                code = job.wait()
            except KeyboardInterrupt:
                click.echo("stopping the server (Ctrl-C): answering what is queued, then exiting", err=True)
                for pid in _children(job.pid) or [job.pid]:
                    _signal(pid, signal.SIGTERM)
                code = job.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            _signal(-job.pid, signal.SIGKILL)
            raise
    if code != 0:
        raise click.ClickException(f"step failed (exit status {code}): {shown}")


@contextlib.contextmanager
def _terminal_foreground() -> Iterator[None]:
    """This process in a process group of its own, the terminal's foreground one until the block ends (then the
    group before it again); nothing without a controlling terminal."""
    try:
        tty = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        yield
        return
    ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may not set the foreground else
    try:
        before = os.tcgetpgrp(tty)
        os.setpgid(0, 0)
        os.tcsetpgrp(tty, os.getpgrp())
    except OSError:  # a session leader, or a terminal of another session: leave things as they are
        before = None
    try:
        yield
    finally:
        if before is not None:
            with contextlib.suppress(OSError):  # that group may be gone
                os.tcsetpgrp(tty, before)
        signal.signal(signal.SIGTTOU, ttou)
        os.close(tty)


def _children(pid: int) -> List[int]:
    """torchrun's worker processes (Linux's /proc; elsewhere none, and torchrun itself is signalled)."""
    listing = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in listing.read_text().split()] if listing.exists() else []


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig) if pid > 0 else os.killpg(-pid, sig)
    except ProcessLookupError:
        pass


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
