"""--dtype int8 through the commands on the tiny golden VQA checkpoint: --calibration (engine.vqa at tp 1 and 2, the
factors it sets, the results identity, refusals, VLMO_INT8_SMOOTHING=0; NLVR2, retrieval and BEiT-3 files;
engine.bench's report; engine.forward's outputs and its --tokenizer), engine.serve --dtype int8 over HTTP against
engine.vqa --dtype int8."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Dict

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import load_file

from _beit3 import BEIT3, cut
from _int8_replies import compare_replies, val_logits
from _paths import GOLDEN, needs
from _run import invoke_refused, run_here, run_torchrun, shard_here
from _serve import Server
from _vqa_requests import ANSWERS, RAW
from engine.bench import main as bench_main
from engine.forward import read_inputs, run_task
from engine.layers.linear import parallel_linears
from engine.layers.quantize import FLOAT_LAYERS, unpack_linears
from engine.layers.smoothing import smoothing_factors, weight_ranges
from engine.models.tasks import TASKS, VQA
from engine.runtime.distributed import init_parallel
from engine.runtime.loading import load_model
from engine.runtime.shards import read_manifest
from engine.tasks.benchmark import run_bench
from engine.tasks.calibration import read_calibration
from engine.tasks.cli import UsageError
from engine.tasks.results import read_identity, read_results
from engine.tasks.tokenizers import make_tokenizer
from engine.vqa import main as vqa_main

ARROW = GOLDEN / "vqav2_arrow_published"
TRAIN = ARROW / "vqav2_train.arrow"
COCO = GOLDEN / "coco_arrow_published" / "coco_caption_karpathy_test.arrow"
FORWARD = GOLDEN / "tiny_relpos_vqa9"
CHECKPOINT = FORWARD / "checkpoint.pt"
pytestmark = [needs(CHECKPOINT), needs(ARROW), needs(RAW)]
# The fp32 answer margin (top-1 minus top-2 logit) beyond which int8 must not change an answer: int8 moves this
# checkpoint's logits by a few hundredths (measured at tp 1: up to 0.022), so a margin of 0.09 is decided whatever
# the rounding.
DECIDED = 0.09
# Every process here runs 1 thread per rank: two threads on a busy 2-core machine spin on each other (6x slower).


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Dict[int, Path]:
    root = tmp_path_factory.mktemp("int8cmd")
    for tp in (1, 2):
        shard_here(CHECKPOINT, tp, root / f"tp{tp}")
    return {tp: root / f"tp{tp}" for tp in (1, 2)}


def _vqa_args(shard_dir: Path, out: Path, *extra: object) -> list:
    return ["--shards", shard_dir, "--data", ARROW, "--answers", ANSWERS, "--out", out, "--device", "cpu",
            "--dtype", "int8", "--split", "val", "--batch-size", 8, "--num-workers", 0, "--threads", 1, *extra]


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> Dict[str, Path]:
    """engine.vqa --dtype int8: at tp 1 (in this process), and calibrated on the train split at tp 1 and tp 2."""
    root = tmp_path_factory.mktemp("int8runs")
    out = {name: root / f"{name}.jsonl" for name in ("tp1", "tp1-cal", "tp2-cal")}
    for name, tp, extra in (("tp1", 1, []), ("tp1-cal", 1, ["--calibration", TRAIN]),
                            ("tp2-cal", 2, ["--calibration", TRAIN])):
        args = _vqa_args(shards[tp], out[name], *extra)
        ran = run_here(vqa_main, args) if tp == 1 else run_torchrun(tp, "engine.vqa", args)
        assert ran.returncode == 0, ran.stderr
    return out


def _answers(out: Path) -> Dict[int, str]:
    return {r["question_id"]: r["answer"] for r in read_results(out)}


@pytest.fixture(scope="module")
def logits(shards) -> Dict[str, Dict[int, torch.Tensor]]:
    """Every val question's logits by question id, tp 1 in this process: fp32, int8, int8 calibrated."""
    cfg = read_manifest(shards[1]).config
    calibration = read_calibration(TRAIN, None, "int8", VQA, cfg, make_tokenizer(cfg, None, None))
    return {name: val_logits(shards[1], ARROW, dtype, batches) for name, dtype, batches in (
        ("fp32", "fp32", None), ("int8", "int8", None), ("int8-cal", "int8", calibration.batches()))}


def first_train_keys_sha256(n: int) -> str:
    """The calibration identity's hash of the first n train questions, from the arrow file itself (every golden
    image decodes): sha256 of their question ids as a JSON list."""
    table = pa.ipc.open_file(pa.memory_map(str(TRAIN))).read_all()
    ids = pc.list_flatten(table.column("question_id")).to_pylist()[:n]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def _decided(fp32: Dict[int, torch.Tensor]) -> list:
    return [q for q, row in fp32.items() if float(row.topk(2).values[0] - row.topk(2).values[1]) > DECIDED]


def test_calibrated_int8_gives_the_same_answers_at_tp_1_and_2_and_records_its_calibration(runs, logits) -> None:
    one, two = _answers(runs["tp1-cal"]), _answers(runs["tp2-cal"])
    decided = _decided(logits["fp32"])
    assert len(one) == len(two) == 65 and len(decided) >= 40
    assert all(one[q] == two[q] for q in decided)
    # near-ties (fp32 margins down to 0.017) may go either way: tp 2 quantises each rank's share of a row-parallel
    # input apart (measured: 0 or 1 of 65 differs)
    assert sum(one[q] == two[q] for q in one) >= 63
    calibrated = {"file": "vqav2_train.arrow", "samples": 32, "keys_sha256": first_train_keys_sha256(32)}
    identities = [read_identity(runs[name]) for name in ("tp1-cal", "tp2-cal")]
    assert all(i["calibration"] == calibrated for i in identities)
    assert identities[0]["calibration"] == identities[1]["calibration"]  # the same samples at both tps
    assert "calibration" not in read_identity(runs["tp1"])
    summary = json.loads(runs["tp2-cal"].with_suffix(".summary.json").read_text())
    assert summary["run"]["calibration"] == identities[1]["calibration"] and summary["run"]["dtype"] == "int8"


def test_a_rerun_with_another_calibration_is_refused_naming_it(shards, runs, tmp_path) -> None:
    continued = tmp_path / "results.jsonl"
    continued.write_bytes(runs["tp1-cal"].read_bytes())
    ran = run_here(vqa_main, _vqa_args(shards[1], continued, "--calibration", TRAIN, "--calibration-samples", 16))
    assert ran.returncode == 1 and ran.stderr.count("error:") == 1, ran.stderr
    assert "holds the results of another run (calibration: {file vqav2_train" in ran.stderr
    assert "samples 32" in ran.stderr and "samples 16" in ran.stderr and "Traceback" not in ran.stderr
    assert continued.read_bytes() == runs["tp1-cal"].read_bytes()


def test_calibration_takes_the_factors_from_the_measured_ranges(shards) -> None:
    """The calibrated model's LayerNorms are γ / s with s from the ranges the samples reach (measured here by hooks of
    this test's own), the layers no sample reaches keep the weight-only factors, the layers int8 leaves in fp32 (the
    first, FLOAT_LAYERS) are not smoothed."""
    ctx = init_parallel("cpu", 1, threads=1)
    fp32 = load_model(shards[1], ctx, "fp32")
    unpack_linears(fp32)
    calibration = read_calibration(TRAIN, 16, "int8", VQA, fp32.cfg, make_tokenizer(fp32.cfg, None, None))
    batches = list(calibration.batches())
    assert [task for task, _ in batches] == [VQA, VQA] and len(calibration.keys) == 16
    groups = list(fp32.smoothing_groups())
    reached: Dict[int, torch.Tensor] = {}

    def record(index: int):
        def hook(_module, inputs) -> None:
            amax = inputs[0].abs().flatten(0, -2).amax(0)
            reached[index] = torch.maximum(reached[index], amax) if index in reached else amax
        return hook

    hooks = [readers[0].register_forward_pre_hook(record(i)) for i, (_, readers) in enumerate(groups)]
    with torch.inference_mode():
        for _, inputs in batches:
            TASKS[VQA].run(fp32, inputs)
    for hook in hooks:
        hook.remove()
    calibrated = list(load_model(shards[1], ctx, "int8", calibration=batches).smoothing_groups())
    weights_only = list(load_model(shards[1], ctx, "int8").smoothing_groups())
    assert 0 < len(reached) < len(groups)  # the VL layers' text and image FFN experts get no VQA token
    kept = {id(m) for block in fp32.encoder_layers()[:FLOAT_LAYERS] for m in parallel_linears(block)}
    assert FLOAT_LAYERS < fp32.cfg.depth and any(id(readers[0]) in kept for _, readers in groups)
    for i, (norm, readers) in enumerate(groups):
        got, plain = calibrated[i][0].weight, weights_only[i][0].weight
        if id(readers[0]) in kept:
            assert torch.equal(got, norm.weight) and torch.equal(plain, norm.weight)
        elif i in reached:
            s = smoothing_factors(reached[i], weight_ranges([m.weight for m in readers]))
            torch.testing.assert_close(got, norm.weight / s, rtol=1e-5, atol=1e-7)
            assert not torch.allclose(got, plain, rtol=1e-3)
        else:
            torch.testing.assert_close(got, plain, rtol=0, atol=0)


def _nlvr2_file(folder: Path) -> Path:
    """Two NLVR2 pairs (golden val photos) with two sentences each, in the arrow format engine.data writes."""
    photos = sorted((RAW / "val2014").glob("*.jpg"))[:4]
    table = pa.table({"image_0": [photos[0].read_bytes(), photos[2].read_bytes()],
                      "image_1": [photos[1].read_bytes(), photos[3].read_bytes()],
                      "questions": [["there are two shapes", "one is red"], ["nothing is blue", "a circle"]],
                      "answers": [["True", "False"], ["False", "True"]], "identifier": ["dev-0-0", "dev-1-0"]})
    path = folder / "calibration.arrow"
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return path


@needs(COCO)
@needs(BEIT3)
@pytest.mark.parametrize("case", ["tiny_relpos_nlvr2", "tiny_relpos_irtr_e2e", "tiny_beit3_vqa9"])
def test_nlvr2_retrieval_and_beit3_files_calibrate_their_heads(case: str, tmp_path: Path) -> None:
    if case.startswith("tiny_beit3"):
        cut(case, 1, tmp_path / "shards")
    else:
        shard_here(GOLDEN / case / "checkpoint.pt", 1, tmp_path / "shards")
    ctx = init_parallel("cpu", 1, threads=1)
    model = load_model(tmp_path / "shards", ctx, "int8")
    head = model.cfg.tasks[0]
    path = {"nlvr2": _nlvr2_file, "irtr": lambda _: COCO, "vqa": lambda _: TRAIN}[head](tmp_path)
    tokenizer = make_tokenizer(model.cfg, BEIT3 / "tokenizer.spm" if case.startswith("tiny_beit3") else None, None)
    calibration = read_calibration(path, 3, "int8", head, model.cfg, tokenizer)
    # 3 samples; retrieval: 3 images and 3 captions, the image-only and the text-only pass each through its experts
    want = {"nlvr2": ["nlvr2"], "irtr": ["image_embedding", "text_embedding"], "vqa": ["vqa"]}[head]
    assert [task for task, _ in calibration.batches()] == want and len(calibration.keys) == 3 * len(want)
    calibrated = load_model(tmp_path / "shards", ctx, "int8", calibration=calibration.batches())
    changed = [not torch.equal(a.weight, b.weight) for (a, _), (b, _) in
               zip(calibrated.smoothing_groups(), model.smoothing_groups())]
    # unreached: experts the task does not use (VLMo), the Sub-LNs' row-parallel readers (BEiT-3)
    assert any(changed) and not all(changed), changed


def test_bad_calibration_input_is_refused_in_one_line_naming_it(shards, tmp_path: Path) -> None:
    from engine.forward import main as forward_main
    from engine.ray_serve import main as ray_serve_main
    from engine.retrieval import main as retrieval_main
    from engine.serve import main as serve_main

    base = _vqa_args(shards[1], tmp_path / "out.jsonl")
    missing = tmp_path / "vqav2_nothing.arrow"
    broken = tmp_path / "broken.arrow"
    broken.write_bytes(b"ARROW1 but not really")
    for path, why in ((missing, "missing arrow file"), (ANSWERS, "not a readable arrow file"),
                      (broken, "not a readable arrow file"), (COCO, "not a vqav2 arrow file")):
        invoke_refused(vqa_main, [*base, "--calibration", path], "--calibration", str(path), why)
    invoke_refused(vqa_main, [*base, "--dtype", "fp32", "--calibration", TRAIN], "--calibration", str(TRAIN),
                   "only with --dtype int8")
    invoke_refused(vqa_main, [*base, "--calibration-samples", 8], "--calibration-samples", "only with --calibration")
    forward = ["--inputs", FORWARD / "inputs.safetensors", "--out", tmp_path / "out.safetensors"]
    # the same options and checks, before any shard loads or Ray starts
    for command, own in ((bench_main, []), (forward_main, forward), (ray_serve_main, ["--answers", ANSWERS])):
        invoke_refused(command, ["--shards", shards[1], *own, "--device", "cpu", "--calibration", TRAIN],
                       "--calibration", str(TRAIN), "only with --dtype int8", "not --dtype default")
        invoke_refused(command, ["--shards", shards[1], *own, "--dtype", "int8", "--calibration", COCO],
                       "--calibration", str(COCO), "not a vqav2 arrow file")
        invoke_refused(command, ["--shards", shards[1], *own, "--dtype", "int8", "--calibration-samples", 8],
                       "--calibration-samples", "only with --calibration")
    table = pa.ipc.open_file(pa.memory_map(str(ARROW / "vqav2_val.arrow"))).read_all()
    garbled = table.set_column(table.schema.get_field_index("image"), "image",
                               pa.array([b"garbled"] * table.num_rows, pa.binary()))
    undecodable = tmp_path / "vqav2_garbled.arrow"
    with pa.ipc.new_file(str(undecodable), garbled.schema) as writer:
        writer.write_table(garbled)
    invoke_refused(vqa_main, [*base, "--calibration", undecodable], str(undecodable), "no sample to calibrate with")
    served = ["--shards", shards[1], "--answers", ANSWERS, "--device", "cpu", "--dtype", "int8", "--port", 0]
    invoke_refused(serve_main, [*served, "--calibration", COCO], "--calibration", str(COCO), "not a vqav2 arrow file")
    shard_here(GOLDEN / "tiny_relpos_irtr_e2e" / "checkpoint.pt", 1, tmp_path / "irtr")
    invoke_refused(retrieval_main, ["--shards", tmp_path / "irtr", "--data", COCO.parent, "--device", "cpu",
                                    "--dtype", "int8", "--calibration", TRAIN, "--summary", tmp_path / "s.json"],
                   "--calibration", str(TRAIN), "not a coco arrow file")
    assert not any((tmp_path / name).exists() for name in ("out.jsonl", "s.json", "out.safetensors"))


def test_calibration_with_smoothing_off_is_refused_in_one_line(shards, monkeypatch, tmp_path: Path) -> None:
    """VLMO_INT8_SMOOTHING=0: a calibration would set factors nothing uses, and a results file would name it."""
    from engine.bench import main as bench_main
    from engine.forward import main as forward_main
    from engine.vqa import main as vqa_main

    monkeypatch.setenv("VLMO_INT8_SMOOTHING", "0")
    out = tmp_path / "out.jsonl"
    invoke_refused(vqa_main, [*_vqa_args(shards[1], out), "--calibration", TRAIN], f"--calibration {TRAIN}",
                   "VLMO_INT8_SMOOTHING=0 turns int8's smoothing off", "drop --calibration")
    invoke_refused(bench_main, ["--shards", shards[1], "--dtype", "int8", "--calibration", TRAIN],
                   "VLMO_INT8_SMOOTHING=0")
    invoke_refused(forward_main, _forward_args(shards[1], tmp_path / "out.safetensors", "--dtype", "int8",
                                               "--calibration", TRAIN), "VLMO_INT8_SMOOTHING=0", "drop --calibration")
    assert not out.exists() and not (tmp_path / "out.safetensors").exists()
    monkeypatch.setenv("VLMO_INT8_SMOOTHING", "1")
    cfg = read_manifest(shards[1]).config
    batches = read_calibration(TRAIN, 8, "int8", VQA, cfg, make_tokenizer(cfg, None, None)).batches()
    monkeypatch.setenv("VLMO_INT8_SMOOTHING", "0")
    with pytest.raises(ValueError, match="VLMO_INT8_SMOOTHING=0 turns smoothing off"):  # the library refuses too
        load_model(shards[1], init_parallel("cpu", 1, threads=1), "int8", calibration=batches)


def test_int8_without_smoothing_does_not_continue_a_default_int8_results_file(shards, runs, monkeypatch,
                                                                             tmp_path: Path) -> None:
    """The settings int8 takes from the environment (to measure them) are part of a results file's identity."""
    continued = tmp_path / "results.jsonl"
    continued.write_bytes(runs["tp1"].read_bytes())
    monkeypatch.setenv("VLMO_INT8_SMOOTHING", "0")
    ran = run_here(vqa_main, _vqa_args(shards[1], continued))
    assert ran.returncode == 1 and ran.stderr.count("error:") == 1, ran.stderr
    assert "holds the results of another run (int8: None recorded, {smoothing False} now)" in ran.stderr, ran.stderr
    assert continued.read_bytes() == runs["tp1"].read_bytes()
    monkeypatch.setenv("VLMO_INT8_SMOOTHING", "1")
    monkeypatch.setenv("VLMO_INT8_FLOAT_LAYERS", "one")
    invoke_refused(vqa_main, _vqa_args(shards[1], tmp_path / "new.jsonl"), "VLMO_INT8_FLOAT_LAYERS='one'",
                   "a number of layers")


def test_a_copy_that_gives_other_samples_is_refused_where_it_is_read_again(shards) -> None:
    """A Ray replica's ranks read the file again on their node: another file at that path is one line."""
    cfg = read_manifest(shards[1]).config
    tokenizer = make_tokenizer(cfg, None, None)
    source = read_calibration(TRAIN, 8, "int8", VQA, cfg, tokenizer).source
    assert source.read(VQA, cfg, tokenizer).identity == source.identity
    other = replace(source, file=ARROW / "vqav2_val.arrow")
    with pytest.raises(UsageError, match="the file on this node gives other samples .* put the same file at that path"):
        other.read(VQA, cfg, tokenizer)


def test_bench_reports_its_calibration_and_checks_the_calibrated_model_against_fp32(shards, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    ran = run_here(bench_main, ["--shards", shards[1], "--device", "cpu", "--dtype", "int8", "--threads", 1,
                                "--batch-size", 3, "--warmup", 1, "--iters", 2, "--check-fp32",
                                "--calibration", TRAIN, "--calibration-samples", 16, "--json", out])
    assert ran.returncode == 0, ran.stderr
    assert "int8 calibrated on 16 samples of vqav2_train.arrow:" in ran.stdout and "vs fp32: top-1" in ran.stdout
    calibrated = json.loads(out.read_text())
    plain = run_bench(shards[1], "cpu", "int8", 1, 60.0, batch_size=3, warmup=1, iters=2, task=None, check_fp32=True)
    assert calibrated["calibration"] == {"file": "vqav2_train.arrow", "samples": 16,
                                         "keys_sha256": first_train_keys_sha256(16)}
    assert plain["calibration"] is None and set(calibrated) == set(plain)
    # the same model, inputs and work; only the int8 model's factors, and so its deviation from fp32, differ
    for same in ("tp", "dtype", "task", "batch_size", "model", "gflop_per_sample", "peak_gemm_shapes"):
        assert calibrated[same] == plain[same], same
    for report in (calibrated, plain):  # the synthetic inputs' top-2 margins are wide: all 3 answers agree
        vs = report["vs_fp32"]
        assert vs["top1_agreement"] == 1.0 and min(vs["min_cosine"].values()) > 0.999, vs
    assert calibrated["vs_fp32"]["max_abs_diff"] != plain["vs_fp32"]["max_abs_diff"]


def _forward_args(shard_dir: Path, out: Path, *extra: object, case: Path = FORWARD) -> list:
    return ["--shards", shard_dir, "--inputs", case / "inputs.safetensors", "--out", out, "--device", "cpu",
            "--threads", 1, *extra]


@pytest.fixture
def first_kernels(monkeypatch) -> None:
    """Every kernel choice at load takes the first candidate: loads in one process then compute alike, where the
    timed choices can differ between them (measured: two int8 loads' outputs 0.005 apart)."""
    from engine.layers import attention_choice, int8, kernels

    for module in (kernels, int8, attention_choice):
        monkeypatch.setattr(module, "fastest_seconds", lambda runs, repeats=0: {
            name: float(i) for i, name in enumerate(runs)})


def test_forward_calibrated_int8_is_the_library_s_calibrated_model_and_stays_close_to_fp32(shards, first_kernels,
                                                                                           tmp_path) -> None:
    """engine.forward --dtype int8 --calibration: the outputs of the model calibrated on the file's first samples
    (loaded here through the library), not the uncalibrated int8 ones, and within int8's cosine of the published
    fp32 outputs."""
    from engine.forward import main as forward_main

    outs = {name: tmp_path / f"{name}.safetensors" for name in ("int8", "int8-cal")}
    for name, extra in (("int8", []), ("int8-cal", ["--calibration", TRAIN, "--calibration-samples", 16])):
        ran = run_here(forward_main, _forward_args(shards[1], outs[name], "--dtype", "int8", *extra))
        assert ran.returncode == 0, ran.stderr
    plain, calibrated = (load_file(str(outs[name])) for name in ("int8", "int8-cal"))
    ctx = init_parallel("cpu", 1, threads=1)
    cfg = read_manifest(shards[1]).config
    batches = read_calibration(TRAIN, 16, "int8", VQA, cfg, make_tokenizer(cfg, None, None)).batches()
    with torch.inference_mode():
        library = run_task(load_model(shards[1], ctx, "int8", calibration=batches), VQA,
                           read_inputs(FORWARD / "inputs.safetensors", VQA, cfg))
    published = load_file(str(FORWARD / "expected.safetensors"))
    assert set(plain) == set(calibrated) == set(library) == set(published) == {"vqa_logits", "cls_feats"}
    for name, fp32 in published.items():
        # measured: the calibration moves them by 0.019 (logits) and 0.027 (features), 16 samples instead of 32 by
        # 0.016 and 0.025; the same model loaded twice, by 0
        assert float((calibrated[name] - plain[name]).abs().max()) > 0.01, name
        torch.testing.assert_close(calibrated[name], library[name].float(), rtol=0, atol=1e-6)
        for got in (plain, calibrated):  # measured: 0.99970 and more
            assert float(torch.nn.functional.cosine_similarity(got[name], fp32, dim=-1).min()) > 0.999, name


@needs(BEIT3)
def test_forward_takes_a_beit3_tokenizer_only_for_a_calibration(tmp_path: Path) -> None:
    from engine.forward import main as forward_main

    case = BEIT3 / "tiny_beit3_vqa9"
    cut(case.name, 1, tmp_path / "shards")
    out = tmp_path / "out.safetensors"
    invoke_refused(forward_main, _forward_args(tmp_path / "shards", out, "--dtype", "int8", "--calibration", TRAIN,
                                               case=case), "BEiT-3 checkpoints read text", "pass --tokenizer beit3.spm")
    invoke_refused(forward_main, _forward_args(tmp_path / "shards", out, "--dtype", "fp32", "--calibration", TRAIN,
                                               case=case), "--calibration", "only with --dtype int8")
    assert not out.exists()
    ran = run_here(forward_main, _forward_args(tmp_path / "shards", out, "--dtype", "int8", case=case))
    assert ran.returncode == 0 and out.exists(), ran.stderr


def test_tokenizer_help_says_when_a_beit3_checkpoint_needs_one() -> None:
    """Commands that read text need --tokenizer for BEiT-3; those whose inputs hold none, only with --calibration."""
    from click.testing import CliRunner

    from engine.ask import main as ask_main
    from engine.bench import main as bench_main
    from engine.forward import main as forward_main
    from engine.serve import main as serve_main
    from engine.vqa import main as vqa_main

    for command, needed in ((bench_main, "needed only with --calibration, whose texts it tokenises"),
                            (forward_main, "needed only with --calibration, whose texts it tokenises"),
                            (vqa_main, "required"), (serve_main, "required"), (ask_main, "required")):
        text = " ".join(CliRunner().invoke(command, ["--help"]).output.split())
        assert f"--tokenizer PATH BEiT-3: its SentencePiece model (beit3.spm; {needed})." in text, command.name


def test_serve_int8_answers_over_http_as_engine_vqa_int8_at_tp_1(shards, runs, logits) -> None:
    server = Server(1, ["--shards", shards[1], "--answers", ANSWERS, "--dtype", "int8", "--max-wait-ms", 1,
                        "--threads", 1])
    try:
        compare_replies(server, _answers(runs["tp1"]), logits["int8"], 0.003, 0.015)
    finally:
        server.kill()


def test_serve_int8_calibrated_answers_over_http_as_engine_vqa_at_tp_2(shards, runs, logits) -> None:
    server = Server(2, ["--shards", shards[2], "--answers", ANSWERS, "--dtype", "int8", "--max-wait-ms", 1,
                        "--calibration", TRAIN])
    try:
        assert any(line.startswith("ready: ") and f"int8 calibrated on 32 samples of {TRAIN})" in line
                   for line in server.log)
        (card,) = server.get("/v1/models")[2]["data"]
        assert card["calibration"] == {"file": "vqav2_train.arrow", "samples": 32,
                                       "keys_sha256": first_train_keys_sha256(32)}
        assert card["int8_variant"] is None  # the default int8
        # against tp 1's logits: int8 at tp 2 rounds each rank's share apart (logits move by a few hundredths)
        compare_replies(server, _answers(runs["tp2-cal"]), logits["int8-cal"], 0.02, DECIDED)
    finally:
        server.kill()
