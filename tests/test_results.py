from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


from engine.tasks.results import DuplicateKeyError, ResultsWriter, read_results

REPO = Path(__file__).resolve().parents[1]


def test_append_and_resume(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    with ResultsWriter(path) as w:
        assert w.done_keys == set()
        w.append([{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"}])
        w.append([])
    with ResultsWriter(path) as w:
        assert w.done_keys == {1, 2}
        w.append([{"question_id": 3, "answer": "red\nline"}])
    assert [r["question_id"] for r in read_results(path)] == [1, 2, 3]
    assert read_results(path)[2]["answer"] == "red\nline"


def test_truncated_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsWriter(path) as w:
        w.append([{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"}])
    complete = path.stat().st_size
    with open(path, "ab") as fh:  # a crash in the middle of writing record 3
        fh.write(b'{"question_id": 3, "ans')
    assert [r["question_id"] for r in read_results(path)] == [1, 2]
    assert path.stat().st_size > complete  # reading alone does not modify the file

    with ResultsWriter(path) as w:
        assert w.done_keys == {1, 2}
        assert path.stat().st_size == complete
        w.append([{"question_id": 3, "answer": "blue"}])
    lines = path.read_text().splitlines()
    assert [json.loads(x)["question_id"] for x in lines] == [1, 2, 3]


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsWriter(path) as w:
        w.append([{"question_id": 7, "answer": "yes"}])
        with pytest.raises(DuplicateKeyError):
            w.append([{"question_id": 7, "answer": "no"}])
        with pytest.raises(DuplicateKeyError):  # within one batch; nothing of it is written
            w.append([{"question_id": 8, "answer": "a"}, {"question_id": 8, "answer": "b"}])
        assert w.done_keys == {7}
    with ResultsWriter(path) as w:
        with pytest.raises(DuplicateKeyError):
            w.append([{"question_id": np.int64(7), "answer": "no"}])
    assert len(read_results(path)) == 1

    path.write_text('{"question_id": 1}\n{"question_id": 1}\n')
    with pytest.raises(DuplicateKeyError):
        ResultsWriter(path)


def test_string_keys_and_numpy_values(tmp_path):
    path = tmp_path / "nlvr2.jsonl"
    with ResultsWriter(path, key="identifier") as w:
        w.append([{"identifier": "dev-850-0-0", "pred": np.int64(1), "logits": np.array([0.5, -0.5])}])
        with pytest.raises(KeyError):
            w.append([{"question_id": 1}])
        with pytest.raises(TypeError):
            w.append([{"identifier": 1.5}])
    with ResultsWriter(path, key="identifier") as w:
        assert w.done_keys == {"dev-850-0-0"}
    assert read_results(path) == [{"identifier": "dev-850-0-0", "pred": 1, "logits": [0.5, -0.5]}]


def test_composite_keys(tmp_path):
    path = tmp_path / "nlvr2.jsonl"
    key = ("identifier", "question_index")
    with ResultsWriter(path, key=key) as w:
        w.append([{"identifier": "dev-5-0", "question_index": 0}, {"identifier": "dev-5-0", "question_index": 1}])
        with pytest.raises(DuplicateKeyError):
            w.append([{"identifier": "dev-5-0", "question_index": np.int64(1)}])
        with pytest.raises(KeyError, match="question_index"):
            w.append([{"identifier": "dev-6-0"}])
    with ResultsWriter(path, key=key) as w:
        assert w.done_keys == {("dev-5-0", 0), ("dev-5-0", 1)}


def test_damaged_complete_line_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"question_id": 1}\nnot json\n')
    with pytest.raises(ValueError, match=":2:"):
        ResultsWriter(path)


def test_recorded_lines_survive_a_kill(tmp_path):
    path = tmp_path / "results.jsonl"
    script = (
        "import os, signal\n"
        "from engine.tasks.results import ResultsWriter\n"
        f"w = ResultsWriter({str(path)!r})\n"
        "w.append([{'question_id': i} for i in range(5)])\n"
        "w.append([{'question_id': 5}])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO)
    assert proc.returncode != 0
    with ResultsWriter(path) as w:
        assert w.done_keys == set(range(6))
