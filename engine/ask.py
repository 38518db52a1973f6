"""`torchrun --nproc-per-node TP -m engine.ask --shards DIR --image photo.jpg --question "..."`: one question.

Prints the answer and the top-k (VQA checkpoints), or the verdict (NLVR2 checkpoints: two --image), with the
server's preprocessing and response shape (`--json`). `python -m engine.ask` runs tp-1 shards without torchrun.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import click
from PIL import Image

from .runtime.shards import read_manifest
from .serving.payloads import Preprocessor, nlvr2_response, top_k_of, vqa_response
from .serving.preprocess import Limits, RequestError, allow_pixels, check_image_size
from .models.tasks import NLVR2, VQA, served_tasks
from .serving.tasks import ServedModel
from .tasks.cli import UsageError, engine_options, one_line_errors, start_engine
from .data.vqav2 import answer_table
from .tasks.tokenizers import make_tokenizer, tokenizer_option

# Pillow's own limit (it warns above it): a local command decodes what a viewer would open, larger than a server takes
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def _read(path: Path, limits: Limits) -> bytes:
    try:
        return check_image_size(path.read_bytes(), str(path), limits)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None


@click.command()
@engine_options
@click.option("--image", "images", required=True, multiple=True, type=click.Path(path_type=Path),
              help="The image (twice for an NLVR2 checkpoint: the left, then the right image).")
@click.option("--question", required=True, help="The question (NLVR2: the sentence to judge).")
@click.option("--answers", "answers_path", type=click.Path(path_type=Path), default=None,
              help="Label → answer table (answer2label.txt), required for VQA checkpoints.")
@click.option("--top-k", default="5", show_default=True, help="Answers to list (VQA).")
@click.option("--vocab", type=click.Path(path_type=Path), default=None,
              help="WordPiece vocabulary [default: bert-base-uncased, shipped with the engine].")
@tokenizer_option()
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Largest image in pixels, checked before decoding (decompression bombs).")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as /v1/vqa (or /v1/nlvr2) returns it.")
@one_line_errors
def main(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
         images: Tuple[Path, ...], question: str, answers_path: Optional[Path], top_k: str, vocab: Optional[Path],
         tokenizer_path: Optional[Path], max_image_pixels: int, as_json: bool) -> None:
    """Answer one question about one image (or judge one sentence about two) with the checkpoint in SHARDS."""
    cfg = read_manifest(shard_dir).config
    kinds = served_tasks(cfg)
    kind = VQA if VQA in kinds else NLVR2 if NLVR2 in kinds else None
    if kind is None:
        raise UsageError(f"{shard_dir}: engine.ask needs a VQA or NLVR2 checkpoint (this one serves "
                         f"{', '.join(kinds) or 'nothing'})")
    wanted = 1 if kind == VQA else 2
    if len(images) != wanted:
        raise UsageError(f"--image: a {kind.upper()} checkpoint takes {wanted} image(s), got {len(images)}")
    answers = answer_table(answers_path, cfg.vqa_labels) if kind == VQA and answers_path else None
    if kind == VQA and answers is None:
        raise UsageError("--answers: required for a VQA checkpoint (its answer2label.txt)")
    limits = Limits(max_image_bytes=1 << 62, max_image_pixels=max_image_pixels)
    allow_pixels(max_image_pixels)  # Pillow's own guard agrees, as in engine.serve
    preprocessor = Preprocessor(cfg, make_tokenizer(cfg, tokenizer_path, vocab), limits)
    try:
        pixels = [preprocessor.image(_read(path, limits), str(path)) for path in images]
        prepared = preprocessor.vqa(pixels[0], question) if kind == VQA else preprocessor.nlvr2(*pixels, question)
        k = top_k_of(top_k, len(answers)) if answers else 0
    except RequestError as exc:
        raise UsageError(str(exc)) from None

    engine = start_engine(shard_dir, device, dtype, threads, timeout_s)
    served = ServedModel(engine.model, engine.ctx.device)
    batch = {name: tensor[None] for name, tensor in prepared.inputs.items()}
    began = time.perf_counter()
    output = served.run(kind, batch)[0]
    latency_ms = 1e3 * (time.perf_counter() - began)
    if not engine.ctx.is_main:
        return
    result: Dict[str, Any] = vqa_response(output, answers, k) if kind == VQA else nlvr2_response(output)
    result.update(latency_ms=latency_ms, truncated=bool(prepared.notes))
    if prepared.notes:
        result["warning"] = "; ".join(prepared.notes)
    if as_json:
        click.echo(json.dumps(result))
        return
    if kind == VQA:
        click.echo(f"answer: {result['answer']}  (label {result['label']})")
        width = max(len(t["answer"]) for t in result["top_k"])
        for rank, t in enumerate(result["top_k"], 1):
            click.echo(f"  {rank}. {t['answer']:<{width}}  {100 * t['probability']:6.2f}%")
    else:
        click.echo(f"label: {result['label']}  (" + ", ".join(
            f"{name} {100 * p:.2f}%" for name, p in result["probabilities"].items()) + ")")
    if prepared.notes:
        click.echo(f"note: {result['warning']}")
    click.echo(f"forward: {latency_ms:.1f} ms on tp {engine.ctx.tp_size}, {engine.dtype}")


if __name__ == "__main__":
    main(prog_name="python -m engine.ask")
