"""Task metrics (VQA score, hit rate, retrieval recall, NLVR2 accuracy) and latency statistics.

Pure functions over plain sequences, numpy arrays or torch tensors; nothing here
touches a device or a process group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

RECALL_KS = (1, 5, 10)


def question_vqa_score(pred_label: int, labels: Sequence[int], scores: Sequence[float]) -> float:
    """Score of one VQA prediction: the annotator score of the predicted label, 0 when absent."""
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} answer labels but {len(scores)} answer scores")
    # A later duplicate label wins, as when the published code fills its target vector.
    return float(dict(zip((int(x) for x in labels), scores)).get(int(pred_label), 0.0))


def vqa_score(
    pred_labels: Sequence[int],
    answer_labels: Sequence[Sequence[int]],
    answer_scores: Sequence[Sequence[float]],
) -> float:
    """Mean over questions of `question_vqa_score` (the number VLMo reports)."""
    n = _same_length(pred_labels, answer_labels, answer_scores)
    total = sum(
        question_vqa_score(p, lab, sc) for p, lab, sc in zip(pred_labels, answer_labels, answer_scores)
    )
    return total / n


def hit_rate(pred_answers: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Fraction of questions whose predicted answer string is among its answers."""
    n = _same_length(pred_answers, answers)
    return sum(p in a for p, a in zip(pred_answers, answers)) / n


def nlvr2_accuracy(pred: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of NLVR2 pairs whose predicted class (0 False, 1 True) equals the label."""
    p = np.asarray(pred).astype(np.int64).reshape(-1)
    t = np.asarray(labels).astype(np.int64).reshape(-1)
    _same_length(p, t)
    return float((p == t).mean())


def retrieval_recall(scores, text_to_image: Sequence[int]) -> Dict[str, float]:
    """Image→text and text→image recall@1/5/10, as the published `compute_irtr_recall`.

    `scores` is [n_images, n_texts] (image · text); `text_to_image[j]` is the image
    row of caption j. tr_rK: per image, whether any of its captions is among the K
    best texts of its row. ir_rK: per caption, whether its image is among the K best
    images of its column. Ties are broken by `torch.topk`, called once per K and in
    the dtype given, as the reference does; the means are taken in float32. Where
    fewer than K candidates exist (the reference would fail) all of them count.
    """
    s = torch.as_tensor(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be [n_images, n_texts], got shape {tuple(s.shape)}")
    n_images, n_texts = s.shape
    if n_images == 0 or n_texts == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    text_img = torch.as_tensor(text_to_image, dtype=torch.long).reshape(-1).to(s.device)
    if text_img.numel() != n_texts:
        raise ValueError(f"{n_texts} captions in scores but {text_img.numel()} in text_to_image")
    if text_img.min() < 0 or text_img.max() >= n_images:
        raise ValueError(f"text_to_image must hold image rows in [0, {n_images})")
    image_ids = torch.arange(n_images, device=s.device)

    ir: Dict[str, float] = {}
    tr: Dict[str, float] = {}
    for k in RECALL_KS:
        best_texts = s.topk(min(k, n_texts), dim=1).indices  # [n_images, k]
        hit = text_img[best_texts] == image_ids.unsqueeze(1)
        tr[f"tr_r{k}"] = hit.float().max(dim=1).values.mean().item()

        best_images = s.topk(min(k, n_images), dim=0).indices  # [k, n_texts]
        hit = image_ids[best_images] == text_img.unsqueeze(0)
        ir[f"ir_r{k}"] = hit.float().max(dim=0).values.mean().item()
    return {**ir, **tr}


@dataclass
class LatencyStats:
    """Per-batch forward times (seconds) and batch sizes, summarised in milliseconds."""

    times_s: List[float] = field(default_factory=list)
    batch_sizes: List[int] = field(default_factory=list)

    def add(self, seconds: float, samples: int) -> None:
        if seconds < 0 or samples < 0:
            raise ValueError(f"negative latency sample: {seconds} s, {samples} samples")
        self.times_s.append(float(seconds))
        self.batch_sizes.append(int(samples))

    def summary(self, wall_s: Optional[float] = None) -> Dict[str, float]:
        """mean/p50/p90/p99/min/max in ms, counts, and samples_per_s when the wall time is given."""
        if not self.times_s:
            raise ValueError("no batches recorded")
        out: Dict[str, float] = {f"{k}_ms": v for k, v in percentiles_ms(self.times_s).items() if k != "std"}
        out.update(batches=len(self.times_s), samples=sum(self.batch_sizes))
        if wall_s is not None:
            if wall_s <= 0:
                raise ValueError(f"wall time must be positive, got {wall_s}")
            out["samples_per_s"] = out["samples"] / wall_s
        return out


def percentiles_ms(seconds: Sequence[float]) -> Dict[str, float]:
    """mean, p50, p90, p99, min, max and std of durations given in seconds, in milliseconds."""
    if not len(seconds):
        raise ValueError("no durations to summarise")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": float(ms.min()), "max": float(ms.max()), "std": float(ms.std())}


def _same_length(*seqs) -> int:
    lengths = {len(s) for s in seqs}
    if len(lengths) != 1:
        raise ValueError(f"inputs differ in length: {[len(s) for s in seqs]}")
    n = lengths.pop()
    if n == 0:
        raise ValueError("no items to score")
    return n
