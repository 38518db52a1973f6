"""Sharding BEiT-3 checkpoints: recognised by their keys, beit3's `save_model` extras read as inert data,
a pickle that would run code refused, and the plan's rows cutting exactly the tensors DESIGN.md §11 names."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _paths import GOLDEN, needs
from _run import shard_here, shard_in_process
from _shards import merge_shards
from engine.models.beit3.config import BEiT3Config
from engine.models import checkpoint_layout
from engine.runtime.shards import read_manifest
from sharding.checkpoint import read_checkpoint

CASE = GOLDEN / "beit3" / "tiny_beit3_vqa"
CHECKPOINT = CASE / "checkpoint.pth"
L0 = "beit3.encoder.layers.0."

pytestmark = needs(CHECKPOINT)


def test_save_model_extras_are_inert_data() -> None:
    ckpt = read_checkpoint(CHECKPOINT)
    assert type(ckpt.hyper_parameters) is dict  # the argparse.Namespace, rebuilt as a plain dict, never imported
    assert ckpt.hyper_parameters["num_max_bpe_tokens"] == 64
    assert ckpt.state_dict[L0 + "self_attn.q_proj.A.weight"].shape == (64, 64)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_beit3_checkpoint_with_code_in_its_pickle_is_refused(tmp_path: Path) -> None:
    weights = read_checkpoint(CHECKPOINT).state_dict
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"model": weights, "epoch": 3, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "args": argparse.Namespace(model="beit3_base_patch16_480_vqav2", hook=_RunsCode(marker))}, evil)
    out = tmp_path / "shards"
    refused = shard_in_process(evil, 1, out, "--num-heads", 4)
    assert refused.returncode != 0 and "refusing" in refused.stderr and "system" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("container", ["model", "module"])
def test_published_containers_with_optimizer_state_and_args(tmp_path: Path, container: str) -> None:
    weights = read_checkpoint(CHECKPOINT).state_dict
    path = tmp_path / "ckpt.pth"
    torch.save({container: dict(weights), "epoch": 9, "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}},
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(num_max_bpe_tokens=32, input_size=64)}, path)
    out = tmp_path / "shards"
    shard_here(path, 2, out, "--num-heads", 4)
    cfg = read_manifest(out).config
    assert isinstance(cfg, BEiT3Config) and cfg.max_text_len == 32  # from the saved args
    assert json.loads((out / "manifest.json").read_text())["config"]["family"] == "beit3"


def test_plan_cuts_heads_and_ffn_and_replicates_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    done = shard_in_process(CHECKPOINT, 2, out, "--num-heads", 4)
    assert done.returncode == 0, done.stderr
    assert "mask_token" in done.stderr  # unused, listed as skipped
    full = read_checkpoint(CHECKPOINT).state_dict
    rank1 = load_file(str(out / "rank-01-of-02.safetensors"))
    for expert in "AB":
        for name in ("q_proj", "k_proj", "v_proj"):  # heads 2, 3 of 4: rows 32..63
            for p in ("weight", "bias"):
                key = f"{L0}self_attn.{name}.{expert}.{p}"
                assert torch.equal(rank1[key], full[key][32:])
        for key, cut in ((f"{L0}self_attn.inner_attn_ln.{expert}.weight", slice(32, 64)),
                         (f"{L0}ffn.{expert}.fc1.weight", slice(128, 256)),
                         (f"{L0}ffn.{expert}.ffn_layernorm.bias", slice(128, 256))):
            assert torch.equal(rank1[key], full[key][cut]), key
        for key in (f"{L0}self_attn.out_proj.{expert}.weight", f"{L0}ffn.{expert}.fc2.weight"):
            assert torch.equal(rank1[key], full[key].chunk(2, dim=1)[1]), key
        for key in (f"{L0}self_attn.out_proj.{expert}.bias", f"{L0}ffn.{expert}.fc2.bias",
                    f"{L0}self_attn_layer_norm.{expert}.weight", f"{L0}final_layer_norm.{expert}.bias"):
            assert checkpoint_layout(read_manifest(out).config)[key].split is None, key
            assert torch.equal(rank1[key], full[key]), key
    merged = merge_shards(out)
    assert set(merged) == set(full) - {"beit3.vision_embed.mask_token"}
    assert all(torch.equal(merged[k], full[k]) for k in merged)


def test_unknown_head_count_names_the_flag(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    refused = shard_in_process(CHECKPOINT, 1, out)
    assert refused.returncode != 0 and "--num-heads" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
