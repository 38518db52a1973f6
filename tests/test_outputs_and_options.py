"""Every output path of every command is checked before any work, and every numeric option has a range: one line,
a non-zero exit, nothing read or computed first."""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from typing import List, Sequence

import click
import pytest
from click.testing import CliRunner

from _paths import GOLDEN
from engine import options

ARROW = GOLDEN / "vqav2_arrow_published"
# (module, arguments with {out} where the output goes, the option, whether it names a folder). Every input is
# missing or harmless: a command that did any work before checking its output would fail on the input instead.
OUTPUTS = [
    ("sharding.__main__", ["--checkpoint", "{missing}", "--tp", "2", "--out", "{out}"], "--out", True),
    ("engine.vqa", ["--shards", "{missing}", "--data", ARROW, "--out", "{out}"], "--out", False),
    ("engine.vqa", ["--shards", "{missing}", "--data", ARROW, "--summary", "{out}"], "--summary", False),
    ("engine.vqa", ["--shards", "{missing}", "--data", ARROW, "--split", "val", "--submission", "{out}"],
     "--submission", False),
    ("engine.nlvr2", ["--shards", "{missing}", "--data", ARROW, "--out", "{out}"], "--out", False),
    ("engine.retrieval", ["--shards", "{missing}", "--data", ARROW, "--summary", "{out}"], "--summary", False),
    ("engine.retrieval", ["--shards", "{missing}", "--data", ARROW, "--save-embeddings", "{out}"],
     "--save-embeddings", False),
    ("engine.forward", ["--shards", "{missing}", "--inputs", "{missing}", "--out", "{out}"], "--out", False),
    ("engine.bench", ["--shards", "{missing}", "--json", "{out}"], "--json", False),
    ("engine.loadgen", ["--url", "http://127.0.0.1:9", "--data", ARROW, "--requests", "3", "--rate", "inf",
                        "--json", "{out}"], "--json", False),
    ("engine.tools.beit3_assets", ["--out", "{out}"], "--out", False),
    ("engine.demo", ["--workdir", "{out}"], "--workdir", True),
    ("engine.tools.bench_serve", ["--out", "{out}"], "--out", True),
    ("engine.tools.bench_serve", ["--workdir", "{out}"], "--workdir", True),
    ("engine.tools.bench_study", ["--out", "{out}"], "--out", True),
    ("engine.tools.bench_study", ["--cache", "{out}"], "--cache", True),
    ("engine.data.__main__", ["vqav2", "--root", GOLDEN, "--out", "{out}"], "--out", True),
    ("engine.tools.int8_accuracy", ["--shards", "{missing}", "--json", "{out}"], "--json", False),
    ("engine.index.__main__", ["build", "--shards", "{missing}", "--images", "{missing}", "--out", "{out}"], "--out",
     True),
]


def command(module: str) -> click.Command:
    return importlib.import_module(module).main


def refused(module: str, args: Sequence[object], *fragments: str) -> str:
    result = CliRunner().invoke(command(module), [str(a) for a in args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and all(f in lines[-1] for f in fragments), result.output
    return lines[-1]


@pytest.mark.parametrize("case", ["under a file", "the wrong kind"])
@pytest.mark.parametrize("module, args, option, folder", OUTPUTS,
                         ids=[f"{m.split('.')[-1] if m.split('.')[-1] != '__main__' else m.split('.')[-2]} {o}"
                              for m, _, o, _ in OUTPUTS])
def test_every_output_path_is_checked_before_any_work(module: str, args: List[object], option: str, folder: bool,
                                                      case: str, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    a_folder = tmp_path / "a-folder"
    a_folder.mkdir()
    out = a_file / "out" if case == "under a file" else (a_file if folder else a_folder)
    line = refused(module, [str(a).format(out=out, missing=tmp_path / "missing") for a in args], option, str(out))
    assert ("is a file" in line) if case == "under a file" or folder else ("is a directory" in line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"] and not any(a_folder.iterdir())


def commands() -> List[click.Command]:
    """Every command line of the project: the entry points, engine.data's subcommands, the tools, sharding's."""
    modules = ["sharding.__main__", "sharding.verify"]
    for package in ("engine", "engine.tools"):
        path = importlib.import_module(package).__path__
        for module in pkgutil.iter_modules(path):  # a package is a command when it has a __main__ (engine.data)
            if not module.ispkg:
                modules.append(f"{package}.{module.name}")
            elif importlib.util.find_spec(f"{package}.{module.name}.__main__") is not None:
                modules.append(f"{package}.{module.name}.__main__")
    found = []
    for name in modules:
        main = getattr(importlib.import_module(name), "main", None)
        if isinstance(main, click.Group):
            found += list(main.commands.values())
        elif isinstance(main, click.Command):
            found.append(main)
    return found


def test_every_numeric_option_of_every_command_has_a_range() -> None:
    found = commands()
    assert len(found) >= 19  # the entry points, the tools, engine.data's writers, engine.index's verbs, sharding's
    unbounded = [f"{c.name} {p.opts[0]}" for c in found for p in c.params
                 if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))
                 and not isinstance(p.type, click.types._NumberRangeBase)]
    assert unbounded == []
    lists = [p for c in found for p in c.params if isinstance(p.type, options.NumberList)]
    assert lists and all(p.type.low is not None for p in lists)


@pytest.mark.parametrize("module, option, value", [
    ("engine.vqa", "--threads", "-3"), ("engine.vqa", "--timeout", "-5"), ("engine.serve", "--timeout", "0"),
    ("engine.bench", "--threads", "0"), ("engine.loadgen", "--timeout", "-1"), ("sharding.__main__", "--tp", "0"),
    ("engine.tools.bench_study", "--tps", "1 -2"), ("engine.tools.bench_serve", "--fractions", "0.5 1.5"),
])
def test_out_of_range_values_are_refused_before_anything_runs(module: str, option: str, value: str,
                                                              tmp_path: Path) -> None:
    required = {"engine.vqa": ["--shards", tmp_path, "--data", tmp_path], "engine.serve": ["--shards", tmp_path],
                "engine.bench": ["--shards", tmp_path], "engine.loadgen": ["--url", "x", "--requests", 1, "--rate", 1],
                "sharding.__main__": ["--checkpoint", tmp_path, "--out", tmp_path / "o"]}.get(module, [])
    result = CliRunner().invoke(command(module), [*map(str, required), option, value])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output


def test_engine_forward_refuses_inputs_of_zero_samples_in_one_line(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from _run import invoke_refused, shard_here
    from engine.forward import main as forward_main

    shards = tmp_path / "shards"
    shard_here(GOLDEN / "tiny_relpos_vqa" / "checkpoint.pt", 1, shards)
    empty = tmp_path / "empty.safetensors"
    save_file({"text_ids": torch.zeros(0, 40, dtype=torch.int64), "text_masks": torch.zeros(0, 40, dtype=torch.int64),
               "image": torch.zeros(0, 3, 64, 64)}, str(empty))
    invoke_refused(forward_main, ["--shards", shards, "--inputs", empty, "--out", tmp_path / "out.safetensors"],
                   str(empty), "0 samples")
    assert not (tmp_path / "out.safetensors").exists()

