"""Input files that are not what they claim are refused at start-up in one line naming the file: tokenizer files
checked against the checkpoint, arrow files checked against the dataset's columns, and results files that hold the
results of another run (split, dataset, checkpoint, dtype, answer table, tokenizer)."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from _datatools import read_arrow
from _paths import GOLDEN, needs
from _run import invoke_refused, shard_here
from engine.data.datasets import KarpathyImageDataset, NLVR2Dataset, VQADataset
from engine.data.raw import DataError
from engine.data.text import DEFAULT_VOCAB, TextTokenizer
from engine.tasks import results
from engine.tasks.results import read_results
from engine.vqa import main as vqa_main

ARROW = GOLDEN / "vqav2_arrow_published"
ANSWERS = ARROW / "answer2label_recovered.txt"
COCO = GOLDEN / "coco_arrow_published"
SPM = GOLDEN / "beit3" / "tokenizer.spm"
VQA9 = GOLDEN / "tiny_relpos_vqa9" / "checkpoint.pt"
BEIT3 = GOLDEN / "beit3" / "tiny_beit3_vqa9" / "checkpoint.pth"
pytestmark = [needs(ARROW), needs(COCO), needs(SPM), needs(VQA9)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa9") / "shards"
    shard_here(VQA9, 1, out)
    return out


def vqa_args(shards: Path, out: Path, *extra: object, data: Path = ARROW) -> list:
    return ["--shards", shards, "--data", data, "--answers", ANSWERS, "--out", out, "--device", "cpu",
            "--dtype", "fp32", "--split", "val", "--batch-size", 4, "--num-workers", 0, "--limit", 4, *extra]


def run_vqa(*args: object) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(vqa_main, [str(a) for a in args])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- tokenizer files


def test_a_wordpiece_vocabulary_that_is_not_one_is_refused_naming_the_file(tmp_path: Path) -> None:
    noise = tmp_path / "noise.txt"
    noise.write_bytes(os.urandom(4096) + b"\xff\xfe")
    with pytest.raises(DataError, match=f"{noise}: not a WordPiece vocabulary .* but binary data"):
        TextTokenizer(noise)
    with pytest.raises(DataError, match=f"{SPM}: not a WordPiece vocabulary .* SentencePiece model"):
        TextTokenizer(SPM)
    lines = DEFAULT_VOCAB.read_text().splitlines()
    for token in ("[SEP]", "[CLS]", "[PAD]"):
        short = tmp_path / f"no-{token[1:-1]}.txt"
        short.write_text("\n".join(t for t in lines if t != token) + "\n")
        with pytest.raises(DataError, match=rf"{short}: not a BERT WordPiece vocabulary: it lacks \{token[:-1]}\]"):
            TextTokenizer(short)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="lacks"):
        TextTokenizer(empty)


def test_task_commands_refuse_bad_tokenizer_files_before_loading(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    noise = tmp_path / "noise.txt"
    noise.write_bytes(os.urandom(2048) + b"\xff")
    invoke_refused(vqa_main, [*vqa_args(shards, out), "--vocab", noise], str(noise), "not a WordPiece")
    invoke_refused(vqa_main, [*vqa_args(shards, out), "--tokenizer", SPM], str(SPM), "SentencePiece model")
    # A vocabulary with more tokens than the checkpoint's text embedding has rows: ids past its end
    big = tmp_path / "big.txt"
    big.write_text(DEFAULT_VOCAB.read_text() + "".join(f"extra{i}\n" for i in range(10)))
    invoke_refused(vqa_main, [*vqa_args(shards, out), "--vocab", big], str(big), "ids up to 30531",
                   "30522 rows")
    assert not out.exists()


def test_serve_refuses_a_bad_vocabulary_in_one_line(shards: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.serve import main as serve_main

    monkeypatch.setenv("WORLD_SIZE", "1")
    noise = tmp_path / "noise.txt"
    noise.write_bytes(os.urandom(2048) + b"\xff")
    invoke_refused(serve_main, ["--shards", shards, "--answers", ANSWERS, "--vocab", noise, "--port", 0],
                   str(noise), "not a WordPiece")


@needs(BEIT3)
def test_a_sentencepiece_model_larger_than_the_beit3_embedding_is_refused(tmp_path: Path) -> None:
    from engine.runtime.shards import read_manifest
    from engine.tasks.tokenizers import make_tokenizer

    shards = tmp_path / "beit3"
    shard_here(BEIT3, 1, shards, "--num-heads", 4)
    cfg = read_manifest(shards).config
    assert make_tokenizer(cfg, SPM, None).vocab_size == 101 <= cfg.vocab_size
    smaller = dataclasses.replace(cfg, vocab_size=64)
    with pytest.raises(DataError, match=f"{SPM}: gives token ids up to 100 but the checkpoint's text embedding has 64"):
        make_tokenizer(smaller, SPM, None)
    with pytest.raises(DataError, match="not a SentencePiece model"):
        make_tokenizer(cfg, DEFAULT_VOCAB, None)


# ---------------------------------------------------------------- arrow schemas


def test_arrow_files_of_another_schema_are_refused_naming_the_file_and_the_columns(tmp_path: Path) -> None:
    data = tmp_path / "arrow"
    data.mkdir()
    coco = COCO / "coco_caption_karpathy_test.arrow"
    shutil.copy(coco, data / "vqav2_val.arrow")  # a captions file where questions are expected
    shutil.copy(ARROW / "vqav2_val.arrow", data / "nlvr2_dev.arrow")
    shutil.copy(ARROW / "vqav2_val.arrow", data / "coco_caption_karpathy_test.arrow")
    with pytest.raises(DataError, match=r"vqav2_val.arrow: not a vqav2 arrow file \(no column questions, "
                                        r"question_id, answers, answer_labels, answer_scores; it has: image, caption"):
        VQADataset(data, "val", TextTokenizer(), 64)
    with pytest.raises(DataError, match="nlvr2_dev.arrow: not a nlvr2 arrow file .no column image_0, image_1, "
                                        "identifier; answers is list<item: list<item: string>>, not a list of "
                                        "strings"):
        NLVR2Dataset(data, "dev", TextTokenizer(), 64)
    with pytest.raises(DataError, match="coco_caption_karpathy_test.arrow: not a coco arrow file .no column caption"):
        KarpathyImageDataset(data, "coco", "test", 64)
    # the right columns of the wrong type: question ids as strings
    table = read_arrow(ARROW / "vqav2_val.arrow")
    ids = pa.array([[str(q) for q in row] for row in table.column("question_id").to_pylist()])
    retyped = table.set_column(table.schema.get_field_index("question_id"), "question_id", ids)
    with pa.OSFile(str(data / "vqav2_val.arrow"), "wb") as sink, pa.ipc.new_file(sink, retyped.schema) as writer:
        writer.write_table(retyped)
    with pytest.raises(DataError, match="question_id is list<item: string>, not a list of integers"):
        VQADataset(data, "val", TextTokenizer(), 64)


def test_engine_vqa_refuses_an_arrow_file_of_another_dataset_in_one_line(shards: Path, tmp_path: Path) -> None:
    data = tmp_path / "arrow"
    data.mkdir()
    shutil.copy(COCO / "coco_caption_karpathy_test.arrow", data / "vqav2_val.arrow")
    invoke_refused(vqa_main, vqa_args(shards, tmp_path / "r.jsonl", data=data), str(data / "vqav2_val.arrow"),
                   "not a vqav2 arrow file", "question_id")


# ---------------------------------------------------------------- results files


def test_a_results_file_records_what_it_holds_and_refuses_every_other_run(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    run_vqa(*vqa_args(shards, out))
    identity = results.read_identity(out)
    assert (identity["task"], identity["split"], identity["dtype"]) == ("vqa", "val", "fp32")
    assert identity["dataset"]["file"] == "vqav2_val.arrow" and len(read_results(out)) == 4
    assert {"checkpoint", "answers", "tokenizer"} <= set(identity)

    another_dataset = tmp_path / "other"
    another_dataset.mkdir()
    table = read_arrow(ARROW / "vqav2_val.arrow")
    with pa.OSFile(str(another_dataset / "vqav2_val.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table.slice(1))  # the same split name, other questions
    answers = tmp_path / "answers.txt"
    answers.write_text("".join(reversed(ANSWERS.read_text().splitlines(keepends=True))))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(DEFAULT_VOCAB.read_text().replace("\nthe\n", "\nteh\n", 1))
    other_checkpoint = tmp_path / "other-shards"
    shard_here(GOLDEN / "tiny_relpos_vqa9" / "checkpoint.pt", 1, other_checkpoint)
    _point_at_another_source(other_checkpoint)
    for change, differs in ((["--split", "train"], "split: val recorded, train now"),
                            (["--dtype", "bf16"], "dtype: fp32 recorded, bf16 now"),
                            (["--answers", answers], "answers: "),
                            (["--vocab", vocab], "tokenizer: "),
                            (["--shards", other_checkpoint], "checkpoint: "),
                            (["--data", another_dataset], "dataset: ")):
        invoke_refused(vqa_main, [*vqa_args(shards, out), *change], str(out), "another run", differs,
                       "pass a new --out")
    assert len(read_results(out)) == 4
    run_vqa(*vqa_args(shards, out, "--limit", 6))  # the same run continues
    assert len(read_results(out)) == 6 and results.read_identity(out) == identity


def _point_at_another_source(shard_dir: Path) -> None:
    """The same weights, recorded as cut from another checkpoint file (its sha256)."""
    import json

    manifest = shard_dir / "manifest.json"
    data = json.loads(manifest.read_text())
    data["source"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))


def test_a_results_file_without_its_identity_is_not_continued(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text('{"question_id": 1, "answer": "yes", "label": 6}\n')
    invoke_refused(vqa_main, vqa_args(shards, out), str(out), "does not record what it holds the results of")
