"""`torchrun --nproc-per-node N -m engine.index build|add|search`: search your own images by text or by image.

    build   embed every image of a folder (or of a benchmark split's arrow file) into a new index
    add     embed the images of a folder (or split) that an index does not hold yet, and add them
    search  the top-k images of each text or image query, with their scores
    info    what an index holds, and every file that is not in it with the reason
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click

from ..atomic import OutputPathError, writable_folder
from ..options import option_group
from ..runtime.launch import this_launch
from ..runtime.shards import read_manifest
from ..tasks.cli import UsageError, engine_options, one_line_errors, require_head, start_engine
from ..tasks.tokenizers import make_tokenizer, tokenizer_option
from .build import Outcome, Source, prepare_work, run_build
from .search import embed_queries, print_results, read_query_images, read_query_texts
from .sources import ArrowSource, FolderSource
from .store import KINDS, Store, check_checkpoint, checkpoint_identity, not_indexed, open_store, read_meta, work_dir

SHOWN_SKIPPED = 100  # files not indexed printed at the end of a build; `info` prints them all


def _is_rank0() -> bool:
    return this_launch().is_main


def source_options(command: Any) -> Any:
    """--images FOLDER, or --data ARROW with --dataset and --split; the batching and size options."""
    return option_group([
        click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
                     help="Folder of images, walked recursively (JPEG, PNG, WebP, GIF, BMP, TIFF: what Pillow reads)."),
        click.option("--data", "arrow_dir", type=click.Path(path_type=Path), default=None,
                     help="Instead of --images: a folder of arrow files (python -m engine.data coco|f30k|...)."),
        click.option("--dataset", default="coco", show_default=True, type=click.Choice(["coco", "f30k", "vqav2"]),
                     help="With --data: which dataset's arrow files."),
        click.option("--split", default="test", show_default=True, help="With --data: the split whose images to index."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Images per forward pass of each model copy."),
        click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Worker processes per rank reading, hashing and decoding images."),
        click.option("--chunk-size", type=click.IntRange(min=1), default=1000, show_default=True,
                     help="Images per saved chunk of embeddings (also saved at least every minute): what a "
                          "killed run loses at most."),
        click.option("--max-image-bytes", type=click.IntRange(min=1), default=256 << 20, show_default=True,
                     help="Larger files are listed as not indexed, without reading them."),
    ])(command)


def make_source(images_dir: Optional[Path], arrow_dir: Optional[Path], dataset: str, split: str, max_bytes: int,
                out: Path) -> Source:
    if (images_dir is None) == (arrow_dir is None):
        raise UsageError("pass either --images FOLDER or --data ARROW_FOLDER (with --dataset and --split)")
    if arrow_dir is not None:
        return ArrowSource(arrow_dir, dataset, split)
    if not images_dir.is_dir():
        raise UsageError(f"--images {images_dir}: not a folder")
    return FolderSource(images_dir, exclude=[out, work_dir(out)], max_bytes=max_bytes)


def _check_out(out: Path, overwrite: bool) -> None:
    try:
        writable_folder(out, "--out", replaced=True)
    except OutputPathError as exc:
        raise UsageError(str(exc)) from None
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} exists: pass --overwrite to replace it, or add images to it with "
                         f"`engine.index add --index {out}`")


def _index(op: str, shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
           out: Path, source_args: Tuple, kind: str, existing: Optional[Store], batch_size: int, num_workers: int,
           chunk_size: int) -> None:
    manifest = read_manifest(shard_dir)
    require_head(manifest.config, "irtr", shard_dir)
    if existing is not None:
        check_checkpoint(existing.meta["checkpoint"], manifest, out, shard_dir)
    source = make_source(*source_args, out)
    folder = prepare_work(out, op, checkpoint_identity(manifest), source) if _is_rank0() else work_dir(out)
    engine = start_engine(shard_dir, device, dtype, threads, timeout_s)
    outcome = run_build(engine, source, out, folder, kind=kind, existing=existing, chunk_size=chunk_size,
                        batch_size=batch_size, num_workers=num_workers)
    if outcome is not None:
        _report(out, kind, outcome, engine.ctx.tp_size, engine.ctx.dp_size)


def _report(out: Path, kind: str, outcome: Outcome, tp: int, dp: int) -> None:
    click.echo(f"index {out}: {outcome.images} images ({kind}), {outcome.duplicates} duplicate files, "
               f"{len(outcome.skipped)} files not indexed")
    for skipped in outcome.skipped[:SHOWN_SKIPPED]:
        click.echo(f"  not indexed: {skipped['path']}: {skipped['reason']}")
    if len(outcome.skipped) > SHOWN_SKIPPED:
        click.echo(f"  ... and {len(outcome.skipped) - SHOWN_SKIPPED} more: `python -m engine.index info --index {out}` "
                   f"lists them all")
    rate = outcome.embedded / outcome.embed_s if outcome.embed_s and outcome.embedded else 0.0
    click.echo(f"  embedded {outcome.embedded} images in {outcome.embed_s:.1f} s ({rate:.2f} images/s, tp {tp} x dp {dp})")
    if outcome.recall:
        params = ", ".join(f"{k} {v}" for k, v in outcome.recall.get("params", {}).items())
        click.echo(f"  recall@{outcome.recall['recall_at']} against exact search: {outcome.recall['recall']:.4f} "
                   f"over {outcome.recall['queries']} sampled images ({kind}{', ' + params if params else ''})")


@click.group()
def main() -> None:
    """Search your own images with a VLMo or BEiT-3 retrieval checkpoint: build an index, add to it, search it."""


@main.command()
@engine_options
@source_options
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The index folder to write.")
@click.option("--kind", type=click.Choice(KINDS), default="flat", show_default=True,
              help="flat: exact inner product; ivf, hnsw: approximate, for millions of images (their recall "
                   "against exact search is measured on a sample and printed).")
@click.option("--overwrite", is_flag=True, help="Replace an existing index at --out.")
@one_line_errors
def build(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
          images_dir: Optional[Path], arrow_dir: Optional[Path], dataset: str, split: str, batch_size: int,
          num_workers: int, chunk_size: int, max_image_bytes: int, out: Path, kind: str, overwrite: bool) -> None:
    """Embed every image of --images (recursively) or of a --data split into a new index at --out.

    A rerun of the same command after an interruption continues where it stopped.
    """
    if _is_rank0():
        _check_out(out, overwrite)
    _index("build", shard_dir, device, dtype, threads, timeout_s, out,
           (images_dir, arrow_dir, dataset, split, max_image_bytes), kind, None, batch_size, num_workers, chunk_size)


@main.command()
@engine_options
@source_options
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=Path), help="The index to add to.")
@one_line_errors
def add(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
        images_dir: Optional[Path], arrow_dir: Optional[Path], dataset: str, split: str, batch_size: int,
        num_workers: int, chunk_size: int, max_image_bytes: int, index_dir: Path) -> None:
    """Add the images of --images or of a --data split that the index does not hold yet (same bytes: a duplicate)."""
    existing = open_store(index_dir) if _is_rank0() else None
    kind = existing.meta["kind"] if existing else "flat"
    _index("add", shard_dir, device, dtype, threads, timeout_s, index_dir,
           (images_dir, arrow_dir, dataset, split, max_image_bytes), kind, existing, batch_size, num_workers, chunk_size)


@main.command()
@engine_options
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=Path), help="The index to search.")
@click.option("--text", "texts", multiple=True, help="A text query (repeat for several).")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="An image file as the query (repeat for several).")
@click.option("--queries", "queries_file", type=click.Path(path_type=Path), default=None,
              help="A file of text queries, one per line.")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON line per query: {query, results: [{id, path, score}]}.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Queries per forward pass.")
@click.option("--vocab", type=click.Path(path_type=Path), default=None,
              help="WordPiece vocabulary [default: bert-base-uncased, shipped with the engine].")
@tokenizer_option(only_with="--text or --queries")
@one_line_errors
def search(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
           index_dir: Path, texts: Tuple[str, ...], images: Tuple[Path, ...], queries_file: Optional[Path],
           top_k: int, as_json: bool, batch_size: int, vocab: Optional[Path], tokenizer_path: Optional[Path]) -> None:
    """The top-k images of the index for each query, best first, with their scores (inner product)."""
    manifest = read_manifest(shard_dir)
    cfg = manifest.config
    require_head(cfg, "irtr", shard_dir)
    store = None
    if _is_rank0():  # the index is rank 0's alone: it searches
        check_checkpoint(read_meta(index_dir)["checkpoint"], manifest, index_dir, shard_dir)
        store = open_store(index_dir)
    query_texts = read_query_texts(texts, queries_file)
    query_images = read_query_images(images, cfg.image_size)
    if not query_texts and not query_images:
        raise UsageError("no query: pass --text, --image or --queries")
    tokenizer = make_tokenizer(cfg, tokenizer_path, vocab) if query_texts else None  # image queries read no text
    engine = start_engine(shard_dir, device, dtype, threads, timeout_s)
    vectors = embed_queries(engine, query_texts, query_images, tokenizer, batch_size)
    if store is None:
        return
    queries: List[Dict[str, Any]] = [{"text": t} for t in query_texts] + [{"image": str(p)} for p in images]
    print_results(store, queries, store.search(vectors, top_k), as_json)


@main.command()
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=Path), help="The index to describe.")
@click.option("--json", "as_json", is_flag=True, help="index.json and the files not indexed, as one JSON object.")
@one_line_errors
def info(index_dir: Path, as_json: bool) -> None:
    """What the index holds (count, kind, checkpoint, sources, measured recall) and every file not indexed, with why."""
    meta, skipped = read_meta(index_dir), not_indexed(index_dir)
    if as_json:
        click.echo(json.dumps({**meta, "not_indexed": skipped}, ensure_ascii=False, indent=1))
        return
    checkpoint = meta["checkpoint"]
    click.echo(f"index {index_dir}: {meta['count']} images ({meta['kind']}, {meta['dim']}-d), {meta['duplicates']} "
               f"duplicate files, {len(skipped)} files not indexed")
    click.echo(f"  checkpoint {checkpoint['file'] or '?'} ({checkpoint['family']}, sha256 {checkpoint['sha256']})")
    for source in meta["sources"]:
        click.echo(f"  from {source.get('images') or source.get('data')}")
    if meta.get("recall_vs_exact"):
        recall = meta["recall_vs_exact"]
        click.echo(f"  recall@{recall['recall_at']} against exact search: {recall['recall']:.4f}")
    for item in skipped:
        click.echo(f"  not indexed: {item['path']}: {item['reason']}")


if __name__ == "__main__":
    main(prog_name="python -m engine.index")
