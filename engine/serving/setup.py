"""What every server of the shards shares (engine.serve, engine.ray_serve): the options, the checkpoint's heads and
answer table, the state behind the FastAPI app, and how a rank joins the group and loads its shard.

Everything a user can get wrong (no head, no answer table, no tokenizer) is refused by `read_served`, before
anything loads or any process starts.
"""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import click

from ..data.vqav2 import answer_table
from ..models import ModelConfig
from ..models.tasks import VQA, served_tasks
from ..options import option_group
from ..runtime.graphs import DEFAULT_BUCKETS
from ..runtime.shards import Manifest, read_manifest
from ..tasks.calibration import Calibration, head_to_calibrate, read_calibration
from ..tasks.cli import Engine, UsageError, start_engine
from ..tasks.tokenizers import make_tokenizer, tokenizer_option
from .app import ServerState
from .batcher import Batcher
from .group import GroupChannel
from .metrics import ServerMetrics
from .payloads import Preprocessor
from .preprocess import Limits, allow_pixels
from .runner import Runner
from .warmup import served_model


@dataclass
class ServerOptions:
    """The server options of `server_options`, as click passes them."""
    answers_path: Optional[Path]
    host: str
    port: int
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    max_image_bytes: int
    max_image_pixels: int
    max_body_bytes: Optional[int]
    request_timeout_s: float
    drain_timeout_s: float
    preprocess_threads: int
    model_id: Optional[str]
    vocab: Optional[Path]
    tokenizer_path: Optional[Path]
    cuda_graphs: bool = True

    @property
    def body_limit(self) -> int:
        return self.max_body_bytes or 3 * self.max_image_bytes + (1 << 20)


def server_options(command: Callable) -> Callable:
    """The HTTP server's options: the answer table, address, batching, bounds, shutdown, tokenizer."""
    return option_group([
        click.option("--answers", "answers_path", type=click.Path(path_type=Path), default=None,
                     help="Label → answer table (answer2label.txt), required for VQA checkpoints."),
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every "
                     "interface; the server has no authentication)."),
        click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True),
        click.option("--max-batch-size", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Most requests in one forward pass."),
        click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
                     help="Run each batch as a CUDA graph of its size bucket (1, 2, 4, ... 32; a batch pads to its "
                          "bucket), captured at start; where the device has no graphs (CPU) the server says why "
                          "and runs eagerly."),
        click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
                     help="How long the oldest waiting request may wait for its batch to fill."),
        click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Requests waiting for a batch before new ones get 503 with Retry-After."),
        click.option("--max-image-bytes", type=click.IntRange(min=1), default=10 << 20, show_default=True,
                     help="Largest encoded image accepted (413 above)."),
        click.option("--max-image-pixels", type=click.IntRange(min=1), default=40_000_000, show_default=True,
                     help="Largest image in pixels, checked before decoding (413 above: decompression bombs)."),
        click.option("--max-body-bytes", type=click.IntRange(min=1), default=None,
                     help="Largest request body (413 above) [default: room for two base64 images of "
                          "--max-image-bytes]."),
        click.option("--request-timeout", "request_timeout_s", type=click.FloatRange(min=0.001), default=60.0,
                     show_default=True, help="Seconds a request may wait for its answer before 503."),
        click.option("--drain-timeout", "drain_timeout_s", type=click.FloatRange(min=0), default=8.0,
                     show_default=True, help="On SIGTERM, seconds to answer the queued requests; those still queued "
                                             "then get 503, and the server exits within 2 s more."),
        click.option("--preprocess-threads", type=click.IntRange(min=1), default=2, show_default=True,
                     help="Threads decoding images and tokenising texts on rank 0."),
        click.option("--model-name", "model_id", default=None, help="Model id in /v1/models and responses "
                     "[default: the checkpoint's file name]."),
        click.option("--vocab", type=click.Path(path_type=Path), default=None,
                     help="WordPiece vocabulary [default: bert-base-uncased, shipped with the engine]."),
        tokenizer_option(),
    ])(command)


@dataclass
class Served:
    """The checkpoint as a server sees it: its heads, answer table and tokenizer."""
    shard_dir: Path
    manifest: Manifest
    kinds: List[str]
    answers: Optional[List[str]]
    tokenizer: Any

    @property
    def cfg(self) -> ModelConfig:
        return self.manifest.config


def read_served(shard_dir: Path, options: ServerOptions, manifest: Optional[Manifest] = None) -> Served:
    """The checkpoint's heads, answer table and tokenizer; one UsageError (or DataError) line for what is missing."""
    manifest = manifest or read_manifest(shard_dir)
    cfg = manifest.config
    kinds = served_tasks(cfg)
    if not kinds:
        raise UsageError(f"{shard_dir}: the checkpoint has no task head to serve (VQA, NLVR2 or retrieval)")
    answers = None
    if VQA in kinds:
        if options.answers_path is None:
            raise UsageError("--answers: required for a VQA checkpoint (the answer2label.txt it was fine-tuned "
                             "with, written by `python -m engine.data vqav2`)")
        answers = answer_table(options.answers_path, cfg.vqa_labels)
    tokenizer = make_tokenizer(cfg, options.tokenizer_path, options.vocab)
    return Served(shard_dir=shard_dir, manifest=manifest, kinds=kinds, answers=answers, tokenizer=tokenizer)


def served_calibration(served: Served, path: Optional[Path], samples: Optional[int],
                       dtype: Optional[str]) -> Optional[Calibration]:
    """A server's --calibration samples: of the checkpoint's first task (engine.tasks.calibration), read before
    anything loads."""
    return read_calibration(path, samples, dtype, head_to_calibrate(served.cfg.tasks), served.cfg, served.tokenizer)


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading anything, so a taken port is one line at once, not a failure after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def model_name(manifest: Manifest, shard_dir: Path) -> str:
    source = str(manifest.source.get("file") or "")
    return Path(source).stem if source else shard_dir.resolve().name


def new_state(served: Served, options: ServerOptions, dtype: Optional[str], timeout_s: float,
              on_fatal: Callable[[str], None], metrics: Optional[ServerMetrics] = None) -> ServerState:
    """The batcher, the engine thread's runner (no model yet) and everything the app reads; Pillow's own bomb
    guard (process-wide) set to --max-image-pixels, in engine.serve's process as in each Ray replica's."""
    allow_pixels(options.max_image_pixels)
    metrics = metrics or ServerMetrics()
    batcher = Batcher(options.max_batch_size, options.max_wait_ms / 1e3, options.max_queue)
    metrics.queue_depth.set_function(lambda: batcher.depth)
    limits = Limits(max_image_bytes=options.max_image_bytes, max_image_pixels=options.max_image_pixels)
    return ServerState(
        cfg=served.cfg, model_id=options.model_id or model_name(served.manifest, served.shard_dir),
        tp=served.manifest.tp, dtype=dtype, kinds=served.kinds, answers=served.answers,
        preprocessor=Preprocessor(served.cfg, served.tokenizer, limits), batcher=batcher,
        runner=Runner(batcher, metrics, timeout_s, on_fatal), metrics=metrics,
        pool=ThreadPoolExecutor(options.preprocess_threads, thread_name_prefix="prep"),
        request_timeout_s=options.request_timeout_s, created=int(time.time()), max_body_bytes=options.body_limit)


def group_channel(engine: Engine, options: ServerOptions) -> Tuple[GroupChannel, bool, Optional[str]]:
    """The group's step channel over the served model, warmed up as every rank of the group does it (device
    graphs captured per bucket, memory checked); whether batches pad to the buckets; a note on the graphs."""
    model, padded, note = served_model(engine, served_tasks(engine.manifest.config), options.max_batch_size,
                                       options.cuda_graphs)
    return GroupChannel(engine.ctx, model), padded, note


def load_rank_zero(state: ServerState, shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int],
                   timeout_s: float, options: ServerOptions, calibration: Optional[Calibration] = None) -> bool:
    """Rank 0: join the group, load the shard (int8: calibrated on `calibration`), warm up and hand the group to
    the runner; False (the runner failed with the reason) when that does not work."""
    try:
        engine = start_engine(shard_dir, device, dtype, threads, timeout_s, calibration)
        channel, padded, note = group_channel(engine, options)
    except Exception as exc:  # a bad shard, a peer that never came, a batch too big: one line
        state.runner.fail(f"cannot load {shard_dir}: {exc}")
        return False
    if note:
        click.echo(f"note: {note}", err=True)
    if padded:
        state.batcher.buckets = DEFAULT_BUCKETS  # batches pad to the graphs' sizes
    state.dtype, state.calibration, state.int8_variant = engine.dtype, engine.calibration, engine.int8_variant
    state.runner.channel = channel
    return True


def follow_rank_zero(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int],
                     timeout_s: float, options: ServerOptions, calibration: Optional[Calibration] = None) -> None:
    """Ranks other than 0: join the group, load the shard (calibrated on the samples rank 0 runs), warm up as rank
    0 does, run its steps until it says stop."""
    group_channel(start_engine(shard_dir, device, dtype, threads, timeout_s, calibration), options)[0].follow()
