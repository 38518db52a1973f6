"""engine.serve on Ray Serve: every replica is one tensor-parallel group of the shards' tp ranks.

Serve reserves each replica a placement group of tp bundles (a GPU, an NPU or CPU cores each), packed on one
node; the replica actor sits in bundle 0 and *is* rank 0: it runs engine.serve's FastAPI app (the ingress), its
dynamic batcher and engine thread, so a batch goes from the request straight into the group's broadcast, with no
extra hop through Ray's object store. The replica starts ranks 1..tp-1 as actors in the other bundles; each sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (rank 0's node and a free port there), joins the
process group through the runtime's `init_parallel`, loads its shard and follows rank 0's steps, as the ranks of
engine.serve do. Ray gives each rank only its own chip (CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES), so
LOCAL_RANK is 0 everywhere. With --calibration every rank, rank 0 included, reads the samples again from the file
at the same path on the replica's node (as it reads its shard there; the command checked them first) and checks that
they are the ones the command read: each rank then runs the same batches. Sending the decoded samples instead would
put 32 × 2.8 MB of fp32 images (VLMo 480) through the object store for every rank of every replica. Every rank
first takes the command's engine settings from the environment (int8's variant, VLMO_TP_SHM) from the spec: its
own process starts with its node's raylet's environment.

Faults: a rank that dies fails its replica's collective (or its Ray task ends), a rank that hangs trips the
--timeout watchdog; either way the replica answers 503 from then on and fails Serve's health check, Serve
stops it (its rank actors go with it: they are its children) and starts a replacement. Shutdown drains: Serve
stops routing to a replica and waits for its requests (--drain-timeout) before the replica stops its group.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import ray
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from ray import serve
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..runtime.loading import FLOAT_LAYERS_ENV, SMOOTHING_ENV
from ..runtime.shm_allreduce import SHM_ENV
from ..tasks.calibration import Calibration, CalibrationSource, head_to_calibrate
from .app import ServerState, build_app
from .metrics import ServerMetrics
from .setup import Served, ServerOptions, follow_rank_zero, load_rank_zero, new_state, read_served

HEALTH_CHECK_TIMEOUT_S = 20.0
FLEET_CACHE_S = 1.0  # /health asks the controller at most this often
CONSTRUCTOR_RETRIES = 3  # a replica whose group cannot form is retried this often, then the deploy fails
RANK_START_S = 300.0  # a rank actor's process start (a fresh Python importing torch) and its scheduling
# What the engine reads from the environment that changes how a rank computes (int8's variant) or talks (the
# shared-memory all-reduce, which every rank of a group must agree on).
SETTINGS_ENV = (SMOOTHING_ENV, FLOAT_LAYERS_ENV, SHM_ENV)


@dataclass
class GroupSpec:
    """What a replica needs to form its group: the shards, the engine options, one rank's Ray resources."""
    shard_dir: Path
    options: ServerOptions
    tp: int
    device: str  # resolved: cpu, cuda or npu
    dtype: Optional[str]
    threads: Optional[int]
    timeout_s: float
    rank_resources: Dict[str, Any] = field(default_factory=dict)  # num_cpus / num_gpus / resources of a rank
    calibration: Optional[CalibrationSource] = None  # int8's --calibration, which every rank reads again
    # SETTINGS_ENV as the command has them (None: unset), which every rank applies first: Ray starts a rank's
    # process with the environment of its node's raylet, not the command's. A field here rather than runtime_env
    # env_vars on the actors, which can only add variables: a rank must also lose a setting the command runs without.
    settings: Dict[str, Optional[str]] = field(default_factory=dict)

    def apply_settings(self) -> None:
        """This rank's environment gets the command's settings, before anything reads them."""
        for name, value in self.settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def calibration_for(self, served: Served) -> Optional[Calibration]:
        """This rank's read of the calibration samples (the same ones on every rank), or None without one."""
        if self.calibration is None:
            return None
        return self.calibration.read(head_to_calibrate(served.cfg.tasks), served.cfg, served.tokenizer)

    def bundle(self) -> Dict[str, float]:
        """One rank's placement-group bundle."""
        out = {"CPU": float(self.rank_resources.get("num_cpus", 0))}
        if self.rank_resources.get("num_gpus"):
            out["GPU"] = float(self.rank_resources["num_gpus"])
        out.update({k: float(v) for k, v in self.rank_resources.get("resources", {}).items()})
        return {k: v for k, v in out.items() if v}


def rank_resources(device: str, cpus_per_rank: float) -> Dict[str, Any]:
    """A rank's Ray resources on `device`: its chip (GPU, or the custom resource NPU) and its CPU cores."""
    resources: Dict[str, Any] = {"num_cpus": cpus_per_rank}
    if device == "cuda":
        resources["num_gpus"] = 1
    elif device == "npu":
        resources["resources"] = {"NPU": 1}
    return resources


def launch_settings() -> Dict[str, Optional[str]]:
    """This process's SETTINGS_ENV, for GroupSpec.settings."""
    return {name: os.environ.get(name) for name in SETTINGS_ENV}


def rank_env(rank: int, tp: int, master_addr: str, master_port: int) -> Dict[str, str]:
    """The launcher variables a rank reads in `init_parallel`, as torchrun would set them for one group."""
    return {"RANK": str(rank), "WORLD_SIZE": str(tp), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": str(tp),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.split(". ")[0].splitlines()[0] if text else type(exc).__name__


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@ray.remote(max_restarts=0, max_concurrency=2)
class RankActor:
    """Ranks 1..tp-1 of one replica's group."""

    def follow(self, env: Dict[str, str], spec: GroupSpec) -> int:
        spec.apply_settings()
        os.environ.update(env)
        calibration = spec.calibration_for(read_served(spec.shard_dir, spec.options))
        follow_rank_zero(spec.shard_dir, spec.device, spec.dtype, spec.threads, spec.timeout_s, spec.options,
                         calibration)
        return os.getpid()

    def pid(self) -> int:
        return os.getpid()


class ReplicaMetrics(ServerMetrics):
    """engine.serve's metrics, rendered with a `replica` label (each replica keeps its own registry)."""

    def __init__(self, replica: str) -> None:
        super().__init__()
        self.replica = replica

    def collect(self) -> List[Metric]:
        families = []
        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, "replica": self.replica}) for s in family.samples]
            families.append(labelled)
        return families

    def render(self) -> bytes:
        return generate_latest(self)


@serve.ingress()
class GroupReplica:
    """One Serve replica: rank 0 of a tensor-parallel group, behind engine.serve's app."""

    async def __init__(self, spec: GroupSpec) -> None:
        spec.apply_settings()  # before the calibration is read (VLMO_INT8_SMOOTHING=0 refuses one)
        context = serve.get_replica_context()
        self.app_name, self.deployment = context.app_name, context.deployment
        self.replica = context.replica_id.unique_id
        served = read_served(spec.shard_dir, spec.options)
        self.calibration = spec.calibration_for(served)  # a bad copy on this node fails the constructor
        self.state: ServerState = new_state(served, spec.options, spec.dtype, spec.timeout_s, self._fatal,
                                            ReplicaMetrics(self.replica))
        self.state.fleet = self._fleet
        self._fleet_seen: Tuple[float, Dict[str, int]] = (0.0, {})
        self.ranks = self._start_ranks(spec)
        self.following: List[ray.ObjectRef] = []  # each rank's `follow`, once the rank actors are up
        self._loaded = threading.Event()
        self._engine = threading.Thread(target=self._load_and_run, args=(spec,), daemon=True, name="engine")
        self._engine.start()
        threading.Thread(target=self.state.runner.watch, daemon=True, name="watchdog").start()
        await asyncio.get_running_loop().run_in_executor(None, self._wait_loaded)

    def _start_ranks(self, spec: GroupSpec) -> List[Any]:
        """Ranks 1..tp-1 as actors in this replica's bundles 1..tp-1 (their processes start meanwhile)."""
        group = get_current_placement_group()
        return [RankActor.options(**spec.rank_resources, scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=rank)).remote() for rank in range(1, spec.tp)]

    def _load_and_run(self, spec: GroupSpec) -> None:
        """The engine thread: form the group (this process is rank 0), load, then run batches."""
        try:
            # --timeout bounds the joining, not the start of the rank processes (slow on a busy machine)
            ray.get([actor.pid.remote() for actor in self.ranks], timeout=RANK_START_S)
        except Exception as exc:
            self.state.runner.fail(f"the ranks did not start within {RANK_START_S:g} s: {_first_sentence(exc)}")
            self._loaded.set()
            return
        master = (ray.util.get_node_ip_address(), free_port())
        os.environ.update(rank_env(0, spec.tp, *master))
        self.following = [actor.follow.remote(rank_env(rank, spec.tp, *master), spec)
                          for rank, actor in enumerate(self.ranks, start=1)]
        loaded = load_rank_zero(self.state, spec.shard_dir, spec.device, spec.dtype, spec.threads, spec.timeout_s,
                                spec.options, self.calibration)
        self._loaded.set()
        if loaded:
            self.state.runner.loop()

    def _wait_loaded(self) -> None:
        """Until rank 0 has loaded (the replica then takes traffic); a rank that failed fails the constructor."""
        while not self._loaded.wait(0.2):
            self._check_ranks()
        if self.state.runner.failure:
            raise RuntimeError(self.state.runner.failure)

    def _check_ranks(self) -> None:
        if not self.following:
            return
        ended, _ = ray.wait(self.following, timeout=0)
        if not ended:
            return
        rank = self.following.index(ended[0]) + 1
        try:
            ray.get(ended[0])
            reason = f"rank {rank} left the group"
        except Exception as exc:  # the actor died, or its load or a collective raised
            reason = f"rank {rank} failed: {_first_sentence(exc)}"
        self.state.runner.fail(reason)
        raise RuntimeError(reason)

    def _fatal(self, reason: str) -> None:
        print(f"error: replica {self.replica}: {reason}", flush=True)

    def check_health(self) -> None:
        """Serve's health check: unhealthy once a rank failed or hung; Serve then replaces the replica."""
        if self.state.runner.failure:
            raise RuntimeError(self.state.runner.failure)
        self._check_ranks()

    def _fleet(self) -> Dict[str, Any]:
        """This replica and how many of the deployment's replicas are running (for /health)."""
        seen, replicas = self._fleet_seen
        if time.monotonic() - seen > FLEET_CACHE_S:
            status = serve.status().applications[self.app_name].deployments[self.deployment]
            replicas = {state.lower(): n for state, n in status.replica_states.items()}
            self._fleet_seen = (time.monotonic(), replicas)
        return {"replica": self.replica, "replicas": replicas}

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self.state)

    def __del__(self) -> None:
        """Serve's graceful stop, once in-flight requests are answered: stop the group, then the rank actors."""
        state = getattr(self, "state", None)
        if state is None:
            return
        state.batcher.close()
        self._engine.join(timeout=state.batcher.max_wait_s + 5.0)
        for actor in self.ranks:
            ray.kill(actor)


def deployment_options(spec: GroupSpec, replicas: int, autoscale: Optional[Tuple[int, int]],
                       health_check_s: float) -> Dict[str, Any]:
    """Serve's options for the deployment, its bounds taken from the server's own options; Serve asks a replica
    every `health_check_s` whether its group is whole."""
    options = spec.options
    bundle = spec.bundle()
    scaling: Dict[str, Any] = {"num_replicas": replicas}
    if autoscale:
        low, high = autoscale
        # Scale on requests per replica: a replica is busy when it holds a full batch.
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                          "initial_replicas": min(max(replicas, low), high),
                                          "target_ongoing_requests": options.max_batch_size}}
    return {
        **scaling,
        "ray_actor_options": dict(spec.rank_resources),
        "placement_group_bundles": [bundle] * spec.tp,
        "placement_group_strategy": "STRICT_PACK",
        # A replica holds its queue and the batch that runs; beyond that requests wait at the proxy, whose
        # queue is bounded the same way, and then get 503 with Retry-After (engine.serve's full queue).
        "max_ongoing_requests": options.max_queue + options.max_batch_size,
        "max_queued_requests": options.max_queue,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1},
        "graceful_shutdown_timeout_s": options.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.2,
        "health_check_period_s": health_check_s,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
    }


def application(spec: GroupSpec, replicas: int, autoscale: Optional[Tuple[int, int]],
                health_check_s: float) -> serve.Application:
    """The Serve application: `replicas` (or autoscaled) tensor-parallel groups behind one HTTP route."""
    return serve.deployment(GroupReplica, name="vlmo").options(
        **deployment_options(spec, replicas, autoscale, health_check_s)).bind(spec)
