"""`torchrun --nproc N -m engine.retrieval`: COCO / Flickr30k image↔text retrieval recall of a sharded checkpoint.

Two passes through the tensor-parallel model, each spread over the data-parallel groups by the shared
evaluation loop: every image of the split alone, then every caption alone (DESIGN.md §3). Rank 0 gathers the
L2-normalised embeddings, scores every image against every caption (image · text, fp32, on the CPU) and
computes recall@1/5/10 both ways as the published `compute_irtr_recall` does (engine.tasks.metrics).

An image that does not decode is never replaced: it is reported in the summary and left out of the gallery
together with its captions, so the recalls are those of the images that decoded and their own captions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import click
import numpy as np
import torch

from .atomic import write_json
from .data.datasets import KarpathyImageDataset, KarpathyTextDataset
from .tasks.tokenizers import make_tokenizer
from .models import MultiwayModel
from .models.tasks import IMAGE_EMBEDDING, TASKS, TEXT_EMBEDDING
from .runtime.shards import read_manifest
from .tasks.calibration import calibration_options, read_calibration
from .tasks.cli import UsageError, engine_options, one_line_errors, require_head, start_engine, writable
from .tasks.embeddings import Gallery, save_embeddings
from .tasks.evaluation import Record, evaluate
from .tasks.frontend import (Step, latency_rows, per_sample_step, print_table, run_info, run_title, summary_option,
                             task_options)
from .tasks.metrics import retrieval_recall

DATASETS = {"coco": "COCO", "f30k": "Flickr30k"}


def image_step(model: MultiwayModel, device: torch.device) -> Step:
    """Image-only pass: one record per image, its embedding or why it did not decode."""
    # numpy rows pickle alone (a tensor row would drag its whole batch's storage through the gather)
    return per_sample_step(lambda tensors: TASKS[IMAGE_EMBEDDING].first_output(model, tensors, device), ("image_id",),
                           lambda batch, i: {"image_index": batch["image_index"][i], "image_id": batch["image_id"][i]},
                           lambda batch, i, row: {"embedding": row.numpy()})


def text_step(model: MultiwayModel, device: torch.device) -> Step:
    """Text-only pass: one record per caption with its embedding."""
    return per_sample_step(lambda tensors: TASKS[TEXT_EMBEDDING].first_output(model, tensors, device),
                           ("caption_index",), lambda batch, i: {"caption_index": batch["caption_index"][i]},
                           lambda batch, i, row: {"embedding": row.numpy()})


def assemble(images: List[Record], texts: List[Record], captions: KarpathyTextDataset) -> Gallery:
    """The gallery to score: decoded images in row order, and the captions of those images in caption order."""
    images = sorted((r for r in images if "embedding" in r), key=lambda r: r["image_index"])
    position = {r["image_index"]: p for p, r in enumerate(images)}
    texts = sorted((r for r in texts if int(captions.image_index[r["caption_index"]]) in position),
                   key=lambda r: r["caption_index"])
    return Gallery(
        image_embeds=torch.from_numpy(np.stack([r["embedding"] for r in images])),
        image_rows=[r["image_index"] for r in images], image_ids=[r["image_id"] for r in images],
        text_embeds=torch.from_numpy(np.stack([r["embedding"] for r in texts])),
        caption_index=[r["caption_index"] for r in texts],
        captions=[captions.captions[r["caption_index"]] for r in texts],
        text_image=[position[int(captions.image_index[r["caption_index"]])] for r in texts],
    )


def image_errors(images: List[Record], captions: KarpathyTextDataset, n_captions: int) -> List[Dict[str, Any]]:
    """The images that did not decode, each with how many captions left the gallery with it."""
    failed = sorted((r for r in images if "image_error" in r), key=lambda r: r["image_index"])
    per_image = captions.image_index[:n_captions]
    return [{"image_index": r["image_index"], "image_id": r["image_id"], "error": r["image_error"],
             "captions": int((per_image == r["image_index"]).sum())} for r in failed]


@click.command()
@engine_options
@task_options(data="Folder with the Karpathy arrow files (python -m engine.data coco|f30k).",
              per_batch="Images, then captions,", limit="images (and their captions)")
@click.option("--dataset", type=click.Choice(sorted(DATASETS)), default="coco", show_default=True,
              help="coco reads coco_caption_karpathy_SPLIT.arrow, f30k f30k_caption_karpathy_SPLIT.arrow.")
@click.option("--split", default="test", show_default=True, help="test or val (or any Karpathy split written).")
@summary_option("recalls, counts, latency, image errors", "results/retrieval_DATASET_SPLIT.summary.json")
@click.option("--save-embeddings", "embeddings_path", type=click.Path(path_type=Path), default=None,
              help="Also write the normalised image and caption embeddings with their ids (safetensors).")
@calibration_options("a Karpathy split's arrow file, e.g. DATA/coco_caption_karpathy_train.arrow: N images and "
                     "N captions")
@one_line_errors
def main(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
         arrow_dir: Path, dataset: str, split: str, vocab: Optional[Path],
         tokenizer_path: Optional[Path], batch_size: int, num_workers: int,
         limit: Optional[int], summary_path: Optional[Path], embeddings_path: Optional[Path],
         calibration_path: Optional[Path], calibration_samples: Optional[int]) -> None:
    """Image→text and text→image recall@1/5/10 of the sharded checkpoint in SHARDS on one Karpathy split."""
    # Everything a user can get wrong is checked before the model loads or a file is written.
    summary_path = writable("--summary", summary_path or Path("results") / f"retrieval_{dataset}_{split}.summary.json")
    if embeddings_path:
        writable("--save-embeddings", embeddings_path)
    cfg = read_manifest(shard_dir).config
    require_head(cfg, "irtr", shard_dir)
    tokenizer = make_tokenizer(cfg, tokenizer_path, vocab)
    images = KarpathyImageDataset(arrow_dir, dataset, split, cfg.image_size)
    captions = KarpathyTextDataset(arrow_dir, dataset, split, tokenizer)
    n_images = min(len(images), limit or len(images))
    if not n_images:
        raise UsageError(f"{dataset} {split}: the split has no images")
    # Captions are in row order: those of the first n_images rows are a prefix.
    n_captions = int((captions.image_index < n_images).sum())
    calibration = read_calibration(calibration_path, calibration_samples, dtype, "irtr", cfg, tokenizer)

    engine = start_engine(shard_dir, device, dtype, threads, timeout_s, calibration)
    ctx = engine.ctx
    received: Dict[str, List[Record]] = {"image": [], "text": []}
    stats = {}
    for kind, data, count, step, noun in (("image", images, n_images, image_step, "images"),
                                          ("text", captions, n_captions, text_step, "captions")):
        stats[kind] = evaluate(ctx, data, range(count), step(engine.model, ctx.device), batch_size=batch_size,
                               num_workers=num_workers, on_records=received[kind].extend,
                               label=f"{dataset} {split} {noun}")
    if not ctx.is_main:
        return

    errors = image_errors(received["image"], captions, n_captions)
    if len(errors) == n_images:
        raise UsageError(f"none of the {n_images} images decoded, nothing to score "
                         f"({errors[0]['image_id']}: {errors[0]['error']})")
    gallery = assemble(received["image"], received["text"], captions)
    recalls = retrieval_recall(gallery.image_embeds @ gallery.text_embeds.t(), gallery.text_image)
    run = run_info(engine, shard_dir, batch_size)
    if embeddings_path:
        save_embeddings(embeddings_path, gallery, {"dataset": dataset, "split": split,
                                                   "checkpoint_sha256": str(run["checkpoint_sha256"])})
    summary = {
        "task": "retrieval", "dataset": dataset, "split": split, **recalls,
        "images": n_images, "captions": n_captions,
        "images_scored": len(gallery.image_ids), "captions_scored": len(gallery.captions),
        "image_errors": errors,
        "latency": {kind: s.latency_summary() for kind, s in stats.items()},
        "embeddings": str(embeddings_path) if embeddings_path else None,
        "run": {"wall_s": sum(s.wall_s for s in stats.values()), **run},
    }
    write_json(summary_path, summary, indent=1)

    def recall_row(prefix: str) -> str:
        return "  ".join(f"R@{k} {100 * recalls[f'{prefix}_r{k}']:.2f}" for k in (1, 5, 10))

    print_table(run_title(f"{DATASETS[dataset]} {split} retrieval", run), [
        ("images", f"{n_images} ({summary['images_scored']} scored)"),
        ("captions", f"{n_captions} ({summary['captions_scored']} scored)"),
        ("image→text", recall_row("tr")),
        ("text→image", recall_row("ir")),
        ("image errors", str(len(errors))),
        *latency_rows(summary["latency"]["image"], "images", ("image batches", "image rate")),
        *latency_rows(summary["latency"]["text"], "captions", ("text batches", "text rate")),
        *([("embeddings", str(embeddings_path))] if embeddings_path else []),
        ("summary", str(summary_path)),
    ])


if __name__ == "__main__":
    main(prog_name="python -m engine.retrieval")
