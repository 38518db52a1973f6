"""COCO and Flickr30k Karpathy-split caption arrow files, as the published
`write_coco_karpathy` / `write_f30k_karpathy` make them.

Rows are in the order of the Karpathy JSON (the published writers shuffle them
at random); an image the JSON lists but the image folders lack is an error
(the published writers drop it silently).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pyarrow as pa

from .arrow_io import split_filename, staged_outputs
from .raw import DataError, content_of, read_bytes, read_json


@dataclass(frozen=True)
class KarpathySource:
    """Where one dataset's Karpathy JSON and images live and which splits it writes."""

    annotations: str
    image_dirs: tuple
    splits: tuple


SOURCES = {
    "coco": KarpathySource(
        annotations="karpathy/dataset_coco.json",
        image_dirs=("train2014", "val2014"),
        splits=("train", "val", "restval", "test"),
    ),
    "f30k": KarpathySource(
        annotations="karpathy/dataset_flickr30k.json",
        image_dirs=("flickr30k-images",),
        splits=("train", "val", "test"),
    ),
}

SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("caption", pa.list_(pa.string())),
        ("image_id", pa.large_string()),
        ("split", pa.large_string()),
    ]
)


def _entries(path: Path) -> dict:
    """file name -> {"caption": [...], "split": ...}; a name listed twice merges its captions, last split wins."""
    entries: dict = {}
    with content_of(path):
        for image in read_json(path)["images"]:
            entry = entries.setdefault(str(image["filename"]), {"caption": [], "split": None})
            entry["split"] = image["split"]
            entry["caption"] += [str(sentence["raw"]) for sentence in image["sentences"]]
    return entries


def _locate(root: Path, source: KarpathySource, name: str) -> Path:
    for folder in source.image_dirs:
        if (root / folder / name).is_file():
            return root / folder / name
    looked = " or ".join(str(root / folder / name) for folder in source.image_dirs)
    raise DataError(f"missing image file {looked} (listed in {root / source.annotations})")


def write_karpathy(dataset: str, root: Path, out: Path, overwrite: bool = False) -> dict:
    """Write the split files of `dataset` ("coco" or "f30k"); returns rows per file."""
    source = SOURCES[dataset]
    names = [split_filename(dataset, split) for split in source.splits]
    entries = _entries(root / source.annotations)
    # Images without captions or outside the written splits are left out, as published.
    kept = {name: e for name, e in entries.items() if e["caption"] and e["split"] in source.splits}
    paths = {name: _locate(root, source, name) for name in kept}

    counts = {}
    with staged_outputs(out, names, overwrite) as outputs:
        for split, filename in zip(source.splits, names):
            sink = outputs.arrow(filename, SCHEMA)
            names = [name for name, e in kept.items() if e["split"] == split]
            with click.progressbar(names, label=filename, file=sys.stderr) as bar:
                for name in bar:
                    image = read_bytes(paths[name], f"listed in {source.annotations}")
                    sink.append({"image": image, "caption": kept[name]["caption"], "image_id": name, "split": split})
            counts[filename] = len(names)
    return counts
