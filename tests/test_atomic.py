"""engine.atomic: a reader sees the old target or the complete new one; a failed write leaves nothing behind."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.atomic import atomic_directory, write_json, write_safetensors, write_text, write_torch


def test_write_json(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    write_json(path, {"vqa_score": 0.5, "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"vqa_score": 0.5, "n": 3}
    write_json(path, [{"question_id": 1, "answer": "yes"}], indent=2)
    assert json.loads(path.read_text()) == [{"question_id": 1, "answer": "yes"}]
    assert os.listdir(path.parent) == ["summary.json"]
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == [{"question_id": 1, "answer": "yes"}]
    assert os.listdir(path.parent) == ["summary.json"]


def test_write_safetensors(tmp_path):
    path = tmp_path / "sub" / "embeddings.safetensors"
    write_safetensors(path, {"x": torch.ones(2, 3)}, metadata={"ids": "[1, 2]"})
    with pytest.raises(ValueError):  # a non-contiguous tensor is refused; the old file stays
        write_safetensors(path, {"x": torch.ones(3, 2).t()})
    assert torch.equal(load_file(str(path))["x"], torch.ones(2, 3))
    assert os.listdir(path.parent) == ["embeddings.safetensors"]


def test_written_files_follow_the_umask(tmp_path):
    # mkstemp creates 0600 files; the result must get the permissions an ordinary open() would give.
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        write_torch(tmp_path / "b.pt", {"w": torch.zeros(1)})
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert torch.load(tmp_path / "b.pt")["w"].shape == (1,)


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "shards"
    with atomic_directory(target) as staging:
        (staging / "a").write_text("1")
    assert sorted(os.listdir(target)) == ["a"]
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "b").write_text("2")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(target)) == ["a"]
    with atomic_directory(target) as staging:
        (staging / "c").write_text("3")
    assert sorted(os.listdir(target)) == ["c"]
    assert sorted(os.listdir(tmp_path)) == ["shards"]
