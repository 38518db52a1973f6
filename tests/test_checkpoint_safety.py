"""Checkpoints are untrusted input: nothing in a pickle runs, and bad files get one clear line."""
from __future__ import annotations

import importlib.util
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from _paths import GOLDEN
from _run import shard_in_process
from sharding.checkpoint import read_checkpoint
from engine.runtime.errors import ShardingError

LIGHTNING_CASE = GOLDEN / "tiny_relpos_vqa" / "checkpoint.pt"
needs_golden = pytest.mark.skipif(not LIGHTNING_CASE.is_file(), reason="golden checkpoint not present")


def _assert_refused(result, out: Path, *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not (out / "manifest.json").exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())  # no staging left behind


@needs_golden
def test_lightning_checkpoint_reads_without_lightning() -> None:
    assert importlib.util.find_spec("pytorch_lightning") is None
    with zipfile.ZipFile(LIGHTNING_CASE) as archive:
        assert b"AttributeDict" in archive.read("checkpoint/data.pkl")
    ckpt = read_checkpoint(LIGHTNING_CASE)
    assert type(ckpt.hyper_parameters) is dict
    assert ckpt.hyper_parameters["image_size"] == 64
    assert ckpt.state_dict["transformer.cls_token"].shape == (1, 1, 64)


class _RunsCode:
    """Pickles as a call to os.system: loading it with plain pickle would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": _RunsCode(marker)}, evil)
    with pytest.raises(ShardingError, match="system"):
        read_checkpoint(evil)
    out = tmp_path / "shards"
    _assert_refused(shard_in_process(evil, 1, out), out, str(evil), "refusing")
    assert not marker.exists()


def test_refusal_does_not_depend_on_the_opcode_prescan(tmp_path: Path, monkeypatch) -> None:
    # Even if the opcode scan missed a global, the allow-list unpickler refuses it.
    import sharding.checkpoint as checkpoint

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _RunsCode(marker)}, evil)
    monkeypatch.setattr(checkpoint, "_referenced_globals", lambda path: set())
    with pytest.raises(ShardingError, match="refusing"):
        read_checkpoint(evil)
    assert not marker.exists()


@needs_golden
def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    data = LIGHTNING_CASE.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    out = tmp_path / "shards"
    _assert_refused(shard_in_process(truncated, 2, out), out, str(truncated))


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n", pickle.dumps([1, 2, 3])])
def test_non_checkpoint_files_are_refused(tmp_path: Path, content: bytes) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(content)
    out = tmp_path / "shards"
    _assert_refused(shard_in_process(bogus, 1, out), out, str(bogus))


def test_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _assert_refused(shard_in_process(tmp_path / "nope.pt", 1, out), out, "nope.pt", "no such")


@needs_golden
def test_missing_weights_are_named(tmp_path: Path) -> None:
    ckpt = read_checkpoint(LIGHTNING_CASE)
    weights = dict(ckpt.state_dict)
    del weights["transformer.blocks.1.attn.proj.weight"]
    partial = tmp_path / "partial.pt"
    torch.save({"state_dict": weights}, partial)
    out = tmp_path / "shards"
    _assert_refused(shard_in_process(partial, 1, out), out, "transformer.blocks.1.attn.proj.weight", "missing")


@needs_golden
@pytest.mark.parametrize("container", ["module", "model", None])
def test_other_published_containers(tmp_path: Path, container) -> None:
    weights = read_checkpoint(LIGHTNING_CASE).state_dict
    path = tmp_path / "other.pt"
    if container == "module":  # DeepSpeed prefixes every key
        torch.save({"module": {f"module.{k}": v for k, v in weights.items()}}, path)
    elif container:
        torch.save({container: weights}, path)
    else:
        torch.save(dict(weights), path)
    loaded = read_checkpoint(path).state_dict
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def _resaved(tmp_path: Path, edit) -> Path:
    """The golden checkpoint's weights and hyper-parameters, edited by `edit(state_dict)`, saved anew."""
    ckpt = read_checkpoint(LIGHTNING_CASE)
    weights = {k: v.clone() for k, v in ckpt.state_dict.items()}
    edit(weights)
    path = tmp_path / "edited.pt"
    torch.save({"state_dict": weights, "hyper_parameters": ckpt.hyper_parameters}, path)
    return path


@needs_golden
def test_non_finite_weight_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    victim = "transformer.blocks.2.mlp_vl.fc1.weight"
    path = _resaved(tmp_path, lambda w: w[victim].view(-1).__setitem__(7, float("nan")))
    out = tmp_path / "shards"
    _assert_refused(shard_in_process(path, 2, out), out, str(path), victim, "1 NaN", "non-finite")


@pytest.mark.parametrize("bad, count", [(float("inf"), "0 NaN and 2 infinite"), (float("-inf"), "0 NaN and 2 infinite")])
def test_infinite_weights_are_refused_naming_the_tensors(bad: float, count: str) -> None:
    from sharding.checkpoint import refuse_non_finite

    weights = {"a.weight": torch.zeros(3, 4), "b.weight": torch.ones(5), "c.bias": torch.zeros(2)}
    weights["b.weight"][1:3] = bad
    weights["c.bias"][0] = float("nan")
    with pytest.raises(ShardingError, match=f"b.weight holds {count} values of 5 \\(and 1 more: c.bias\\)"):
        refuse_non_finite(Path("ckpt.pt"), weights)


def _member_data_offset(path: Path, member: str) -> int:
    """Where a stored (uncompressed) zip member's bytes start: after its local header, name and extra field."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    return info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


@needs_golden
def test_flipped_byte_inside_a_tensor_is_refused_naming_the_member(tmp_path: Path) -> None:
    member = "checkpoint/data/4"
    data = bytearray(LIGHTNING_CASE.read_bytes())
    data[_member_data_offset(LIGHTNING_CASE, member) + 10] ^= 0x01  # torch.load alone would load this silently
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(data))
    out = tmp_path / "shards"
    _assert_refused(shard_in_process(corrupt, 1, out), out, str(corrupt), member, "CRC-32", "corrupt")


def test_directory_as_checkpoint_is_named_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "vlmo_base_patch16_480_vqa.pt").write_bytes(b"x")
    out = tmp_path / "shards"
    _assert_refused(shard_in_process(folder, 1, out), out, "is a directory", "vlmo_base_patch16_480_vqa.pt")


def test_random_bytes_are_not_a_checkpoint_rather_than_a_safety_refusal(tmp_path: Path) -> None:
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3),
                                          dtype=torch.uint8).tolist()))
    out = tmp_path / "shards"
    result = shard_in_process(noise, 1, out)
    _assert_refused(result, out, str(noise), "not a PyTorch checkpoint")
    assert "refusing" not in result.stderr


@needs_golden
def test_stale_staging_directories_of_the_target_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    # What a run killed mid-write leaves: a hidden staging copy (and, killed mid-swap, a retired one).
    stale = [tmp_path / ".shards.partial-k1ll3d", tmp_path / ".shards.old-4242"]
    other = tmp_path / ".other.partial-abc"  # another target's: not ours to touch
    for folder in stale + [other]:
        folder.mkdir()
        (folder / "rank-00-of-01.safetensors").write_bytes(b"half written")
    result = shard_in_process(LIGHTNING_CASE, 1, out)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in stale) and other.is_dir()
    for folder in stale:
        assert f"removed {folder}" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-abc", "shards"]


@needs_golden
def test_staging_directories_are_only_reported_while_another_run_writes_beside(tmp_path: Path) -> None:
    import fcntl

    from engine.models.vlmo.infer import infer_config
    from sharding.weights import select_weights
    from sharding.shards import write_shards

    ckpt = read_checkpoint(LIGHTNING_CASE)
    cfg = infer_config(ckpt.state_dict, ckpt.hyper_parameters)
    weights, _ = select_weights(ckpt.state_dict, cfg)
    stale = tmp_path / ".shards.partial-busy"
    stale.mkdir()
    other_run = os.open(tmp_path, os.O_RDONLY)  # what a concurrent sharding run holds
    fcntl.flock(other_run, fcntl.LOCK_EX)
    lines: list = []
    try:
        write_shards(weights, cfg, 1, tmp_path / "shards", source={}, report=lines.append)
    finally:
        os.close(other_run)
    assert stale.is_dir() and (tmp_path / "shards" / "manifest.json").is_file()
    assert len(lines) == 1 and str(stale) in lines[0] and "another sharding run" in lines[0]
