"""Evaluation metrics, as seqio metric functions `metric_fn(targets, predictions) -> {name: float}` (or
`metric_fn(targets, scores)` for metrics of log-likelihood scores).

Closed-book QA: exact match and token F1, each the maximum over a question's gold answers and averaged over the
questions, reported x100, after one of two normalisations:

    SQuAD      lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace
    TriviaQA   the same, but punctuation, the quote marks ‘ ’ ´ ` and underscores become spaces

so "Mary-Kate Olsen" against "mary kate olsen" scores SQuAD EM 0 and F1 40 ("marykate olsen"), TriviaQA EM 100.
The scores equal the `t5` package's (t5.evaluation.metrics.squad / trivia_qa, qa_utils; tests/test_metrics.py
checks edge cases against values computed with t5 0.9.4), including its rules that punctuation means ASCII
punctuation only (accents, "–" and "。" stay), and that a prediction and an answer that both normalise to nothing
("", "the", "---") are an exact match with F1 0. Deliberately unlike t5:

    - a target that is one string is one answer (t5 takes each of its characters for an answer);
    - a question without gold answers is an error naming it (t5: "max() arg is an empty sequence");
    - no questions at all is an error (t5 returns NaN).

A task's targets carry all of a question's answers through `qa_postprocessor`.

Classification: `accuracy` (x100) of predictions equal to their targets; `rank_classification` (x100) of examples
whose best-scored answer choice is correct, each choice a row scored by the log-likelihood of its targets (T0's
zero-shot evaluation), the rows' targets made by `rank_classification_postprocessor`.
"""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_TRIVIA_QA_SPACED = frozenset(string.punctuation + "‘’´")  # string.punctuation has ` and _


def _drop_articles_and_collapse_whitespace(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_squad(text: str) -> str:
    """SQuAD v1.1's answer normalisation: "The Mary-Kate  Olsen!" -> "marykate olsen"."""
    return _drop_articles_and_collapse_whitespace("".join(c for c in text.lower() if c not in _PUNCTUATION))


def normalize_trivia_qa(text: str) -> str:
    """TriviaQA's answer normalisation: "The Mary-Kate  Olsen!" -> "mary kate olsen"."""
    return _drop_articles_and_collapse_whitespace("".join(" " if c in _TRIVIA_QA_SPACED else c for c in text.lower()))


def _token_f1(prediction: str, answer: str) -> float:
    """Token F1 of two normalised texts; 0 when they share no token, even when both are empty (as t5's)."""
    prediction_tokens, answer_tokens = prediction.split(), answer.split()
    common = sum((collections.Counter(prediction_tokens) & collections.Counter(answer_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction_tokens), common / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(targets: Sequence[str | Sequence[str]], predictions: Sequence[str],
               normalize: Callable[[str], str]) -> dict[str, float]:
    """{"em", "f1"} x100: the mean over questions of the best score against any of the question's answers.

    Args:
      targets: per question its gold answers (a sequence of strings, or one string: one answer).
      predictions: per question the predicted answer.
      normalize: the normalisation of answers and predictions (normalize_squad, normalize_trivia_qa).

    Raises:
      ValueError: the counts differ, there are no questions, or a question has no gold answers.
    """
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")
    if not targets:
        raise ValueError("No predictions to score.")
    exact, f1 = [], []
    for question, (answers, prediction) in enumerate(zip(targets, predictions)):
        answers = [answers] if isinstance(answers, str) else list(answers)
        if not answers:
            raise ValueError(f"Question {question} has no gold answers (prediction {prediction!r}).")
        normalized_prediction = normalize(prediction)
        normalized_answers = [normalize(answer) for answer in answers]
        exact.append(max(float(normalized_prediction == answer) for answer in normalized_answers))
        f1.append(max(_token_f1(normalized_prediction, answer) for answer in normalized_answers))
    # The mean first, then x100, as t5 does: the same float to the last bit (100 / 3 and 100 * (1 / 3) differ).
    return {"em": float(np.mean(exact)) * 100, "f1": float(np.mean(f1)) * 100}


def squad(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """Exact match and token F1 (x100) with SQuAD's normalisation (Natural Questions, WebQuestions)."""
    return qa_metrics(targets, predictions, normalize_squad)


def trivia_qa(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """Exact match and token F1 (x100) with TriviaQA's normalisation."""
    return qa_metrics(targets, predictions, normalize_trivia_qa)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def qa_postprocessor(output: str, example: Mapping[str, Any] | None = None, is_target: bool = False):
    """A seqio postprocess_fn: a target becomes all of its example's answers (the "answers" feature, a list of
    strings or bytes); a prediction stays as it is."""
    if is_target:
        if example is None or "answers" not in example:
            raise ValueError("qa_postprocessor needs the example's 'answers' feature to postprocess a target.")
        return [_text(answer) for answer in example["answers"]]
    return output


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """{"accuracy"} x100: the share of predictions equal to their target (after stripping whitespace)."""
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")
    if not targets:
        raise ValueError("No predictions to score.")
    return {"accuracy": 100 * sum(t.strip() == p.strip() for t, p in zip(targets, predictions)) / len(targets)}


# ---------------------------------------------------------------------------------------------------------------
# Rank classification: each answer choice of an example is one scored row (preprocessors.rank_classification)


class ScoredChoice(NamedTuple):
    """What rank classification needs of one row: which example and choice it is, and whether it is correct."""

    example: int
    choice: int
    num_choices: int
    is_correct: bool


def rank_classification_postprocessor(output: Any, example: Mapping[str, Any] | None = None,
                                      is_target: bool = False):
    """A seqio postprocess_fn: a target becomes its row's `ScoredChoice` (from the `idx`, `num_choices` and
    `is_correct` features); a prediction stays as it is."""
    if not is_target:
        return output
    if example is None or not {"idx", "num_choices", "is_correct"} <= set(example):
        raise ValueError("rank_classification_postprocessor needs the example's 'idx', 'num_choices' and "
                         "'is_correct' features (preprocessors.rank_classification makes them).")
    example_index, choice_index = (int(i) for i in example["idx"])
    return ScoredChoice(example_index, choice_index, int(example["num_choices"]), bool(example["is_correct"]))


def rank_classification(targets: Sequence[ScoredChoice], scores: Sequence[float]) -> dict[str, float]:
    """{"accuracy"} x100 of rank classification: an example counts as correct when the choice with the highest
    score (the first of equal ones) is a correct one.

    Args:
      targets: per row, its `ScoredChoice` (rank_classification_postprocessor).
      scores: per row, the log-likelihood of its choice.

    Raises:
      ValueError: an example does not have all its choices scored (e.g. an evaluation cut after `num_examples`
        rows, mid-example), or has no correct choice.
    """
    if len(targets) != len(scores):
        raise ValueError(f"{len(targets)} targets but {len(scores)} scores.")
    if not targets:
        raise ValueError("No scores to rank.")
    choices_of = collections.defaultdict(list)
    for target, score in zip(targets, scores):
        choices_of[target.example].append((target.choice, float(score), target))
    correct = 0
    for example, choices in choices_of.items():
        expected = choices[0][2].num_choices
        if sorted(choice for choice, _, _ in choices) != list(range(expected)):
            raise ValueError(f"Example {example} has the choices {sorted(c for c, _, _ in choices)} scored, but it has "
                             f"{expected}; evaluate whole examples (a num_examples cut mid-example leaves some out).")
        if not any(target.is_correct for _, _, target in choices):
            raise ValueError(f"Example {example} has no correct choice among its {expected}.")
        best = max(sorted(choices, key=lambda c: c[0]), key=lambda c: c[1])
        correct += best[2].is_correct
    return {"accuracy": 100 * correct / len(choices_of)}
