"""Task metrics: every one is ``metric(predictions, references) -> float`` in [0, 100].

Owns scoring of generated text against references: corpus BLEU (sacreBLEU,
default 13a tokenizer), mean ROUGE-L F1 (rouge-score, Porter stemmer),
exact-match accuracy on the last number (math) and on a normalised label
(classification), plus ``answer_nll`` (mean negative log-likelihood per
completion token, in nats) from per-example token log-probs computed elsewhere.
Invariants: predictions and references are equal-length, non-empty lists of
str; no model or torch here.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence

_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references; they must pair up")
    if not predictions:
        raise ValueError("no predictions to score")
    for p in list(predictions) + list(references):
        if not isinstance(p, str):
            raise ValueError(f"predictions and references must be str, got {type(p).__name__}")


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus BLEU (one reference per example), 0-100."""
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over examples (rouge-score, stemmed), times 100."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return 100.0 * sum(scores) / len(scores)


def last_number(text: str) -> float | None:
    """The last number in ``text`` ('1,234.5' -> 1234.5), or None."""
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def exact_match_number(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percent of predictions whose last number equals the reference's last number."""
    _check(predictions, references)
    hits = 0
    for pred, ref in zip(predictions, references):
        want, got = last_number(ref), last_number(pred)
        if want is None:
            raise ValueError(f"reference {ref!r} contains no number")
        hits += got is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=1e-6)
    return 100.0 * hits / len(predictions)


def normalize_label(text: str) -> str:
    """Lowercase, drop surrounding whitespace/punctuation, collapse inner spaces."""
    return " ".join(text.lower().strip().strip(string.punctuation + " \n\t").split())


def exact_match_label(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percent of predictions equal to the reference label after ``normalize_label``."""
    _check(predictions, references)
    hits = sum(normalize_label(p) == normalize_label(r) for p, r in zip(predictions, references))
    return 100.0 * hits / len(predictions)


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "bleu": bleu,
    "rougeL": rouge_l,
    "exact_match_number": exact_match_number,
    "exact_match_label": exact_match_label,
}


def compute_metric(name: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """Score with the metric called ``name`` (a key of ``METRICS``)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name](predictions, references)


def answer_nll(token_logprobs: Sequence[Sequence[float]]) -> float:
    """Mean NLL per completion token (nats), pooled over all tokens of all examples.

    ``token_logprobs[i][j]`` is log p(completion token j of example i | prefix),
    natural log, as the model assigned it under teacher forcing. Long answers
    weigh by their token count (sum of -logprob / total tokens).
    """
    total, count = 0.0, 0
    for i, example in enumerate(token_logprobs):
        if len(example) == 0:
            raise ValueError(f"example {i} has no completion tokens; every example needs at least one")
        for lp in example:
            lp = float(lp)
            if math.isnan(lp) or lp > 1e-6:
                raise ValueError(f"example {i}: log-prob {lp} is not a log-probability (must be <= 0)")
            total -= lp
            count += 1
    if count == 0:
        raise ValueError("no examples given to answer_nll")
    return total / count
