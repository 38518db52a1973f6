"""Start engine.serve as a user would (torchrun, or python -m at tp 1) and talk to it over real HTTP (stdlib only)."""
from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from _paths import REPO
from _run import _env, _torchrun

Reply = Tuple[int, Dict[str, str], Any]


class Server:
    """A running engine.serve; its stderr is collected line by line (`log`)."""

    def __init__(self, nproc: int, args: Sequence[object], ready_s: float = 120, module: str = "engine.serve",
                 port: int = 0) -> None:
        args = [*map(str, args), "--port", str(port), "--device", "cpu"]
        cmd = _torchrun(nproc, module, args) if nproc > 1 else [sys.executable, "-m", module, *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), start_new_session=True, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log: List[str] = []
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.host, self.port = self._wait_for("listening on ", ready_s).split("http://")[1].split()[0].rsplit(":", 1)
        self.port = int(self.port)
        self.first_health = self.get("/health")[0]
        self._wait_for("ready: ", ready_s)
        # torchrun starts its workers in sessions of their own: remember them, to clean up after a test
        self.workers = self._children()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                raise AssertionError(f"server did not print {prefix!r}:\n{''.join(self.log)}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
                timeout: float = 60) -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body or None, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            kind = response.getheader("content-type", "")
            payload = json.loads(data) if kind.startswith("application/json") else data.decode()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, payload
        finally:
            conn.close()

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post_json(self, path: str, obj: Any) -> Reply:
        return self.request("POST", path, json.dumps(obj).encode(), {"content-type": "application/json"})

    def post_form(self, path: str, fields: Dict[str, str], files: Dict[str, bytes]) -> Reply:
        body, kind = multipart(fields, files)
        return self.request("POST", path, body, {"content-type": kind})

    def _children(self) -> List[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in children.read_text().split()] if children.exists() else []

    def rank_pid(self, rank: int) -> int:
        """The pid of torchrun's worker with RANK `rank` (or the process itself at tp 1)."""
        if self.proc.args[1:3] == ["-m", "engine.serve"]:
            return self.proc.pid
        for child in self.workers:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return child
        raise AssertionError(f"no worker with RANK={rank}")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def multipart(fields: Dict[str, str], files: Dict[str, bytes]) -> Tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.jpg"\r\n'
                     f'Content-Type: image/jpeg\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (grayscale, 1 bit) with one tiny, truncated IDAT: a
    decompression bomb's header, without the bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def in_parallel(calls: Sequence[Any], clients: int) -> List[Any]:
    """Run the zero-argument `calls` on `clients` threads at once; results in call order."""
    results: List[Any] = [None] * len(calls)
    jobs: "queue.Queue[int]" = queue.Queue()
    for i in range(len(calls)):
        jobs.put(i)

    def client() -> None:
        while True:
            try:
                i = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = calls[i]()
            except Exception as exc:  # reported by the test, not lost in a thread
                results[i] = exc

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
