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
import threading
import time
from pathlib import Path
from typing import Any, Optional

import click
import uvicorn

from .runtime.launch import exit_process, this_launch
from .runtime.shards import Manifest, read_manifest
from .models.tasks import TEXT_EMBEDDING
from .serving.app import build_app
from .serving.search import SearchIndex
from .serving.setup import (ServerOptions, follow_rank_zero, listen, load_rank_zero, new_state, read_served,
                            served_calibration, server_options)
from .tasks.calibration import SERVED_FILE, Calibration, calibration_options
from .tasks.cli import UsageError, engine_options, one_line_errors

# SIGTERM: after --drain-timeout, the time left for the batch in flight and the last answers; then rank 0 stops the
# group. A rank other than 0 leaves on its own if rank 0 has not stopped it by twice that after the drain.
SHUTDOWN_MARGIN_S = 2.0


def check_launch(manifest: Manifest, shard_dir: Path) -> None:
    world = this_launch().world_size
    if world != manifest.tp:
        raise UsageError(f"{shard_dir} is cut for tp {manifest.tp} and engine.serve runs one model copy: launch "
                         f"--nproc-per-node {manifest.tp}, not {world} processes (for more copies start one "
                         f"server per group of {manifest.tp} chips, each with its own --port)")


def follow(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
           options: ServerOptions, calibration: Optional[Calibration]) -> None:
    """Ranks other than 0: load, warm up, then run rank 0's steps until it says stop. Exits the process."""
    outcome = []

    def work() -> None:
        try:
            follow_rank_zero(shard_dir, device, dtype, threads, timeout_s, options, calibration)
            outcome.append(0)
        except Exception as exc:  # rank 0 went away, or a collective failed
            click.echo(f"error: rank {this_launch().rank}: {exc}", err=True)
            outcome.append(1)

    deadline = []
    # SIGTERM (torchrun forwards it to every rank) or Ctrl-C must not stop this rank before rank 0 has finished
    # the requests in flight: rank 0 stops it; it leaves by itself only if that does not happen in time.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: deadline.append(time.monotonic() + options.drain_timeout_s
                                                      + 2 * SHUTDOWN_MARGIN_S))
    worker = threading.Thread(target=work, daemon=True, name="follower")
    worker.start()
    while worker.is_alive() and not (deadline and time.monotonic() > deadline[0]):
        worker.join(0.2)  # short waits keep the main thread free to run the signal handler
    exit_process(outcome[0] if outcome else 1)


class _Server(uvicorn.Server):
    """uvicorn, plus: on SIGTERM/SIGINT the runner drains the queue (`Runner.drain`)."""

    on_exit = staticmethod(lambda: None)

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)
        # not here, in the signal handler: the batcher's lock may be held by the interrupted main thread
        if not self.draining:
            self.draining = True
            threading.Thread(target=self.on_exit, daemon=True).start()

    draining = False


@click.command()
@engine_options
@server_options
@click.option("--index", "index_dir", type=click.Path(path_type=Path), default=None,
              help="An image index (python -m engine.index build) to serve: POST /v1/search, GET /v1/images/{id} "
                   "and the search page /search.")
@calibration_options(SERVED_FILE)
@one_line_errors
def main(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
         index_dir: Optional[Path], calibration_path: Optional[Path], calibration_samples: Optional[int],
         **serving: Any) -> None:
    """Serve the sharded checkpoint in SHARDS over HTTP: VQA, OpenAI chat, embeddings, NLVR2, image search (--index),
    metrics, web pages."""
    options = ServerOptions(**serving)
    manifest = read_manifest(shard_dir)
    check_launch(manifest, shard_dir)
    served = read_served(shard_dir, options, manifest)  # every rank refuses a missing tokenizer, before loading
    if index_dir is not None and TEXT_EMBEDDING not in served.kinds:
        raise UsageError(f"--index {index_dir}: {shard_dir} has no retrieval head to embed queries with")
    calibration = served_calibration(served, calibration_path, calibration_samples, dtype)
    if not this_launch().is_main:
        follow(shard_dir, device, dtype, threads, timeout_s, options, calibration)
    search = SearchIndex.open(index_dir, manifest, shard_dir) if index_dir is not None else None  # rank 0's alone
    sock = listen(options.host, options.port)
    server: Optional[_Server] = None

    def on_fatal(reason: str) -> None:
        click.echo(f"error: {reason}", err=True)
        if server is not None:
            server.should_exit = True

    state = new_state(served, options, dtype, timeout_s, on_fatal)
    state.search = search
    batcher, runner = state.batcher, state.runner
    server = _Server(uvicorn.Config(build_app(state), log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=options.drain_timeout_s + 0.75 * SHUTDOWN_MARGIN_S,
                                    lifespan="off"))
    server.on_exit = lambda: runner.drain(options.drain_timeout_s)
    bound = sock.getsockname()
    click.echo(f"listening on http://{bound[0]}:{bound[1]} (loading the model)", err=True)

    def load_and_serve() -> None:
        if load_rank_zero(state, shard_dir, device, dtype, threads, timeout_s, options, calibration):
            searching = f"; searching {index_dir} ({len(search.store)} images, /search)" if search else ""
            calibrated = f" {calibration.description}" if calibration else ""
            click.echo(f"ready: {state.model_id} ({', '.join(served.kinds)}; tp {manifest.tp}, {state.dtype}"
                       f"{calibrated}){searching}", err=True)
            runner.loop()

    # uvicorn re-raises the signal after its graceful shutdown, into the handler in place before it: these.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    engine_thread = threading.Thread(target=load_and_serve, daemon=True, name="engine")
    engine_thread.start()
    threading.Thread(target=runner.watch, daemon=True, name="watchdog").start()
    server.run(sockets=[sock])  # returns after SIGTERM/SIGINT (in-flight requests answered) or a fatal error
    batcher.close()
    engine_thread.join(timeout=0.25 * SHUTDOWN_MARGIN_S)
    exit_process(1 if runner.failure or engine_thread.is_alive() else 0)


if __name__ == "__main__":
    main(prog_name="python -m engine.serve")
