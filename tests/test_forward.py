"""engine.forward refuses, in one line and before any work, inputs the model cannot take and outputs it cannot
write; a non-finite model output is an error naming the samples, never written."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _faults import overflowing_shards
from _paths import GOLDEN, needs
from _run import invoke_refused, shard_here
from engine.forward import main as forward_main

CASE = GOLDEN / "tiny_relpos_vqa9"
INPUTS = load_file(str(CASE / "inputs.safetensors")) if (CASE / "inputs.safetensors").exists() else {}

pytestmark = needs(CASE / "inputs.safetensors")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("forward") / "shards"
    shard_here(CASE / "checkpoint.pt", 1, out)
    return out


def _args(shards: Path, inputs: Path, out: Path) -> list:
    return ["--shards", shards, "--inputs", inputs, "--out", out, "--device", "cpu", "--dtype", "fp32"]


def _altered(tmp_path: Path, name: str, change) -> Path:
    tensors = dict(INPUTS)
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, str(tmp_path / "inputs.safetensors"))
    return tmp_path / "inputs.safetensors"


@pytest.mark.parametrize("name, change, fragment", [
    ("text_ids", lambda t: t.index_fill_(1, torch.tensor([1]), 30522), "ids from"),
    ("text_ids", lambda t: t.index_fill_(1, torch.tensor([1]), -1), "ids from -1"),
    ("text_masks", lambda t: t * 2, "only 0 and 1"),
    ("image", lambda t: (t * 100).to(torch.uint8), "floating-point"),
    ("image", lambda t: t.index_fill_(0, torch.tensor([0]), float("nan")), "NaN or Inf"),
], ids=["id past the vocabulary", "negative id", "mask of 2", "integer image", "NaN image"])
def test_bad_input_values_are_refused(shards: Path, tmp_path: Path, name: str, change, fragment: str) -> None:
    out = tmp_path / "out.safetensors"
    invoke_refused(forward_main, _args(shards, _altered(tmp_path, name, change), out), name, fragment)
    assert not out.exists()


def test_unwritable_out_is_refused_before_the_forward_pass(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    # The shards do not exist: --out is checked before anything else is read.
    invoke_refused(forward_main, _args(tmp_path / "none", CASE / "inputs.safetensors", tmp_path / "file" / "o"),
                   "--out", "is a file")
    invoke_refused(forward_main, _args(tmp_path / "none", CASE / "inputs.safetensors", Path(".")),
                   "--out", "is a directory")


def test_a_non_finite_output_names_the_samples_and_writes_nothing(tmp_path: Path) -> None:
    shards = overflowing_shards(CASE / "checkpoint.pt", ["vqa_classifier.3.weight"], tmp_path)
    out = tmp_path / "out.safetensors"
    invoke_refused(forward_main, _args(shards, CASE / "inputs.safetensors", out), "not finite", "samples [0, 1")
    assert not out.exists()
