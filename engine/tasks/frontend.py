"""What the task front ends (engine.vqa, engine.nlvr2, engine.retrieval) share: continuing a results file,
the description of a run, and the final table."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import click

from ..runtime.shards import Manifest

from .cli import Engine, UsageError
from ..runtime.distributed import ParallelContext, broadcast_object
from .results import ResultsWriter, read_results

Row = Tuple[str, str]


def checkpoint_tag(manifest: Manifest) -> str:
    """A short id of the source checkpoint, stored in every result line so a file is never continued with another."""
    return str(manifest.source.get("sha256", ""))[:16]


def open_results(path: Path, checkpoint: str, key: Union[str, Sequence[str]] = "question_id") -> ResultsWriter:
    """The results file to append to, refusing one that holds another checkpoint's results."""
    try:
        if path.exists():
            others = {r.get("checkpoint") for r in read_results(path)} - {checkpoint}
            if others:
                raise UsageError(f"{path} holds results of another checkpoint "
                                 f"(sha256 {sorted(map(str, others))[0]}…); pass a new --out")
        return ResultsWriter(path, key)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot continue {path}: {exc}; pass a new --out") from None


def pending(ctx: ParallelContext, writer: Optional[ResultsWriter], keys: Sequence[Hashable], noun: str) -> List[int]:
    """Positions of the `keys` that rank 0's results file lacks, the same list on every rank.

    Rank 0 alone reads the file (it may live on rank 0's node only) and tells the others what is done.
    """
    done = broadcast_object(ctx, writer.done_keys if writer else None)
    todo = [i for i, key in enumerate(keys) if key not in done]
    if ctx.is_main and done:
        click.echo(f"continuing {writer.path}: {len(keys) - len(todo)} of {len(keys)} {noun} already done", err=True)
    return todo


def run_info(engine: Engine, shard_dir: Path, batch_size: int) -> Dict[str, Any]:
    """How the run was launched, for the summary JSON."""
    ctx = engine.ctx
    return {"tp": ctx.tp_size, "dp": ctx.dp_size, "device": str(ctx.device), "dtype": engine.dtype,
            "batch_size": batch_size, "shards": str(shard_dir),
            "checkpoint_sha256": engine.manifest.source.get("sha256")}


def run_title(task: str, run: Dict[str, Any]) -> str:
    return (f"{task}: tp {run['tp']} x dp {run['dp']} on {run['device']}, {run['dtype']}, "
            f"batch {run['batch_size']}")


def latency_rows(latency: Optional[Dict[str, float]], unit: str,
                 names: Tuple[str, str] = ("batch latency", "throughput")) -> List[Row]:
    """Per-batch device latency and end-to-end rate; nothing when no batch ran (all done before)."""
    if not latency:
        return []
    return [(names[0], "mean {mean_ms:.1f} ms, p50 {p50_ms:.1f}, p90 {p90_ms:.1f}, p99 {p99_ms:.1f} "
                       "({batches} batches)".format(**latency)),
            (names[1], f"{latency['samples_per_s']:.2f} {unit}/s end to end")]


def print_table(title: str, rows: Sequence[Row]) -> None:
    """The final table, on rank 0's stdout."""
    click.echo(title)
    for name, value in rows:
        click.echo(f"  {name:<14} {value}")
