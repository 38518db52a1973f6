"""One tp-1 engine.serve per head (VQA, NLVR2, retrieval with an image index), started side by side once for the
session and shared by test_serve_schema and test_serve_heads (conftest's `head_servers`): start-up is most of the
time of a test that talks to one."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, NamedTuple

from click.testing import CliRunner

from _paths import GOLDEN
from _run import shard_here
from _serve import Server
from _vqa_requests import ANSWERS

CHECKPOINTS = {"vqa": GOLDEN / "tiny_relpos_vqa9" / "checkpoint.pt",
               "nlvr2": GOLDEN / "tiny_relpos_nlvr2" / "checkpoint.pt",
               "irtr": GOLDEN / "tiny_relpos_irtr" / "checkpoint.pt"}
COCO = GOLDEN / "coco_arrow_published"
MAX_IMAGE_PIXELS = 1_000_000


class HeadServers(NamedTuple):
    servers: Dict[str, Server]  # head -> its running server
    shards: Dict[str, Path]  # head -> the tp-1 shards it serves


def head_servers(mktemp: Callable[[str], Path]) -> Iterator[HeadServers]:
    """Shards every head's checkpoint at tp 1, builds the retrieval shards' index of the COCO test split, starts
    the servers (--max-image-pixels 1 M, --max-wait-ms 1) and kills them when the generator is closed."""
    from engine.index.__main__ import main as index_main

    root = mktemp("heads")
    shards = {task: root / task for task in CHECKPOINTS}
    shard_here(CHECKPOINTS["irtr"], 1, shards["irtr"])
    built = CliRunner().invoke(index_main, ["build", "--shards", str(shards["irtr"]), "--data", str(COCO), "--split",
                                            "test", "--out", str(root / "index"), "--device", "cpu", "--num-workers",
                                            "0"])
    assert built.exit_code == 0, built.output
    started: Dict[str, object] = {}

    def start(task: str) -> None:
        if task != "irtr":
            shard_here(CHECKPOINTS[task], 1, shards[task])
        args = ["--shards", shards[task], "--max-image-pixels", MAX_IMAGE_PIXELS, "--max-wait-ms", 1]
        args += ["--index", root / "index"] if task == "irtr" else []
        try:
            started[task] = Server(1, args + (["--answers", ANSWERS] if task == "vqa" else []))
        except Exception as exc:  # reported below, not lost in the thread
            started[task] = exc

    threads = [threading.Thread(target=start, args=(task,)) for task in CHECKPOINTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for task, server in started.items():
            assert isinstance(server, Server), f"{task}: {server}"
        yield HeadServers(started, shards)  # type: ignore[arg-type]
    finally:
        for server in started.values():
            if isinstance(server, Server):
                server.kill()
