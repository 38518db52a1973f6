"""`python -m engine.demo` (make demo) drives the whole pipeline; here with the tiny model so it takes seconds."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import subprocess
import termios
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from _paths import REPO
from _run import _env, run_here


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One demo workdir for the module: the demo builds its assets there, `make serve` then finds them cached (as
    after a user's `make demo`), and no test builds them twice."""
    return tmp_path_factory.mktemp("demo")


def test_demo_runs_the_vqa_pipeline_and_says_the_weights_are_random(workdir: Path) -> None:
    from engine.demo import main

    ran = run_here(main, ["--model", "tiny", "--workdir", workdir])  # in this process: its steps have their own
    assert ran.returncode == 0, ran.stderr
    assert "RANDOM" in ran.stdout and "VQA score" in ran.stdout
    for step in ("python -m engine.data vqav2", "make shard", "torchrun --standalone --nproc-per-node 2 -m engine.vqa"):
        assert step in ran.stderr
    [summary_path] = (workdir / "results").glob("*.summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["questions"] == summary["answered"] == 18
    assert (summary["run"]["tp"], summary["latency"]["batches"]) == (2, 9)


def test_ctrl_c_on_make_serve_stops_the_server_quietly_with_exit_0(workdir: Path) -> None:
    # A terminal of its own (a pty), as a person has: Ctrl-C is the byte 0x03, which the terminal turns into
    # SIGINT for its foreground process group.
    master, slave = pty.openpty()
    job = subprocess.Popen(["make", "-s", "serve", f"DEMO_ARGS=--model tiny --workdir {workdir} --port 0"],
                           cwd=REPO, env=_env(), stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                           preexec_fn=_terminal_job)
    os.close(slave)
    output = Terminal(master)
    try:
        url = output.wait_for("listening on ").split()[2]
        output.wait_for("ready: ")
        with urllib.request.urlopen(url + "/health", timeout=30) as reply:
            assert reply.status == 200
        seen = len(output.text)
        os.write(master, b"\x03")
        try:
            code = job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 60 s after Ctrl-C; the terminal showed:\n{output.text}")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    rest = output.text[seen:]
    assert code == 0, output.text
    for noise in ("Traceback", "SignalException", "Error", "error", "Interrupt"):
        assert noise not in rest, output.text


def _terminal_job() -> None:
    """In the child: the pty as its controlling terminal, and Ctrl-C's SIGINT with its default action and not
    blocked, as a job a person starts at a terminal has it. A test run in the background of a shell without job
    control inherits SIGINT ignored (POSIX), and Python then keeps it ignored: Ctrl-C would do nothing."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class Terminal:
    """What a pty's programs print, read in the background."""

    def __init__(self, master: int) -> None:
        self.text = ""
        self._master = master
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 4096)
            except OSError:  # EIO: every program holding the terminal has exited
                return
            if not data:
                return
            self.text += data.decode(errors="replace")

    def wait_for(self, prefix: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.text.splitlines():
                if line.startswith(prefix):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no line starting {prefix!r}:\n{self.text}")
