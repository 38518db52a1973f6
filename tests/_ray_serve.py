"""engine.ray_serve as a user runs it, on a Ray cluster shared by a test module or on the command's own local Ray.

`Cluster` is a small local Ray head (2 CPUs, no dashboard, a small object store) that engine.ray_serve joins with
--address, as on a machine where `ray start --head` ran; it exports the proxy callback as the README says a
`ray start` user does. Every process of a cluster or a command lives in a session of its own: stopping one kills
exactly that session's processes (Ray's workers sit in process groups of their own inside it).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

from _paths import REPO
from _run import _env, _free_port
from _serve import Server

AUTH_MODE = "RAY_AUTH_MODE"
CLUSTER = """
import os, sys, time, ray
ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, logging_level="WARNING",
         _node_ip_address="127.0.0.1")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""


def session(sid: int) -> List[int]:
    """The processes of session `sid` (the command and everything Ray started under it)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # after pid (comm): state ppid pgrp session
            found.append(int(stat.parent.name))
    return found


def kill_session(sid: int) -> None:
    for pid in session(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def processes_named(sid: int, title: str) -> List[int]:
    """Pids in session `sid` whose command line starts with `title` (Ray titles workers `ray::Class.method`)."""
    named = []
    for pid in session(sid):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title.encode()):
                named.append(pid)
        except OSError:
            continue
    return named


class Cluster:
    def __init__(self) -> None:
        env = _env()
        env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = "engine.serving.ray_proxy:middlewares"
        self.proc = subprocess.Popen([sys.executable, "-c", CLUSTER], cwd=REPO, env=env, start_new_session=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.address = self.proc.stdout.readline().strip()
        assert self.address, "the test's Ray head did not start"
        self.port = _free_port()  # Serve's HTTP port, the same for every application in the cluster
        # The head enabled Ray's token authentication (its default) with ~/.ray/auth_token; a driver joining it
        # from this machine uses that token once told to (the commands inherit this).
        self._auth_mode = os.environ.get(AUTH_MODE)
        os.environ[AUTH_MODE] = "token"

    def stop(self) -> None:
        if self._auth_mode is None:
            os.environ.pop(AUTH_MODE, None)
        else:
            os.environ[AUTH_MODE] = self._auth_mode
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        kill_session(self.proc.pid)


class RayServer(Server):
    """A running `python -m engine.ray_serve`; SIGTERM stops it as a user would."""

    def __init__(self, args: Sequence[object], cluster: "Cluster | None" = None, ready_s: float = 180) -> None:
        where = ["--address", cluster.address] if cluster else ["--num-cpus", 2, "--object-store-mb", 80]
        super().__init__(1, [*args, *where], ready_s, module="engine.ray_serve",
                         port=cluster.port if cluster else _free_port())
        self.cluster = cluster

    def ranks(self, title: str = "ray::RankActor") -> List[int]:
        """Pids of this deployment's rank actors (ranks 1..tp-1 of every replica)."""
        return processes_named(self.cluster.proc.pid if self.cluster else self.proc.pid, title)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit status (the requests in flight are answered first)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        kill_session(self.proc.pid)

    def wait_until(self, check, timeout: float, every: float = 0.5):
        """Poll `check()` until it returns something true; that value, or AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"not within {timeout} s:\n{''.join(self.log[-40:])}")


def golden_replies(server: Server, questions: Sequence[dict], clients: int = 8) -> tuple:
    """Every question as JSON, multipart and an OpenAI chat completion (the official client), `clients` at once:
    (the calls, what came back: (label, answer) or the chat answer, or the exception)."""
    from openai import OpenAI

    from _serve import in_parallel
    from _vqa_requests import ask_form, ask_json, b64

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def chat(q: dict) -> str:
        reply = client.chat.completions.create(model="vlmo", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(q["bytes"])}},
            {"type": "text", "text": q["question"]}]}])
        return reply.choices[0].message.content

    def vqa(ask, q: dict) -> tuple:
        status, _, body = ask(server, q)
        assert status == 200, body
        return body["label"], body["answer"]

    calls = [(fmt, q) for q in questions for fmt in ("json", "form", "chat")]
    run = {"json": lambda q: vqa(ask_json, q), "form": lambda q: vqa(ask_form, q), "chat": chat}
    return calls, in_parallel([lambda f=f, q=q: run[f](q) for f, q in calls], clients)


def expected_replies(calls: Sequence[tuple], predictions: dict) -> list:
    """What golden_replies must give for `calls`, from a vqa_e2e_expected.json's predictions."""
    want = []
    for fmt, q in calls:
        p = predictions[str(q["question_id"])]
        want.append(p["answer"] if fmt == "chat" else (p["label"], p["answer"]))
    return want
