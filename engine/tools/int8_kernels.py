"""Int8 against fp32 on VLMo-base's GEMM shapes (python -m engine.tools.int8_kernels).

Per shape, threads and token count: the fp32 linear the engine would run (the faster of ATen's and oneDNN's
packed one, engine.layers.kernels) against each W8A8 kernel of engine.layers.int8, the activation
quantisation and the scaling included. Several interleaved rounds; prints min and median of each ratio.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Tuple

import click
import torch

from ..layers.int8 import Int8Linear, kernels_for
from ..layers.kernels import best_seconds, time_linear
from ..options import NumberList

D, FFN = 768, 3072


def vlmo_base_shapes(tp: int) -> Dict[str, Tuple[int, int]]:
    """(out, in) of each linear of a VLMo-base layer on one rank of tp."""
    return {"qkv": (3 * D // tp, D), "proj": (D, D // tp), "fc1": (FFN // tp, D), "fc2": (D, FFN // tp)}


def time_shape(shape: Tuple[int, int], tokens: int) -> Dict[str, float]:
    """Seconds of fp32 (best kernel) and of each int8 kernel for one `tokens`-row call, with a bias."""
    weight = torch.randn(*shape)
    bias = torch.randn(shape[0])
    x = torch.randn(tokens, shape[1])
    times = {"fp32": min(time_linear(tokens, weight, bias=True, gelu=False).values())}
    for kernel in kernels_for(torch.device("cpu")):
        layer = Int8Linear(weight, kernel)
        times[kernel] = best_seconds(lambda: layer(x, bias))
    return times


@click.command()
@click.option("--threads", type=NumberList(int, 1), default="1 2", help="thread counts, space-separated")
@click.option("--tokens", type=NumberList(int, 1), default="237 941",
              help="rows per GEMM (VLMo joint pass: 237 at 224, 941 at 480)")
@click.option("--tps", type=NumberList(int, 1), default="1 2", help="tensor-parallel widths of the shapes")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
def main(threads: List[int], tokens: List[int], tps: List[int], rounds: int) -> None:
    rows: Dict[tuple, List[Dict[str, float]]] = {}
    for _ in range(rounds):
        for t in threads:
            torch.set_num_threads(t)
            for tp in tps:
                for name, shape in vlmo_base_shapes(tp).items():
                    for m in tokens:
                        rows.setdefault((t, tp, name, shape, m), []).append(time_shape(shape, m))
    click.echo(f"{'thr':>3} {'tp':>2} {'layer':<5} {'out x in':>10} {'tokens':>6} {'fp32 ms':>8} "
               f"{'int_mm x (min/med)':>19} {'onednn x (min/med)':>19}")
    for (t, tp, name, shape, m), runs in rows.items():
        fp32 = min(r["fp32"] for r in runs)
        cells = []
        for kernel in ("int_mm", "onednn"):
            ratios = sorted(r["fp32"] / r[kernel] for r in runs if kernel in r)
            cells.append(f"{ratios[0]:.2f} / {statistics.median(ratios):.2f}" if ratios else "-")
        click.echo(f"{t:>3} {tp:>2} {name:<5} {shape[0]:>5}x{shape[1]:<4} {m:>6} {fp32 * 1e3:>8.2f} "
                   f"{cells[0]:>19} {cells[1]:>19}")


if __name__ == "__main__":
    main()
