"""VQA accuracy, checked by hand against the standard VQA evaluation (README "Metrics")."""

import pytest

from modeltest.metrics import normalize_prediction, vqa_accuracy


def test_exact_match_all_identical_answers():
    assert vqa_accuracy("Dakota", ["dakota"] * 10) == 1.0


def test_fewer_than_three_matches():
    # 2 "stop": leaving out a "stop" leaves 1 match (1/3), leaving out a "go" leaves 2 (2/3).
    assert vqa_accuracy("stop", ["stop"] * 2 + ["go"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("stop", ["stop"] * 2 + ["go"] * 8) == pytest.approx(0.6)


def test_exactly_three_matches():
    # leaving out one of the three gives 2/3; leaving out any of the seven others gives 1.
    assert vqa_accuracy("stop", ["stop"] * 3 + ["go"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)


def test_one_match_and_no_match():
    assert vqa_accuracy("stop", ["stop"] + ["go"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("halt", ["stop"] * 10) == 0.0


@pytest.mark.parametrize("pred", ["stop.", "Stop!", "STOP", " stop\n", "stop<|im_end|>ignored", "stop\t"])
def test_punctuation_case_and_end_markers(pred):
    assert vqa_accuracy(pred, ["stop"] * 10) == 1.0


def test_numbers_words_to_digits():
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert normalize_prediction("Ten") == "10"
    assert normalize_prediction("none") == "0"
    assert normalize_prediction("eleven") == "eleven"  # only none/zero..ten are mapped


def test_articles_dropped():
    assert vqa_accuracy("the dog", ["dog"] * 10) == 1.0
    assert normalize_prediction("A cat and an owl") == "cat and owl"


def test_contractions_expanded_in_prediction():
    assert normalize_prediction("dont") == "don't"
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("don't", ["don't"] * 10) == 1.0


def test_identical_answers_are_not_normalised():
    # Human answers only get the punctuation step when they differ: "stop." stays "stop.".
    assert vqa_accuracy("stop.", ["stop."] * 10) == 0.0
    # Differing answers are normalised: "stop." -> "stop"; 5 of 10 match -> all 10 values are 1.
    assert vqa_accuracy("stop", ["stop."] * 5 + ["go"] * 5) == 1.0


def test_hyphen_becomes_space_and_answers_follow_only_when_they_differ():
    assert normalize_prediction("t-shirt") == "t shirt"
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0


def test_digit_comma_and_decimal_point():
    assert normalize_prediction("1,000") == "1000"
    assert normalize_prediction("3.5") == "3.5"
    assert normalize_prediction("yes, sir") == "yes sir"
    assert normalize_prediction("end.") == "end"


def test_official_period_count_quirk():
    # The official code passes re.UNICODE (32) as `count`: at most 32 periods are removed.
    assert normalize_prediction("." * 40) == "." * 8


def test_no_answers_is_an_error():
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])
