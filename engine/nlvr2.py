"""`torchrun --nproc N -m engine.nlvr2`: NLVR2 predictions, accuracy and latency of a sharded VLMo or BEiT-3.

Each sentence is judged against its pair of images with two joint passes (DESIGN.md §3). The world splits
into tensor-parallel groups of the shards' tp; each group takes a disjoint share of the sentences and rank 0
appends every prediction to a results JSONL file as it arrives, so a rerun with the same --out continues where
the last one stopped. A pair's sentences share its identifier: a result is keyed by (identifier,
question_index), the sentence's position among its pair's sentences in the arrow file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import click
import torch

from .atomic import write_json
from .data.arrow_io import split_filename
from .data.datasets import NLVR2Dataset
from .tasks.tokenizers import make_tokenizer
from .models import MultiwayModel
from .models.tasks import NLVR2, NLVR2_LABELS, TASKS
from .runtime.shards import read_manifest
from .tasks.calibration import calibration_options, read_calibration
from .tasks.cli import engine_options, one_line_errors, require_head, start_engine, writable
from .tasks.evaluation import Batch, Record
from .tasks.frontend import (Step, image_errors, latency_rows, per_sample_step, print_table, results_identity,
                             results_options, run_info, run_resumable, run_title, task_options)
from .tasks.metrics import nlvr2_accuracy

KEY = ("identifier", "question_index")


def predictor(model: MultiwayModel, device: torch.device) -> Step:
    """The per-batch step: each sentence's prediction from its pair's two logits."""

    def logits(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
        return TASKS[NLVR2].first_output(model, tensors, device)

    def sentence(batch: Batch, i: int) -> Record:
        return {"identifier": batch["identifier"][i], "question_index": batch["question_index"][i],
                "sentence": batch["text"][i], "label": NLVR2_LABELS[int(batch["label"][i])]}

    def prediction(batch: Batch, i: int, row: torch.Tensor) -> Record:
        predicted = NLVR2_LABELS[int(row.argmax())]
        return {"prediction": predicted, "correct": predicted == NLVR2_LABELS[int(batch["label"][i])],
                "logits": row.tolist()}

    return per_sample_step(logits, KEY, sentence, prediction)


def summarize(records: List[Record]) -> Dict[str, Any]:
    """Counts, image errors and accuracy over all records (sentences whose images failed are left out)."""
    predicted = [r for r in records if "image_error" not in r]
    accuracy = None
    if predicted:
        accuracy = nlvr2_accuracy([NLVR2_LABELS.index(r["prediction"]) for r in predicted],
                                  [NLVR2_LABELS.index(r["label"]) for r in predicted])
    return {
        "sentences": len(records),
        "predicted": len(predicted),
        "accuracy": accuracy,
        "image_errors": image_errors(records, KEY),
    }


@click.command()
@engine_options
@task_options(data="Folder with nlvr2_{split}.arrow (python -m engine.data nlvr2).",
              per_batch="Sentences (image pairs)", limit="sentences")
@click.option("--split", default="dev", show_default=True,
              help="dev or test1 (or train, balanced_dev, ...: any nlvr2_SPLIT.arrow).")
@results_options(stem="nlvr2", one_per="sentence", summary="accuracy, latency, image errors")
@calibration_options("an NLVR2 split's arrow file, e.g. DATA/nlvr2_train.arrow")
@one_line_errors
def main(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
         arrow_dir: Path, split: str, vocab: Optional[Path],
         tokenizer_path: Optional[Path], batch_size: int, num_workers: int,
         limit: Optional[int], out_path: Optional[Path], summary_path: Optional[Path],
         calibration_path: Optional[Path], calibration_samples: Optional[int]) -> None:
    """Judge the sentences of one NLVR2 split with the sharded checkpoint in SHARDS; report accuracy and latency."""
    # Everything a user can get wrong is checked before the model loads or a file is written.
    out_path = writable("--out", out_path or Path("results") / f"nlvr2_{split}.jsonl")
    summary_path = writable("--summary", summary_path or out_path.with_suffix(".summary.json"))
    cfg = read_manifest(shard_dir).config
    require_head(cfg, "nlvr2", shard_dir)
    tokenizer = make_tokenizer(cfg, tokenizer_path, vocab)
    dataset = NLVR2Dataset(arrow_dir, split, tokenizer, cfg.image_size)
    keys = dataset.keys()
    identity = results_identity("nlvr2", split, split_filename("nlvr2", split), keys, tokenizer=tokenizer.file)
    calibration = read_calibration(calibration_path, calibration_samples, dtype, "nlvr2", cfg, tokenizer)

    engine = start_engine(shard_dir, device, dtype, threads, timeout_s, calibration)
    done = run_resumable(engine, dataset, keys[:limit], predictor(engine.model, engine.ctx.device),
                         out_path=out_path, key=KEY, noun="sentences", batch_size=batch_size,
                         num_workers=num_workers, label=f"nlvr2 {split}", identity=identity)
    if done is None:
        return
    records, stats = done
    summary = {"task": "nlvr2", "split": split, "results": str(out_path), **summarize(records),
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
