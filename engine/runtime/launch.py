"""Where the launcher put this process: rank, world size, local rank — read from the environment here only.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; so does anything else that starts ranks (a Ray
actor sets them before it joins the group). Without them the process runs alone.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch.distributed as dist


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def this_launch() -> Launch:
    """This process's place in the launch, as the launcher's variables say now."""
    env = os.environ
    return Launch(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")),
                  int(env.get("LOCAL_WORLD_SIZE", "1")))


def exit_process(code: int, grouped: bool = False) -> NoReturn:
    """End this process with `code`, output flushed. A rank of a process group (one now, or `grouped`: one that
    has just left it) skips interpreter teardown: gloo's threads can abort a finished process there ("terminate
    called without an active exception")."""
    sys.stdout.flush()
    sys.stderr.flush()
    if grouped or dist.is_initialized():
        os._exit(code)
    sys.exit(code)
