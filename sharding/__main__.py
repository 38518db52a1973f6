"""`python -m sharding --checkpoint C --tp N --out DIR`: cut a published checkpoint into tensor-parallel shards."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from engine.models import recognise
from engine.models.inference import OVERRIDE_FLAGS, ConfigError
from engine.runtime.errors import ShardingError
from engine.runtime.plan import check_degree, plan_table

from .checkpoint import read_checkpoint, refuse_non_finite
from .shards import write_shards
from .weights import select_weights


def _plan_help() -> str:
    return "\n".join(f"  {pattern:<58} {how}" for pattern, how in plan_table())


@click.command(epilog="Sharding plan (rank r of t keeps):\n\n\b\n" + _plan_help())
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(path_type=Path),
              help="Published VLMo (.pt / .ckpt) or BEiT-3 (.pth) checkpoint. Read without executing any pickle "
                   "code.")
@click.option("--tp", required=True, type=int, help="Tensor-parallel degree: number of shards to cut.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--num-heads", type=int,
              help="Attention heads, when the checkpoint cannot tell (VLMo without a relative table; BEiT-3 of an "
                   "unpublished size).")
@click.option("--image-size", type=int, help="Input image size, when the checkpoint cannot tell.")
@click.option("--max-text-len", type=int, help="Text length, when the checkpoint cannot tell.")
@click.option("--vl-start-layer", type=int, help="First layer with a vision-language expert (VLMo).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
def main(checkpoint: Path, tp: int, out_dir: Path, num_heads: Optional[int], image_size: Optional[int],
         max_text_len: Optional[int], vl_start_layer: Optional[int], overwrite: bool) -> None:
    """Cut CHECKPOINT into TP safetensors shards plus manifest.json under OUT."""
    overrides = {"num_heads": num_heads, "image_size": image_size, "max_text_len": max_text_len,
                 "vlffn_start_layer_index": vl_start_layer}
    try:
        ckpt = read_checkpoint(checkpoint)
        try:
            family = recognise(ckpt.state_dict)
            given = {k: v for k, v in overrides.items() if v is not None}
            for name in sorted(set(given) - set(family.overrides)):
                raise ConfigError(f"{OVERRIDE_FLAGS[name]} does not apply to {family.title}")
            cfg = family.infer_config(ckpt.state_dict, ckpt.hyper_parameters, given)
            check_degree(cfg, tp)
            weights, unknown = select_weights(ckpt.state_dict, cfg)
        except ValueError as exc:  # ConfigError, and the degree check
            raise ShardingError(checkpoint, str(exc)) from None
        refuse_non_finite(checkpoint, weights)
        if unknown:
            click.echo(f"ignoring {len(unknown)} tensors the engine does not use: {', '.join(unknown)}", err=True)
        manifest = write_shards(weights, cfg, tp, out_dir, source={"file": checkpoint.name, "sha256": ckpt.sha256},
                                overwrite=overwrite, report=lambda line: click.echo(line, err=True))
    except ShardingError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {manifest.tp} shards of a {cfg.depth}-layer, {cfg.embed_dim}-wide, {cfg.num_heads}-head "
               f"{family.title} ({', '.join(cfg.tasks) or 'backbone only'}; image {cfg.image_size}) to {out_dir}")


if __name__ == "__main__":
    main(prog_name="python -m sharding")
