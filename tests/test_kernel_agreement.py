"""Ranks of one job choose their kernels from every rank's timings summed, so they all run the same kernels
(a rank on the slower kernel would keep its peers waiting at every all-reduce)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.layers import attention_choice, int8, kernels
from engine.layers.attention import AttentionOptions
from engine.runtime.distributed import ParallelContext

WORLD = 2


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    ctx = ParallelContext(rank=rank, world_size=WORLD, tp_size=WORLD, device=torch.device("cpu"), backend="gloo")
    # each rank times alike candidates, and rank 0 one more that rank 1 cannot run
    only_rank_0 = {"c": 0.1} if rank == 0 else {}
    summed = ctx.summed_over_ranks({"shape": {"a": 1.0 + rank, "b": 10.0 * (1 + rank), **only_rank_0}})
    # rank 0 alone would pack (0.5 against 1.0), rank 1 alone would not (1.8): summed, 2.3 against 2.0
    kernels.time_linear = lambda tokens, weight, bias, gelu: {kernels.ATEN: 1.0, kernels.ONEDNN: (0.5, 1.8)[rank]}
    linear_choice = kernels.choose_kernels([(((32, 16), True, False), torch.zeros(32, 16))], 7, ctx.summed_over_ranks)
    int8.time_kernels = lambda weight, tokens, kernels: {int8.INT_MM: (1.0, 3.0)[rank], int8.ONEDNN: 1.5}
    int8.kernels_for = lambda device: (int8.INT_MM, int8.ONEDNN)
    int8_choice = int8.choose_kernels([torch.zeros(8, 16)], 7, ctx.summed_over_ranks)
    attention_choice.time_attention = lambda *args, **kwargs: {
        "sdpa": 30.0, "per_head_bmm": (10.0, 40.0)[rank], "per_head_onednn": 20.0}
    model = SimpleNamespace(cfg=SimpleNamespace(num_heads=4, joint_tokens=9, head_dim=8), ctx=ctx,
                            has_position_bias=True, attention_options=AttentionOptions())
    attention = attention_choice.choose_attention(model, torch.float32, ctx.summed_over_ranks)
    with open(f"{out}/rank{rank}.json", "w") as handle:
        json.dump({"summed": summed, "linear": list(linear_choice.values()), "int8": list(int8_choice.values()),
                   "attention": attention}, handle)
    dist.destroy_process_group()


def test_every_rank_chooses_from_the_timings_of_all(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for got in ranks:
        assert got["summed"] == {"shape": {"a": 3.0, "b": 30.0}}  # "c" left out: rank 1 has no timing of it
        assert got["linear"] == [kernels.ATEN]
        assert got["int8"] == [int8.ONEDNN]  # 3.0 against 4.0
        assert got["attention"] == "per_head_onednn"  # 40 against 50 (bmm) and 60 (sdpa)
