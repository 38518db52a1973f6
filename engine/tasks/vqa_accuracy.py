"""The official VQA accuracy of visualqa.org: answers normalised, then min(1, agreeing humans / 3) averaged over
the ten leave-one-out subsets of the human answers.

Written from the published description of the metric and checked against the behaviour of the official
evaluation script (PythonEvaluationTools/vqaEvaluation/vqaEval.py of GT-Vision-Lab/VQA), including its quirks,
so that the numbers here equal the ones the official tools and the EvalAI server give:

- answers are normalised only when the human answers of the question disagree; when all of them are the same
  string, the prediction is compared with it as given (after trimming whitespace);
- the normal form is engine.data.answers.normalize_answer, the same rules the label table is built with: a
  punctuation mark is dropped where a space is beside it, or anywhere in an answer that holds a comma between
  two digits ("2,000" -> "2000"); elsewhere it becomes a space ("black-and-white" -> "black and white");
  apostrophes and colons are kept; a period is dropped unless a digit follows it ("3.5" stays), at most 32 times;
- then lower case, number words zero to ten (and "none") become digits, the articles a/an/the are dropped and a
  contraction written without its apostrophe gets it back ("dont" -> "don't").
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

from ..data.answers import normalize_answer


def _trim(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official accuracy of one prediction against the human answers (ten in VQAv2), in [0, 1]."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer to be scored")
    humans = [_trim(a) for a in human_answers]
    predicted = _trim(prediction)
    if len(set(humans)) > 1:
        humans = [normalize_answer(a) for a in humans]
        predicted = normalize_answer(predicted)
    agreeing = sum(h == predicted for h in humans)
    # Leaving out human i leaves `agreeing` others that agree, one fewer when i itself agreed.
    per_subset = [min(1.0, float(agreeing - (h == predicted)) / 3) for h in humans]
    return float(sum(per_subset)) / len(per_subset)


def accuracy_by_type(scored: Iterable[Tuple[float, str]]) -> Tuple[float, Dict[str, float]]:
    """(mean accuracy, mean accuracy per type) over (accuracy, answer type) pairs."""
    by_type: Mapping[str, List[float]] = defaultdict(list)
    everything: List[float] = []
    for accuracy, kind in scored:
        everything.append(accuracy)
        by_type[kind].append(accuracy)
    if not everything:
        raise ValueError("no questions to score")
    return (float(sum(everything)) / len(everything),
            {kind: float(sum(values)) / len(values) for kind, values in sorted(by_type.items())})
