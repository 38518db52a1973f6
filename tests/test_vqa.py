"""`torchrun -m engine.vqa` end to end on the golden mini VQAv2: answers and metrics of the published pipeline,
data × tensor parallel, resuming, undecodable images, test-split submissions, bad inputs and a rank that dies. What
rank 0 alone does with the answers (the official accuracy, the submissions) is checked at tp 1, in this process."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from _datatools import read_arrow
from _faults import overflowing_shards
from _paths import GOLDEN, needs
from _run import invoke_refused, run_here, run_torchrun, shard_here, start_torchrun
from engine.tasks.metrics import vqa_score
from engine.tasks.results import read_results
from engine.tasks.cli import UsageError
from engine.tasks.frontend import open_results
from engine.data.vqav2 import write_vqav2
from engine.vqa import PLACEHOLDER_ANSWER, main as vqa_main

ARROW = GOLDEN / "vqav2_arrow_published"
ANSWERS = ARROW / "answer2label_recovered.txt"
EXPECTED = GOLDEN / "vqa_e2e_expected.json"
CHECKPOINT = GOLDEN / "tiny_relpos_vqa9" / "checkpoint.pt"
RAW = GOLDEN / "vqav2_raw"

pytestmark = [needs(CHECKPOINT), needs(EXPECTED), needs(ARROW)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa9") / "shards"
    shard_here(CHECKPOINT, 2, out)
    return out


@pytest.fixture(scope="module")
def shards_tp1(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa9") / "shards_tp1"
    shard_here(CHECKPOINT, 1, out)
    return out


def _args(shards: Path, out: Path, data: Path, *extra: object) -> list:
    return ["--shards", shards, "--data", data, "--answers", ANSWERS, "--out", out, "--device", "cpu",
            "--dtype", "fp32", "--split", "val", "--batch-size", 8, "--num-workers", 1, *extra]


def run_vqa(nproc: int, shards: Path, out: Path, *extra: object, data: Path = ARROW):
    ran = run_torchrun(nproc, "engine.vqa", _args(shards, out, data, *extra))
    assert ran.returncode == 0, ran.stderr
    return ran


def run_vqa_here(shards: Path, out: Path, *extra: object, data: Path = ARROW):
    """engine.vqa at tp 1 in this process (`run_here`)."""
    ran = run_here(vqa_main, _args(shards, out, data, *extra))
    assert ran.returncode == 0, ran.stderr
    return ran


def summary_of(out: Path) -> dict:
    return json.loads(out.with_suffix(".summary.json").read_text())


def assert_matches_published(out: Path) -> dict:
    expected = json.loads(EXPECTED.read_text())
    records = read_results(out)
    assert sorted(r["question_id"] for r in records) == sorted(int(q) for q in expected["predictions"])
    for r in records:
        assert {"label": r["label"], "answer": r["answer"]} == expected["predictions"][str(r["question_id"])]
    summary = summary_of(out)
    assert summary["questions"] == expected["questions"] and summary["image_errors"] == []
    assert summary["vqa_score"] == pytest.approx(expected["vqa_score"], abs=1e-12)
    assert summary["hit_rate"] == pytest.approx(expected["hit_rate"], abs=1e-12)
    return summary


def arrow_copy(table: pa.Table, folder: Path, split: str = "val") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_file(str(folder / f"vqav2_{split}.arrow"), table.schema) as writer:
        writer.write_table(table)
    return folder


@pytest.fixture(scope="module")
def tp2_results(shards: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp2") / "results.jsonl"
    ran = run_vqa(2, shards, out)
    assert "VQA score" in ran.stdout and "p99" in ran.stdout
    return out


def test_tp2_gives_the_published_answers_and_metrics(tp2_results: Path) -> None:
    summary = assert_matches_published(tp2_results)
    # The published writer's arrow files keep no raw answers: the official accuracy cannot be computed.
    assert summary["vqa_accuracy"] is None and "vqav2_val.official.arrow" in summary["vqa_accuracy_unavailable"]
    latency = summary["latency"]
    assert latency["batches"] == 9 and latency["samples"] == 65  # 65 questions in batches of 8
    assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"] and latency["samples_per_s"] > 0
    assert (summary["run"]["tp"], summary["run"]["dp"]) == (2, 1)


def test_dp2_tp2_splits_the_questions_and_gives_the_same_answers(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    run_vqa(4, shards, out, "--batch-size", 4)
    summary = assert_matches_published(out)
    assert (summary["run"]["tp"], summary["run"]["dp"]) == (2, 2)
    assert summary["latency"]["batches"] == 9 + 8  # shares of 33 and 32 questions


def test_rerun_completes_a_cut_results_file(shards: Path, tp2_results: Path, tmp_path: Path) -> None:
    lines = tp2_results.read_bytes().splitlines(keepends=True)
    keep = len(lines) // 2
    out = tmp_path / "results.jsonl"
    # The second half gone, and a crash in the middle of writing the next line.
    out.write_bytes(b"".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])
    run_vqa(2, shards, out)
    assert out.read_bytes().endswith(b"\n")
    summary = assert_matches_published(out)  # every question exactly once, same metrics
    assert summary["run"]["questions"] == len(lines) - keep


def test_undecodable_image_is_reported_and_excluded_not_replaced(shards: Path, tmp_path: Path) -> None:
    table = read_arrow(ARROW / "vqav2_val.arrow")
    bad_row = 3
    images = table.column("image").to_pylist()
    images[bad_row] = b"garbled" + images[bad_row][64:]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    out = tmp_path / "results.jsonl"
    run_vqa(2, shards, out, data=arrow_copy(table, tmp_path / "arrow"))

    bad = set(table.column("question_id")[bad_row].as_py())
    summary = summary_of(out)
    assert {e["question_id"] for e in summary["image_errors"]} == bad
    assert summary["questions"] == 65 and summary["answered"] == 65 - len(bad)
    expected = json.loads(EXPECTED.read_text())["predictions"]
    records = read_results(out)
    answered = [r for r in records if r["question_id"] not in bad]
    assert all("answer" not in r for r in records if r["question_id"] in bad)
    for r in answered:
        assert {"label": r["label"], "answer": r["answer"]} == expected[str(r["question_id"])]
    truth = {}
    for row in table.select(["question_id", "answer_labels", "answer_scores"]).to_pylist():
        truth.update(zip(row["question_id"], zip(row["answer_labels"], row["answer_scores"])))
    others = [q for q in truth if q not in bad]
    assert summary["vqa_score"] == pytest.approx(vqa_score([expected[str(q)]["label"] for q in others],
                                                           [truth[q][0] for q in others],
                                                           [truth[q][1] for q in others]), abs=1e-12)


# Hand-worked normal forms of the golden annotations' answers (compared normalised where the ten disagree).
NORMAL_FORMS = {"Yes!": "yes", "two": "2", "a red": "red", "yes": "yes", "no": "no", "red": "red", "1": "1",
                "2": "2", "circle": "circle", "square": "square", "green": "green", "blue": "blue"}


def expected_official_accuracy(predictions: dict) -> tuple:
    """Overall and per-answer-type official accuracy of the published answers, from the raw annotations."""
    annotations = json.loads((RAW / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    by_type: dict = {}
    for a in annotations:
        humans = [x["answer"] for x in a["answers"]]
        if len(set(humans)) > 1:
            humans = [NORMAL_FORMS[h] for h in humans]
        predicted = predictions[str(a["question_id"])]["answer"]  # a label-table answer: already normal
        subsets = [min(1.0, sum(h == predicted for h in humans[:i] + humans[i + 1:]) / 3) for i in range(10)]
        by_type.setdefault(a["answer_type"], []).append(sum(subsets) / 10)
    everything = [acc for accs in by_type.values() for acc in accs]
    return sum(everything) / len(everything), {t: sum(accs) / len(accs) for t, accs in by_type.items()}


@needs(RAW)
def test_official_vqa_accuracy_end_to_end(shards_tp1: Path, tmp_path: Path) -> None:
    arrow = tmp_path / "arrow"
    write_vqav2(RAW, arrow)
    out = tmp_path / "results.jsonl"
    ran = run_vqa_here(shards_tp1, out, data=arrow)
    assert "VQA accuracy" in ran.stdout and "official" in ran.stdout
    summary = assert_matches_published(out)
    overall, by_type = expected_official_accuracy(json.loads(EXPECTED.read_text())["predictions"])
    assert set(by_type) == {"yes/no", "number", "other"}
    assert summary["vqa_accuracy"] == pytest.approx(overall, abs=1e-9)
    assert summary["vqa_accuracy_by_answer_type"] == pytest.approx(by_type, abs=1e-9)
    kinds = {a["question_id"]: (a["answer_type"], a["question_type"]) for a in json.loads(
        (RAW / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]}
    assert all((r["answer_type"], r["question_type"]) == kinds[r["question_id"]] for r in read_results(out))


def _test2015_ids() -> list:
    return pc.list_flatten(read_arrow(ARROW / "vqav2_test.arrow").column("question_id")).to_pylist()


@pytest.fixture(scope="module")
def test_submission(shards_tp1: Path, tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("test") / "test.jsonl"
    run_vqa_here(shards_tp1, out, "--split", "test")
    assert "vqa_score" not in summary_of(out) and summary_of(out)["placeholder_answers"] == 0
    return json.loads(out.with_suffix(".submission.json").read_text())


def test_test_split_gives_an_evalai_submission(test_submission: list) -> None:
    assert [s["question_id"] for s in test_submission] == _test2015_ids()
    answers = {json.loads(line)["answer"] for line in ANSWERS.read_text().splitlines()}
    assert all(set(s) == {"question_id", "answer"} and s["answer"] in answers for s in test_submission)


def test_test_dev_submission_covers_every_test2015_question(shards_tp1: Path, test_submission: list,
                                                             tmp_path: Path) -> None:
    # One test-dev image that does not decode: its questions get the placeholder too, never dropped.
    table = read_arrow(ARROW / "vqav2_test-dev.arrow")
    images = table.column("image").to_pylist()
    images[0] = b"garbled" + images[0][64:]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    data = arrow_copy(table, tmp_path / "arrow", "test-dev")
    arrow_copy(read_arrow(ARROW / "vqav2_test.arrow"), data, "test")
    out = tmp_path / "test-dev.jsonl"
    run_vqa_here(shards_tp1, out, "--split", "test-dev", data=data)

    submission = json.loads(out.with_suffix(".submission.json").read_text())
    assert [s["question_id"] for s in submission] == _test2015_ids()  # every test2015 question, once
    dev = set(pc.list_flatten(table.column("question_id")).to_pylist())
    bad = set(table.column("question_id")[0].as_py())
    by_test = {s["question_id"]: s["answer"] for s in test_submission}
    for s in submission:
        if s["question_id"] in dev - bad:
            assert s["answer"] == by_test[s["question_id"]]  # the model's answer, as in the test run
        else:
            assert s["answer"] == PLACEHOLDER_ANSWER
    summary = summary_of(out)
    assert {e["question_id"] for e in summary["image_errors"]} == bad
    assert summary["submission_questions"] == len(submission)
    assert summary["placeholder_answers"] == len(submission) - len(dev - bad)


@pytest.mark.parametrize("case", ["answer table size", "missing split", "no VQA head", "test-dev without test"])
def test_bad_inputs_are_refused_before_any_work(case: str, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    args = _args(shards, out, ARROW)
    if case == "answer table size":
        short = tmp_path / "answers.txt"
        short.write_text("".join(ANSWERS.read_text().splitlines(keepends=True)[:8]))
        args += ["--answers", short]
        fragments = ("9 labels", "8 answers", str(short))
    elif case == "missing split":
        args += ["--data", arrow_copy(read_arrow(ARROW / "vqav2_val.arrow"), tmp_path / "arrow"), "--split", "rest_val"]
        fragments = ("vqav2_rest_val.arrow",)
    elif case == "test-dev without test":  # the submission needs every test2015 question
        data = arrow_copy(read_arrow(ARROW / "vqav2_test-dev.arrow"), tmp_path / "arrow", "test-dev")
        args += ["--data", data, "--split", "test-dev"]
        fragments = ("--split test-dev", "every test2015 question", "vqav2_test.arrow")
    else:
        nlvr2 = tmp_path / "nlvr2"
        shard_here(GOLDEN / "tiny_relpos_nlvr2" / "checkpoint.pt", 1, nlvr2)
        args += ["--shards", nlvr2]
        fragments = ("no VQA head",)
    invoke_refused(vqa_main, args, *fragments)
    assert not out.exists()


def test_shards_for_another_tp_are_refused(shards: Path, tmp_path: Path, monkeypatch) -> None:
    # Rank 0 of a 3-process launch, in this process: the refusal comes before the process group forms.
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "results.jsonl"
    invoke_refused(vqa_main, _args(shards, out, ARROW), "tp=2", "3 processes")
    assert not out.exists()


def _child_with_rank(parent: int, rank: int) -> int:
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} process under torchrun {parent}")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_a_dead_rank_ends_the_job_and_keeps_the_results(shards: Path, tmp_path: Path) -> None:
    # Many one-question steps, so the job is still running when a rank is killed.
    val = read_arrow(ARROW / "vqav2_val.arrow")
    copies = []
    for k in range(20):
        ids = pa.array([[q + 100_000 * k for q in row] for row in val.column("question_id").to_pylist()])
        copies.append(val.set_column(val.schema.get_field_index("question_id"), "question_id", ids))
    data = arrow_copy(pa.concat_tables(copies), tmp_path / "arrow")
    out = tmp_path / "results.jsonl"
    timeout_s = 20
    job = start_torchrun(2, "engine.vqa", _args(shards, out, data, "--batch-size", 1, "--timeout", timeout_s))
    try:
        deadline = time.monotonic() + 180
        while not (out.exists() and out.read_bytes().count(b"\n") >= 4):  # the identity line, then 3 answers
            assert job.poll() is None, "the job ended before a rank could be killed"
            assert time.monotonic() < deadline, "no results after 180 s"
            time.sleep(0.05)
        os.kill(_child_with_rank(job.pid, 1), signal.SIGKILL)
        killed = time.monotonic()
        returncode = job.wait(timeout=timeout_s + 60)
        assert time.monotonic() - killed < timeout_s + 60
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert returncode != 0
    data = out.read_bytes()
    assert data.endswith(b"\n")
    ids = [r["question_id"] for r in read_results(out)]
    assert len(ids) == len(set(ids)) < 20 * 65


def test_results_of_another_checkpoint_are_not_continued(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    open_results(out, {"checkpoint": "aaaa"}).close()
    with pytest.raises(UsageError, match="another run .checkpoint: aaaa recorded, bbbb now"):
        open_results(out, {"checkpoint": "bbbb"})
    open_results(out, {"checkpoint": "aaaa"}).close()  # the same checkpoint continues


def test_a_non_finite_output_is_an_error_naming_the_questions_never_an_answer(tmp_path: Path) -> None:
    shards = overflowing_shards(CHECKPOINT, ["vqa_classifier.3.weight"], tmp_path)
    out = tmp_path / "results.jsonl"
    first = read_arrow(ARROW / "vqav2_val.arrow").column("question_id").to_pylist()[0][0]
    invoke_refused(vqa_main, [*_args(shards, out, ARROW), "--num-workers", 0], "not finite", f"question_id {first}")
    assert read_results(out) == []


@pytest.mark.parametrize("case", ["under a file", "read-only folder", "a folder", "submission under a file"])
def test_unwritable_outputs_are_refused_before_any_work(case: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    out, extra, option = tmp_path / "file" / "results.jsonl", [], "--out"
    if case == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "results.jsonl"
    elif case == "a folder":
        out = Path(".")
    elif case == "submission under a file":
        out, extra, option = tmp_path / "results.jsonl", ["--split", "test", "--submission", tmp_path / "file" / "s"], \
            "--submission"
    # --shards does not exist: the outputs are checked first, before anything is read.
    invoke_refused(vqa_main, [*_args(tmp_path / "no-shards", out, ARROW), *extra], option)
