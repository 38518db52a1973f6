"""What every torchrun entry point shares: the common options, engine start-up, and one-line errors."""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import click
import torch
import torch.distributed as dist

from ..runtime.errors import ShardingError
from ..runtime.shards import Manifest, read_manifest

from ..data.raw import DataError
from ..runtime.distributed import LaunchError, ParallelContext, init_parallel, shutdown
from ..runtime.health import PeerFailure, leave
from ..runtime.loading import DTYPES, default_dtype, load_model
from ..runtime.model import VLMo


class UsageError(ValueError):
    """Bad input to a task (a missing tensor, a wrong shape, a split that is not there)."""


@dataclass
class Engine:
    ctx: ParallelContext
    model: VLMo
    manifest: Manifest
    dtype: str


def engine_options(command: Callable) -> Callable:
    """--shards, --device, --dtype, --threads, --timeout."""
    options = [
        click.option("--shards", "shard_dir", required=True, type=click.Path(path_type=Path),
                     help="Directory written by `python -m sharding` (manifest.json + one file per rank)."),
        click.option("--device", default="auto", show_default=True,
                     type=click.Choice(["auto", "npu", "cuda", "cpu"]),
                     help="npu → HCCL, cuda → NCCL, cpu → gloo; auto picks the first available in that order."),
        click.option("--dtype", default=None, type=click.Choice(sorted(DTYPES)),
                     help="Compute dtype [default: fp16 on NPU/GPU, fp32 on CPU]."),
        click.option("--threads", type=int, default=None,
                     help="CPU threads per rank [default: cores / ranks on this node]."),
        click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
                     help="Seconds a collective may wait for a peer before the job fails."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def start_engine(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int],
                 timeout_s: float) -> Engine:
    """Read the manifest, join the process group, and load this rank's shard."""
    manifest = read_manifest(shard_dir)
    ctx = init_parallel(device, manifest.tp, timeout_s, threads)
    dtype = dtype or default_dtype(ctx.device)
    model = load_model(shard_dir, ctx, dtype, manifest)
    return Engine(ctx=ctx, model=model, manifest=manifest, dtype=dtype)


def one_line_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix into one line on stderr and exit status 1, not a traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with torch.inference_mode():
                result = main(*args, **kwargs)
        except (ShardingError, LaunchError, UsageError, DataError) as exc:
            # No orderly shutdown: peers may be inside a collective; torchrun stops them on our exit.
            leave(f"error: {exc}", failed=True)
        except PeerFailure as exc:
            leave(str(exc), failed=False)
        if not dist.is_initialized():
            return result
        shutdown()
        # Every output is written and fsynced by now. Interpreter teardown can still abort a finished rank
        # ("terminate called without an active exception" from gloo's threads), failing a good run, so a
        # distributed rank leaves without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    return wrapper
