"""QA metrics: SQuAD and TriviaQA normalisation, exact match and token F1 over all gold answers, x100, equal to the
`t5` package's (t5.evaluation.metrics.squad / trivia_qa), and the deliberate differences from it."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from t5x_lite import metrics


def test_the_worked_example():
    assert metrics.squad([["Mary-Kate Olsen"]], ["mary kate olsen"]) == {"em": 0.0, "f1": pytest.approx(40.0)}
    assert metrics.trivia_qa([["Mary-Kate Olsen"]], ["mary kate olsen"]) == {"em": 100.0, "f1": 100.0}


# The normalised texts are t5==0.9.4's t5.evaluation.qa_utils.normalize_squad / normalize_trivia_qa of the inputs.
@pytest.mark.parametrize("text, squad, trivia_qa", [
    ("The Mary-Kate  Olsen!", "marykate olsen", "mary kate olsen"),
    ("an apple, a pear and THE plum", "apple pear and plum", "apple pear and plum"),
    ("‘Quoted’ ´acute´ `back` snake_case", "‘quoted’ ´acute´ back snakecase", "quoted acute back snake case"),
    ("theatre Anthem", "theatre anthem", "theatre anthem"),  # articles only as whole words
    ("---", "", ""),
    ("a.k.a. Prince", "aka prince", "k prince"),  # TriviaQA's spaces leave 'a' a whole word: an article
    ("The-End", "theend", "end"),
    ("Don't", "dont", "don t"),
    ("$1,000,000", "1000000", "1 000 000"),
    ("Zoë", "zoë", "zoë"),  # accents stay
    ("İstanbul", "i\u0307stanbul", "i\u0307stanbul"),  # str.lower: a dotted i is two code points
    ("東京。", "東京。", "東京。"),  # only ASCII punctuation (and TriviaQA's quote marks) goes
    ("¿Qué?", "¿qué", "¿qué"),
    ("New\u00a0York", "new york", "new york"),  # str.split: any Unicode whitespace separates
])
def test_normalisation(text, squad, trivia_qa):
    assert metrics.normalize_squad(text) == squad
    assert metrics.normalize_trivia_qa(text) == trivia_qa


# Expected (em, f1) values computed with t5==0.9.4 (pip install --no-deps t5): t5.evaluation.metrics.squad and
# trivia_qa, i.e. qa_utils.normalize_* of every answer and prediction, then qa_utils.qa_metrics, on these inputs.
T5_SCORES = [
    # answers, prediction, squad (em, f1), trivia_qa (em, f1)
    pytest.param(["Paris"], "", (0.0, 0.0), (0.0, 0.0), id="empty prediction"),
    pytest.param([""], "", (100.0, 0.0), (100.0, 0.0), id="empty prediction and answer: EM 100, F1 0"),
    pytest.param([" "], "", (100.0, 0.0), (100.0, 0.0), id="whitespace answer"),
    pytest.param(["The"], "", (100.0, 0.0), (100.0, 0.0), id="an answer that is an article"),
    pytest.param(["---"], ")", (100.0, 0.0), (100.0, 0.0), id="punctuation on both sides"),
    pytest.param(["---"], "many", (0.0, 0.0), (0.0, 0.0), id="punctuation answer"),
    pytest.param(["Zoë Saldaña"], "zoe saldana", (0.0, 0.0), (0.0, 0.0), id="accents count"),
    pytest.param(["Zoë"], "ZOË", (100.0, 100.0), (100.0, 100.0), id="accented case"),
    pytest.param(["İstanbul"], "istanbul", (0.0, 0.0), (0.0, 0.0), id="dotted capital I"),
    pytest.param(["東京"], "東京。", (0.0, 0.0), (0.0, 0.0), id="CJK full stop stays"),
    pytest.param(["Αθήνα"], "ΑΘΉΝΑ", (100.0, 100.0), (100.0, 100.0), id="Greek case"),
    pytest.param(["Rock ’n’ Roll"], "rock n roll", (0.0, 66.66666666666666), (100.0, 100.0), id="curly quotes"),
    pytest.param(["Jay-Z"], "jay–z", (0.0, 0.0), (0.0, 0.0), id="en dash is not punctuation"),
    pytest.param(["The Beatles"], "beatles", (100.0, 100.0), (100.0, 100.0), id="leading article"),
    pytest.param(["Anne of the Island"], "anne of island", (100.0, 100.0), (100.0, 100.0), id="inner article"),
    pytest.param(["The-End"], "end", (0.0, 0.0), (100.0, 100.0), id="hyphenated article"),
    pytest.param(["a.k.a. Prince"], "k prince", (0.0, 50.0), (100.0, 100.0), id="dotted letters"),
    pytest.param(["Don't Stop"], "dont stop", (100.0, 100.0), (0.0, 40.0), id="apostrophe"),
    pytest.param(["$1,000,000"], "1000000", (100.0, 100.0), (0.0, 0.0), id="number punctuation"),
    pytest.param(["snake_case"], "snake case", (0.0, 0.0), (100.0, 100.0), id="underscore"),
    pytest.param(["New York City"], "  New\tYork\n City ", (100.0, 100.0), (100.0, 100.0), id="whitespace"),
    pytest.param(["New York"], "New\u00a0York", (100.0, 100.0), (100.0, 100.0), id="no-break space"),
    pytest.param(["Obama", "Barack Hussein Obama"], "Barack Obama", (0.0, 80.0), (0.0, 80.0),
                 id="F1 is the best over answers"),
    pytest.param(["Barack Obama", "Obama"], "obama", (100.0, 100.0), (100.0, 100.0), id="EM is the best over answers"),
    pytest.param(["cat"], "cat cat cat", (0.0, 50.0), (0.0, 50.0), id="repeated tokens count once"),
    pytest.param(["PARIS"], "paris", (100.0, 100.0), (100.0, 100.0), id="case"),
]


@pytest.mark.parametrize("answers, prediction, squad, trivia_qa", T5_SCORES)
def test_scores_equal_the_t5_packages(answers, prediction, squad, trivia_qa):
    assert metrics.squad([answers], [prediction]) == {"em": squad[0], "f1": squad[1]}
    assert metrics.trivia_qa([answers], [prediction]) == {"em": trivia_qa[0], "f1": trivia_qa[1]}


def test_best_answer_counts_and_questions_average_as_t5_does():
    targets = [["Paris", "City of Light"], ["1972"], ["Bob Dylan"]]
    predictions = ["city of light", "December 1972", "Dylan"]
    # F1: 1; 2*(1/2*1)/(1/2+1) = 2/3; 2*(1*1/2)/(1+1/2) = 2/3. t5==0.9.4: np.mean over questions, then x100, which
    # rounds 1/3 to 33.33333333333333 (100 / 3 would be 33.333333333333336).
    assert metrics.squad(targets, predictions) == {"em": 33.33333333333333, "f1": 77.77777777777777}


def test_a_single_string_target_is_one_answer():
    """Deliberately unlike t5, whose metrics iterate over a string target's characters as its answers."""
    assert metrics.squad(["Paris"], ["paris."]) == {"em": 100.0, "f1": 100.0}


def test_errors():
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.squad([["a"], ["b"]], ["a"])
    # t5 raises "max() arg is an empty sequence" here; we name the question.
    with pytest.raises(ValueError, match=r"Question 1 has no gold answers \(prediction 'a'\)"):
        metrics.trivia_qa([["b"], []], ["b", "a"])
    # t5 returns NaN for no questions (numpy's mean of nothing).
    with pytest.raises(ValueError, match="No predictions to score"):
        metrics.squad([], [])


def test_postprocessor_gives_all_answers_for_targets():
    example = {"answers": np.array([b"Ann", "Zo\u00eb".encode()], dtype=object)}
    assert metrics.qa_postprocessor("Ann", example=example, is_target=True) == ["Ann", "Zo\u00eb"]
    assert metrics.qa_postprocessor("a prediction", example=example) == "a prediction"
    with pytest.raises(ValueError, match="'answers' feature"):
        metrics.qa_postprocessor("Ann", example={}, is_target=True)


answers = st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=4)


@given(st.lists(answers, min_size=1, max_size=6), st.data())
def test_gold_answers_score_100_unless_they_normalise_to_nothing(targets, data):
    """A gold answer as the prediction is an exact match; its F1 is 100 when it has a token after normalisation and
    0 when it has none (t5's token F1 of two empty texts is 0)."""
    for metric, normalize in ((metrics.squad, metrics.normalize_squad),
                              (metrics.trivia_qa, metrics.normalize_trivia_qa)):
        scores = metric(targets, [answers[0] for answers in targets])
        assert scores["em"] == 100.0
        assert math.isclose(scores["f1"], 100 * np.mean([bool(normalize(answers[0])) for answers in targets]))
        predictions = [data.draw(st.text(max_size=12)) for _ in targets]
        scores = metric(targets, predictions)
        assert 0 <= scores["em"] <= 100 and 0 <= scores["f1"] <= 100
