"""Multiple-choice extraction, including outputs the reference's rule gets wrong."""

import pytest

from modeltest.metrics import extract_choice
from modeltest.tasks.videobench import reference_choice

CHOICES = {"A": "a dog", "B": "a cat", "C": "a bird", "D": "nothing"}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B) a cat", "B"),
        ("B. a cat", "B"),
        ("Answer: B", "B"),
        ("The answer is B.", "B"),
        ("b", "B"),
        ("(c)", "C"),
        ("the answer is c", "C"),
        ("ASSISTANT: D", "D"),
        ("C.<|im_end|>", "C"),
        ("  A\n", "A"),
        ("a cat", "B"),
        ("A Cat.", "B"),
        ("Nothing", "D"),
        ("B, because a cat is visible", "B"),
        # a short sentence naming exactly one option letter as a standalone word
        ("I think C fits best.", "C"),
        ("Probably D here", "D"),
        ("I would go with B since it flies", "B"),
    ],
)
def test_reads_an_option(text, expected):
    assert extract_choice(text, CHOICES) == expected


@pytest.mark.parametrize(
    "text",
    [
        "A dog is running",  # the article "A" is not an option
        "A man rides a horse.",
        "The answer is a dog running",
        "A or B",
        "(A) and (B)",
        "A, B",
        "B/C",  # several options
        "I do not know",
        "",
        "E",  # no option / not a valid letter here
        "a cat and a dog",  # option texts, but more than one
        "Eva Eva Eva",
        "I think C or D fits best.",  # two letters
        "I think B fits, maybe C",  # two standalone letters
        "A bird, I think",  # the article again
        "C-3PO is there",  # a letter inside a word
    ],
)
def test_returns_none(text):
    assert extract_choice(text, CHOICES) is None


def test_letters_outside_the_choices_are_ignored():
    two = {"A": "yes", "B": "no"}
    assert extract_choice("C", two) is None
    assert extract_choice("no", two) == "B"


def test_reference_rule_is_naive():
    # What the reference harness does, kept for comparison in the debug records.
    assert reference_choice("A dog is running") == "A"
    assert reference_choice("Eva") == "E"
    assert extract_choice("A dog is running", CHOICES) is None
