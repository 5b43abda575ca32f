"""Regular expressions written in recipes (the ``pattern`` of parameters and entered values).

A recipe's author chooses the pattern and an operator (or a scanner) the text, so a pattern
that backtracks catastrophically (``(a|aa)+$``, ``(x+x+)+y``) must not freeze the agent. The
``regex`` library (re-compatible syntax, ``VERSION0``) is used because its matching takes a
timeout, which the standard ``re`` does not: a match that runs out of time is refused with a
clear message rather than left running.

Public API::

    compile_pattern(pattern) -> regex.Pattern    PatternError naming the position when invalid
    full_match(pattern, text) -> bool            PatternError when it takes too long
"""

from __future__ import annotations

from functools import lru_cache

import regex

MAX_PATTERN = 500
"""Longest pattern accepted, in characters (identifiers and codes need a few dozen)."""
TIMEOUT = 0.25
"""Seconds one match may take; an honest pattern takes microseconds."""


class PatternError(ValueError):
    """A pattern that is invalid, too long, or too slow on a given text."""


@lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> regex.Pattern[str]:
    """The compiled pattern; ``PatternError`` when it is not a valid regular expression."""
    if len(pattern) > MAX_PATTERN:
        raise PatternError(f"the pattern has {len(pattern)} characters; at most {MAX_PATTERN}")
    try:
        return regex.compile(pattern, regex.VERSION0)
    except regex.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        raise PatternError(
            f"pattern {pattern!r} is not a valid regular expression: {exc.msg}{where}"
        ) from None


def full_match(pattern: str, text: str) -> bool:
    """Does the whole of ``text`` match? ``PatternError`` when the pattern is invalid or the
    match takes longer than ``TIMEOUT`` (catastrophic backtracking)."""
    compiled = compile_pattern(pattern)
    try:
        return compiled.fullmatch(text, timeout=TIMEOUT) is not None
    except TimeoutError:
        raise PatternError(
            f"pattern {pattern!r} took too long to check {len(text)} characters "
            "(it backtracks catastrophically; simplify it, e.g. no nested + or *)"
        ) from None
