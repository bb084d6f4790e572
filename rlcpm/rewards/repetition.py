"""N-gram repetition: a score for degenerate, looping responses, usable as a reward or a filter."""

from __future__ import annotations

from collections.abc import Sequence


def repetition_fraction(tokens: Sequence[int] | str, ngram: int = 8) -> float:
    """Share of the response's n-grams that repeat an earlier n-gram: 1 - #distinct / #total.

    `tokens`: token ids, or text (split on whitespace into words). 0.0 when the response has
    fewer than `ngram` tokens; approaches 1.0 for a response that loops on one phrase.
    """
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    items = tokens.split() if isinstance(tokens, str) else list(tokens)
    total = len(items) - ngram + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(items[i : i + ngram]) for i in range(total)})
    return 1.0 - distinct / total


def is_repetitive(tokens: Sequence[int] | str, ngram: int = 8, max_repeat_fraction: float = 0.5) -> bool:
    """The filter form (recipe `algorithm.repetition_filter`): True when the fraction exceeds the limit."""
    return repetition_fraction(tokens, ngram) > max_repeat_fraction
