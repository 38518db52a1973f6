"""`torchrun --nproc N -m engine.forward`: run the sharded model on a safetensors file of input tensors.

Inputs are named as in golden/*/inputs.safetensors (text_ids, text_masks and image, or
image_0 and image_1 for NLVR2); rank 0 writes the outputs named as in
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
from .tasks.cli import UsageError, engine_options, one_line_errors, start_engine
from .runtime.config import VLMoConfig
from .runtime.model import VLMo

TASK_INPUTS = {
    "vqa": ("text_ids", "text_masks", "image"),
    "nlvr2": ("text_ids", "text_masks", "image_0", "image_1"),
    "irtr": ("text_ids", "text_masks", "image"),
}


def pick_task(cfg: VLMoConfig, requested: Optional[str]) -> str:
    if requested:
        if requested not in cfg.tasks:
            raise UsageError(f"--task {requested}: this checkpoint has no {requested} head "
                             f"(it has: {', '.join(cfg.tasks) or 'none'})")
        return requested
    if len(cfg.tasks) != 1:
        raise UsageError(f"the checkpoint has heads for {', '.join(cfg.tasks) or 'no task'}; pick one with --task")
    return cfg.tasks[0]


def read_inputs(path: Path, task: str, cfg: VLMoConfig) -> Dict[str, torch.Tensor]:
    """The task's input tensors, checked for presence, shape and dtype against the model."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, FileNotFoundError) as exc:
        raise UsageError(f"{path}: cannot read as safetensors ({exc})") from None
    missing = [name for name in TASK_INPUTS[task] if name not in tensors]
    if missing:
        raise UsageError(f"{path}: missing input tensors {missing} for task {task} (has {sorted(tensors)})")
    T, S = cfg.max_text_len, cfg.image_size
    batch = tensors["text_ids"].shape[0]
    for name in TASK_INPUTS[task]:
        tensor = tensors[name]
        expected = (batch, T) if name.startswith("text_") else (batch, 3, S, S)
        if tuple(tensor.shape) != expected:
            raise UsageError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {expected}")
        if name.startswith("text_") and tensor.dtype not in (torch.int64, torch.int32):
            raise UsageError(f"{path}: {name} must be an integer tensor, got {tensor.dtype}")
    return {name: tensors[name] for name in TASK_INPUTS[task]}


def run_task(model: VLMo, task: str, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Outputs named as in golden/*/expected.safetensors."""
    if task == "vqa":
        logits, pooled = model.vqa(inputs["text_ids"], inputs["text_masks"], inputs["image"])
        return {"vqa_logits": logits, "cls_feats": pooled}
    if task == "nlvr2":
        return {"nlvr2_logits": model.nlvr2(inputs["text_ids"], inputs["text_masks"],
                                            inputs["image_0"], inputs["image_1"])}
    return {"text_feats": model.text_features(inputs["text_ids"], inputs["text_masks"]),
            "image_feats": model.image_features(inputs["image"])}


@click.command()
@engine_options
@click.option("--inputs", "inputs_path", required=True, type=click.Path(path_type=Path),
              help="safetensors with text_ids, text_masks (int, [B, T]) and image ([B, 3, S, S], normalised), "
                   "or image_0 and image_1 for NLVR2.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="safetensors to write (rank 0): vqa_logits + cls_feats, nlvr2_logits, "
                   "or text_feats + image_feats.")
@click.option("--task", type=click.Choice(sorted(TASK_INPUTS)), default=None,
              help="Task head to run [default: the checkpoint's only head].")
@one_line_errors
def main(shard_dir: Path, device: str, dtype: Optional[str], threads: Optional[int], timeout_s: float,
         inputs_path: Path, out_path: Path, task: Optional[str]) -> None:
    """Run the tensor-parallel VLMo on INPUTS and write its outputs to OUT (fp32)."""
    engine = start_engine(shard_dir, device, dtype, threads, timeout_s)
    task = pick_task(engine.manifest.config, task)
    inputs = {k: v.to(engine.ctx.device) for k, v in read_inputs(inputs_path, task, engine.manifest.config).items()}
    outputs = run_task(engine.model, task, inputs)
    if engine.ctx.is_main:
        write_safetensors(out_path, {k: v.float().cpu().contiguous() for k, v in outputs.items()})
        click.echo(f"wrote {', '.join(f'{k} {list(v.shape)}' for k, v in outputs.items())} to {out_path}")


if __name__ == "__main__":
    main(prog_name="python -m engine.forward")
