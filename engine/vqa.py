"""`torchrun --nproc N -m engine.vqa`: VQAv2 answers, accuracy and latency of a sharded VLMo or BEiT-3.

The world splits into tensor-parallel groups of the shards' tp; each group
answers a disjoint share of the questions and rank 0 appends every answer to a
results JSONL file as it arrives. A rerun with the same --out continues where
the last one stopped. Scores (DESIGN.md §7) are computed over the whole results
file; test and test-dev, which have no answers, give an EvalAI submission.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click
import pyarrow.compute as pc
import torch

from .atomic import write_json
from .data.arrow_io import read_split, split_filename
from .data.datasets import VQADataset
from .data.raw import DataError
from .data.vqav2 import ANSWER_TABLE, answer_table
from .models import MultiwayModel
from .models.tasks import TASKS, VQA
from .runtime.shards import read_manifest
from .tasks.calibration import calibration_options, read_calibration
from .tasks.cli import engine_options, one_line_errors, require_head, start_engine, writable
from .tasks.evaluation import Batch, Record
from .tasks.frontend import (Row, Step, image_errors, latency_rows, per_sample_step, print_table, results_options,
                             results_identity, run_info, run_resumable, run_title, task_options)
from .tasks.tokenizers import make_tokenizer
from .tasks.metrics import hit_rate, question_vqa_score, vqa_score
from .tasks.vqa_accuracy import accuracy_by_type, question_accuracy

# Splits published without answers: no score, an EvalAI submission instead.
TEST_SPLITS = ("test", "test-dev")
# The answer a submission gives to a question the model did not answer (test2015 questions outside test-dev in
# a test-dev run, questions whose image did not decode): the most frequent VQAv2 answer.
PLACEHOLDER_ANSWER = "yes"
# Per-question fields of the official annotations, kept in each results line when the split has them.
OFFICIAL_FIELDS = ("human_answers", "answer_type", "question_type")


def answerer(model: MultiwayModel, device: torch.device, answers: Sequence[str], scored: bool) -> Step:
    """The per-batch step: each question's answer (and score, where the split has answers)."""

    def logits(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
        return TASKS[VQA].first_output(model, tensors, device)

    def question(batch: Batch, i: int) -> Record:
        return {"question_id": batch["question_id"][i], "image_id": batch["image_id"][i],
                "question": batch["text"][i], **{k: batch[k][i] for k in OFFICIAL_FIELDS if k in batch}}

    def answer(batch: Batch, i: int, row: torch.Tensor) -> Record:
        label = int(row.argmax())
        result: Record = {"answer": answers[label], "label": label}
        if scored:
            truth = {k: batch[k][i] for k in ("answers", "answer_labels", "answer_scores")}
            result.update(score=question_vqa_score(label, truth["answer_labels"], truth["answer_scores"]),
                          hit=answers[label] in truth["answers"], **truth)
        if "human_answers" in batch:
            result["accuracy"] = question_accuracy(answers[label], batch["human_answers"][i])
        return result

    return per_sample_step(logits, ("question_id",), question, answer)


def summarize(records: List[Record], scored: bool, official_missing: Optional[str] = None) -> Dict[str, Any]:
    """Counts, image errors and (for splits with answers) official VQA accuracy, VQA score and hit rate over all
    records; `official_missing` says why the split has no official annotations, if so."""
    answered = [r for r in records if "image_error" not in r]
    summary: Dict[str, Any] = {
        "questions": len(records),
        "answered": len(answered),
        "image_errors": image_errors(records, ("question_id", "image_id")),
    }
    if scored:
        summary["vqa_score"] = summary["hit_rate"] = None
        if answered:
            summary["vqa_score"] = vqa_score([r["label"] for r in answered], [r["answer_labels"] for r in answered],
                                             [r["answer_scores"] for r in answered])
            summary["hit_rate"] = hit_rate([r["answer"] for r in answered], [r["answers"] for r in answered])
        summary.update(official_accuracy(answered, official_missing))
    return summary


def official_accuracy(answered: List[Record], official_missing: Optional[str]) -> Dict[str, Any]:
    """vqa_accuracy and vqa_accuracy_by_answer_type, or None and vqa_accuracy_unavailable saying why."""
    unscored = [r for r in answered if "human_answers" not in r]
    if answered and not unscored:
        overall, by_type = accuracy_by_type(
            (question_accuracy(r["answer"], r["human_answers"]), r["answer_type"]) for r in answered)
        return {"vqa_accuracy": overall, "vqa_accuracy_by_answer_type": by_type}
    if not answered:
        why = "no question was answered"
    else:
        why = official_missing or "they were recorded by a run without the official annotations; pass a new --out"
        why = f"{len(unscored)} of {len(answered)} answered questions have no human answers: {why}"
    return {"vqa_accuracy": None, "vqa_accuracy_by_answer_type": None, "vqa_accuracy_unavailable": why}


def submission_entries(records: List[Record], question_ids: Sequence[int]) -> Tuple[List[Dict[str, Any]], int]:
    """The EvalAI submission (one answer per question id, in their order) and how many are placeholders."""
    answered = {r["question_id"]: r["answer"] for r in records if "answer" in r}
    entries = [{"question_id": int(q), "answer": answered.get(q, PLACEHOLDER_ANSWER)} for q in question_ids]
    return entries, sum(q not in answered for q in question_ids)


def submission_question_ids(dataset: VQADataset, arrow_dir: Path, split: str) -> List[int]:
    """Every test2015 question: EvalAI wants them all, also in the test-dev phase (it scores only test-dev)."""
    ids = dataset.question_ids()
    if split == "test":
        return ids
    try:
        test = read_split(arrow_dir, "vqav2", "test")
    except DataError as err:
        raise DataError(f"--split test-dev answers every test2015 question, as EvalAI requires: {err}") from None
    everything = pc.list_flatten(test.column("question_id")).to_pylist()
    known = set(everything)
    return everything + [q for q in ids if q not in known]


def table_rows(summary: Dict[str, Any]) -> List[Row]:
    """The lines of the final table."""
    rows = [("questions", f"{summary['questions']} recorded ({summary['run']['questions']} this run)")]
    if summary.get("vqa_accuracy") is not None:
        by_type = ", ".join(f"{kind} {100 * value:.2f}"
                            for kind, value in summary["vqa_accuracy_by_answer_type"].items())
        rows.append(("VQA accuracy", f"{100 * summary['vqa_accuracy']:.2f}  (official; {by_type})"))
    elif "vqa_accuracy_unavailable" in summary:
        rows.append(("VQA accuracy", f"unavailable: {summary['vqa_accuracy_unavailable']}"))
    if "vqa_score" in summary and summary["vqa_score"] is not None:
        rows += [("VQA score", f"{100 * summary['vqa_score']:.2f}  (VLMo's training-time score)"),
                 ("hit rate", f"{100 * summary['hit_rate']:.2f}  (the Ascend guide's 'accuracy')")]
    if "submission" in summary:
        rows.append(("submission", f"{summary['submission']} ({summary['submission_questions']} questions, "
                                   f"{summary['placeholder_answers']} placeholders)"))
    rows.append(("image errors", str(len(summary["image_errors"]))))
    return rows + latency_rows(summary["latency"], "questions")


@click.command()
@engine_options
@task_options(data="Folder with vqav2_{split}.arrow and answer2label.txt (python -m engine.data vqav2).",
              per_batch="Questions", limit="questions")
@click.option("--split", default="rest_val", show_default=True,
              help="rest_val (the val images VLMo's fine-tuning held out), val, trainable_val, train (scored), "
                   "or test, test-dev (EvalAI submission).")
@click.option("--answers", "answers_path", type=click.Path(path_type=Path), default=None,
              help="Label → answer table, one JSON object per line [default: DATA/answer2label.txt].")
@results_options(stem="vqav2", one_per="question", summary="metrics, latency, image errors")
@click.option("--submission", "submission_path", type=click.Path(path_type=Path), default=None,
              help="EvalAI submission for test/test-dev [default: beside --out, .submission.json].")
@calibration_options("a VQAv2 split's arrow file, e.g. DATA/vqav2_train.arrow")
@one_line_errors
def main(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
         arrow_dir: Path, split: str, answers_path: Optional[Path], vocab: Optional[Path],
         tokenizer_path: Optional[Path], batch_size: int,
         num_workers: int, limit: Optional[int], out_path: Optional[Path], summary_path: Optional[Path],
         submission_path: Optional[Path], calibration_path: Optional[Path],
         calibration_samples: Optional[int]) -> None:
    """Answer the questions of one VQAv2 split with the sharded checkpoint in SHARDS; report accuracy and latency."""
    # Everything a user can get wrong is checked before the model loads or a file is written.
    out_path = writable("--out", out_path or Path("results") / f"vqav2_{split}.jsonl")
    summary_path = writable("--summary", summary_path or out_path.with_suffix(".summary.json"))
    scored = split not in TEST_SPLITS
    if not scored or submission_path:
        submission_path = writable("--submission", submission_path or out_path.with_suffix(".submission.json"))
    cfg = read_manifest(shard_dir).config
    require_head(cfg, "vqa", shard_dir)
    answers_path = answers_path or arrow_dir / ANSWER_TABLE
    answers = answer_table(answers_path, cfg.vqa_labels)
    tokenizer = make_tokenizer(cfg, tokenizer_path, vocab)
    dataset = VQADataset(arrow_dir, split, tokenizer, cfg.image_size)
    every_question = dataset.question_ids()
    identity = results_identity("vqa", split, split_filename("vqav2", split), every_question, answers=answers_path,
                                tokenizer=tokenizer.file)
    question_ids = every_question[:limit]
    submission_ids = [] if scored else submission_question_ids(dataset, arrow_dir, split)
    calibration = read_calibration(calibration_path, calibration_samples, dtype, "vqa", cfg, tokenizer)

    engine = start_engine(shard_dir, device, dtype, threads, timeout_s, calibration)
    done = run_resumable(engine, dataset, question_ids, answerer(engine.model, engine.ctx.device, answers, scored),
                         out_path=out_path, key="question_id", noun="questions", batch_size=batch_size,
                         num_workers=num_workers, label=f"vqav2 {split}", identity=identity)
    if done is None:
        return
    records, stats = done
    summary = {"task": "vqa", "split": split, "results": str(out_path),
               **summarize(records, scored, dataset.official_missing)}
    if not scored:
        submission, placeholders = submission_entries(records, submission_ids)
        write_json(submission_path, submission)
        summary.update(submission=str(submission_path), submission_questions=len(submission),
                       placeholder_answers=placeholders, placeholder_answer=PLACEHOLDER_ANSWER)
    summary["latency"] = stats.latency_summary()
    summary["run"] = {"questions": stats.samples, "wall_s": stats.wall_s, **run_info(engine, shard_dir, batch_size)}
    write_json(summary_path, summary, indent=1)
    print_table(run_title(f"VQAv2 {split}", summary["run"]), [*table_rows(summary), ("summary", str(summary_path))])


if __name__ == "__main__":
    main(prog_name="python -m engine.vqa")
