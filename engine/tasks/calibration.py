"""`--calibration FILE`: --dtype int8's smoothing factors from the activation ranges a few samples of data reach.

Without it, int8 predicts each LayerNorm output channel's range from the LayerNorm's γ and β
(engine.layers.smoothing). With it, the fp32 model first runs the first --calibration-samples samples of FILE
(whose images decode), a file in the format the command reads (engine.data's arrow file of the checkpoint's task),
and the measured ranges decide the factors (engine.layers.quantize.calibrate), inside the load: the shard is read
once. The file is read and its samples decoded before the shard loads, so a bad file is one line at once; they
are decoded again batch by batch when the model runs them, so no rank holds them while it serves.

Every rank reads the same file and runs the same batches (the fp32 forward all-reduces); the measured inputs are
LayerNorm outputs, which every rank holds whole, so a calibration means the same at any tp. A process that did not
read the file itself (a Ray replica's ranks) reads it again from its `CalibrationSource` and checks that it found
the same samples. With VLMO_INT8_SMOOTHING=0 a calibration would set factors nothing uses: it is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import click
from torch.utils.data import Dataset

from ..data.datasets import KarpathyImageDataset, KarpathyTextDataset, NLVR2Dataset, VQADataset, collate
from ..data.raw import DataError
from ..models import ModelConfig
from ..models.tasks import IMAGE_EMBEDDING, IRTR, NLVR2, TASKS, TEXT_EMBEDDING, VQA, Inputs
from ..options import option_group
from ..runtime.loading import INT8, SMOOTHING_ENV, int8_smoothing
from .cli import UsageError
from .frontend import keys_sha256
from .tokenizers import make_tokenizer, tokenizer_option

DEFAULT_SAMPLES = 32
# Samples per calibration forward: the ranges are maxima over samples, the batching does not change them.
BATCH = 8
Pass = Tuple[str, Dataset, List[int]]  # a task, and the dataset items it runs
Samples = Tuple[List[Any], List[Pass]]  # the samples' keys, and the passes that run them


@dataclass(frozen=True)
class Calibration:
    """The samples a --calibration file gives and what identifies them; `batches` are the model's inputs."""
    file: Path
    passes: List[Pass]
    keys: List[Any]  # each sample's key in the file (question id, (identifier, index), image / caption index)

    def batches(self) -> Iterator[Tuple[str, Inputs]]:
        """(task, model inputs) per forward of BATCH samples, in file order, the same on every rank."""
        for task, dataset, indices in self.passes:
            for start in range(0, len(indices), BATCH):
                stacked = collate([dataset[i] for i in indices[start:start + BATCH]])
                yield task, {name: stacked[name] for name in TASKS[task].inputs}

    @property
    def identity(self) -> Dict[str, Any]:
        """What results files and summaries record: the file's name, the samples run, a hash of their keys (a copy
        of the file matches, other samples do not)."""
        return {"file": self.file.name, "samples": len(self.keys), "keys_sha256": keys_sha256(self.keys)}

    @property
    def description(self) -> str:
        return f"calibrated on {len(self.keys)} samples of {self.file}"

    @property
    def source(self) -> "CalibrationSource":
        """What another process needs to read these samples again: the first len(keys) samples whose images decode
        are these same ones."""
        return CalibrationSource(file=self.file.resolve(), samples=len(self.keys), identity=self.identity)


@dataclass(frozen=True)
class CalibrationSource:
    """A calibration as a process elsewhere reads it again (a Ray replica's ranks, on the replica's node): the file
    at the same path there, and the identity the first read found. Small to send, unlike the decoded samples."""
    file: Path
    samples: int
    identity: Dict[str, Any]

    def read(self, head: str, cfg: ModelConfig, tokenizer: Any) -> Calibration:
        """The same samples, read from this node's file; one UsageError line when it gives other samples."""
        calibration = read_calibration(self.file, self.samples, INT8, head, cfg, tokenizer)
        if calibration.identity != self.identity:
            raise UsageError(f"--calibration {self.file}: the file on this node gives other samples (keys sha256 "
                             f"{calibration.identity['keys_sha256'][:12]}) than where the command read it "
                             f"({self.identity['keys_sha256'][:12]}): put the same file at that path on every node")
        return calibration


# What a server's --calibration takes (engine.serve, engine.ray_serve).
SERVED_FILE = "the arrow file of the checkpoint's task, e.g. DATA/vqav2_train.arrow for VQA"


def calibration_options(what: str) -> Callable[[Callable], Callable]:
    """--calibration FILE and --calibration-samples N; `what` says which file the command takes."""
    return option_group([
        click.option("--calibration", "calibration_path", type=click.Path(path_type=Path), default=None,
                     help=f"With --dtype int8: smoothing factors from the activation ranges the first samples of "
                          f"this file reach ({what}) instead of from the LayerNorm weights."),
        click.option("--calibration-samples", type=click.IntRange(min=1), default=None,
                     help=f"Samples of --calibration to run (whose images decode) [default: {DEFAULT_SAMPLES}]."),
    ])


def read_calibration(path: Optional[Path], samples: Optional[int], dtype: Optional[str], head: str,
                     cfg: ModelConfig, tokenizer: Any) -> Optional[Calibration]:
    """The calibration samples of `path` for a checkpoint's `head` (vqa, nlvr2 or irtr), or None without a file;
    one UsageError line for an option that does not apply or a file that is not of the head's format."""
    if not _applies(path, samples, dtype):
        return None
    return _read(path, samples, head, cfg, tokenizer)


def calibration_with_tokenizer(what: str) -> Callable[[Callable], Callable]:
    """calibration_options and --tokenizer for a command whose own inputs hold no text (engine.bench's synthetic
    ones, engine.forward's token ids): it tokenises only the calibration file's texts."""
    return option_group([calibration_options(what), tokenizer_option(only_with="--calibration")])


def read_run_calibration(cfg: ModelConfig, task: str, dtype: Optional[str], path: Optional[Path],
                         samples: Optional[int], tokenizer_path: Optional[Path]) -> Optional[Calibration]:
    """read_calibration for the command of calibration_with_tokenizer that runs `task`: the tokenizer is made only
    for a calibration that applies (a BEiT-3 checkpoint needs --tokenizer for nothing else)."""
    if not _applies(path, samples, dtype):
        return None
    return _read(path, samples, task, cfg, make_tokenizer(cfg, tokenizer_path, None))


def _applies(path: Optional[Path], samples: Optional[int], dtype: Optional[str]) -> bool:
    """Whether there is a calibration file to read; a UsageError line for options that do not go together."""
    if path is None:
        if samples is not None:
            raise UsageError("--calibration-samples: only with --calibration FILE")
        return False
    if dtype != INT8:
        raise UsageError(f"--calibration {path}: only with --dtype int8 (it sets int8's smoothing factors), "
                         f"not --dtype {dtype or 'default'}")
    if not int8_smoothing():
        raise UsageError(f"--calibration {path}: {SMOOTHING_ENV}=0 turns int8's smoothing off, and a calibration "
                         f"only sets the smoothing factors: drop --calibration (the same int8 run) or unset "
                         f"{SMOOTHING_ENV}")
    return True


def _read(path: Path, samples: Optional[int], head: str, cfg: ModelConfig, tokenizer: Any) -> Calibration:
    try:
        keys, passes = _READERS[head](path, samples or DEFAULT_SAMPLES, cfg, tokenizer)
    except DataError as exc:
        raise UsageError(f"--calibration: {exc}") from None
    if not keys:
        raise UsageError(f"--calibration {path}: no sample to calibrate with (the file is empty, or none of its "
                         f"images decodes)")
    return Calibration(file=path, passes=passes, keys=keys)


def _first_samples(dataset: Dataset, n: int, task: str, key: Callable[[dict], Any]) -> Samples:
    """The keys of the first n items whose images decode, in item order, and their pass."""
    keys, indices = [], []
    for index in range(len(dataset)):
        if len(indices) == n:
            break
        item = dataset[index]
        if item.get("image_ok", True):
            keys.append(key(item))
            indices.append(index)
    return keys, [(task, dataset, indices)]


def _vqa(path: Path, n: int, cfg: ModelConfig, tokenizer: Any) -> Samples:
    dataset = VQADataset(path.parent, "", tokenizer, cfg.image_size, file_name=path.name)
    return _first_samples(dataset, n, VQA, lambda item: item["question_id"])


def _nlvr2(path: Path, n: int, cfg: ModelConfig, tokenizer: Any) -> Samples:
    dataset = NLVR2Dataset(path.parent, "", tokenizer, cfg.image_size, file_name=path.name)
    return _first_samples(dataset, n, NLVR2, lambda item: (item["identifier"], item["question_index"]))


def _retrieval(path: Path, n: int, cfg: ModelConfig, tokenizer: Any) -> Samples:
    """n images and n captions: retrieval runs the image-only and the text-only pass, each its own experts."""
    images = KarpathyImageDataset(path.parent, "coco", "", cfg.image_size, file_name=path.name)
    captions = KarpathyTextDataset(path.parent, "coco", "", tokenizer, file_name=path.name)
    image_keys, image_pass = _first_samples(images, n, IMAGE_EMBEDDING, lambda item: ("image", item["image_index"]))
    text_keys, text_pass = _first_samples(captions, n, TEXT_EMBEDDING, lambda item: ("caption", item["caption_index"]))
    return image_keys + text_keys, image_pass + text_pass


_READERS: Dict[str, Callable[[Path, int, ModelConfig, Any], Samples]] = {
    VQA: _vqa, NLVR2: _nlvr2, IRTR: _retrieval}


def head_to_calibrate(heads: Sequence[str]) -> str:
    """The head whose file format a server's --calibration takes: the checkpoint's first (VQA, NLVR2, retrieval)."""
    return next(head for head in heads if head in _READERS)
