"""How close int8 comes to fp32 on one shard set (python -m engine.tools.int8_accuracy --shards DIR).

On the golden VQAv2 inputs (the three preprocessed 480×480 validation images with their questions, VLMo
shards at 480) plus N synthetic VQA-shaped samples, per variant: the per-sample logit cosine (min, mean) and
top-1 agreement against the fp32 model. Variants: int8 with and without smoothing, and the same on a copy of the
model with planted outlier channels (`plant_outliers`: a few LayerNorm channels made `factor` times larger
with the linears reading them scaled down to match, so fp32 computes the same function while int8's per-token
activations see the outliers real fine-tuned checkpoints have), plus smoothing from a calibration pass there.
tp 1, in this process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

import click
import torch
from safetensors.torch import load_file
from torch import nn

from ..atomic import OutputPathError, writable_file, write_json
from ..tasks.benchmark import output_agreement, synthetic_inputs
from ..layers.quantize import calibrate, quantize_model, unpack_linears
from ..models.tasks import TASKS, VQA
from ..runtime.distributed import ParallelContext, init_parallel
from ..runtime.loading import load_model
from ..runtime.shards import read_manifest

OUTLIER_CHANNELS = (1, 100, 383, 700)
GOLDEN_VQA = "vqav2_val_preprocessed.safetensors"
BATCH = 8
BERT_VOCAB = 30522  # bert-base-uncased, whose ids the golden preprocessed inputs hold


def plant_outliers(model: nn.Module, factor: float, channels: Sequence[int] = OUTLIER_CHANNELS) -> None:
    """In place: every LayerNorm that feeds a linear gets γ_j, β_j × factor on `channels` (modulo its width),
    and the columns j of the linears reading it ÷ factor: the same fp32 function, with outlier activations."""
    unpack_linears(model)
    for norm, readers in model.smoothing_groups():
        index = sorted({c % norm.weight.shape[0] for c in channels})
        norm.weight.data[index] *= factor
        norm.bias.data[index] *= factor
        for layer in readers:
            layer.weight.data[:, index] /= factor


def evaluation_inputs(cfg: Any, golden: Path, synthetic: int) -> Dict[str, torch.Tensor]:
    """The golden VQA inputs where they fit this model (bert-base-uncased ids, 40 tokens, 480-pixel images: a
    VLMo at 480), followed by `synthetic` random ones."""
    parts = []
    path = golden / GOLDEN_VQA
    if cfg.image_size == 480 and path.is_file():
        g = load_file(str(path))
        n = g["image_480"].shape[0]
        if cfg.vocab_size == BERT_VOCAB and g["text_ids"].shape[1] == cfg.max_text_len:
            parts.append({"text_ids": g["text_ids"][:n], "text_masks": g["text_masks"][:n], "image": g["image_480"]})
    if synthetic:
        parts.append(synthetic_inputs(cfg, "vqa", synthetic, torch.device("cpu"), seed=1))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def logits(model: nn.Module, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    n = inputs["text_ids"].shape[0]
    with torch.inference_mode():
        runs = [TASKS[VQA].run(model, {k: v[i:i + BATCH] for k, v in inputs.items()}) for i in range(0, n, BATCH)]
    return {"vqa_logits": torch.cat([r["vqa_logits"] for r in runs]).float()}


def summary(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> Dict[str, float]:
    cos = nn.functional.cosine_similarity(got["vqa_logits"], want["vqa_logits"], dim=-1)
    agreement = output_agreement(got, want)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "top1_agreement": agreement["top1_agreement"], "max_abs_diff": agreement["max_abs_diff"]["vqa_logits"]}


# name -> (planted, smoothing: None for fp32, calibrated)
VARIANTS = {"int8": (False, True, False), "int8-raw": (False, False, False), "planted-fp32": (True, None, False),
            "planted-int8-raw": (True, False, False), "planted-int8": (True, True, False),
            "planted-int8-calibrated": (True, True, True)}


def study(shard_dir: Path, ctx: ParallelContext, inputs: Dict[str, torch.Tensor], factor: float,
          calibration: Dict[str, torch.Tensor], variants: Sequence[str]) -> Dict[str, Dict[str, float]]:
    def fresh(planted: bool) -> nn.Module:
        model = load_model(shard_dir, ctx, "fp32")
        if planted:
            plant_outliers(model, factor)
        return model

    reference = fresh(False)
    tokens = reference.cfg.joint_tokens
    want = logits(reference, inputs)
    del reference
    results: Dict[str, Dict[str, float]] = {}
    for name in variants:
        planted, smooth, calibrated = VARIANTS[name]
        model = fresh(planted)
        if smooth is not None:
            ranges = calibrate(model, lambda b: TASKS[VQA].run(model, b), [calibration]) if calibrated else None
            quantize_model(model, tokens, smooth, ranges)
        results[name] = summary(logits(model, inputs), want)
        click.echo(f"{name:<24} " + ", ".join(f"{k} {v:.5f}" for k, v in results[name].items()), err=True)
    return results


@click.command()
@click.option("--shards", "shard_dir", required=True, type=click.Path(path_type=Path), help="tp-1 shards")
@click.option("--golden", type=click.Path(path_type=Path), default=Path("../shared/golden"), show_default=True)
@click.option("--synthetic", type=click.IntRange(min=0), default=64, show_default=True, help="synthetic samples after the golden ones")
@click.option("--factor", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True, help="planted outlier factor")
@click.option("--variants", default=" ".join(VARIANTS), show_default=True,
              help="-raw: no smoothing; planted-: with planted outliers; -calibrated: smoothing from 4 synthetic samples")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(shard_dir: Path, golden: Path, synthetic: int, factor: float, variants: str, threads: int,
         json_path: Path) -> None:
    """int8 against fp32: logit cosine and top-1 agreement, with and without smoothing and planted outliers."""
    if json_path:
        try:
            writable_file(json_path, "--json")
        except OutputPathError as exc:
            raise click.ClickException(str(exc)) from None
    ctx = init_parallel("cpu", 1, threads=threads)
    cfg = read_manifest(shard_dir).config
    inputs = evaluation_inputs(cfg, golden, synthetic)
    calibration = synthetic_inputs(cfg, "vqa", 4, torch.device("cpu"), seed=2)  # not among the evaluated
    click.echo(f"{inputs['text_ids'].shape[0]} samples ({cfg.family}, image {cfg.image_size})")
    results = study(shard_dir, ctx, inputs, factor, calibration, variants.split())
    if json_path:
        write_json(json_path, {"samples": int(inputs["text_ids"].shape[0]), "results": results}, indent=1)


if __name__ == "__main__":
    main(prog_name="python -m engine.tools.int8_accuracy")
