"""Per-bucket graphs (engine.runtime.graphs) and the device-memory bound (engine.runtime.memory), on the CPU.

Device graphs need CUDA; here the graph path is checked to be off with a reason, and the runner's own logic —
static buffers, padding to the bucket, slicing the padding off, copies out of the graph's buffers — is run on
the golden model with `Rerun`, a stand-in for a graph that replays by rerunning the recorded function on the
same static buffers and writing into the outputs it first returned (what a graph replay does to them).
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, Tuple

import pytest
import torch
from safetensors.torch import load_file

from _paths import GOLDEN, needs
from _run import shard_here
from engine.forward import run_task
from engine.runtime.distributed import ParallelContext
from engine.runtime.graphs import DEFAULT_BUCKETS, GraphRunner, bucket_for, graph_support, pad_rows
from engine.runtime.loading import load_model
from engine.runtime.memory import DeviceMemoryError, MemoryBudget

CPU = torch.device("cpu")
CASE = GOLDEN / "tiny_relpos_vqa"


class Rerun:
    """A graph stand-in: capture runs fn once; replay reruns it and copies into the first outputs."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def warm_up(self, fn: Callable, runs: int) -> None:
        for _ in range(runs):
            fn()

    def capture(self, fn: Callable) -> Tuple[Dict[str, torch.Tensor], Callable[[], None]]:
        self.captures += 1
        outputs = fn()

        def replay() -> None:
            self.replays += 1
            for name, value in fn().items():
                outputs[name].copy_(value)

        return outputs, replay


@pytest.fixture(scope="module")
def vqa_model(tmp_path_factory):
    shards = tmp_path_factory.mktemp("graphs") / "shards"
    shard_here(CASE / "checkpoint.pt", 1, shards)
    ctx = ParallelContext(rank=0, world_size=1, tp_size=1, device=CPU, backend=None)
    model = load_model(shards, ctx, "fp32")
    model.shards = shards
    return model


def test_buckets_round_up() -> None:
    assert [bucket_for(n, DEFAULT_BUCKETS) for n in (1, 2, 3, 5, 8, 9, 17, 32, 33)] == \
        [1, 2, 4, 8, 8, 16, 32, 32, None]
    assert bucket_for(3, (8, 2)) == 8


def test_padding_repeats_the_first_row() -> None:
    masks = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(pad_rows(masks, 4), torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]]))
    assert pad_rows(masks, 2) is masks


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the graph path is not skipped")
def test_graphs_are_skipped_with_a_reason_without_cuda() -> None:
    assert graph_support(CPU) == "CUDA graphs off: no CUDA here (the device is cpu)"
    assert graph_support(torch.device("cuda")) == "CUDA graphs off: torch sees no CUDA device"
    calls = []
    runner = GraphRunner(lambda task, x: calls.append(rows_of(x)) or {"y": x["x"] * 2}, CPU)
    assert not runner.enabled and runner.reason == graph_support(CPU)
    assert runner.mode("vqa", 3) == f"eager ({runner.reason})"
    out = runner("vqa", {"x": torch.arange(3.0)})
    assert torch.equal(out["y"], torch.tensor([0.0, 2.0, 4.0])) and calls == [3]  # as given: no padding row
    assert runner.captured() == [] and runner.memory.report() is None
    assert GraphRunner(lambda t, x: x, CPU, enabled=False).reason == "CUDA graphs off: --no-cuda-graphs"


def rows_of(inputs: Dict[str, torch.Tensor]) -> int:
    return next(iter(inputs.values())).shape[0]


@needs(CASE)
def test_no_padding_row_reaches_a_result(vqa_model) -> None:
    inputs, expected = load_file(str(CASE / "inputs.safetensors")), load_file(str(CASE / "expected.safetensors"))
    seen = []

    def run(task: str, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        seen.append(rows_of(batch))
        return run_task(vqa_model, task, batch)

    rerun = Rerun()
    runner = GraphRunner(run, CPU, buckets=(1, 2, 4, 8), capture=rerun)
    assert runner.enabled
    # every batch size up to 8 from the 4 golden samples, in several orders: 3 -> bucket 4, 5..7 -> bucket 8
    for n, shift in itertools.product(range(1, 9), (0, 1, 3)):
        order = [(shift + i * 3) % 4 for i in range(n)]
        got = runner("vqa", {k: v[order] for k, v in inputs.items()})
        assert runner.mode("vqa", n) == f"graph (bucket {bucket_for(n, runner.buckets)})"
        for name in ("vqa_logits", "cls_feats"):
            assert got[name].shape[0] == n
            assert (got[name] - expected[name][order]).abs().max() <= 1e-4, (n, shift, name)
    assert runner.captured() == [("vqa", 1), ("vqa", 2), ("vqa", 4), ("vqa", 8)] and rerun.captures == 4
    assert set(seen) == {1, 2, 4, 8}  # the model only ever ran whole buckets
    # results are copies: a later replay of the same graph does not change an earlier result
    first = runner("vqa", {k: v[:3] for k, v in inputs.items()})
    kept = first["vqa_logits"].clone()
    runner("vqa", {k: v[[3, 2, 1]] for k, v in inputs.items()})
    assert torch.equal(first["vqa_logits"], kept)
    # above the largest bucket: eager, as given
    order = [i % 4 for i in range(9)]
    nine = runner("vqa", {k: v[order] for k, v in inputs.items()})
    assert seen[-1] == 9 and (nine["vqa_logits"] - expected["vqa_logits"][order]).abs().max() <= 1e-4
    assert runner.mode("vqa", 9) == "eager (batch 9 is above the largest bucket, 8)"


def test_a_forward_that_cannot_be_captured_runs_eagerly_with_the_reason() -> None:
    class Refuses(Rerun):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    runner = GraphRunner(lambda task, x: {"y": x["x"] + 1}, CPU, buckets=(4,), capture=Refuses())
    out = runner("vqa", {"x": torch.zeros(3, 2)})
    assert torch.equal(out["y"], torch.ones(3, 2))
    assert runner.skipped == {("vqa", 4): "capture of vqa at batch 4 failed: operation not permitted when stream "
                                          "is capturing"}
    assert runner.mode("vqa", 3).startswith("eager (capture of vqa at batch 4 failed")


class FakeStats:
    """Allocator counters for a pretend device of `total` bytes on which each forward row takes `per_row`."""

    def __init__(self, total: int, resting: int, per_row: int) -> None:
        self.total_bytes, self.resting, self.per_row = total, resting, per_row
        self._peak = resting

    def run(self, task: str, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        self._peak = max(self._peak, self.resting + self.per_row * rows_of(batch))
        return {"y": batch["x"].clone()}

    def free(self) -> int:
        return self.total_bytes - self.resting

    def total(self) -> int:
        return self.total_bytes

    def allocated(self) -> int:
        return self.resting

    def reserved(self) -> int:
        return self.resting

    def reset_peak(self) -> None:
        self._peak = self.resting

    def peak(self) -> int:
        return self._peak


def test_a_batch_that_would_not_fit_is_refused_in_one_line() -> None:
    stats = FakeStats(total=10_000, resting=1_000, per_row=1_000)  # 9 000 bytes free: 90 % of it is 8 rows
    runner = GraphRunner(stats.run, CPU, enabled=False, memory=MemoryBudget(CPU, stats))
    assert torch.equal(runner("vqa", {"x": torch.arange(8)})["y"], torch.arange(8))
    # batch 1 was measured first (1 000 bytes), batch 8 then run and measured (8 000)
    assert runner.memory.activations == {"vqa": {1: 1_000, 8: 8_000}}
    assert runner.memory.estimate("vqa", 9) == 9_000 and runner.memory.estimate("vqa", 4) == 4_000
    with pytest.raises(DeviceMemoryError) as refused:
        runner("vqa", {"x": torch.arange(9)})
    line = str(refused.value)
    assert "\n" not in line and "a vqa batch of 9 needs about 0.00 GiB" in line and "at batch 8" in line
    assert runner.memory.report()["activations_bytes"] == {"vqa": {1: 1_000, 8: 8_000}}


def test_the_server_warms_every_bucket_a_batch_can_pad_to_largest_first() -> None:
    from engine.serving.warmup import warm_sizes

    assert warm_sizes(16, graphs=True) == [16, 8, 4, 2, 1]
    assert warm_sizes(20, graphs=True) == [32, 16, 8, 4, 2, 1]  # a batch of 17-20 pads to 32
    assert warm_sizes(40, graphs=True) == [40, 32, 16, 8, 4, 2, 1]  # above 32: eager, its memory checked
    assert warm_sizes(20, graphs=False) == [20]


def test_batched_key_masking_asks_the_host_nothing() -> None:
    """Accelerators' batched masking keeps a mask even when every key is real (no host check a graph could not
    hold), and it changes nothing there; the CPU's per-sample path still takes the whole batch at once."""
    from engine.layers.attention import BATCHED, PER_SAMPLE, AttentionOptions, attention, select_keys

    gen = torch.Generator().manual_seed(0)
    qkv, bias = torch.randn(2, 5, 3 * 2 * 4, generator=gen), torch.randn(1, 2, 5, 5, generator=gen)
    every_key = torch.ones(2, 5, dtype=torch.long)
    batched, per_sample = AttentionOptions(key_masking=BATCHED), AttentionOptions(key_masking=PER_SAMPLE)
    keys = select_keys(every_key, 0, batched)
    assert keys.additive_mask is not None and torch.equal(keys.additive_mask, torch.zeros(2, 1, 1, 5))
    whole = select_keys(every_key, 0, per_sample)
    assert whole.additive_mask is None and whole.per_sample is None
    assert torch.allclose(attention(qkv, 2, bias, keys, batched), attention(qkv, 2, bias, whole, per_sample),
                          atol=1e-6)


@needs(CASE)
def test_the_served_model_on_the_cpu_warms_nothing_and_says_why(vqa_model) -> None:
    from engine.runtime.shards import read_manifest
    from engine.serving.warmup import example_inputs, served_model
    from engine.tasks.cli import Engine

    ctx = ParallelContext(rank=0, world_size=1, tp_size=1, device=CPU, backend=None)
    manifest = read_manifest(vqa_model.shards)
    engine = Engine(ctx=ctx, model=vqa_model, manifest=manifest, dtype="fp32", load_s=0.0)
    served, padded, note = served_model(engine, ["vqa"], 16, cuda_graphs=True)
    assert (padded, note) == (False, "CUDA graphs off: no CUDA here (the device is cpu)")
    assert served.graphs.memory.activations == {}  # nothing ran ahead
    # the warm-up's inputs are valid inputs of the task: the published model's shapes, finite answers
    out = served.run("vqa", example_inputs(manifest.config, "vqa", 3, CPU))
    assert out.shape == (3, manifest.config.vqa_labels) and bool(torch.isfinite(out).all())
