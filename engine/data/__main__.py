"""python -m engine.data {vqav2,coco,f30k,nlvr2} --root RAW --out ARROW"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import click

from ..atomic import OutputPathError, writable_folder
from ..options import option_group
from .karpathy import write_karpathy
from .nlvr2 import write_nlvr2
from .raw import DataError
from .vqav2 import write_vqav2

_in_out = option_group([
    click.option("--root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="The raw download (the layout the published writer reads)."),
    click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                 help="Folder for the arrow files (created if needed)."),
    click.option("--overwrite", is_flag=True, help="Replace arrow files that already exist in --out (refused otherwise)."),
])


def _run(writer: Callable[[Path, Path, bool], dict], root: Path, out: Path, overwrite: bool) -> None:
    try:
        writable_folder(out, "--out")
        counts = writer(root, out, overwrite)
    except (DataError, OutputPathError) as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:  # inputs are read through DataError, so this is the output side
        raise click.ClickException(f"cannot write to {out}: {err}") from None
    for name, rows in counts.items():
        click.echo(f"wrote {out / name} ({rows} rows)")


@click.group()
def main() -> None:
    """Write the arrow files the published VLMo code reads, from the raw downloads."""


@main.command()
@_in_out
def vqav2(root: Path, out: Path, overwrite: bool) -> None:
    """VQAv2 from the official download.

    Writes vqav2_{train,val,trainable_val,rest_val,test,test-dev}.arrow and answer2label.txt.
    """
    _run(write_vqav2, root, out, overwrite)


@main.command()
@_in_out
def coco(root: Path, out: Path, overwrite: bool) -> None:
    """COCO captions, Karpathy splits.

    Writes coco_caption_karpathy_{train,val,restval,test}.arrow.
    """
    _run(partial(write_karpathy, "coco"), root, out, overwrite)


@main.command()
@_in_out
def f30k(root: Path, out: Path, overwrite: bool) -> None:
    """Flickr30k captions, Karpathy splits.

    Writes f30k_caption_karpathy_{train,val,test}.arrow.
    """
    _run(partial(write_karpathy, "f30k"), root, out, overwrite)


@main.command()
@_in_out
def nlvr2(root: Path, out: Path, overwrite: bool) -> None:
    """NLVR2 image pairs and sentences.

    Writes nlvr2_{train,dev,test1}.arrow, and the balanced/unbalanced subsets when present.
    """
    _run(write_nlvr2, root, out, overwrite)


if __name__ == "__main__":
    main()
