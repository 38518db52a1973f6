"""VQAv2 arrow files from the official download, as the published `write_vqa` makes them.

Differences from the published writer, none affecting row content: rows are in
the order images first appear in the questions file (the published writer
shuffles them at random, so its `trainable_val` / `rest_val` cut was not
reproducible); an annotated image missing on disk is an error instead of being
dropped silently; an empty table keeps the full column types. Beside each file
with answers (train, val and the cuts of val) goes `vqav2_SPLIT.official.arrow`
with what the official VQA accuracy needs (OFFICIAL_SCHEMA).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import click
import pyarrow as pa

from .answers import answer_labels, score_answers
from .arrow_io import split_filename, staged_outputs
from .raw import DataError, content_of, read_bytes, read_json, read_json_lines, require_files

QUESTION_FILES = {
    "train": "v2_OpenEnded_mscoco_train2014_questions.json",
    "val": "v2_OpenEnded_mscoco_val2014_questions.json",
    "test": "v2_OpenEnded_mscoco_test2015_questions.json",
    "test-dev": "v2_OpenEnded_mscoco_test-dev2015_questions.json",
}
ANNOTATION_FILES = {
    "train": "v2_mscoco_train2014_annotations.json",
    "val": "v2_mscoco_val2014_annotations.json",
}
IMAGE_DIRS = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test2015"}
# The published writer keeps the last 1000 val images apart for evaluation.
REST_VAL_ROWS = 1000
ANSWER_TABLE = "answer2label.txt"

_COMMON = [
    ("image", pa.binary()),
    ("questions", pa.list_(pa.string())),
]
_TAIL = [
    ("image_id", pa.int64()),
    ("question_id", pa.list_(pa.int64())),
    ("split", pa.large_string()),
]
LABELLED_SCHEMA = pa.schema(
    _COMMON
    + [
        ("answers", pa.list_(pa.list_(pa.string()))),
        ("answer_labels", pa.list_(pa.list_(pa.int64()))),
        ("answer_scores", pa.list_(pa.list_(pa.float64()))),
    ]
    + _TAIL
)
# Test rows carry empty answer lists, typed as the published files type them.
TEST_SCHEMA = pa.schema(
    _COMMON
    + [(name, pa.list_(pa.null())) for name in ("answers", "answer_labels", "answer_scores")]
    + _TAIL
)


# Beside each labelled arrow file, one row per question in the arrow file's question order: what the official
# VQA accuracy needs and the published format leaves out (the ten raw human answers, answer and question type).
OFFICIAL_SCHEMA = pa.schema([
    ("question_id", pa.int64()),
    ("answers", pa.list_(pa.string())),
    ("answer_type", pa.string()),
    ("question_type", pa.string()),
])


def official_filename(arrow_name: str) -> str:
    """The official-annotations file beside an arrow file: vqav2_val.arrow -> vqav2_val.official.arrow."""
    return arrow_name[:-len(".arrow")] + ".official.arrow"


def _questions_by_image(path: Path) -> dict:
    """image_id -> {question_id: {"question": text}}, both in file order."""
    by_image: dict = {}
    with content_of(path):
        for q in read_json(path)["questions"]:
            by_image.setdefault(int(q["image_id"]), {})[int(q["question_id"])] = {"question": str(q["question"])}
    return by_image


def _attach_answers(path: Path, annotations: list, by_image: dict, label_of: dict, labels: list) -> None:
    """Give each annotated question its labels, scores and the answers those labels stand for."""
    with content_of(path):
        for a in annotations:
            question = by_image.get(int(a["image_id"]), {}).get(int(a["question_id"]))
            if question is None:
                raise DataError(
                    f"{path}: question_id {a['question_id']} (image_id {a['image_id']}) has no question"
                )
            question["official"] = {"question_id": int(a["question_id"]),
                                    "answers": [str(answer["answer"]) for answer in a["answers"]],
                                    "answer_type": str(a["answer_type"]), "question_type": str(a["question_type"])}
            question["labels"], question["scores"] = score_answers(
                (answer["answer"] for answer in a["answers"]), label_of
            )
            question["answers"] = [labels[label] for label in question["labels"]]


def _rows(split: str, by_image: dict, labelled: bool, questions_file: str) -> list:
    """Rows without image bytes; labelled splits keep only questions with a label."""
    rows = []
    for image_id, questions in by_image.items():
        if labelled:
            missing = [qid for qid, q in questions.items() if "labels" not in q]
            if missing:
                raise DataError(f"question_id {missing[0]} of {questions_file} has no annotation")
            questions = {qid: q for qid, q in questions.items() if q["labels"]}
            if not questions:
                continue
        rows.append(
            {
                "questions": [q["question"] for q in questions.values()],
                "answers": [q["answers"] for q in questions.values()] if labelled else [],
                "answer_labels": [q["labels"] for q in questions.values()] if labelled else [],
                "answer_scores": [q["scores"] for q in questions.values()] if labelled else [],
                "image_id": image_id,
                "question_id": list(questions),
                "split": split,
                "official": [q["official"] for q in questions.values()] if labelled else [],
            }
        )
    return rows


def _image_path(root: Path, split: str, image_id: int) -> Path:
    folder = IMAGE_DIRS[split]
    return root / folder / f"COCO_{folder}_{image_id:012d}.jpg"


def write_vqav2(root: Path, out: Path, overwrite: bool = False) -> dict:
    """Write vqav2_{train,val,trainable_val,rest_val,test,test-dev}.arrow, the .official.arrow files beside
    the ones with answers, and answer2label.txt.

    Returns the number of rows per file written.
    """
    questions = {split: _questions_by_image(root / name) for split, name in QUESTION_FILES.items()}
    annotations, majority = {}, []
    for split, name in ANNOTATION_FILES.items():
        with content_of(root / name):
            annotations[split] = list(read_json(root / name)["annotations"])
            majority += [str(a["multiple_choice_answer"]) for a in annotations[split]]
    labels = answer_labels(majority)
    label_of = {answer: label for label, answer in enumerate(labels)}
    for split, name in ANNOTATION_FILES.items():
        _attach_answers(root / name, annotations[split], questions[split], label_of, labels)

    rows = {
        split: _rows(split, questions[split], split in ANNOTATION_FILES, QUESTION_FILES[split])
        for split in QUESTION_FILES
    }
    for split, split_rows in rows.items():
        require_files(
            {_image_path(root, split, r["image_id"]): r["image_id"] for r in split_rows},
            f"listed in {QUESTION_FILES[split]} as image_id",
        )

    cut = max(len(rows["val"]) - REST_VAL_ROWS, 0)
    # Each output file of a split with the row indices it takes from that split.
    split_parts = {split: {split_filename("vqav2", split): range(len(split_rows))} for split, split_rows in rows.items()}
    split_parts["val"][split_filename("vqav2", "trainable_val")] = range(0, cut)
    split_parts["val"][split_filename("vqav2", "rest_val")] = range(cut, len(rows["val"]))
    sidecars = {name: official_filename(name) for split in ANNOTATION_FILES for name in split_parts[split]}
    names = [name for parts in split_parts.values() for name in parts] + list(sidecars.values()) + [ANSWER_TABLE]
    counts = {}
    with staged_outputs(out, names, overwrite) as outputs:
        for split, split_rows in rows.items():
            parts = split_parts[split]
            schema = LABELLED_SCHEMA if split in ANNOTATION_FILES else TEST_SCHEMA
            sinks = {name: outputs.arrow(name, schema) for name in parts}
            official = {name: outputs.arrow(sidecars[name], OFFICIAL_SCHEMA) for name in parts if name in sidecars}
            counts.update({name: len(indices) for name, indices in parts.items()})
            with click.progressbar(split_rows, label=f"vqav2_{split}", file=sys.stderr) as bar:
                for index, row in enumerate(bar):
                    path = _image_path(root, split, row["image_id"])
                    full = {"image": read_bytes(path, f"image_id {row['image_id']}"), **row}
                    for name, indices in parts.items():
                        if index in indices:
                            sinks[name].append(full)
                            for question in row["official"] if name in official else ():
                                official[name].append(question)
        outputs.text(ANSWER_TABLE, "".join(json.dumps({"answer": a, "label": i}) + "\n" for i, a in enumerate(labels)))
    return counts


def read_answer_table(path: Path) -> list:
    """`answer2label.txt` as a list whose position i holds the answer of label i."""
    entries = read_json_lines(path)
    with content_of(path):
        by_label = {int(entry["label"]): str(entry["answer"]) for entry in entries}
    if sorted(by_label) != list(range(len(entries))):
        raise DataError(f"{path}: the labels must be 0..{len(entries) - 1}, each exactly once")
    return [by_label[label] for label in range(len(entries))]


def answer_table(path: Path, vqa_labels: Optional[int]) -> List[str]:
    """The label → answer table, checked against the checkpoint's VQA classifier."""
    if not path.is_file():
        raise DataError(f"missing answer table {path} (written by `python -m engine.data vqav2`; "
                        f"or pass --answers)")
    answers = read_answer_table(path)
    if len(answers) != vqa_labels:
        raise DataError(f"the checkpoint's VQA classifier has {vqa_labels} labels but {path} lists "
                        f"{len(answers)} answers; pass the answer table the checkpoint was fine-tuned with")
    return answers
