"""The scaffold every task front end (engine.vqa, engine.nlvr2, engine.retrieval) is built on.

A task writes its per-batch step with `per_sample_step` (run the model, name each sample, turn its output
row into a record) and its metrics over the records; this module does the rest: the shared options, a
resumable run into a results file (`run_resumable`), image-error records, non-finite output checks, the
run description and the final table. See "Adding a task" in the README.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import click
import torch
from torch.utils.data import Dataset

from ..runtime.distributed import ParallelContext
from ..runtime.shards import sha256_file
from ..options import option_group
from .cli import Engine, ModelOutputError, UsageError
from .evaluation import Batch, EvalStats, Record, evaluate
from .results import IdentityMismatch, ResultsWriter, read_results
from .tokenizers import tokenizer_option

Row = Tuple[str, str]
Step = Callable[[Batch], List[Record]]
# Samples named in a non-finite output error; the rest are counted.
_NAMED = 10


def task_options(*, data: str, per_batch: str, limit: str) -> Callable[[Callable], Callable]:
    """--data, --vocab, --tokenizer, --batch-size, --num-workers, --limit: what a task reads and how it batches.

    `data` is --data's help, `per_batch` what one forward pass takes ("Questions"), `limit` what --limit
    counts ("questions").
    """
    return option_group([
        click.option("--data", "arrow_dir", required=True, type=click.Path(path_type=Path), help=data),
        click.option("--vocab", type=click.Path(path_type=Path), default=None,
                     help="WordPiece vocabulary [default: bert-base-uncased, shipped with the engine]."),
        tokenizer_option(),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help=f"{per_batch} per forward pass of each model copy."),
        click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Data-loading worker processes per rank (decode and tokenise while the model runs)."),
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help=f"Only the first N {limit} of the split."),
    ])


def summary_option(contents: str, default: str) -> Callable[[Callable], Callable]:
    """--summary: the summary JSON holding `contents`, written to `default` unless given."""
    return click.option("--summary", "summary_path", type=click.Path(path_type=Path), default=None,
                        help=f"Summary JSON ({contents}) [default: {default}].")


def results_options(*, stem: str, one_per: str, summary: str) -> Callable[[Callable], Callable]:
    """--out (the resumable results JSONL, results/STEM_SPLIT.jsonl) and --summary (beside it)."""
    return option_group([
        click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
                     help=f"Results JSONL, one line per {one_per}; an existing file is continued "
                          f"[default: results/{stem}_SPLIT.jsonl]."),
        summary_option(summary, "beside --out, .summary.json"),
    ])


def results_identity(task: str, split: str, dataset_file: str, keys: Sequence[Hashable],
                     **files: Path) -> Dict[str, Any]:
    """What a results file holds the results of, besides the checkpoint and dtype (which `run_resumable` adds):
    the task, the split, the dataset (its file name, its item count and a hash of every item's key in order, so a
    copy of the same file matches and another dataset does not) and the sha256 of each input file that changes the
    results (`files`: answer table, tokenizer)."""
    return {"task": task, "split": split,
            "dataset": {"file": dataset_file, "items": len(keys), "keys_sha256": keys_sha256(keys)},
            **{name: sha256_file(Path(path)) for name, path in files.items()}}


def keys_sha256(keys: Sequence[Hashable]) -> str:
    """A hash of the items' keys in order (a key: an int, a str, or a tuple of them)."""
    listed = json.dumps([list(k) if isinstance(k, tuple) else k for k in keys]).encode()
    return hashlib.sha256(listed).hexdigest()


def open_results(path: Path, identity: Dict[str, Any], key: Union[str, Sequence[str]] = "question_id") -> ResultsWriter:
    """The results file to append to, refusing one that holds the results of anything else than `identity`."""
    try:
        return ResultsWriter(path, key, identity)
    except IdentityMismatch as exc:
        raise UsageError(f"{exc}: pass a new --out") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot continue {path}: {exc}; pass a new --out") from None


def pending(ctx: ParallelContext, writer: Optional[ResultsWriter], keys: Sequence[Hashable], noun: str) -> List[int]:
    """Positions of the `keys` that rank 0's results file lacks, the same list on every rank.

    Rank 0 alone reads the file (it may live on rank 0's node only) and tells the others what is done.
    """
    done = ctx.broadcast_object(writer.done_keys if writer else None)
    todo = [i for i, key in enumerate(keys) if key not in done]
    if ctx.is_main and done:
        click.echo(f"continuing {writer.path}: {len(keys) - len(todo)} of {len(keys)} {noun} already done", err=True)
    return todo


def run_resumable(engine: Engine, dataset: Dataset, keys: Sequence[Hashable], step: Step, *, out_path: Path,
                  key: Union[str, Sequence[str]], noun: str, batch_size: int, num_workers: int,
                  label: str, identity: Dict[str, Any]) -> Optional[Tuple[List[Record], EvalStats]]:
    """Evaluate the `keys` not yet in the results file `out_path`, appending each batch's records as it ends.

    The file records its `identity` (`results_identity`) with the checkpoint, the dtype, int8's calibration
    samples and its settings that are not the defaults if any, and is never continued by a run of another.
    Returns (every record of the file, this run's stats) on rank 0, None on the other ranks.
    """
    ctx = engine.ctx
    identity = {**identity, "checkpoint": str(engine.manifest.source.get("sha256", "")), "dtype": engine.dtype}
    if engine.calibration:  # absent otherwise: files of uncalibrated runs keep their identity
        identity["calibration"] = engine.calibration
    if engine.int8_variant:  # VLMO_INT8_SMOOTHING=0 or VLMO_INT8_FLOAT_LAYERS: absent for the default int8
        identity["int8"] = engine.int8_variant
    writer = open_results(out_path, identity, key) if ctx.is_main else None
    todo = pending(ctx, writer, keys, noun)
    stats = evaluate(ctx, dataset, todo, step, batch_size=batch_size, num_workers=num_workers,
                     on_records=writer.append if writer else None, label=label)
    if not ctx.is_main:
        return None
    writer.close()
    return read_results(out_path), stats


def per_sample_step(run: Callable[[Dict[str, torch.Tensor]], torch.Tensor], names: Sequence[str],
                    record: Callable[[Batch, int], Record],
                    result: Callable[[Batch, int, torch.Tensor], Record]) -> Step:
    """A per-batch step from what a task knows: `run` the model on a batch's tensors (one output row per
    sample), the `names` fields that identify a sample in messages, the `record` fields that describe sample
    i, and the `result` fields made from its output row (float32, on the CPU).

    A sample whose image did not decode (`image_ok` False) is never replaced: the model runs on the others and
    its record holds `image_error` instead of a result. A non-finite output row is an error naming the
    samples, never a result. Every rank of a tensor-parallel group runs the same batch, so all agree.
    """

    def step(batch: Batch) -> List[Record]:
        ok = batch.get("image_ok")
        ok = torch.ones(len(next(iter(batch.values()))), dtype=torch.bool) if ok is None else ok
        decoded = ok.nonzero().flatten().tolist()
        outputs = {}
        if decoded:
            rows = run({k: v[ok] for k, v in batch.items() if isinstance(v, torch.Tensor)}).float().cpu()
            _check_finite(rows, [{f: batch[f][i] for f in names} for i in decoded])
            outputs = dict(zip(decoded, rows))
        records = []
        for i in range(len(ok)):
            fields = record(batch, i)
            fields.update(result(batch, i, outputs[i]) if i in outputs else {"image_error": batch["image_error"][i]})
            records.append(fields)
        return records

    return step


def non_finite_rows(rows: torch.Tensor) -> List[int]:
    """Positions along the first dimension of the rows holding a NaN or an Inf."""
    return (~torch.isfinite(rows.reshape(len(rows), -1)).all(dim=1)).nonzero().flatten().tolist()


def _check_finite(rows: torch.Tensor, samples: List[Dict[str, Any]]) -> None:
    bad = [", ".join(f"{k} {v}" for k, v in samples[i].items()) for i in non_finite_rows(rows)]
    if bad:
        more = f" and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
        raise ModelOutputError(f"the model's output is not finite (NaN or Inf) for {len(bad)} of {len(samples)} "
                               f"samples of a batch ({'; '.join(bad[:_NAMED])}{more}); the run stops without "
                               f"recording that batch: check the checkpoint's weights and the --dtype")


def image_errors(records: Sequence[Record], names: Sequence[str]) -> List[Dict[str, Any]]:
    """The summary's list of samples whose image did not decode: their `names` fields and the error."""
    return [{**{f: r[f] for f in names}, "error": r["image_error"]} for r in records if "image_error" in r]


def run_info(engine: Engine, shard_dir: Path, batch_size: int) -> Dict[str, Any]:
    """How the run was launched, for the summary JSON."""
    ctx = engine.ctx
    return {"tp": ctx.tp_size, "dp": ctx.dp_size, "device": str(ctx.device), "dtype": engine.dtype,
            "batch_size": batch_size, "shards": str(shard_dir),
            "checkpoint_sha256": engine.manifest.source.get("sha256"), "calibration": engine.calibration,
            "int8_variant": engine.int8_variant}


def calibrated_dtype(dtype: str, calibration: Optional[Dict[str, Any]]) -> str:
    """The dtype as a title says it, with int8's calibration (Calibration.identity) if any."""
    if not calibration:
        return dtype
    return f"{dtype} calibrated on {calibration['samples']} samples of {calibration['file']}"


def run_title(task: str, run: Dict[str, Any]) -> str:
    dtype = calibrated_dtype(run["dtype"], run.get("calibration"))
    return f"{task}: tp {run['tp']} x dp {run['dp']} on {run['device']}, {dtype}, batch {run['batch_size']}"


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
