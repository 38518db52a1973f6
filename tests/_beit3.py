"""Cutting BEiT-3 golden checkpoints into shards in-process (no interpreter start-up per cut); the command line's
own path is covered by test_beit3_sharding and the VQAv2 pipeline test."""
from __future__ import annotations

from pathlib import Path

from _paths import GOLDEN
from engine.runtime.beit3_config import BEiT3Config
from engine.runtime.plan import check_degree
from sharding.beit3_infer import infer_beit3_config
from sharding.checkpoint import read_checkpoint
from sharding.infer import select_weights
from sharding.shards import write_shards

BEIT3 = GOLDEN / "beit3"
TINY_HEADS = 4  # not in the weights (golden/README.md §BEiT-3)


def cut(case: str, tp: int, out: Path) -> BEiT3Config:
    """Shard golden/beit3/CASE at tp into `out`, as `python -m sharding ... --num-heads 4` does."""
    ckpt = read_checkpoint(BEIT3 / case / "checkpoint.pth")
    cfg = infer_beit3_config(ckpt.state_dict, ckpt.hyper_parameters, {"num_heads": TINY_HEADS})
    check_degree(cfg, tp)
    weights, _ = select_weights(ckpt.state_dict, cfg)
    write_shards(weights, cfg, tp, out, source={"file": case, "sha256": ckpt.sha256})
    return cfg
