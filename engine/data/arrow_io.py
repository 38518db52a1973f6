"""Arrow IPC files: all-or-nothing writing of a writer's outputs, and memory-mapped reading."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.types as pt

from ..atomic import atomic_path
from .raw import DataError

# File name of each dataset's split, shared by the writers and the readers.
_SPLIT_FILES = {
    "vqav2": "vqav2_{}.arrow",
    "coco": "coco_caption_karpathy_{}.arrow",
    "f30k": "f30k_caption_karpathy_{}.arrow",
    "nlvr2": "nlvr2_{}.arrow",
}

# What the readers need of each kind of file: column -> (what it must be, the test). Writers' extra columns
# (split) and metadata are free; test splits type their empty answer lists as lists of null, so "a list" it is.
Kind = Tuple[str, Callable[[pa.DataType], bool]]
_BINARY: Kind = ("binary", lambda t: pt.is_binary(t) or pt.is_large_binary(t))
_STRING: Kind = ("a string", lambda t: pt.is_string(t) or pt.is_large_string(t))
_INTEGER: Kind = ("an integer", pt.is_integer)
_LIST: Kind = ("a list", lambda t: pt.is_list(t) or pt.is_large_list(t))
_ANY: Kind = ("any type", lambda t: True)


def _list_of(kind: Kind, plural: str) -> Kind:
    return f"a list of {plural}", lambda t: _LIST[1](t) and kind[1](t.value_type)


_STRINGS, _INTEGERS = _list_of(_STRING, "strings"), _list_of(_INTEGER, "integers")
COLUMNS: Dict[str, Dict[str, Kind]] = {
    "vqav2": {"image": _BINARY, "questions": _STRINGS, "question_id": _INTEGERS, "image_id": _ANY,
              "answers": _LIST, "answer_labels": _LIST, "answer_scores": _LIST},
    "coco": {"image": _BINARY, "caption": _STRINGS, "image_id": _ANY},
    "nlvr2": {"image_0": _BINARY, "image_1": _BINARY, "questions": _STRINGS, "answers": _STRINGS,
              "identifier": _STRING},
    "vqav2 official annotations": {"question_id": _INTEGER, "answers": _STRINGS, "answer_type": _STRING,
                                   "question_type": _STRING},
}
COLUMNS["f30k"] = COLUMNS["coco"]

# Rows buffered before a record batch is written: bounds memory to a few
# hundred MB of images while keeping the batch count small.
BATCH_ROWS = 1000


class ArrowSink:
    """Rows appended here land in one Arrow IPC file (RecordBatchFileWriter)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.schema = schema
        self._pending: list = []
        self._writer = pa.ipc.new_file(str(path), schema)

    def append(self, row: dict) -> None:
        self._pending.append(row)
        if len(self._pending) >= BATCH_ROWS:
            self._flush()

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        if self._pending:
            batch = pa.RecordBatch.from_pylist(self._pending, schema=self.schema)
            self._writer.write_batch(batch)
            self._pending = []


class StagedOutputs:
    """Output files written under temporary names (engine.atomic), renamed into place together at the end."""

    def __init__(self, out_dir: Path, names: Sequence[str], stack: ExitStack) -> None:
        self.out_dir = out_dir
        self._names = set(names)
        self._stack = stack
        self._sinks: List[ArrowSink] = []

    def arrow(self, name: str, schema: pa.Schema) -> ArrowSink:
        sink = ArrowSink(self._stage(name), schema)
        self._sinks.append(sink)
        return sink

    def text(self, name: str, content: str) -> None:
        self._stage(name).write_text(content, encoding="utf-8")

    def close_sinks(self, quietly: bool = False) -> None:
        for sink in self._sinks:
            try:
                sink.close()
            except (OSError, pa.ArrowException):
                if not quietly:
                    raise  # otherwise the file is deleted next anyway

    def _stage(self, name: str) -> Path:
        if name not in self._names:
            raise ValueError(f"{name} is not among the declared outputs {sorted(self._names)}")
        return self._stack.enter_context(atomic_path(self.out_dir / name))


@contextmanager
def staged_outputs(out_dir: Path, names: Sequence[str], overwrite: bool = False) -> Iterator[StagedOutputs]:
    """All outputs of the block (`names`, declared up front) appear together at its end, or none on error.

    Existing files among `names` are refused before any work unless `overwrite`, as the sharding tool does.
    """
    existing = [name for name in names if (out_dir / name).exists()]
    if existing and not overwrite:
        raise DataError(f"{out_dir / existing[0]} already exists ({len(existing)} of the outputs do); "
                        f"pass --overwrite to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        outputs = StagedOutputs(out_dir, names, stack)
        try:
            yield outputs
        except BaseException:
            outputs.close_sinks(quietly=True)
            raise
        outputs.close_sinks()


def split_filename(dataset: str, split: str) -> str:
    """The arrow file name of `split` of `dataset` ("vqav2", "coco", "f30k" or "nlvr2")."""
    if dataset not in _SPLIT_FILES:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(_SPLIT_FILES)}")
    return _SPLIT_FILES[dataset].format(split)


def read_split(arrow_dir: Path, dataset: str, split: str) -> pa.Table:
    """Memory-map the arrow file of one split, checked to have the columns of `dataset`'s files."""
    return read_table(Path(arrow_dir) / split_filename(dataset, split), dataset)


def read_table(path: Path, kind: Optional[str] = None) -> pa.Table:
    """Memory-map an Arrow IPC file; column data is read from the page cache on access.

    With `kind` (a key of COLUMNS), the file must have the columns its readers use, of the types they expect.
    """
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.arrow")) if path.parent.is_dir() else []
        hint = f"; present: {', '.join(present)}" if present else ""
        raise DataError(f"missing arrow file {path}{hint}")
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable arrow file {path}: {err}") from None
    if kind is not None:
        check_columns(path, table.schema, kind)
    return table


def check_columns(path: Path, schema: pa.Schema, kind: str) -> None:
    """Refuse, naming the file and every wrong column, a schema without the columns of `kind`'s files."""
    expected = COLUMNS[kind]
    missing = [name for name in expected if name not in schema.names]
    wrong = [f"{name} is {schema.field(name).type}, not {what}" for name, (what, fits) in expected.items()
             if name in schema.names and not fits(schema.field(name).type)]
    if missing or wrong:
        problems = ([f"no column {', '.join(missing)}"] if missing else []) + wrong
        raise DataError(f"{path}: not a {kind} arrow file ({'; '.join(problems)}; it has: "
                        f"{', '.join(schema.names) or 'no columns'}); write it with `python -m engine.data "
                        f"{kind.split()[0]}`")
