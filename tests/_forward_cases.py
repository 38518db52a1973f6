"""`torchrun -m tests._forward_cases --case SHARDS INPUTS OUT ...`: engine.forward over several shard
directories cut for the same tp, in one launch (one process-group start-up for many golden cases)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import click
from safetensors.torch import save_file

from engine.forward import pick_task, read_inputs, run_task
from engine.runtime.distributed import init_parallel
from engine.runtime.loading import load_model
from engine.runtime.shards import read_manifest
from engine.tasks.cli import one_line_errors


@click.command()
@click.option("--case", "cases", multiple=True, nargs=3, type=click.Path(path_type=Path), required=True)
@click.option("--task", default=None)
@one_line_errors
def main(cases: Sequence[Tuple[Path, Path, Path]], task: Optional[str]) -> None:
    ctx = init_parallel("cpu", read_manifest(cases[0][0]).tp, 120.0, None)
    for shard_dir, inputs_path, out_path in cases:
        manifest = read_manifest(shard_dir)
        model = load_model(shard_dir, ctx, "fp32", manifest)
        case_task = pick_task(manifest.config, task)
        outputs = run_task(model, case_task, read_inputs(inputs_path, case_task, manifest.config))
        if ctx.is_main:
            save_file({k: v.float().contiguous() for k, v in outputs.items()}, str(out_path))


if __name__ == "__main__":
    main()
