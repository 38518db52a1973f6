"""What the int8 server tests share (engine.serve, engine.ray_serve): every golden val question's logits from an
in-process tp-1 model, and a server's replies over HTTP against them."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from _serve import Server
from _vqa_requests import ask_json, val_questions
from engine.data.datasets import VQADataset, collate
from engine.models.tasks import TASKS, VQA
from engine.runtime.distributed import init_parallel
from engine.runtime.loading import CalibrationBatches, load_model
from engine.tasks.tokenizers import make_tokenizer

QUESTIONS = val_questions()


def val_logits(shard_dir: Path, arrow: Path, dtype: str,
               calibration: Optional[CalibrationBatches] = None) -> Dict[int, torch.Tensor]:
    """Every val question's VQA logits by question id, from `shard_dir` (tp 1) loaded in this process."""
    ctx = init_parallel("cpu", 1, threads=1)
    model = load_model(shard_dir, ctx, dtype, calibration=calibration)
    dataset = VQADataset(arrow, "val", make_tokenizer(model.cfg, None, None), model.cfg.image_size)
    batch = collate([dataset[i] for i in range(len(dataset))])
    with torch.inference_mode():
        return dict(zip(batch["question_id"], TASKS[VQA].first_output(model, batch, ctx.device)))


def compare_replies(server: Server, answers: Dict[int, str], logits: Dict[int, torch.Tensor], tolerance: float,
                    near_tie: float) -> None:
    """Every golden val question over HTTP: engine.vqa's answer, and every label's probability within `tolerance`
    of the softmax of `logits`.

    Each process times its int8 kernels at load (int_mm or oneDNN per shape): the same integer products, the fp32
    scaling rounded in another order, which can move one activation across an int8 level downstream (measured on
    this checkpoint: logits move by up to 0.009 between the two kernels, probabilities by 0.001). An answer whose
    top-2 margin in `logits` is below `near_tie` may therefore go either way; every other must be equal.
    """
    assert len(QUESTIONS) == len(answers) == 65
    differ = []
    for q in QUESTIONS:
        status, _, reply = ask_json(server, q, top_k=9)
        assert status == 200, reply
        row = logits[q["question_id"]]
        if reply["answer"] != answers[q["question_id"]]:
            differ.append(q["question_id"])
            assert float(row.topk(2).values[0] - row.topk(2).values[1]) < near_tie, (q, reply)
        got = torch.tensor([t["probability"] for t in sorted(reply["top_k"], key=lambda t: t["label"])])
        assert float((got - row.softmax(-1)).abs().max()) < tolerance, (q["question_id"], got, row.softmax(-1))
    assert len(differ) <= 1, differ
