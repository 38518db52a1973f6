"""`torchrun --nproc N -m engine.forward`: run the sharded model on a safetensors file of input tensors.

Inputs are named as in golden/*/inputs.safetensors (text_ids, text_masks and image, or
image_0 and image_1 for NLVR2; a BEiT-3 checkpoint takes padding_mask, 1 on padding, instead
of text_masks, as golden/beit3 and the published beit3 code do); rank 0 writes the outputs named as in
golden/*/expected.safetensors. The debugging tool: compare any checkpoint
against a reference implementation tensor by tensor.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import click
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import write_safetensors
from .models import ModelConfig, MultiwayModel, family_of
from .models.tasks import HEAD_TASKS, TASKS
from .runtime.shards import read_manifest
from .tasks.calibration import calibration_with_tokenizer, read_run_calibration
from .tasks.cli import (ModelOutputError, UsageError, engine_options, one_line_errors, pick_task, require_samples,
                        start_engine, writable)
from .tasks.frontend import non_finite_rows

TEXT_INPUTS = ("text_ids", "text_masks", "padding_mask")


def input_names(cfg: ModelConfig, task: str) -> tuple:
    """The input tensors of a task, with the text mask named as the checkpoint family's published code names it."""
    mask = family_of(cfg).text_mask_input
    return tuple(mask if name == "text_masks" else name for name in TASKS[task].inputs)


def read_inputs(path: Path, task: str, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """The task's input tensors, checked for presence, shape and dtype against the model."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, FileNotFoundError) as exc:
        raise UsageError(f"{path}: cannot read as safetensors ({exc})") from None
    names = input_names(cfg, task)
    missing = [name for name in names if name not in tensors]
    if missing:
        raise UsageError(f"{path}: missing input tensors {missing} for task {task} (has {sorted(tensors)})")
    T, S = cfg.max_text_len, cfg.image_size
    batch = tensors["text_ids"].shape[0]
    require_samples(path, batch)
    for name in names:
        tensor = tensors[name]
        expected = (batch, T) if name in TEXT_INPUTS else (batch, 3, S, S)
        if tuple(tensor.shape) != expected:
            raise UsageError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {expected}")
        check_values(path, name, tensor, cfg)
    return {name: tensors[name] for name in names}


def check_values(path: Path, name: str, tensor: torch.Tensor, cfg: ModelConfig) -> None:
    """Token ids within the vocabulary, masks of 0 and 1, images of finite floating-point values."""
    if name in TEXT_INPUTS and tensor.dtype not in (torch.int64, torch.int32):
        raise UsageError(f"{path}: {name} must be an integer tensor, got {tensor.dtype}")
    if name == "text_ids" and tensor.numel() and (tensor.min() < 0 or tensor.max() >= cfg.vocab_size):
        raise UsageError(f"{path}: text_ids holds ids from {int(tensor.min())} to {int(tensor.max())}; "
                         f"the vocabulary has ids 0 to {cfg.vocab_size - 1}")
    if name in ("text_masks", "padding_mask") and not bool(((tensor == 0) | (tensor == 1)).all()):
        raise UsageError(f"{path}: {name} must hold only 0 and 1")
    if name.startswith("image") and not tensor.is_floating_point():
        raise UsageError(f"{path}: {name} must be a floating-point tensor of normalised pixels, got {tensor.dtype}")
    if name.startswith("image") and not bool(torch.isfinite(tensor).all()):
        raise UsageError(f"{path}: {name} holds NaN or Inf values")


def run_task(model: MultiwayModel, task: str, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Outputs named as in golden/*/expected.safetensors."""
    if "padding_mask" in inputs:  # 1 on padding; the models take text_masks, 1 on real tokens
        inputs = {**inputs, "text_masks": 1 - inputs["padding_mask"]}
    return TASKS[task].run(model, inputs)


def check_finite_outputs(outputs: Dict[str, torch.Tensor]) -> None:
    """A non-finite output is an error naming the samples (their positions in the inputs), never written."""
    bad = sorted({i for v in outputs.values() for i in non_finite_rows(v)})
    if bad:
        raise ModelOutputError(f"the model's output is not finite (NaN or Inf) for samples {bad} of the inputs; "
                               f"nothing written: check the checkpoint's weights and the --dtype")


@click.command()
@engine_options
@click.option("--inputs", "inputs_path", required=True, type=click.Path(path_type=Path),
              help="safetensors with text_ids, text_masks (int, [B, T]; BEiT-3: padding_mask, 1 on padding) and "
                   "image ([B, 3, S, S], normalised), or image_0 and image_1 for NLVR2.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="safetensors to write (rank 0): vqa_logits + cls_feats, nlvr2_logits, "
                   "or text_feats + image_feats.")
@click.option("--task", type=click.Choice(HEAD_TASKS), default=None,
              help="Task head to run [default: the checkpoint's only head].")
@calibration_with_tokenizer("an arrow file of the task run, e.g. DATA/vqav2_train.arrow for VQA; BEiT-3: with "
                            "--tokenizer")
@one_line_errors
def main(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
         inputs_path: Path, out_path: Path, task: Optional[str], calibration_path: Optional[Path],
         calibration_samples: Optional[int], tokenizer_path: Optional[Path]) -> None:
    """Run the tensor-parallel model on INPUTS and write its outputs to OUT (fp32)."""
    # Everything a user can get wrong is checked before the model loads or a file is written.
    writable("--out", out_path)
    cfg = read_manifest(shard_dir).config
    task = pick_task(cfg, task)
    inputs = read_inputs(inputs_path, task, cfg)
    calibration = read_run_calibration(cfg, task, dtype, calibration_path, calibration_samples, tokenizer_path)
    engine = start_engine(shard_dir, device, dtype, threads, timeout_s, calibration)
    outputs = run_task(engine.model, task, {k: v.to(engine.ctx.device) for k, v in inputs.items()})
    check_finite_outputs(outputs)
    if engine.ctx.is_main:
        write_safetensors(out_path, {k: v.float().cpu().contiguous() for k, v in outputs.items()})
        click.echo(f"wrote {', '.join(f'{k} {list(v.shape)}' for k, v in outputs.items())} to {out_path}")


if __name__ == "__main__":
    main(prog_name="python -m engine.forward")
