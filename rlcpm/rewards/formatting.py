"""Format reward: does the response have the required shape (by default, one think block then an answer)."""

from __future__ import annotations

import functools
import re

from rlcpm.errors import RewardError

THINK_THEN_ANSWER = r"\s*<think>(?:(?!</?think>).)*</think>\s*(?:(?!</?think>)\S)(?:(?!</?think>).)*"


def format_score(response: str, pattern: str = THINK_THEN_ANSWER, *, search: bool = False) -> float:
    """1.0 if `pattern` matches the whole response (or anywhere in it, with `search`), else 0.0.

    The pattern is compiled with re.DOTALL, so `.` spans lines. The default accepts exactly one
    `<think>...</think>` block at the start followed by a non-empty answer without think tags.
    """
    compiled = _compile(pattern)
    matched = compiled.search(response) if search else compiled.fullmatch(response)
    return 1.0 if matched else 0.0


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise RewardError(f"format reward: invalid regex {pattern!r}: {err}") from err
