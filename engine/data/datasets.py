"""Torch datasets over the arrow files, for DataLoaders with worker processes.

Each dataset memory-maps its arrow file and decodes one image per item, so
workers share the page cache instead of copying the file. An image that does
not decode is never replaced by another sample: the item keeps its place with
a zero image, ``image_ok`` False and the reason in ``image_error``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from .arrow_io import read_table, split_filename
from .image import ImageDecodeError, load_image
from .raw import DataError
from .text import TextTokenizer
from .vqav2 import official_filename

PathLike = Union[str, Path]


class _LazyTable:
    """A memory-mapped arrow split that pickles as its location only.

    Forked workers share the parent's mapping; a pickled copy (spawned
    workers) maps the file again on first use instead of carrying its data.
    """

    def __init__(self, arrow_dir: PathLike, dataset: str, split: str, file_name: Optional[str] = None,
                 kind: Optional[str] = None) -> None:
        self._path = Path(arrow_dir) / (file_name or split_filename(dataset, split))
        # Opened (and its columns checked) now so a missing or foreign file fails in the parent process.
        self._table: Optional[pa.Table] = read_table(self._path, kind or dataset)

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            self._table = read_table(self._path)
        return self._table

    def value(self, column: str, row: int):
        return self.table.column(column)[row].as_py()

    def __getstate__(self) -> dict:
        return {"_path": self._path, "_table": None}


def _flatten(table: pa.Table, column: str) -> tuple:
    """(row, position) of every element of a list column, rows in order."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lengths = pc.list_value_length(table.column(column)).fill_null(0).to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return rows, np.arange(int(lengths.sum())) - np.repeat(starts, lengths)


def _image(data: bytes, size: int) -> tuple:
    """(image tensor, None), or (zero placeholder, reason) when the bytes do not decode."""
    try:
        return load_image(data, size), None
    except ImageDecodeError as err:
        return torch.zeros(3, size, size), str(err)


def _tokens(tokenizer: TextTokenizer, text: str) -> dict:
    encoded = tokenizer([text])
    return {"text_ids": encoded["text_ids"][0], "text_masks": encoded["text_masks"][0]}


class _PerTextDataset(Dataset):
    """One item per element of a list column of a split (a question, a sentence), rows then elements in file
    order; the row's image(s) decoded at `image_size`. `file_name`: a file of the split's format under another
    name than the split's (a calibration file)."""

    def __init__(self, arrow_dir: PathLike, dataset: str, split: str, column: str, tokenizer: TextTokenizer,
                 image_size: int, file_name: Optional[str] = None) -> None:
        self._arrow = _LazyTable(arrow_dir, dataset, split, file_name)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self._rows, self._positions = _flatten(self._arrow.table, column)

    def __len__(self) -> int:
        return len(self._rows)


class VQADataset(_PerTextDataset):
    """One item per question of vqav2_{split}.arrow, rows then questions in file order."""

    def __init__(self, arrow_dir: PathLike, split: str, tokenizer: TextTokenizer, image_size: int,
                 file_name: Optional[str] = None) -> None:
        file_name = file_name or split_filename("vqav2", split)
        super().__init__(arrow_dir, "vqav2", split, "question_id", tokenizer, image_size, file_name)
        self._official, self.official_missing = self._official_annotations(Path(arrow_dir), file_name)

    def _official_annotations(self, arrow_dir: Path, file_name: str) -> Tuple[Optional[_LazyTable], Optional[str]]:
        """The split's official annotations (engine.data.vqav2.OFFICIAL_SCHEMA), or None and why there are none."""
        name = official_filename(file_name)
        if not (arrow_dir / name).is_file():
            return None, (f"no {name} beside the arrow file: the published arrow format keeps only the answers in "
                          f"the label vocabulary; `python -m engine.data vqav2` writes it")
        official = _LazyTable(arrow_dir, "vqav2", "", file_name=name, kind="vqav2 official annotations")
        if official.table.column("question_id").to_pylist() != self.question_ids():
            raise DataError(f"{arrow_dir / name} does not list the questions of {file_name} "
                            f"in its order; write both again with `python -m engine.data vqav2`")
        return official, None

    def question_ids(self) -> list:
        """The question id of every item, in item order, without decoding any image."""
        column = self._arrow.table.column("question_id")
        return pc.list_flatten(column).to_pylist() if self._arrow.table.num_rows else []

    def __getitem__(self, index: int) -> dict:
        row, j = int(self._rows[index]), int(self._positions[index])
        value = self._arrow.value
        question = value("questions", row)[j]
        image, error = _image(value("image", row), self.image_size)
        # Test rows carry one empty list per column instead of one list per question.
        answers, labels, scores = (value(c, row) for c in ("answers", "answer_labels", "answer_scores"))
        return {
            "question_id": value("question_id", row)[j],
            "image_id": value("image_id", row),
            "text": question,
            **_tokens(self.tokenizer, question),
            "image": image,
            "image_ok": error is None,
            "image_error": error,
            "answers": answers[j] if answers else [],
            "answer_labels": labels[j] if labels else [],
            "answer_scores": scores[j] if scores else [],
            **(self._official_fields(index) if self._official else {}),
        }

    def _official_fields(self, index: int) -> dict:
        value = self._official.value
        return {"human_answers": value("answers", index), "answer_type": value("answer_type", index),
                "question_type": value("question_type", index)}


class KarpathyImageDataset(Dataset):
    """One item per image row of a COCO / Flickr30k Karpathy split (`dataset` "coco" or "f30k")."""

    def __init__(self, arrow_dir: PathLike, dataset: str, split: str, image_size: int,
                 file_name: Optional[str] = None) -> None:
        self._arrow = _LazyTable(arrow_dir, dataset, split, file_name)
        self.image_size = image_size

    def __len__(self) -> int:
        return self._arrow.table.num_rows

    def __getitem__(self, index: int) -> dict:
        image, error = _image(self._arrow.value("image", index), self.image_size)
        return {
            "image_index": index,
            "image_id": self._arrow.value("image_id", index),
            "image": image,
            "image_ok": error is None,
            "image_error": error,
        }


class KarpathyTextDataset(Dataset):
    """One item per caption of a Karpathy split, with the row index of its image."""

    def __init__(self, arrow_dir: PathLike, dataset: str, split: str, tokenizer: TextTokenizer,
                 file_name: Optional[str] = None) -> None:
        table = read_table(Path(arrow_dir) / (file_name or split_filename(dataset, split)), dataset)
        self.tokenizer = tokenizer
        self.image_index, _ = _flatten(table, "caption")
        # Captions are small next to the images: keep them, drop the table.
        self.captions = [c for row in table.column("caption").to_pylist() for c in row] if table.num_rows else []

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        caption = self.captions[index]
        return {
            "caption_index": index,
            "image_index": int(self.image_index[index]),
            "text": caption,
            **_tokens(self.tokenizer, caption),
        }


class NLVR2Dataset(_PerTextDataset):
    """One item per sentence of nlvr2_{split}.arrow; `label` is True when the sentence holds."""

    def __init__(self, arrow_dir: PathLike, split: str, tokenizer: TextTokenizer, image_size: int,
                 file_name: Optional[str] = None) -> None:
        super().__init__(arrow_dir, "nlvr2", split, "questions", tokenizer, image_size, file_name)

    def keys(self) -> list:
        """(identifier, question_index) of every item, in item order, without decoding any image.

        A pair's sentences share its identifier: the sentence's position in the pair tells them apart.
        """
        identifiers = self._arrow.table.column("identifier").to_pylist()
        return [(identifiers[row], int(j)) for row, j in zip(self._rows, self._positions)]

    def __getitem__(self, index: int) -> dict:
        row, j = int(self._rows[index]), int(self._positions[index])
        value = self._arrow.value
        text = value("questions", row)[j]
        image_0, error_0 = _image(value("image_0", row), self.image_size)
        image_1, error_1 = _image(value("image_1", row), self.image_size)
        errors = [f"image_{i}: {e}" for i, e in enumerate((error_0, error_1)) if e is not None]
        return {
            "identifier": value("identifier", row),
            "question_index": j,
            "text": text,
            **_tokens(self.tokenizer, text),
            "image_0": image_0,
            "image_1": image_1,
            "image_ok": not errors,
            "image_error": "; ".join(errors) or None,
            "label": value("answers", row)[j] == "True",
        }


def collate(items: Sequence[dict]) -> dict:
    """Stack tensors, turn booleans (``image_ok``, ``label``) into bool tensors, keep the rest as lists.

    Every item keeps its place, decodable or not; use ``image_ok`` to leave out
    (and ``image_error`` to report) the samples whose image failed to decode.
    """
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = torch.stack(values)
        elif all(isinstance(v, bool) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        else:
            batch[key] = values
    return batch
