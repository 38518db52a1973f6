"""The sharding plan, shard files and manifest: round trip, verification and refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _paths import GOLDEN
from _run import run_here, run_module, run_torchrun, shard, shard_here, shard_in_process
from sharding.checkpoint import read_checkpoint
from sharding.verify import main as verify_main
from engine.runtime.errors import ShardingError
from engine.models.vlmo.infer import infer_config
from sharding.weights import select_weights
from engine.models import checkpoint_layout
from engine.runtime.plan import shard_tensor
from engine.runtime.shards import load_rank_shard, read_manifest
from _shards import merge_shards

CASE = GOLDEN / "tiny_relpos_vqa"
needs_golden = pytest.mark.skipif(not (CASE / "checkpoint.pt").is_file(), reason="golden checkpoint not present")


@pytest.fixture(scope="module")
def source():
    ckpt = read_checkpoint(CASE / "checkpoint.pt")
    cfg = infer_config(ckpt.state_dict, ckpt.hyper_parameters)
    weights, _ = select_weights(ckpt.state_dict, cfg)
    return cfg, weights


@needs_golden
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_then_merge_is_bit_exact(source, tp: int, tmp_path: Path) -> None:
    cfg, weights = source
    shard_here(CASE / "checkpoint.pt", tp, tmp_path / "s")
    merged = merge_shards(tmp_path / "s")
    assert set(merged) == set(weights)
    for name, tensor in weights.items():
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor), name


@needs_golden
def test_each_rank_holds_its_own_heads(source, tmp_path: Path) -> None:
    # Independent expectation: rank r's q rows are heads r*h..(r+1)*h of the q block, likewise k and v.
    cfg, weights = source
    tp, D, d = 2, cfg.embed_dim, cfg.head_dim
    h = cfg.num_heads // tp
    qkv = weights["transformer.blocks.0.attn.qkv.weight"]
    for rank in range(tp):
        rows = [qkv[part * D + rank * h * d: part * D + (rank + 1) * h * d] for part in range(3)]
        layout = checkpoint_layout(cfg)
        got = shard_tensor(layout["transformer.blocks.0.attn.qkv.weight"], qkv, tp, rank)
        assert torch.equal(got, torch.cat(rows))
        table = weights["relative_position_bias_table"]
        cols = [layer * cfg.num_heads + rank * h + j for layer in range(cfg.depth) for j in range(h)]
        assert torch.equal(shard_tensor(layout["relative_position_bias_table"], table, tp, rank), table[:, cols])


@needs_golden
def test_manifest_describes_the_shards(source, tmp_path: Path) -> None:
    cfg, _ = source
    shard_here(CASE / "checkpoint.pt", 2, tmp_path / "s")
    data = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert data["tp"] == 2 and data["format_version"] == 1
    assert data["config"]["num_heads"] == cfg.num_heads
    assert data["source"]["sha256"] == read_checkpoint(CASE / "checkpoint.pt").sha256
    assert [f["file"] for f in data["files"]] == ["rank-00-of-02.safetensors", "rank-01-of-02.safetensors"]
    assert data["files"][1]["tensors"]["transformer.blocks.0.mlp_text.fc1.weight"]["shape"] == [cfg.ffn_dim // 2,
                                                                                              cfg.embed_dim]
    ok = run_module("sharding.verify", [tmp_path / "s"])
    assert ok.returncode == 0, ok.stderr


@needs_golden
def test_tp_that_does_not_divide_heads_is_refused(tmp_path: Path) -> None:
    result = shard(CASE / "checkpoint.pt", 3, tmp_path / "s")  # `python -m sharding` itself, once
    assert result.returncode != 0
    assert "tp=3 does not divide" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists()


@needs_golden
def test_existing_output_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "s"
    shard_here(CASE / "checkpoint.pt", 1, out)
    again = shard_in_process(CASE / "checkpoint.pt", 2, out)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert read_manifest(out).tp == 1
    shard_here(CASE / "checkpoint.pt", 2, out, "--overwrite")
    assert read_manifest(out).tp == 2 and sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "rank-00-of-02.safetensors", "rank-01-of-02.safetensors"]


@pytest.fixture()
def tampered(tmp_path: Path) -> Path:
    out = tmp_path / "s"
    shard_here(CASE / "checkpoint.pt", 2, out)
    victim = out / "rank-01-of-02.safetensors"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit in a weight
    victim.write_bytes(bytes(data))
    return out


@needs_golden
def test_tampered_shard_is_refused_by_verify(tampered: Path) -> None:
    result = run_here(verify_main, [tampered])
    assert result.returncode != 0
    assert "rank-01-of-02.safetensors" in result.stderr and "sha256" in result.stderr


# The engine's refusal of the same tampered shard: tests/test_faults.py (one launch checks it and the fault handling).


@needs_golden
def test_only_the_own_shard_is_read(tmp_path: Path) -> None:
    out = tmp_path / "s"
    shard_here(CASE / "checkpoint.pt", 2, out)
    (out / "rank-01-of-02.safetensors").unlink()  # rank 0 must not need it
    tensors = load_rank_shard(out, 0, 2)
    assert tensors["transformer.blocks.0.attn.q_bias"].shape == (32,)


@needs_golden
def test_group_size_must_match_the_manifest(tmp_path: Path) -> None:
    out = tmp_path / "s"
    shard_here(CASE / "checkpoint.pt", 2, out)
    with pytest.raises(ShardingError, match="cut for tp=2 but the tensor-parallel group has 4"):
        load_rank_shard(out, 0, 4)
    # a launch whose world is not a multiple of the shards' tp
    result = run_torchrun(3, "engine.forward", ["--shards", out, "--inputs", CASE / "inputs.safetensors",
                                                "--out", tmp_path / "o.safetensors", "--device", "cpu"])
    assert result.returncode != 0
    assert "cut for tp=2 but 3 processes were launched" in result.stderr


def _edit_manifest(shard_dir: Path, edit) -> None:
    path = shard_dir / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _refused_by_verify_and_loader(shard_dir: Path, *fragments: str) -> None:
    result = run_here(verify_main, [shard_dir])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert all(f in result.stderr for f in fragments), result.stderr
    with pytest.raises(ShardingError) as refused:
        load_rank_shard(shard_dir, 1, 2)
    assert all(f in str(refused.value) for f in fragments), refused.value


@needs_golden
def test_edited_manifest_shape_names_the_tensor(tmp_path: Path) -> None:
    out = tmp_path / "s"
    shard_here(CASE / "checkpoint.pt", 2, out)
    victim = "transformer.blocks.1.mlp_imag.fc2.weight"
    _edit_manifest(out, lambda m: m["files"][1]["tensors"][victim].update(shape=[64, 64]))
    _refused_by_verify_and_loader(out, victim, "(64, 64)")


@needs_golden
def test_edited_manifest_dtype_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "s"
    shard_here(CASE / "checkpoint.pt", 2, out)
    victim = "pooler.dense.weight"
    _edit_manifest(out, lambda m: m["files"][1]["tensors"][victim].update(dtype="float16"))
    _refused_by_verify_and_loader(out, victim, "float32 in the file", "float16 in the manifest")


@needs_golden
def test_verify_finds_non_finite_weights_in_shards(tmp_path: Path) -> None:
    # Shards cut before sharding refused non-finite weights: hashes match, the weights are NaN.
    from safetensors.torch import load_file, save_file

    from engine.runtime.shards import sha256_file

    out = tmp_path / "s"
    shard_here(CASE / "checkpoint.pt", 2, out)
    victim = "transformer.blocks.0.attn.qkv.weight"
    shard_file = out / "rank-01-of-02.safetensors"
    tensors = load_file(str(shard_file))
    tensors[victim][3, 5] = float("nan")
    save_file(tensors, str(shard_file))
    _edit_manifest(out, lambda m: m["files"][1].update(sha256=sha256_file(shard_file)))
    result = run_here(verify_main, [out])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "rank-01-of-02.safetensors" in result.stderr and victim in result.stderr and "1 NaN" in result.stderr
