"""vqa.metrics against figures derived by hand from the rules of the official vqaEval.py.

Per question (10 humans): acc = mean over the 10 leave-one-out subsets of min(1, m/3),
m = matches among the 9 others. With k of 10 humans matching, the k subsets without a
match see k-1 matches and the 10-k others see k: k=1 -> 9*(1/3)/10 = 0.3, k=2 ->
(2*(1/3) + 8*(2/3))/10 = 0.6, k=3 -> (3*(2/3) + 7*1)/10 = 0.9, k>=4 -> 1.
Normalisation (punctuation, number words, articles, contractions) applies only when the
humans disagree; whitespace is always cleaned.
"""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vqa.errors import DataError
from vqa.metrics import check_results, evaluate_results, load_results, official_round
from vqa.records import VQASplit


def make_split(cases, answer_type="other", question_type="what is the") -> VQASplit:
    """cases: [(human answers, ...)] or dicts with answers/answer_type/question_type."""
    records = []
    for qid, case in enumerate(cases, start=1):
        case = case if isinstance(case, dict) else {"answers": case}
        answers = case["answers"]
        records.append({
            "question_id": qid, "image_id": 100 + qid, "question": f"question {qid}?", "answers": list(answers),
            "answer_type": case.get("answer_type", answer_type),
            "question_type": case.get("question_type", question_type),
            "multiple_choice_answer": max(set(answers), key=answers.count),
        })
    return VQASplit("hand", records, {})


def score(prediction: str, humans: list[str]) -> float:
    """perQuestion figure (percent, 2 decimals) of one prediction."""
    metrics = evaluate_results([{"question_id": 1, "answer": prediction}], make_split([humans]))
    return metrics["perQuestion"][1]


CASES = [
    # (prediction, humans, expected %, why)
    ("yes", ["yes"] * 10, 100.0, "exact match, k=10"),
    ("Yes.", ["yes"] * 10, 0.0, "humans agree: no normalisation, 'Yes.' != 'yes'"),
    ("Yes.", ["Yes."] * 10, 100.0, "humans agree on the raw text"),
    (" yes\n", ["yes"] * 10, 100.0, "whitespace is always cleaned"),
    ("Yes.", ["yes"] * 9 + ["no"], 100.0, "disagreement: 'Yes.' -> 'yes', k=9"),
    ("two", ["2"] * 10, 0.0, "humans agree: number words are not mapped"),
    ("two", ["2"] + ["3"] * 9, 30.0, "disagreement: 'two' -> '2', k=1"),
    ("none", ["0"] * 3 + ["1"] * 7, 90.0, "'none' -> '0', k=3"),
    ("1,000", ["1000"] * 2 + ["a lot"] * 8, 60.0, "digit,digit: punctuation deleted -> '1000', k=2"),
    ("1,000", ["1000"] * 10, 0.0, "humans agree: '1,000' stays"),
    ("t-shirt", ["t shirt"] * 3 + ["shirt"] * 7, 90.0, "'-' not beside a space becomes a space, k=3"),
    ("t - shirt", ["t shirt"] * 3 + ["shirt"] * 7, 90.0, "'-' beside a space is deleted, spaces collapse"),
    ("t-shirt", ["tshirt"] * 3 + ["shirt"] * 7, 0.0, "'t shirt' != 'tshirt'"),
    ("dont", ["don't"] * 4 + ["no"] * 6, 100.0, "contraction 'dont' -> \"don't\", k=4"),
    ("don't", ["dont"] + ["no"] * 9, 30.0, "the humans' answers are normalised too, k=1"),
    ("the dog", ["dog", "a dog"] + ["cat"] * 8, 60.0, "articles dropped on both sides, k=2"),
    ("3.5", ["3.5"] * 2 + ["3"] * 8, 60.0, "a period before a digit stays, k=2"),
    ("3.5.", ["3.5"] * 2 + ["3"] * 8, 60.0, "the final period goes, the inner one stays"),
    ("35", ["3.5"] * 2 + ["3"] * 8, 0.0, "'3.5' is not '35'"),
    ("Two Dogs!", ["2 dogs"] * 5 + ["dogs"] * 5, 100.0, "case, '!' and number words together, k=5"),
    ("red", ["red", "blue", "green"], 22.22, "3 humans, k=1: (0 + 1/3 + 1/3)/3 = 2/9 = 22.222..."),
    ("red", ["red", "blue"], 16.67, "2 humans, k=1: (0 + 1/3)/2 = 1/6 = 16.666..."),
    ("purple", ["red"] * 5 + ["blue"] * 5, 0.0, "no match"),
]


@pytest.mark.parametrize("prediction, humans, expected, why", CASES, ids=[c[3] for c in CASES])
def test_per_question_accuracy_matches_hand_derivation(prediction, humans, expected, why):
    assert score(prediction, humans) == expected


def test_aggregates_per_answer_type_and_question_type():
    cases = [
        {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},  # "yes": 1
        {"answers": ["no"] * 10, "answer_type": "yes/no", "question_type": "is the"},  # "yes": 0
        {"answers": ["yes"] + ["no"] * 9, "answer_type": "yes/no", "question_type": "are there"},  # "yes": 0.3
        {"answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number", "question_type": "how many"},  # "two": 0.6
        {"answers": ["red"] * 3 + ["blue"] * 7, "answer_type": "other", "question_type": "what color"},  # 0.9
    ]
    results = [{"question_id": i, "answer": a} for i, a in enumerate(["yes", "yes", "yes", "two", "red"], start=1)]
    metrics = evaluate_results(results, make_split(cases))
    assert metrics["perQuestion"] == {1: 100.0, 2: 0.0, 3: 30.0, 4: 60.0, 5: 90.0}
    # yes/no: (1 + 0 + 0.3) / 3 = 0.4333... -> 43.33
    assert metrics["perAnswerType"] == {"yes/no": 43.33, "number": 60.0, "other": 90.0}
    assert metrics["perQuestionType"] == {"is the": 50.0, "are there": 30.0, "how many": 60.0, "what color": 90.0}
    # (1 + 0 + 0.3 + 0.6 + 0.9) / 5 = 0.56
    assert metrics["overall"] == 56.0
    assert list(metrics) == ["overall", "perAnswerType", "perQuestionType", "perQuestion"]


def test_result_order_does_not_matter():
    split = make_split([["yes"] * 10, ["no"] * 10, ["red"] * 10])
    results = [{"question_id": q, "answer": a} for q, a in ((3, "red"), (1, "no"), (2, "no"))]
    metrics = evaluate_results(results, split)
    assert metrics["perQuestion"] == {1: 0.0, 2: 100.0, 3: 100.0}
    assert metrics["overall"] == 66.67  # 2/3


@pytest.mark.parametrize("value, expected", [
    (0.125, 0.13),  # an exact half: away from zero (Python 3's round gives 0.12)
    (0.375, 0.38),
    (12.125, 12.13),
    (2.675, 2.67),  # 2.675 is 2.67499999... in binary: Python 2.7 gives 2.67 as well
    (1.005, 1.0),  # 1.00499999...
    (66.66666666666667, 66.67),
    (30.000000000000004, 30.0),
    (29.999999999999996, 30.0),
    (0.0, 0.0),
    (100.0, 100.0),
])
def test_official_round_is_python2_round(value, expected):
    assert official_round(value) == expected


def test_aggregate_rounding_sends_exact_halves_up():
    # 1 of 800 right: 100 * 1 / 800 = 0.125 exactly -> 0.13 (Python 3's round: 0.12).
    # 97 of 800 right: 12.125 exactly -> 12.13.
    for right, expected in ((1, 0.13), (97, 12.13)):
        split = make_split([["yes"] * 10] * 800, answer_type="yes/no")
        results = [{"question_id": i, "answer": "yes" if i <= right else "no"} for i in range(1, 801)]
        metrics = evaluate_results(results, split)
        assert metrics["overall"] == expected
        assert metrics["perAnswerType"] == {"yes/no": expected}
        assert metrics["perQuestionType"] == {"what is the": expected}


WORDS = ["red", "blue", "green", "circle", "2", "3", "yes", "no"]  # already normalised: rules are identity


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(WORDS), st.lists(st.sampled_from(WORDS), min_size=10, max_size=10)),
                min_size=1, max_size=12))
def test_ten_humans_give_the_five_official_levels(cases):
    split = make_split([humans for _, humans in cases])
    results = [{"question_id": i, "answer": pred} for i, (pred, _) in enumerate(cases, start=1)]
    metrics = evaluate_results(results, split)
    levels = [0.0, 30.0, 60.0, 90.0, 100.0]
    expected = {i: levels[min(humans.count(pred), 4)] for i, (pred, humans) in enumerate(cases, start=1)}
    assert metrics["perQuestion"] == expected
    exact = sum(levels[min(h.count(p), 4)] / 100 for p, h in cases) / len(cases)
    assert abs(metrics["overall"] - 100 * exact) <= 0.005 + 1e-9


# --- results files -------------------------------------------------------------------

def write(tmp_path, content) -> str:
    path = tmp_path / "results.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_load_results_reads_the_official_format(tmp_path):
    path = write(tmp_path, [{"question_id": 2, "answer": "no"}, {"question_id": 1, "answer": "yes", "extra": 1}])
    assert load_results(path, [1, 2]) == [{"question_id": 2, "answer": "no"}, {"question_id": 1, "answer": "yes"}]


def test_malformed_json_gives_line_and_column(tmp_path):
    path = write(tmp_path, '[{"question_id": 1, "answer": "yes"},\n {"question_id": 2 "answer": "no"}]')
    with pytest.raises(DataError, match=r"not valid JSON: Expecting ',' delimiter at line 2 column 20"):
        load_results(path, [1, 2])


@pytest.mark.parametrize("content, message", [
    ({"question_id": 1, "answer": "yes"}, r"expected a list .* got a JSON dict"),
    ([{"question_id": 1, "answer": "yes"}, "no"], r"results\[1\] is str, expected an object"),
    ([{"answer": "yes"}], r"results\[0\] has no field 'question_id'"),
    ([{"question_id": 1}], r"results\[0\] has no field 'answer'"),
    ([{"question_id": "1", "answer": "yes"}], r"results\[0\] field 'question_id' is '1' \(str\), expected an integer"),
    ([{"question_id": 1.0, "answer": "yes"}], r"results\[0\] field 'question_id' is 1.0 \(float\)"),
    ([{"question_id": True, "answer": "yes"}], r"results\[0\] field 'question_id' is True \(bool\)"),
    ([{"question_id": 1, "answer": "a"}, {"question_id": 2, "answer": 3}],
     r"results\[1\] field 'answer' is 3 \(int\), expected a string"),
    ([{"question_id": 1, "answer": None}], r"results\[0\] field 'answer' is None"),
])
def test_malformed_results_name_the_position(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        load_results(write(tmp_path, content), [1, 2])


def test_duplicate_ids_are_named(tmp_path):
    content = [{"question_id": q, "answer": "x"} for q in (1, 2, 1, 3, 2, 1)]
    message = (r"2 question ids appear more than once "
               r"\(1 at results\[0\], results\[2\], results\[5\]; 2 at results\[1\], results\[4\]\)")
    with pytest.raises(DataError, match=message):
        load_results(write(tmp_path, content), [1, 2, 3])


def test_missing_and_extra_ids_are_counted_and_named(tmp_path):
    expected = range(1, 11)
    path = write(tmp_path, [{"question_id": q, "answer": "x"} for q in (1, 2, 3, 99, 100)])
    with pytest.raises(DataError) as error:
        load_results(path, expected)
    message = str(error.value)
    assert "7 of the 10 questions have no answer (question ids 4, 5, 6, 7, 8, ...)" in message
    assert "2 answers are for question ids not in the questions file (99, 100)" in message


def test_missing_or_unreadable_results_file(tmp_path):
    with pytest.raises(DataError, match="results file not found"):
        load_results(tmp_path / "absent.json")
    (tmp_path / "latin1.json").write_bytes(b'[{"question_id": 1, "answer": "caf\xe9"}]')
    with pytest.raises(DataError, match="not UTF-8"):
        load_results(tmp_path / "latin1.json")


def test_evaluate_results_requires_the_exact_question_set():
    split = make_split([["yes"] * 10, ["no"] * 10])
    with pytest.raises(DataError, match="1 of the 2 questions have no answer"):
        evaluate_results([{"question_id": 1, "answer": "yes"}], split)
    with pytest.raises(DataError, match="question ids not in the questions file"):
        evaluate_results([{"question_id": q, "answer": "yes"} for q in (1, 2, 3)], split)


def test_split_without_annotations_cannot_be_scored():
    split = VQASplit("test-dev", [{"question_id": 1, "image_id": 1, "question": "q?"}], {})
    with pytest.raises(DataError, match="no annotations"):
        evaluate_results([{"question_id": 1, "answer": "yes"}], split)


def test_check_results_accepts_an_empty_list_only_for_no_questions():
    assert check_results([], []) == []
    with pytest.raises(DataError, match="1 of the 1 questions have no answer"):
        check_results([], [5])
