"""`torchrun --nproc-per-node TP -m engine.serve --shards DIR`: an HTTP inference server over the tensor-parallel group.

Rank 0 runs the HTTP server (FastAPI on uvicorn) and the dynamic batcher; every batch is broadcast to the
group's ranks, which all run the same forward (engine.serving). The other ranks only follow rank 0's steps.
One server is one model copy: the launch must have exactly the shards' tp processes (more copies: one server
per group of chips, each on its own --port). SIGTERM to the server (rank 0, or `python -m` at tp 1) stops
accepting, finishes what is in flight and exits 0; a rank that dies or hangs fails the pending requests with
503 and the server exits non-zero within --timeout.
"""
from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import click
import uvicorn

from .runtime.launch import exit_process, this_launch
from .runtime.shards import Manifest, read_manifest
from .serving.app import ServerState, build_app
from .serving.batcher import Batcher
from .serving.group import GroupChannel
from .serving.metrics import ServerMetrics
from .serving.payloads import Preprocessor
from .serving.preprocess import Limits
from .serving.runner import Runner
from .models.tasks import TEXT_EMBEDDING, VQA, served_tasks
from .serving.search import SearchIndex
from .serving.tasks import ServedModel
from .tasks.cli import UsageError, engine_options, one_line_errors, start_engine
from .data.vqav2 import answer_table
from .tasks.tokenizers import make_tokenizer, tokenizer_option

STOP_GRACE_S = 10.0  # SIGTERM: a rank other than 0 leaves on its own if rank 0 has not stopped it by then


def check_launch(manifest: Manifest, shard_dir: Path) -> None:
    world = this_launch().world_size
    if world != manifest.tp:
        raise UsageError(f"{shard_dir} is cut for tp {manifest.tp} and engine.serve runs one model copy: launch "
                         f"--nproc-per-node {manifest.tp}, not {world} processes (for more copies start one "
                         f"server per group of {manifest.tp} chips, each with its own --port)")


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


def follow(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float) -> None:
    """Ranks other than 0: load, then run rank 0's steps until it says stop. Exits the process."""
    outcome = []

    def work() -> None:
        try:
            engine = start_engine(shard_dir, device, dtype, threads, timeout_s)
            GroupChannel(engine.ctx, ServedModel(engine.model, engine.ctx.device)).follow()
            outcome.append(0)
        except Exception as exc:  # rank 0 went away, or a collective failed
            click.echo(f"error: rank {this_launch().rank}: {exc}", err=True)
            outcome.append(1)

    deadline = []
    # SIGTERM (torchrun forwards it to every rank) or Ctrl-C must not stop this rank before rank 0 has finished
    # the requests in flight: rank 0 stops it; it leaves by itself only if that does not happen in time.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: deadline.append(time.monotonic() + STOP_GRACE_S))
    worker = threading.Thread(target=work, daemon=True, name="follower")
    worker.start()
    while worker.is_alive() and not (deadline and time.monotonic() > deadline[0]):
        worker.join(0.2)  # short waits keep the main thread free to run the signal handler
    exit_process(outcome[0] if outcome else 1)


class _Server(uvicorn.Server):
    """uvicorn, plus: on SIGTERM/SIGINT the batcher stops waiting for batches to fill."""

    on_exit = staticmethod(lambda: None)

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)
        # not here, in the signal handler: the batcher's lock may be held by the interrupted main thread
        threading.Thread(target=self.on_exit, daemon=True).start()


@click.command()
@engine_options
@click.option("--answers", "answers_path", type=click.Path(path_type=Path), default=None,
              help="Label → answer table (answer2label.txt), required for VQA checkpoints.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every "
              "interface; the server has no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most requests in one forward pass.")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long the oldest waiting request may wait for its batch to fill.")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests waiting for a batch before new ones get 503 with Retry-After.")
@click.option("--max-image-bytes", type=click.IntRange(min=1), default=10 << 20, show_default=True,
              help="Largest encoded image accepted (413 above).")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=40_000_000, show_default=True,
              help="Largest image in pixels, checked before decoding (413 above: decompression bombs).")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=None,
              help="Largest request body (413 above) [default: room for two base64 images of --max-image-bytes].")
@click.option("--request-timeout", "request_timeout_s", type=click.FloatRange(min=0.001), default=60.0,
              show_default=True, help="Seconds a request may wait for its answer before 503.")
@click.option("--drain-timeout", "drain_timeout_s", type=click.FloatRange(min=0), default=8.0, show_default=True,
              help="On SIGTERM, seconds to finish the requests in flight.")
@click.option("--preprocess-threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threads decoding images and tokenising texts on rank 0.")
@click.option("--model-name", "model_id", default=None, help="Model id in /v1/models and responses [default: the "
              "checkpoint's file name].")
@click.option("--vocab", type=click.Path(path_type=Path), default=None,
              help="WordPiece vocabulary [default: bert-base-uncased, shipped with the engine].")
@tokenizer_option
@click.option("--index", "index_dir", type=click.Path(path_type=Path), default=None,
              help="An image index (python -m engine.index build) to serve: POST /v1/search, GET /v1/images/{id} "
                   "and the search page /search.")
@one_line_errors
def main(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
         answers_path: Optional[Path], host: str, port: int, max_batch_size: int, max_wait_ms: float,
         max_queue: int, max_image_bytes: int, max_image_pixels: int, max_body_bytes: Optional[int],
         request_timeout_s: float, drain_timeout_s: float, preprocess_threads: int, model_id: Optional[str],
         vocab: Optional[Path], tokenizer_path: Optional[Path], index_dir: Optional[Path]) -> None:
    """Serve the sharded checkpoint in SHARDS over HTTP: VQA, OpenAI chat, embeddings, NLVR2, image search (--index),
    metrics, web pages."""
    manifest = read_manifest(shard_dir)
    check_launch(manifest, shard_dir)
    cfg = manifest.config
    kinds = served_tasks(cfg)
    if not kinds:
        raise UsageError(f"{shard_dir}: the checkpoint has no task head to serve (VQA, NLVR2 or retrieval)")
    answers = None
    if VQA in kinds:
        if answers_path is None:
            raise UsageError("--answers: required for a VQA checkpoint (the answer2label.txt it was fine-tuned "
                             "with, written by `python -m engine.data vqav2`)")
        answers = answer_table(answers_path, cfg.vqa_labels)
    tokenizer = make_tokenizer(cfg, tokenizer_path, vocab)  # every rank refuses a missing one, before loading
    if index_dir is not None and TEXT_EMBEDDING not in kinds:
        raise UsageError(f"--index {index_dir}: {shard_dir} has no retrieval head to embed queries with")
    if not this_launch().is_main:
        follow(shard_dir, device, dtype, threads, timeout_s)
    search = SearchIndex.open(index_dir, manifest, shard_dir) if index_dir is not None else None  # rank 0's alone
    limits = Limits(max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels)
    preprocessor = Preprocessor(cfg, tokenizer, limits)
    sock = listen(host, port)

    metrics = ServerMetrics()
    batcher = Batcher(max_batch_size, max_wait_ms / 1e3, max_queue)
    metrics.queue_depth.set_function(lambda: batcher.depth)
    server: Optional[_Server] = None

    def on_fatal(reason: str) -> None:
        click.echo(f"error: {reason}", err=True)
        if server is not None:
            server.should_exit = True

    runner = Runner(batcher, metrics, timeout_s, on_fatal)
    state = ServerState(
        cfg=cfg, model_id=model_id or model_name(manifest, shard_dir), tp=manifest.tp,
        dtype=dtype, kinds=kinds, answers=answers, preprocessor=preprocessor, batcher=batcher,
        runner=runner, metrics=metrics, pool=ThreadPoolExecutor(preprocess_threads, thread_name_prefix="prep"),
        request_timeout_s=request_timeout_s, created=int(time.time()),
        max_body_bytes=max_body_bytes or 3 * max_image_bytes + (1 << 20), search=search)
    server = _Server(uvicorn.Config(build_app(state), log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=drain_timeout_s, lifespan="off"))
    server.on_exit = batcher.close
    bound = sock.getsockname()
    click.echo(f"listening on http://{bound[0]}:{bound[1]} (loading the model)", err=True)

    def load_and_serve() -> None:
        try:
            engine = start_engine(shard_dir, device, dtype, threads, timeout_s)
            state.dtype = engine.dtype
            runner.channel = GroupChannel(engine.ctx, ServedModel(engine.model, engine.ctx.device))
        except Exception as exc:  # a bad shard, a peer that never came: one line, then exit 1
            runner.fail(f"cannot load {shard_dir}: {exc}")
            return
        served = f"; searching {index_dir} ({len(search.store)} images, /search)" if search else ""
        click.echo(f"ready: {state.model_id} ({', '.join(kinds)}; tp {manifest.tp}, {engine.dtype}){served}", err=True)
        runner.loop()

    # uvicorn re-raises the signal after its graceful shutdown, into the handler in place before it: these.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    engine_thread = threading.Thread(target=load_and_serve, daemon=True, name="engine")
    engine_thread.start()
    threading.Thread(target=runner.watch, daemon=True, name="watchdog").start()
    server.run(sockets=[sock])  # returns after SIGTERM/SIGINT (in-flight requests answered) or a fatal error
    batcher.close()
    engine_thread.join(timeout=max(1.0, STOP_GRACE_S - drain_timeout_s))
    exit_process(1 if runner.failure or engine_thread.is_alive() else 0)


if __name__ == "__main__":
    main(prog_name="python -m engine.serve")
