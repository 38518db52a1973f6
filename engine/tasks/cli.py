"""What every torchrun entry point shares: the common options, output checks, engine start-up, and one-line errors."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

import click
import torch
import torch.distributed as dist

from ..atomic import OutputPathError, writable_file
from ..data.raw import DataError
from ..options import option_group
from ..models import ModelConfig, MultiwayModel, family_of
from ..models.tasks import TASKS
from ..runtime.distributed import LaunchError, ParallelContext, init_parallel, shutdown
from ..runtime.errors import ShardingError
from ..runtime.health import PeerFailure, leave
from ..layers.int8 import kernels_for
from ..runtime.dtypes import CHOICES, announce, choose
from ..runtime.launch import exit_process, this_launch
from ..runtime.loading import INT8, default_dtype, int8_variant, load_model
from ..runtime.memory import DeviceMemoryError
from ..runtime.shards import Manifest, read_manifest

if TYPE_CHECKING:
    from .calibration import Calibration


class UsageError(ValueError):
    """Bad input to a task (a missing tensor, a wrong shape, a split that is not there)."""


class ModelOutputError(RuntimeError):
    """The model gave a non-finite output: an error naming the samples, never an answer."""


@dataclass
class Engine:
    ctx: ParallelContext
    model: MultiwayModel
    manifest: Manifest
    dtype: str
    load_s: float  # this rank's time to load its shard
    calibration: Optional[Dict[str, Any]] = None  # int8's calibration samples (Calibration.identity), if any
    int8_variant: Optional[Dict[str, Any]] = None  # int8's settings that are not the defaults (loading.int8_variant)


def engine_options(command: Callable) -> Callable:
    """--shards, --device, --dtype, --threads, --timeout."""
    return option_group([
        click.option("--shards", "shard_dir", required=True, type=click.Path(path_type=Path),
                     help="Directory written by `python -m sharding` (manifest.json + one file per rank)."),
        click.option("--device", default="auto", show_default=True,
                     type=click.Choice(["auto", "npu", "cuda", "cpu"]),
                     help="npu → HCCL, cuda → NCCL, cpu → gloo; auto picks the first available in that order."),
        click.option("--dtype", default=None, type=click.Choice(CHOICES),
                     help="Compute dtype [default: fp16 on NPU/GPU, fp32 on CPU]. auto: the faster of fp32 and bf16 "
                          "here (fp16 and bf16 on NPU/GPU), measured at load; int8: W8A8 linears (CPU, CUDA)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads per rank [default: cores / ranks on this node]."),
        click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=600.0,
                     show_default=True,
                     help="Seconds a collective may wait for a peer before the job fails."),
    ])(command)


def require_head(cfg: ModelConfig, task: str, where: object) -> None:
    """Refuse a checkpoint without the head `task` needs (cfg.tasks), saying which checkpoint has one."""
    head = TASKS[task].head
    if head not in cfg.tasks:
        family = family_of(cfg)
        name, weights, example = TASKS[head].title, family.heads[head].weights, family.heads[head].example
        raise UsageError(f"{where}: the checkpoint has no {name} head ({weights}; it has: "
                         f"{', '.join(cfg.tasks) or 'none'}); shard a {name} fine-tuned {family.title} checkpoint "
                         f"such as {example}")


def pick_task(cfg: ModelConfig, requested: Optional[str]) -> str:
    """The head task to run: the one requested (if the checkpoint has its head) or the checkpoint's only one."""
    if requested:
        require_head(cfg, requested, f"--task {requested}")
        return requested
    if len(cfg.tasks) != 1:
        raise UsageError(f"the checkpoint has heads for {', '.join(cfg.tasks) or 'no task'}; pick one with --task")
    return cfg.tasks[0]


def require_samples(where: object, rows: int) -> None:
    """Refuse inputs of 0 samples before the model loads (every rank would fail inside the forward)."""
    if rows < 1:
        raise UsageError(f"{where}: holds 0 samples (the inputs' first dimension is 0); nothing to run")


def writable(option: str, path: Path) -> Path:
    """`path` after checking, before any work, that rank 0 can write a file there; else one UsageError line.

    Only rank 0 writes outputs (its node may be the only one with the folder), so only rank 0 checks.
    """
    if not this_launch().is_main:
        return path
    try:
        return writable_file(path, option)
    except OutputPathError as exc:
        raise UsageError(str(exc)) from None


def start_engine(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int],
                 timeout_s: float, calibration: Optional["Calibration"] = None) -> Engine:
    """Read the manifest, join the process group, and load this rank's shard (int8: calibrated on `calibration`'s
    samples, engine.tasks.calibration)."""
    manifest = read_manifest(shard_dir)
    ctx = init_parallel(device, manifest.tp, timeout_s, threads)
    dtype, note = pick_dtype(ctx, manifest.config, dtype)
    start = time.perf_counter()
    model = load_model(shard_dir, ctx, dtype, manifest, calibration=calibration.batches() if calibration else None)
    announce(ctx, note)
    return Engine(ctx=ctx, model=model, manifest=manifest, dtype=dtype, load_s=time.perf_counter() - start,
                  calibration=calibration.identity if calibration else None,
                  int8_variant=(int8_variant() or None) if dtype == INT8 else None)


def pick_dtype(ctx: ParallelContext, cfg: ModelConfig, requested: Optional[str]) -> Tuple[str, Optional[str]]:
    """(dtype, note): the default as asked, auto resolved by measurement, and for any other explicit choice but
    fp32 (the reference) a note when another candidate is faster here (engine.runtime.dtypes)."""
    if requested is None or requested == "fp32":
        return requested or default_dtype(ctx.device), None
    if requested == "int8":
        try:
            kernels_for(ctx.device)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        check_int8_settings()
    return choose(ctx, requested, (cfg.ffn_dim // ctx.tp_size, cfg.embed_dim), cfg.joint_tokens)


def check_int8_settings() -> None:
    """int8's settings from the environment (loading.int8_variant), checked before a shard is read."""
    try:
        int8_variant()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def one_line_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix into one line on stderr and exit status 1, not a traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with torch.inference_mode():
                result = main(*args, **kwargs)
        except (ShardingError, LaunchError, UsageError, DataError, ModelOutputError, DeviceMemoryError) as exc:
            # No orderly shutdown: peers may be inside a collective; torchrun stops them on our exit.
            leave(f"error: {exc}", failed=True)
        except PeerFailure as exc:
            leave(str(exc), failed=False)
        if not dist.is_initialized():
            return result
        shutdown()  # leaves the group: is_initialized() is False from here, gloo's threads may still run
        exit_process(0, grouped=True)  # every output is written and fsynced by now

    return wrapper
