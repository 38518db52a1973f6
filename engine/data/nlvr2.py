"""NLVR2 arrow files, as the published `write_nlvr2` makes them.

One row per image pair: the sentences written about it (`questions`) with
their labels (`answers`, the JSON's "True"/"False" strings), in file order.
train, dev and test1 are required; the balanced/unbalanced subsets, which the
published writer also requires, are written when their JSON files exist.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import pyarrow as pa

from .arrow_io import split_filename, staged_outputs
from .raw import content_of, read_bytes, read_json_lines, require_files

REQUIRED = {"train": "train.json", "dev": "dev.json", "test1": "test1.json"}
OPTIONAL = {
    "balanced_dev": "balanced/balanced_dev.json",
    "balanced_test1": "balanced/balanced_test1.json",
    "unbalanced_dev": "unbalanced/unbalanced_dev.json",
    "unbalanced_test1": "unbalanced/unbalanced_test1.json",
}
DATA_DIR = "nlvr2/data"

SCHEMA = pa.schema(
    [
        ("image_0", pa.binary()),
        ("image_1", pa.binary()),
        ("questions", pa.list_(pa.string())),
        ("answers", pa.list_(pa.string())),
        ("identifier", pa.large_string()),
    ]
)


def _pairs(path: Path) -> dict:
    """Pair identifier ("dev-850-0" for sentence "dev-850-0-1") -> its JSON records, in file order."""
    pairs: dict = {}
    with content_of(path):
        for record in read_json_lines(path):
            pair = "-".join(record["identifier"].split("-")[:-1])
            pairs.setdefault(pair, []).append(record)
    return pairs


def _image_paths(root: Path, pair: str, records: list) -> tuple:
    """The pair's two image files."""
    if pair.startswith("train"):
        # Training images are spread over numbered folders named in the records.
        folder = root / "images" / "train" / str(records[0]["directory"])
    else:
        folder = root / pair.split("-")[0]
    return tuple(folder / f"{pair}-img{i}.png" for i in (0, 1))


def write_nlvr2(root: Path, out: Path, overwrite: bool = False) -> dict:
    """Write nlvr2_{split}.arrow for each split present; returns rows per file."""
    files = dict(REQUIRED)
    files.update({s: name for s, name in OPTIONAL.items() if (root / DATA_DIR / name).is_file()})

    splits = {}
    for split, name in files.items():
        path = root / DATA_DIR / name
        pairs = _pairs(path)
        with content_of(path):
            rows = [
                {
                    "paths": _image_paths(root, pair, records),
                    "questions": [str(r["sentence"]) for r in records],
                    "answers": [str(r["label"]) for r in records],
                    "identifier": pair,
                }
                for pair, records in pairs.items()
            ]
        require_files({p: row["identifier"] for row in rows for p in row["paths"]}, f"listed in {path} for")
        splits[split] = rows

    counts = {}
    names = {split: split_filename("nlvr2", split) for split in splits}
    with staged_outputs(out, list(names.values()), overwrite) as outputs:
        for split, rows in splits.items():
            filename = names[split]
            sink = outputs.arrow(filename, SCHEMA)
            with click.progressbar(rows, label=filename, file=sys.stderr) as bar:
                for row in bar:
                    what = f"pair {row['identifier']}"
                    images = {f"image_{i}": read_bytes(p, what) for i, p in enumerate(row["paths"])}
                    sink.append({**images, **{k: v for k, v in row.items() if k != "paths"}})
            counts[filename] = len(rows)
    return counts
