"""VQA answer normalisation, the answer label table and annotator-count scores.

Normalisation follows the official VQA evaluation rules as the published VLMo
writer applies them, quirks included, so labels come out identical.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

# Contractions written without their apostrophes map back to the canonical
# form. Forms with one apostrophe are matched with it dropped; forms with
# several are matched with any single one of them dropped.
_ONE_APOSTROPHE = """
ain't aren't can't couldn't could've didn't doesn't don't hadn't hasn't haven't
he'd he's how'd how'll how's isn't it'd it'll ma'am mightn't might've mustn't
must've needn't not've o'clock oughtn't shan't should've shouldn't somebody'll
somebody's someone'd someone'll someone's something'd something'll that's there'd
there're there's they'd they'll they're they've 'twas wasn't we've weren't
what'll what're what's what've when's where'd where's where've who'd who'll who's
who've why'll why're why's won't would've wouldn't y'all you'd you'll you're you've
""".split()
_SEVERAL_APOSTROPHES = """
couldn't've hadn't've he'd've it'd've mightn't've 'ow's'at she'd've shouldn't've
somebody'd've someone'd've something'd've there'd've they'd've we'd've who'd've
wouldn't've y'all'll y'all'd've you'd've
""".split()


def _contractions() -> dict:
    table = {form.replace("'", ""): form for form in _ONE_APOSTROPHE}
    for form in _SEVERAL_APOSTROPHES:
        for i, char in enumerate(form):
            if char == "'":
                table[form[:i] + form[i + 1:]] = form
    # The published table maps this one the wrong way round; kept for identical labels.
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _contractions()
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit. (The published pattern also carries a
# look-ahead for "<=digit", which can never match at a period: a no-op.)
_PERIOD = re.compile(r"\.(?!\d)")
# The published call passes re.UNICODE (32) where `count` goes, so only the
# first 32 periods are removed.
_PERIOD_LIMIT = 32

MIN_ANSWER_COUNT = 9


def normalize_answer(answer: str) -> str:
    """The normalised form of one answer string."""
    drop = _DIGIT_COMMA_DIGIT.search(answer) is not None
    text = answer
    for mark in _PUNCTUATION:
        # Marks touching a space (in the original string) vanish, others become spaces.
        if drop or mark + " " in answer or " " + mark in answer:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text, count=_PERIOD_LIMIT)
    words = (_NUMBER_WORDS.get(word, word) for word in text.lower().split())
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words).replace(",", "")


def answer_labels(major_answers: Iterable[str]) -> list:
    """Label order: normalised majority answers seen >= 9 times, by first appearance."""
    counts = Counter(normalize_answer(answer) for answer in major_answers)
    return [answer for answer, count in counts.items() if count >= MIN_ANSWER_COUNT]


def answer_score(count: int) -> float:
    """Soft score of an answer given by `count` annotators."""
    return {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}.get(count, 1.0)


def score_answers(answers: Iterable[str], label_of: dict) -> tuple:
    """(labels, scores) of one question's raw annotator answers.

    As in the published writer the raw strings (not normalised) are looked up,
    in order of first appearance; answers without a label are dropped.
    """
    counts = Counter(answers)
    labels = [label_of[answer] for answer in counts if answer in label_of]
    scores = [answer_score(counts[answer]) for answer in counts if answer in label_of]
    return labels, scores
