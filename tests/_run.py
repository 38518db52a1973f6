"""Run the project's command-line tools as a user would: in a subprocess, through torchrun where parallel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from _paths import REPO


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_module(module: str, args: Sequence[object], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args` in the repository root."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _launcher(nproc: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(_free_port())]


def _torchrun(nproc: int, module: str, args: Sequence[object]) -> list:
    return [*_launcher(nproc), "-m", module, *map(str, args)]


def run_torchrun(nproc: int, module: str, args: Sequence[object], timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc -m module args` on this machine (gloo on the CPU)."""
    return subprocess.run(_torchrun(nproc, module, args), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_torchrun(nproc: int, module: str, args: Sequence[object], stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """run_torchrun in the background, stdout discarded, stderr where asked (discarded by default), in its own
    process group (os.killpg cleans up)."""
    return subprocess.Popen(_torchrun(nproc, module, args), cwd=REPO, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=stderr)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shard(checkpoint: Path, tp: int, out: Path, *extra: object) -> subprocess.CompletedProcess:
    return run_module("sharding", ["--checkpoint", checkpoint, "--tp", tp, "--out", out, *extra])


def run_here(command, args: Sequence[object]) -> subprocess.CompletedProcess:
    """A click command run in this process (no interpreter start-up), reported as `run_module` reports the same
    command run as `python -m`. An exception other than the command's own exit fails here: in a subprocess it
    would have printed a traceback. The command's --threads (torch.set_num_threads) holds for it alone."""
    import torch
    from click.testing import CliRunner

    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into stdout unless told not to
    except TypeError:
        runner = CliRunner()
    threads = torch.get_num_threads()
    try:
        result = runner.invoke(command, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return subprocess.CompletedProcess(list(map(str, args)), result.exit_code, result.stdout, result.stderr)


def shard_in_process(checkpoint: Path, tp: int, out: Path, *extra: object) -> subprocess.CompletedProcess:
    """`shard`, run in this process (`run_here`)."""
    from sharding.__main__ import main

    return run_here(main, ["--checkpoint", checkpoint, "--tp", tp, "--out", out, *extra])


def shard_here(checkpoint: Path, tp: int, out: Path, *extra: object) -> None:
    """`python -m sharding` in this process, for tests that only need the shards."""
    done = shard_in_process(checkpoint, tp, out, *extra)
    assert done.returncode == 0, done.stderr


def forward_many(tp: int, items: Sequence[dict], plan: Path) -> None:
    """engine.forward for every item (shards, inputs, out[, task, dtype]) in one torchrun launch of tp ranks; at tp 1
    one process alone, as `python -m engine.forward` runs there: this one (a process of its own would cost seconds
    of start-up)."""
    steps = [{k: str(v) for k, v in item.items()} for item in items]
    if tp == 1:
        import torch
        from _forward_many import run_plan

        threads = torch.get_num_threads()
        try:
            run_plan(steps)
        finally:
            torch.set_num_threads(threads)  # init_parallel sets this process's threads
        return
    plan.write_text(json.dumps(steps))
    ran = subprocess.run([*_launcher(tp), str(Path(__file__).with_name("_forward_many.py")), str(plan)], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr


def invoke_refused(command, args: Sequence[object], *fragments: str) -> None:
    """Run a click command in-process and check it refuses: exit 1, one `error:` line holding every fragment."""
    from click.testing import CliRunner

    result = CliRunner().invoke(command, [str(a) for a in args])  # the last of a repeated option wins
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), result.output
    assert "Traceback" not in result.output
