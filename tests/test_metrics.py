"""QA metrics: SQuAD and TriviaQA normalisation, exact match and token F1 over all gold answers, x100."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from t5x_lite import metrics


def test_the_worked_example():
    assert metrics.squad([["Mary-Kate Olsen"]], ["mary kate olsen"]) == {"em": 0.0, "f1": pytest.approx(40.0)}
    assert metrics.trivia_qa([["Mary-Kate Olsen"]], ["mary kate olsen"]) == {"em": 100.0, "f1": 100.0}


@pytest.mark.parametrize("text, squad, trivia_qa", [
    ("The Mary-Kate  Olsen!", "marykate olsen", "mary kate olsen"),
    ("an apple, a pear and THE plum", "apple pear and plum", "apple pear and plum"),
    ("‘Quoted’ ´acute´ `back` snake_case", "‘quoted’ ´acute´ back snakecase", "quoted acute back snake case"),
    ("theatre Anthem", "theatre anthem", "theatre anthem"),  # articles only as whole words
    ("---", "", ""),
])
def test_normalisation(text, squad, trivia_qa):
    assert metrics.normalize_squad(text) == squad
    assert metrics.normalize_trivia_qa(text) == trivia_qa


def test_best_answer_counts_and_questions_average():
    targets = [["Paris", "City of Light"], ["1972"], ["Bob Dylan"]]
    predictions = ["city of light", "December 1972", "Dylan"]
    scores = metrics.squad(targets, predictions)
    assert scores["em"] == pytest.approx(100 / 3)
    # F1: 1; 2*(1/2*1)/(1/2+1) = 2/3; 2*(1*1/2)/(1+1/2) = 2/3
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3) / 3)


def test_a_single_string_target_is_one_answer():
    assert metrics.squad(["Paris"], ["paris."]) == {"em": 100.0, "f1": 100.0}


def test_an_answer_that_normalises_to_nothing():
    assert metrics.squad([["---"]], [")"]) == {"em": 100.0, "f1": 100.0}
    assert metrics.squad([["---"]], ["many"]) == {"em": 0.0, "f1": 0.0}


def test_errors():
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.squad([["a"], ["b"]], ["a"])
    with pytest.raises(ValueError, match="no gold answers"):
        metrics.trivia_qa([[]], ["a"])
    with pytest.raises(ValueError, match="No predictions"):
        metrics.squad([], [])


def test_postprocessor_gives_all_answers_for_targets():
    example = {"answers": np.array([b"Ann", "Zo\u00eb".encode()], dtype=object)}
    assert metrics.qa_postprocessor("Ann", example=example, is_target=True) == ["Ann", "Zo\u00eb"]
    assert metrics.qa_postprocessor("a prediction", example=example) == "a prediction"
    with pytest.raises(ValueError, match="'answers' feature"):
        metrics.qa_postprocessor("Ann", example={}, is_target=True)


answers = st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=4)


@given(st.lists(answers, min_size=1, max_size=6), st.data())
def test_gold_answers_score_100_and_f1_bounds_em(targets, data):
    for metric in (metrics.squad, metrics.trivia_qa):
        assert metric(targets, [answers[0] for answers in targets]) == {"em": 100.0, "f1": 100.0}
        predictions = [data.draw(st.text(max_size=12)) for _ in targets]
        scores = metric(targets, predictions)
        assert 0 <= scores["em"] <= scores["f1"] + 1e-9 <= 100 + 1e-9
