"""Multiple-choice answer extraction for VideoBench.

The reference harness takes the first capital A-F found anywhere in the output, so "A dog is
running" reads as A. `extract_choice` only accepts a letter in a context that marks it as an
option label, and returns None when the output names no option or more than one.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Set

from .vqa import clean_answer

# A letter standing alone as the whole answer: "B", "b", "(B)", "B.", "[b]", "B)".
_WHOLE = re.compile(r"^\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:;,!]?\s*$")
# A bracketed letter anywhere: "(B)", "[B]".
_BRACKETED = re.compile(r"[\(\[]([A-Za-z])[\)\]]")
# A capital letter used as a label: at the start or after a space/colon/quote, followed by . ) : ,
# or the end. "B. text", "B) text", "is B.", "Answer: B". Not "A dog" (followed by a word).
_LABEL = re.compile(r"(?:^|(?<=[\s:\"'*]))([A-Z])(?=[.):,;\"'*]|\s*$)")
# After a cue word: "answer is B", "Answer: b.", "option C", "choice (D)".
_CUED = re.compile(
    r"(?:answer|option|choice)\s*(?:is|would be|:|-)?\s*[:\-]?\s*[\(\[]?([A-Za-z])[\)\]]?"
    r"(?=[\s.,:;!)\]]|$)",
    re.IGNORECASE,
)


# A capital letter standing alone as a word: "I think C fits best." (not "C's", "C-3PO").
_STANDALONE = re.compile(r"(?<![\w'\-])([A-Z])(?![\w'\-])")
# "A" followed by a word is the article ("A dog is running"), not option A.
_ARTICLE_A = re.compile(r"A\s+[A-Za-z]")


# Two option letters joined as alternatives: "A or B", "(A) and (B)", "A/B", "A, B".
_ALTERNATIVES = re.compile(r"(?<![A-Za-z])[\(\[]?([A-Z])[\)\]]?\s*(?:or|and|,|/|&)\s*[\(\[]?([A-Z])[\)\]]?(?![A-Za-z])")


def _normalize_text(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _labelled_letters(text: str, valid: Set[str]) -> Set[str]:
    found = set()
    whole = _WHOLE.match(text)
    if whole:
        found.add(whole.group(1).upper())
    for m in _BRACKETED.finditer(text):
        found.add(m.group(1).upper())
    for m in _LABEL.finditer(text):
        found.add(m.group(1))
    for m in _CUED.finditer(text):
        letter = m.group(1)
        # A lower-case letter after a cue is an option only when nothing word-like follows it
        # ("the answer is a dog" names no option).
        rest = text[m.end() :].lstrip()
        if letter.isupper() or not rest or not rest[0].isalpha():
            found.add(letter.upper())
    return found & valid


def extract_choice(text: str, choices: Dict[str, str]) -> Optional[str]:
    """The option letter named by a model output, or None.

    `choices` maps letters to option texts (null options already dropped). Reads "B", "(B)",
    "B.", "B) text", "Answer: B", "The answer is B.", "b", a sentence naming one option letter as
    a word ("I think C fits best."), and an output that repeats exactly one option's text.
    Returns None when the output names no option or several.
    """
    valid = {k.upper() for k in choices}
    text = clean_answer(text or "")
    if not text:
        return None
    if any(a in valid and b in valid and a != b for a, b in _ALTERNATIVES.findall(text)):
        return None
    # Labelled letters, and option letters standing alone as words ("I think C fits best.";
    # "A" before a word is the article and does not count): exactly one must be named.
    letters = _labelled_letters(text, valid)
    letters |= {
        m.group(1) for m in _STANDALONE.finditer(text) if not (m.group(1) == "A" and _ARTICLE_A.match(text, m.start()))
    } & valid
    if len(letters) == 1:
        return next(iter(letters))
    if len(letters) > 1:
        return None
    # No letter: accept an output that repeats exactly one option's text (case and punctuation
    # aside). Containment is deliberately not enough: "a dog is running" must not pick "a dog".
    norm = _normalize_text(text)
    options = {k.upper(): _normalize_text(str(v)) for k, v in choices.items() if v is not None}
    exact = [k for k, v in options.items() if v and v == norm]
    return exact[0] if len(exact) == 1 else None
