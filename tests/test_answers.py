import pytest

from vqa.answers import answer_scores, build_answer_vocabulary, normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),
    ("two", "2"),
    ("1,000", "1000"),  # digit-comma-digit: punctuation is deleted, not spaced
    ("t-shirt", "t shirt"),  # no space next to it: becomes a space
    ("dont", "don't"),
    ("the dog", "dog"),
    ("A Red Car!", "red car"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("  none \n", "0"),
    ("ten dogs", "10 dogs"),
])
def test_normalize_answer_follows_the_official_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_accuracy_is_min_of_matches_over_three_averaged_over_leave_one_out():
    humans = ["red"] * 2 + ["blue"] * 8
    # "red": leaving out a red human leaves 1 match (1/3), leaving out a blue one 2 (2/3).
    assert vqa_accuracy("red", humans) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("blue", humans) == 1.0
    assert vqa_accuracy("green", humans) == 0.0
    three = ["cat"] * 3 + ["dog"] * 7
    # 3 matches: 7 subsets keep all 3 (1.0), 3 subsets keep 2 (2/3).
    assert vqa_accuracy("cat", three) == pytest.approx((7 + 3 * 2 / 3) / 10)


def test_no_normalisation_when_all_humans_agree():
    # Official quirk: identical human answers switch normalisation off.
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    # With disagreement both sides are normalised: "Yes." == "yes".
    assert vqa_accuracy("Yes.", ["yes"] * 9 + ["no"]) == 1.0
    assert vqa_accuracy("two", ["2"] * 5 + ["3"] * 5) == 1.0


def test_answer_scores_are_the_official_accuracy_of_each_answer():
    vocabulary = {"2": 0, "3": 1, "yes": 2}
    humans = ["two"] * 2 + ["3"] * 7 + ["4"]
    scores = answer_scores(humans, vocabulary)
    assert set(scores) == {0, 1}
    assert scores[0] == pytest.approx(vqa_accuracy("2", humans))
    assert scores[1] == 1.0


def test_vocabulary_is_top_k_normalised_answers_most_frequent_first():
    lists = [["Yes"] * 10, ["yes."] * 5 + ["no"] * 5, ["two"] * 10, ["2"] * 3 + ["dog"] * 7]
    assert build_answer_vocabulary(lists, 3) == ["yes", "2", "dog"]
    assert build_answer_vocabulary(lists, 100) == ["yes", "2", "dog", "no"]


def test_only_ascii_digits_count_as_digits():
    # Python 2's \d (the official script) is 0-9: an Arabic-Indic digit does not keep the period.
    assert normalize_answer("1.\u0663") == "1\u0663"
