"""Metrics against sacrebleu / rouge-score computed directly, and hand-checked cases."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from inlaid.tasks.metrics import (
    METRICS,
    answer_nll,
    bleu,
    compute_metric,
    exact_match_label,
    exact_match_number,
    last_number,
    rouge_l,
)

PREDS = ["The cat sat on the mat.", "Il fait beau aujourd'hui", "a completely different sentence here"]
REFS = ["The cat is sitting on the mat.", "Il fait très beau aujourd'hui", "nothing in common"]


def test_bleu_matches_sacrebleu_corpus_score() -> None:
    want = sacrebleu.corpus_bleu(PREDS, [REFS]).score
    assert 0.0 < want < 100.0
    assert bleu(PREDS, REFS) == pytest.approx(want, abs=1e-9)


def test_bleu_hand_checked_extremes() -> None:
    assert bleu(["the quick brown fox jumps"], ["the quick brown fox jumps"]) == pytest.approx(100.0)
    assert bleu(["xyz"], ["the quick brown fox jumps"]) == pytest.approx(0.0)


def test_rouge_l_matches_rouge_score_mean_f1() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = 100 * sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDS, REFS)) / len(PREDS)
    assert rouge_l(PREDS, REFS) == pytest.approx(want, abs=1e-9)


def test_rouge_l_hand_checked() -> None:
    # LCS("the cat sat", "the cat sat on the mat") = 3 tokens: P = 1, R = 1/2, F1 = 2/3.
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    # Mean over examples, not pooled: (100 + 0) / 2.
    assert rouge_l(["same words", "abc"], ["same words", "xyz"]) == pytest.approx(50.0)


def test_last_number_extraction() -> None:
    assert last_number("so 3 apples + 4 = 7.") == 7.0
    assert last_number("The answer is 1,234.5 dollars") == 1234.5
    assert last_number("it dropped to -12") == -12.0
    assert last_number("no digits") is None


def test_exact_match_number_hand_checked() -> None:
    preds = ["The answer is 42.", "#### 1,000", "I think 7 or maybe 8", "none", "18.0"]
    refs = ["42", "1000", "7", "3", "18"]
    # hits: 42, 1000, (last number 8 != 7), none, 18.0 == 18 -> 3 of 5
    assert exact_match_number(preds, refs) == pytest.approx(60.0)


def test_exact_match_label_normalizes_case_space_punctuation() -> None:
    preds = ["Computers.", "  food\n", "law and order", "LOVE!"]
    refs = ["computers", "food", "law", "science"]
    assert exact_match_label(preds, refs) == pytest.approx(50.0)


def test_answer_nll_is_token_weighted_mean() -> None:
    lp = [[math.log(0.5)], [math.log(0.25), math.log(0.25), math.log(1.0)]]
    want = (math.log(2) + 2 * math.log(4) + 0.0) / 4
    assert answer_nll(lp) == pytest.approx(want)


@pytest.mark.parametrize("bad", [[], [[]], [[0.5]], [[float("nan")]]])
def test_answer_nll_rejects_bad_input(bad: list[list[float]]) -> None:
    with pytest.raises(ValueError):
        answer_nll(bad)


def test_metric_input_errors() -> None:
    with pytest.raises(ValueError, match="pair up"):
        bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no predictions"):
        rouge_l([], [])
    with pytest.raises(ValueError, match="contains no number"):
        exact_match_number(["1"], ["no number"])
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metric("accuracy", ["a"], ["a"])
    assert compute_metric("exact_match_label", ["A"], ["a"]) == 100.0
    assert set(METRICS) == {"bleu", "rougeL", "exact_match_number", "exact_match_label"}
