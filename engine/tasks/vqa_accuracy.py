"""The official VQA accuracy of visualqa.org: answers normalised, then min(1, agreeing humans / 3) averaged over
the ten leave-one-out subsets of the human answers.

Written from the published description of the metric and checked against the behaviour of the official
evaluation script (PythonEvaluationTools/vqaEvaluation/vqaEval.py of GT-Vision-Lab/VQA), including its quirks,
so that the numbers here equal the ones the official tools and the EvalAI server give:

- answers are normalised only when the human answers of the question disagree; when all of them are the same
  string, the prediction is compared with it as given (after trimming whitespace);
- a punctuation mark is dropped where a space is beside it, or anywhere in an answer that holds a comma between
  two digits ("2,000" -> "2000"); elsewhere it becomes a space ("black-and-white" -> "black and white");
  apostrophes and colons are kept; a period is dropped unless a digit follows it ("3.5" stays), at most 32 times;
- then lower case, number words zero to ten (and "none") become digits, the articles a/an/the are dropped and a
  contraction written without its apostrophe gets it back ("dont" -> "don't").
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (32) where re.sub takes its count: at most 32 periods go.
_MAX_PERIODS = 32

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(("a", "an", "the"))

# Contractions restored when written with one apostrophe missing. Forms that are also plain words ("its",
# "were", "lets", "shes", "ill", ...) are left alone, and so are the "I" forms, as in the official table (whose
# capitalised keys never meet the lower-cased words).
_CONTRACTIONS = (
    "'ow's'at 'twas ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am might've mightn't "
    "mightn't've must've mustn't needn't not've o'clock oughtn't shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd "
    "who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'd've "
    "y'all'll you'd you'd've you'll you're you've"
).split()


def _restorations() -> Dict[str, str]:
    table = {}
    for full in _CONTRACTIONS:
        for i, char in enumerate(full):
            if char == "'":
                table[full[:i] + full[i + 1:]] = full
    # The official table has this one backwards; kept so that the scores agree.
    table["somebody'd"] = "somebodyd"
    return table


CONTRACTIONS: Dict[str, str] = _restorations()


def _trim(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    drop_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        dropped = drop_all or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if dropped else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def _words(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer in the official normal form (what it is compared as when the human answers disagree)."""
    return _words(_punctuation(_trim(answer)))


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
