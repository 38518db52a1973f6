"""All-reduce through shared memory for the tensor-parallel ranks of one CPU host.

gloo moves every all-reduce through loopback TCP and a helper thread: about 2 ms
for a [941, 768] fp32 activation between two local processes, and 4-5 ms on
average inside a VLMo forward, where it runs 24 times per question. Ranks on one
machine can instead copy their partial sums into a shared buffer, publish a
sequence number, wait for every peer's, and each add up all slots in rank order,
so that every rank holds the same bits afterwards.

Two slot sets alternate between calls: a rank can only start writing a set again
after every peer has published the call in between, i.e. has finished reading.
The publish-then-read protocol relies on x86-64's store ordering; elsewhere (and
with VLMO_TP_SHM=0, or across hosts) the engine keeps gloo.

A wait ends after the job's --timeout with the ranks that never published, or
sooner when a peer has left an error (engine.runtime.health).
"""
from __future__ import annotations

import os
import platform
import socket
import time
import uuid
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .health import Health, PeerFailure, failed_line, silent_line

SHM_ENV = "VLMO_TP_SHM"  # 0: keep gloo (to measure what the shared memory saves)

SHM_DIR = "/dev/shm"
FLAG_STRIDE = 8  # int64s: one 64-byte cache line per rank's flag
SPIN_S, NAP_S = 1e-3, 1e-4  # wait for peers spinning for 1 ms, then in 0.1 ms naps
CHECK_S = 1.0  # while napping, look for a failed peer this often


class SharedMemoryAllReduce:
    """Sum a contiguous CPU tensor in place over the group's ranks; False when it does not fit the buffer."""

    def __init__(self, group: Optional[dist.ProcessGroup], rank: int, size: int, capacity_bytes: int,
                 health: Health) -> None:
        self.rank, self.size, self.capacity, self.health = rank, size, capacity_bytes, health
        self.group = group
        self.seq = 0
        header = size * FLAG_STRIDE * 8
        total = header + 2 * size * capacity_bytes
        name = [f"{SHM_DIR}/vlmo-tp-{uuid.uuid4().hex}" if rank == 0 else None]
        dist.broadcast_object_list(name, src=_global_rank(group, 0), group=group)
        path = name[0]
        if rank == 0:
            with open(path, "wb") as handle:
                handle.truncate(total)
        dist.barrier(group=group)
        self.buffer = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
        dist.barrier(group=group)
        if rank == 0:
            os.unlink(path)  # the mappings stay; nothing is left behind when the processes end
        self.flags = self.buffer[:header].view(torch.int64).view(size, FLAG_STRIDE)[:, 0]
        self.slots = self.buffer[header:].view(2, size, capacity_bytes)
        # (slot set, dtype, shape) -> every rank's slot as a tensor of that kind: a forward reuses a few shapes
        self._views: Dict[Tuple[int, torch.dtype, Tuple[int, ...]], List[torch.Tensor]] = {}

    def __call__(self, tensor: torch.Tensor) -> bool:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.capacity or not tensor.is_contiguous():
            return False
        self.seq += 1
        key = (self.seq % 2, tensor.dtype, tuple(tensor.shape))
        slots = self._views.get(key)
        if slots is None:
            slots = self._views[key] = [s[:nbytes].view(tensor.dtype).view(tensor.shape) for s in self.slots[key[0]]]
        slots[self.rank].copy_(tensor)
        self.flags[self.rank] = self.seq  # publish after the data (x86-64 keeps stores in order)
        self._wait_for_peers()
        torch.add(slots[0], slots[1], out=tensor)
        for other in slots[2:]:
            tensor.add_(other)
        return True

    def _wait_for_peers(self) -> None:
        start = time.monotonic()
        checked = start
        while int(self.flags.min()) < self.seq:
            now = time.monotonic()
            if now - start < SPIN_S:
                os.sched_yield()  # peers usually arrive within a millisecond: spin, but let a core-mate run
                continue
            if now - start > self.health.timeout_s:
                raise PeerFailure(silent_line(self._missing(), "shared-memory all-reduce", self.health.timeout_s))
            if now - checked > CHECK_S:
                checked = now
                failed = self.health.failed_peer()
                if failed is not None:
                    raise PeerFailure(failed_line(failed))
            time.sleep(NAP_S)  # a peer is descheduled or busy: stop burning the core it may need

    def _missing(self) -> List[int]:
        """Global ranks of the peers that have not published this call."""
        late = (self.flags < self.seq).nonzero().flatten().tolist()
        return [_global_rank(self.group, r) for r in late]


def _global_rank(group: Optional[dist.ProcessGroup], group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def shared_memory_all_reduce(group: Optional[dist.ProcessGroup], rank: int, size: int, health: Health,
                             capacity_bytes: int = 64 << 20) -> Optional[SharedMemoryAllReduce]:
    """The group's shared-memory all-reduce, or None where gloo must stay (collective: every rank calls it)."""
    hosts: List[Optional[str]] = [None] * size
    with health.guard("setting up the shared-memory all-reduce"):
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        usable = (os.environ.get(SHM_ENV, "1") != "0"
                  and platform.machine().lower() in ("x86_64", "amd64")
                  and os.path.isdir(SHM_DIR) and len(set(hosts)) == 1)
        # every rank sees the same hosts; the other conditions are per machine and the hosts are one machine
        return SharedMemoryAllReduce(group, rank, size, capacity_bytes, health) if usable else None
