"""`python -m sharding.verify DIR`: check a shard directory (hashes, shapes, completeness) without the model."""
from __future__ import annotations

from pathlib import Path

import click

from engine.runtime.errors import ShardingError
from engine.runtime.shards import verify_shards


@click.command()
@click.argument("shard_dir", type=click.Path(path_type=Path))
def main(shard_dir: Path) -> None:
    """Verify every shard file of SHARD_DIR against its manifest."""
    try:
        manifest = verify_shards(shard_dir)
    except (ShardingError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"ok: {manifest.tp} shard files match manifest.json (source sha256 {manifest.source.get('sha256')})")


if __name__ == "__main__":
    main(prog_name="python -m sharding.verify")
