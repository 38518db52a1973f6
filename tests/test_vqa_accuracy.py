"""The official VQA accuracy on hand-worked cases: normalisation, the leave-one-out average, per answer type."""
from __future__ import annotations

import pytest

from engine.data.answers import normalize_answer
from engine.tasks.vqa_accuracy import accuracy_by_type, question_accuracy

@pytest.mark.parametrize("raw, normal", [
    ("dont", "don't"),                      # contraction restored
    ("Couldnt've", "couldn't've"),          # one apostrophe missing of two
    ("its", "its"),                         # also a plain word: left alone
    ("two", "2"), ("None", "0"), ("ten dogs", "10 dogs"),
    ("a red", "red"), ("The Cat", "cat"), ("an apple", "apple"),
    ("Yes!", "yes"), ("yes, it is", "yes it is"),        # a mark beside a space is dropped
    ("black-and-white", "black and white"),             # a mark between words becomes a space
    ("2,000", "2000"), ("2,000-3,000", "20003000"),      # a comma between digits: every mark dropped
    ("3.5", "3.5"), ("u.s.", "us"), ("10:30", "10:30"),  # periods go unless a digit follows; colons stay
    ("  Left\tside\n", "left side"),
])
def test_normalisation(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal

def test_more_than_32_periods_keep_the_rest() -> None:
    # The official script caps the period removal at 32 (re.UNICODE passed as the count).
    assert normalize_answer("x" + "." * 40) == "x" + "." * 8

# Each by hand: with k of the ten humans agreeing, leaving out one of the k leaves k-1 others, leaving out one of
# the other 10-k leaves k; each subset scores min(1, agreeing/3) and the ten subsets are averaged.
@pytest.mark.parametrize("prediction, humans, expected", [
    ("dont", ["don't"] * 3 + ["no"] * 7, (3 * 2 / 3 + 7 * 1) / 10),               # 0.9
    ("two", ["2", "2", "two"] + ["3"] * 7, 0.9),                                  # "two" and "2" agree
    ("red", ["red", "red", "a red"] + ["blue"] * 7, 0.9),                         # "a red" is "red"
    ("2000", ["2,000", "2000", "2000"] + ["3000"] * 7, 0.9),                      # punctuation inside numbers
    ("cat", ["cat"] * 2 + ["dog"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),              # 0.6: two agree
    ("cat", ["cat"] + ["dog"] * 9, (1 * 0 + 9 * 1 / 3) / 10),                      # 0.3: one agrees
    ("cat", ["cat"] * 4 + ["dog"] * 6, 1.0),                                       # four agree: every subset has 3
    ("bird", ["cat"] * 4 + ["dog"] * 6, 0.0),
    ("Yes", ["yes"] * 10, 0.0),     # all humans agree: compared as given, so "Yes" is not "yes"
    ("two", ["two"] * 10, 1.0),     # ... and "two" is not turned into "2" on one side only
    ("2", ["two"] * 10, 0.0),
])
def test_question_accuracy(prediction: str, humans: list, expected: float) -> None:
    assert question_accuracy(prediction, humans) == pytest.approx(expected, abs=1e-12)

def test_accuracy_by_answer_type() -> None:
    overall, by_type = accuracy_by_type([(1.0, "yes/no"), (0.0, "yes/no"), (0.6, "number"), (0.9, "other")])
    assert overall == pytest.approx(2.5 / 4) and by_type == pytest.approx({"yes/no": 0.5, "number": 0.6, "other": 0.9})
    with pytest.raises(ValueError):
        accuracy_by_type([])
    with pytest.raises(ValueError):
        question_accuracy("yes", [])
