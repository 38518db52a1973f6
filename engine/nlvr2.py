"""`torchrun --nproc N -m engine.nlvr2`: NLVR2 predictions, accuracy and latency of a sharded VLMo checkpoint.

Each sentence is judged against its pair of images with two joint passes (DESIGN.md §3). The world splits
into tensor-parallel groups of the shards' tp; each group takes a disjoint share of the sentences and rank 0
appends every prediction to a results JSONL file as it arrives, so a rerun with the same --out continues where
the last one stopped. A pair's sentences share its identifier: a result is keyed by (identifier,
question_index), the sentence's position among its pair's sentences in the arrow file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import click
import torch

from .runtime.shards import read_manifest

from .tasks.cli import UsageError, engine_options, one_line_errors, start_engine
from .data.datasets import NLVR2Dataset
from .data.text import TextTokenizer
from .tasks.evaluation import Batch, EvalStats, Record, evaluate
from .tasks.frontend import checkpoint_tag, latency_rows, open_results, pending, print_table, run_info, run_title
from .tasks.metrics import nlvr2_accuracy
from .runtime.model import VLMo
from .atomic import write_json
from .tasks.results import read_results

KEY = ("identifier", "question_index")
ANSWERS = ("False", "True")  # class 0, class 1 of the NLVR2 head, as the arrow's `answers` spell them


def predictor(model: VLMo, device: torch.device, checkpoint: str) -> Callable[[Batch], List[Record]]:
    """The per-batch step: one record per sentence; a sentence whose images did not decode records the error."""

    def compute(batch: Batch) -> List[Record]:
        ok = batch["image_ok"]
        logits = iter([])
        if ok.any():  # the same on every rank of the group: they decode the same bytes
            inputs = [batch[k][ok].to(device) for k in ("text_ids", "text_masks", "image_0", "image_1")]
            logits = iter(model.nlvr2(*inputs).float().cpu())
        records = []
        for i, image_ok in enumerate(ok.tolist()):
            record = {"identifier": batch["identifier"][i], "question_index": batch["question_index"][i],
                      "sentence": batch["text"][i], "label": ANSWERS[int(batch["label"][i])],
                      "checkpoint": checkpoint}
            if not image_ok:
                record["image_error"] = batch["image_error"][i]
            else:
                pair_logits = next(logits)
                prediction = ANSWERS[int(pair_logits.argmax())]
                record.update(prediction=prediction, correct=prediction == record["label"],
                              logits=pair_logits.tolist())
            records.append(record)
        return records

    return compute


def summarize(records: List[Record]) -> Dict[str, Any]:
    """Counts, image errors and accuracy over all records (sentences whose images failed are left out)."""
    predicted = [r for r in records if "image_error" not in r]
    accuracy = None
    if predicted:
        accuracy = nlvr2_accuracy([ANSWERS.index(r["prediction"]) for r in predicted],
                                  [ANSWERS.index(r["label"]) for r in predicted])
    return {
        "sentences": len(records),
        "predicted": len(predicted),
        "accuracy": accuracy,
        "image_errors": [{"identifier": r["identifier"], "question_index": r["question_index"],
                          "error": r["image_error"]} for r in records if "image_error" in r],
    }


@click.command()
@engine_options
@click.option("--data", "arrow_dir", required=True, type=click.Path(path_type=Path),
              help="Folder with nlvr2_{split}.arrow (python -m engine.data nlvr2).")
@click.option("--split", default="dev", show_default=True,
              help="dev or test1 (or train, balanced_dev, ...: any nlvr2_SPLIT.arrow).")
@click.option("--vocab", type=click.Path(path_type=Path), default=None,
              help="WordPiece vocabulary [default: bert-base-uncased, shipped with the engine].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Sentences (image pairs) per forward pass of each model copy.")
@click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Data-loading worker processes per rank (decode and tokenise while the model runs).")
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help="Only the first N sentences of the split.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="Predictions JSONL, one line per sentence; an existing file is continued "
                   "[default: results/nlvr2_SPLIT.jsonl].")
@click.option("--summary", "summary_path", type=click.Path(path_type=Path), default=None,
              help="Summary JSON (accuracy, latency, image errors) [default: beside --out, .summary.json].")
@one_line_errors
def main(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
         arrow_dir: Path, split: str, vocab: Optional[Path], batch_size: int, num_workers: int,
         limit: Optional[int], out_path: Optional[Path], summary_path: Optional[Path]) -> None:
    """Judge the sentences of one NLVR2 split with the sharded checkpoint in SHARDS; report accuracy and latency."""
    out_path = out_path or Path("results") / f"nlvr2_{split}.jsonl"
    summary_path = summary_path or out_path.with_suffix(".summary.json")

    # Everything a user can get wrong is checked before the model loads or a file is written.
    cfg = read_manifest(shard_dir).config
    if not cfg.nlvr2:
        raise UsageError(f"{shard_dir}: the checkpoint has no NLVR2 head (nlvr2_classifier); "
                         f"shard an NLVR2 fine-tuned checkpoint such as vlmo_base_patch16_384_nlvr2.pt")
    dataset = NLVR2Dataset(arrow_dir, split, TextTokenizer(vocab, cfg.max_text_len), cfg.image_size)
    keys = dataset.keys()[:limit]

    engine = start_engine(shard_dir, device, dtype, threads, timeout_s)
    ctx = engine.ctx
    checkpoint = checkpoint_tag(engine.manifest)
    writer = open_results(out_path, checkpoint, KEY) if ctx.is_main else None
    todo = pending(ctx, writer, keys, "sentences")
    stats: EvalStats = evaluate(ctx, dataset, todo, predictor(engine.model, ctx.device, checkpoint),
                                batch_size=batch_size, num_workers=num_workers,
                                on_records=writer.append if writer else None, label=f"nlvr2 {split}")
    if not ctx.is_main:
        return
    writer.close()
    summary = {"task": "nlvr2", "split": split, "results": str(out_path), **summarize(read_results(out_path)),
               "latency": stats.latency_summary(),
               "run": {"sentences": stats.samples, "wall_s": stats.wall_s,
                       **run_info(engine, shard_dir, batch_size)}}
    write_json(summary_path, summary, indent=1)
    accuracy = "n/a" if summary["accuracy"] is None else f"{100 * summary['accuracy']:.2f}"
    print_table(run_title(f"NLVR2 {split}", summary["run"]), [
        ("sentences", f"{summary['sentences']} recorded ({stats.samples} this run)"),
        ("accuracy", f"{accuracy}  ({summary['predicted']} sentences)"),
        ("image errors", str(len(summary["image_errors"]))),
        *latency_rows(summary["latency"], "sentences"),
        ("summary", str(summary_path)),
    ])


if __name__ == "__main__":
    main(prog_name="python -m engine.nlvr2")
