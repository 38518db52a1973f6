"""Queries against an index: texts through the text-only pass, images through the image-only pass, then FAISS.

The queries are embedded by the tensor-parallel model like the images were (shared out among the data-parallel
groups), and rank 0 searches the index. A query image is decoded as the folder's images were (upright).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import click
import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.image import ImageDecodeError, decode_image, square_transform
from ..models.tasks import IMAGE_EMBEDDING, TASKS, TEXT_EMBEDDING
from ..tasks.cli import Engine, UsageError
from ..tasks.evaluation import Record, evaluate
from ..tasks.frontend import per_sample_step
from ..tasks.tokenizers import Tokenizer
from .store import Store


class Queries(Dataset):
    """Queries as a dataset: item i is the `encode`d query i, with its position."""

    def __init__(self, queries: Sequence[Any], encode: Callable[[Any], Dict[str, torch.Tensor]]) -> None:
        self.queries, self.encode = queries, encode

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> dict:
        return {"query": i, **self.encode(self.queries[i])}


def _text(tokenizer: Tokenizer) -> Callable[[str], Dict[str, torch.Tensor]]:
    def encode(text: str) -> Dict[str, torch.Tensor]:
        encoded = tokenizer([text])
        return {"text_ids": encoded["text_ids"][0], "text_masks": encoded["text_masks"][0]}
    return encode


def query_image(data: bytes, image_size: int) -> torch.Tensor:
    """A query image as the model sees it: upright, resized and normalised as the indexed photos were."""
    return square_transform(decode_image(data, upright=True), image_size)


def read_query_images(paths: Sequence[Path], image_size: int) -> List[bytes]:
    """The query images' bytes, each checked to decode (before the model loads): a one-line error otherwise."""
    images = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
            query_image(data, image_size)
        except OSError as exc:
            raise UsageError(f"--image {path}: {exc.strerror or exc}") from None
        except ImageDecodeError as exc:
            raise UsageError(f"--image {path}: {exc}") from None
        images.append(data)
    return images


def read_query_texts(texts: Sequence[str], queries_file: Optional[Path]) -> List[str]:
    """--text values, then the lines of --queries (blank lines skipped)."""
    texts = list(texts)
    if queries_file is not None:
        try:
            lines = Path(queries_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--queries {queries_file}: {getattr(exc, 'strerror', None) or exc}") from None
        texts += [line for line in lines if line.strip()]
    for text in texts:
        if not text.strip():
            raise UsageError("--text: empty query")
    return texts


def embed_queries(engine: Engine, texts: Sequence[str], images: Sequence[bytes], tokenizer: Optional[Tokenizer],
                  batch_size: int) -> Optional[np.ndarray]:
    """Rank 0: the L2-normalised embeddings [Q, D] of the texts, then the images; None on the other ranks. The
    tokenizer may be None where there are no texts."""
    ctx, size = engine.ctx, engine.manifest.config.image_size
    passes = ((Queries(texts, _text(tokenizer)), TASKS[TEXT_EMBEDDING]),
              (Queries(images, lambda data: {"image": query_image(data, size)}), TASKS[IMAGE_EMBEDDING]))
    rows: List[np.ndarray] = []
    for dataset, task in passes:
        if not len(dataset):
            continue
        received: List[Record] = []
        step = per_sample_step(lambda t, task=task: task.first_output(engine.model, t, ctx.device), ("query",),
                               lambda batch, i: {"query": batch["query"][i]},
                               lambda batch, i, row: {"embedding": row.numpy()})
        evaluate(ctx, dataset, range(len(dataset)), step, batch_size=batch_size, num_workers=0,
                 on_records=received.extend, label="queries", unit="queries")
        rows += [r["embedding"] for r in sorted(received, key=lambda r: r["query"])]
    return np.stack(rows).astype(np.float32) if ctx.is_main else None


def describe_query(query: Dict[str, Any]) -> str:
    return f"text {query['text']!r}" if "text" in query else f"image {query['image']}"


def print_results(store: Store, queries: Sequence[Dict[str, Any]], results: Sequence[List[Dict[str, Any]]],
                  as_json: bool) -> None:
    """One JSON line per query ({"query", "results"}), or a table per query."""
    for query, found in zip(queries, results):
        if as_json:
            click.echo(json.dumps({"query": query, "results": found}, ensure_ascii=False))
            continue
        click.echo(f"{describe_query(query)}: top {len(found)} of {len(store)} images")
        for rank, result in enumerate(found, 1):
            click.echo(f"  {rank:>3}  {result['score']:.4f}  {result['path']}")
