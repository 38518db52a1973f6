"""Which rank broke the job: heartbeats and failure marks in the launcher's key-value store.

A collective that fails only says that a connection closed or a wait timed out, on
every rank but the one at fault. So each rank keeps a timestamp fresh in the store
(torchrun's, which outlives any one worker) from a daemon thread, and a rank that
gives up with an error leaves its message there before it exits. A rank whose
collective fails then reads the store and leaves with one line naming the rank
that failed (its own error is printed once, by that rank) or stopped answering.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional

import torch.distributed as dist

from .launch import exit_process, this_launch

HEARTBEAT_S = 0.5
# A heartbeat older than this means the rank is stopped or gone: several missed beats, so that a rank
# descheduled on a busy machine is not blamed.
SILENT_S = 3.0


class PeerFailure(RuntimeError):
    """Another rank failed or stopped answering; the message is the line to print."""


def _store(timeout_s: Optional[float] = None) -> Optional[dist.Store]:
    """This job's health keys: in torchrun's own store when the ranks share it (from before they join the
    process group), else beside the process group's keys; None outside a process group."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun keeps its store across restarts
    prefix = f"vlmo-health/{restart}/"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_PORT" in os.environ:
        timeout = datetime.timedelta(seconds=timeout_s or 60)
        try:
            client = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
                                   is_master=False, timeout=timeout)
            return dist.PrefixStore(prefix, client)
        except (RuntimeError, ValueError):
            pass
    if dist.is_initialized():
        return dist.PrefixStore(prefix, dist.distributed_c10d._get_default_store())
    return None


def _read(store: dist.Store, key: str) -> Optional[str]:
    return store.get(key).decode() if store.check([key]) else None


class Health:
    """This rank's heartbeat, and what the store says about the others."""

    def __init__(self, rank: int, world_size: int, timeout_s: Optional[float], beat: bool = True) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.store = _store(timeout_s) if world_size > 1 else None
        if self.store is not None and beat:
            self._beat()
            threading.Thread(target=self._beat_forever, name="vlmo-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        self.store.set(f"beat/{self.rank}", repr(time.time()))

    def _beat_forever(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            try:
                self._beat()
            except RuntimeError:  # the store is gone: the job is ending
                return

    def failed_peer(self) -> Optional[int]:
        """The lowest rank that left an error in the store, if any."""
        if self.store is None:
            return None
        try:
            failed = [r for r in range(self.world_size) if r != self.rank and self.store.check([f"failed/{r}"])]
        except RuntimeError:  # the store is gone: nothing to learn from it
            return None
        return min(failed) if failed else None

    def silent_peers(self) -> List[int]:
        """Ranks whose heartbeat is older than SILENT_S (or that never sent one)."""
        now = time.time()
        beats: Dict[int, Optional[str]] = {r: _read(self.store, f"beat/{r}") for r in range(self.world_size)
                                           if r != self.rank}
        return [r for r, beat in beats.items() if beat is None or now - float(beat) > SILENT_S]

    def diagnose(self, waiting_in: str, error: BaseException) -> str:
        """The line that says why `waiting_in` failed: a peer's error, a peer gone silent, or the error itself.

        Waits up to SILENT_S for the evidence: a rank that died a moment ago still has a fresh heartbeat.
        """
        deadline = time.monotonic() + SILENT_S + HEARTBEAT_S
        try:
            while self.store is not None:
                failed = self.failed_peer()
                if failed is not None:
                    return failed_line(failed)
                silent = self.silent_peers()
                if silent:
                    return silent_line(silent, waiting_in, self.timeout_s)
                if time.monotonic() > deadline:
                    break
                time.sleep(HEARTBEAT_S / 5)
        except RuntimeError:  # the store itself is gone (its host stopped): say what we know
            pass
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"stopped: {waiting_in} failed ({first})"

    @contextlib.contextmanager
    def guard(self, waiting_in: str) -> Iterator[None]:
        """Turn a failed or timed-out collective into a PeerFailure that names the rank at fault."""
        try:
            yield
        except PeerFailure:
            raise
        except RuntimeError as exc:  # gloo/NCCL/HCCL and store errors, timeouts included (torch's DistError family)
            raise PeerFailure(self.diagnose(waiting_in, exc)) from None


def failed_line(rank: int) -> str:
    return f"stopped: rank {rank} failed, see its error"


def silent_line(ranks: List[int], waiting_in: str, timeout_s: Optional[float]) -> str:
    who = "rank " + str(ranks[0]) if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
    limit = "" if timeout_s is None else f", --timeout {timeout_s:g} s"
    return f"stopped: {who} stopped answering ({waiting_in}{limit})"


def leave(line: str, failed: bool) -> None:
    """Print `line` to stderr and end this process with status 1, leaving the others a mark if `failed`.

    When several ranks fail with the same error, the first to get here prints it and the rest point to it.
    """
    launch = this_launch()
    store = _store() if failed and launch.world_size > 1 else None
    if store is not None:
        try:
            rank = launch.rank
            store.set(f"failed/{rank}", line)
            first = int(store.compare_set("first-failure", "", str(rank)).decode())
            if first != rank and _read(store, f"failed/{first}") == line:
                line = failed_line(first)
        except RuntimeError:
            pass  # the store is gone: print our own line
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    exit_process(1)
