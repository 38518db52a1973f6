"""`python -m engine.ray_serve --shards DIR --replicas N`: engine.serve's HTTP API on Ray Serve, one tensor-parallel
group per replica (engine.serving.ray_app), on one machine or a Ray cluster.

Without --address the command starts a local Ray of its own (stopped when the command stops); with --address it
joins a running cluster (`ray start --head` ...). Everything a user can get wrong is refused in one line before
Ray starts (the shards, --answers, --tokenizer, --calibration, int8's settings from the environment, the port) or
before anything deploys (no GPU/NPU in the cluster, no node large enough for one group). The engine's settings from
this process's environment (VLMO_INT8_SMOOTHING, VLMO_INT8_FLOAT_LAYERS, VLMO_TP_SHM) go to every rank of every
replica in the group spec. SIGTERM or Ctrl-C drains: the requests in flight are answered (--drain-timeout), then the
application (and a Ray the command started) stops, and the command exits 0. `build` is the same application for
`serve run` / `serve deploy` configs and KubeRay's RayService.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import click

from .options import option_group
from .runtime.loading import INT8
from .runtime.shards import read_manifest
from .serving.setup import ServerOptions, listen, read_served, served_calibration, server_options
from .tasks.calibration import SERVED_FILE, Calibration, calibration_options
from .tasks.cli import UsageError, check_int8_settings, engine_options, one_line_errors

if TYPE_CHECKING:
    from .serving.ray_app import GroupSpec

APP = "vlmo"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_TIMEOUT_MARGIN_S = 5.0  # the proxy's own timeout: past the replica's, which answers 503 first


def parse_autoscale(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if text is None:
        return None
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--autoscale {text}: expected MIN:MAX, e.g. 1:4") from None
    if not 0 <= low <= high or high < 1:
        raise UsageError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def ray_options(command: Any) -> Any:
    return option_group([
        click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Tensor-parallel groups serving at once (with --autoscale: how many to start with)."),
        click.option("--autoscale", default=None, metavar="MIN:MAX",
                     help="Let Serve scale between MIN and MAX replicas on requests per replica "
                          "(target: --max-batch-size)."),
        click.option("--health-check-period", "health_check_s", type=click.FloatRange(min=0.1), default=2.0,
                     show_default=True, help="Seconds between Serve's health checks of a replica: a failed group "
                     "is replaced after three failed checks in a row (Serve's threshold)."),
        click.option("--cpus-per-rank", type=click.FloatRange(min=0, min_open=True), default=1.0,
                     show_default=True, help="CPU cores Ray reserves for each rank (the threads of a CPU rank)."),
        click.option("--address", default=None,
                     help="Join this Ray cluster (auto: the one `ray start` runs here) [default: start a local Ray]."),
        click.option("--num-cpus", type=click.IntRange(min=1), default=None,
                     help="A local Ray's CPUs [default: all cores]."),
        click.option("--object-store-mb", type=click.IntRange(min=80), default=256, show_default=True,
                     help="A local Ray's object store (requests and answers only pass through it)."),
    ])(command)


def start_ray(address: Optional[str], num_cpus: Optional[int], object_store_mb: int) -> None:
    import ray

    if address is not None:
        ray.init(address=address, logging_level="WARNING", namespace="vlmo")
        return
    # The proxy's plain-text errors become engine.serve's JSON ones (a `ray start` cluster: export it there).
    os.environ.setdefault(PROXY_CALLBACK_ENV, "engine.serving.ray_proxy:middlewares")
    # A Ray of this machine only: its processes talk over the loopback, not on the network.
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_mb << 20,
             logging_level="WARNING", namespace="vlmo", _node_ip_address="127.0.0.1")


def cluster_device(device: str) -> str:
    """`--device` against what the Ray cluster has: auto picks NPU, then GPU, then the CPU."""
    import ray

    resources = ray.cluster_resources()
    names = {"npu": "NPU", "cuda": "GPU"}
    if device == "auto":
        return next((d for d, name in names.items() if resources.get(name)), "cpu")
    if device in names and not resources.get(names[device]):
        raise UsageError(f"--device {device}: the Ray cluster has no {names[device]} resource "
                         f"(it has: {', '.join(sorted(k for k in resources if '.' not in k and ':' not in k))})")
    return device


def check_fits(bundle: Dict[str, float], tp: int) -> None:
    """One group is packed on one node: some node must hold tp bundles."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    most = max((min(int(res.get(k, 0) // v) for k, v in bundle.items()) for res in nodes), default=0)
    if most < tp:
        raise UsageError(f"one replica needs {tp} x {bundle} on one node and the largest node of the Ray cluster "
                         f"holds {most} (fewer --cpus-per-rank, or shards of a smaller tp)")


def group_spec(shard_dir: Path, options: ServerOptions, device: str, dtype: Optional[str], threads: Optional[int],
               timeout_s: float, cpus_per_rank: float, calibration: Optional[Calibration] = None) -> "GroupSpec":
    """The replicas' plan, once Ray is up: the device the cluster has, a rank's resources, the threads, where
    every rank reads int8's calibration samples again, and this process's settings from the environment."""
    from .serving.ray_app import GroupSpec, launch_settings, rank_resources

    device = cluster_device(device)
    if device == "cpu" and threads is None:
        threads = max(1, int(cpus_per_rank))
    spec = GroupSpec(shard_dir=shard_dir.resolve(), options=options, tp=read_manifest(shard_dir).tp, device=device,
                     dtype=dtype, threads=threads, timeout_s=timeout_s,
                     rank_resources=rank_resources(device, cpus_per_rank),
                     calibration=calibration.source if calibration else None, settings=launch_settings())
    check_fits(spec.bundle(), spec.tp)
    return spec


def checked_before_ray(shard_dir: Path, options: ServerOptions, dtype: Optional[str], calibration_path: Optional[Path],
                       calibration_samples: Optional[int]) -> Optional[Calibration]:
    """The served checkpoint and --calibration's samples, read, and int8's settings from the environment checked
    (the ranks would refuse them only once the deploy began); the calibration, if any."""
    calibration = served_calibration(read_served(shard_dir, options), calibration_path, calibration_samples, dtype)
    if dtype == INT8:
        check_int8_settings()
    return calibration


def _import_ray() -> None:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise UsageError("ray[serve] is not installed: pip install -e '.[ray]' (make install does)") from None


@click.command()
@engine_options
@server_options
@ray_options
@calibration_options(f"{SERVED_FILE}; every rank of every replica reads it again, at this path on its node, as "
                     f"--shards")
@one_line_errors
def main(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
         replicas: int, autoscale: Optional[str], health_check_s: float, cpus_per_rank: float,
         address: Optional[str], num_cpus: Optional[int], object_store_mb: int, calibration_path: Optional[Path],
         calibration_samples: Optional[int], **serving: Any) -> None:
    """Serve the shards in SHARDS on Ray Serve: REPLICAS tensor-parallel groups behind engine.serve's HTTP API."""
    options = ServerOptions(**serving)
    scale = parse_autoscale(autoscale)
    calibration = checked_before_ray(shard_dir, options, dtype, calibration_path, calibration_samples)
    _import_ray()
    if address is None:
        listen(options.host, options.port).close()  # a taken port: one line now, not a proxy that never starts
    from ray import serve

    from .serving.ray_app import application

    start_ray(address, num_cpus, object_store_mb)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    started = False  # Serve, and (being) deployed
    try:
        spec = group_spec(shard_dir, options, device, dtype, threads, timeout_s, cpus_per_rank, calibration)
        serve.start(http_options={"host": options.host, "port": options.port,
                                  "request_timeout_s": options.request_timeout_s + PROXY_TIMEOUT_MARGIN_S})
        url = f"http://{options.host}:{options.port}"
        click.echo(f"listening on {url} (starting {replicas} replica(s) of tp {spec.tp} on {spec.device})",
                   err=True)
        started = True
        try:
            serve.run(application(spec, replicas, scale, health_check_s), name=APP, route_prefix="/")
        except RuntimeError as exc:  # a replica could not start (its error is in the log above)
            raise UsageError(f"the application did not deploy: {str(exc).strip().splitlines()[0]}") from None
        calibrated = f", {dtype} {calibration.description}" if calibration else ""
        click.echo(f"ready: {url} ({replicas if scale is None else f'{scale[0]}-{scale[1]}'} replica(s) of tp "
                   f"{spec.tp} on {spec.device}{calibrated})", err=True)
        while not stop.wait(0.5):
            pass
        click.echo("draining: answering the requests in flight, then stopping", err=True)
    finally:
        _stop(own_ray=address is None, started=started)


def _stop(own_ray: bool, started: bool) -> None:
    """Serve drains the replicas (--drain-timeout) as it deletes them; a Ray the command started stops too."""
    import ray
    from ray import serve

    if started and own_ray:
        serve.shutdown()
    elif started:
        serve.delete(APP)
    if own_ray:
        ray.shutdown()


def build_params(args: Dict[str, Any]) -> Dict[str, Any]:
    """A Serve config's `args` (option names without the dashes) parsed as the command parses its options."""
    argv = []
    for key, value in args.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return main.make_context("engine.ray_serve", argv).params


def build(args: Dict[str, Any]) -> Any:
    """The application for `serve run` / `serve deploy` configs (import_path: engine.ray_serve:build), from the
    command's options: `args` maps their names (shards, answers, replicas, autoscale, ...) to values."""
    from .serving.ray_app import application

    params = build_params(args)
    options = ServerOptions(**{k: params[k] for k in ServerOptions.__dataclass_fields__})
    calibration = checked_before_ray(params["shard_dir"], options, params["dtype"], params["calibration_path"],
                                     params["calibration_samples"])
    spec = group_spec(params["shard_dir"], options, params["device"], params["dtype"], params["threads"],
                      params["timeout_s"], params["cpus_per_rank"], calibration)
    return application(spec, params["replicas"], parse_autoscale(params["autoscale"]), params["health_check_s"])


if __name__ == "__main__":
    main(prog_name="python -m engine.ray_serve")
