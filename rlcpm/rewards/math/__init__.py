"""Math reward: extract the final answer, decide equivalence with math-verify (sympy underneath).

    score(response, answer) -> 1.0 if the response's final answer equals `answer`, else 0.0

Equivalent forms accepted (math-verify): fractions and decimals (`0.5` = `\\frac{1}{2}`),
percentages, `\\sqrt`/`\\pi` expressions, intervals, sets and tuples, `x=3` vs `3`, units and
`\\text{}` stripped. Multiple-choice answers (a gold letter A-J) compare letters. Each check is
bounded by `timeout_s` in any thread or process (see verifier.py).
"""

from __future__ import annotations

from typing import Any

from rlcpm.errors import RewardError
from rlcpm.rewards.math.extract import choice_letter, extract_answer, join_digit_groups, last_boxed
from rlcpm.rewards.math.verifier import MathVerifier, default_verifier


def score(
    response: str,
    answer: Any,
    *,
    pattern: str | None = None,
    fallback_last_number: bool = True,
    timeout_s: float = 5.0,
    verifier: MathVerifier | None = None,
) -> float:
    """1.0 if the final answer of `response` is equivalent to `answer`, else 0.0.

    pattern: a regex that locates the answer instead of `\\boxed{}` / "the answer is" (group 1
    if it has groups). fallback_last_number: with no box or statement, use the last number.
    `answer` may itself hold a `\\boxed{}` (a reference solution); its box is the gold answer.
    A list or tuple of answers accepts any of them (datasets that list several forms).
    """
    if answer is None:
        raise RewardError("math reward: the sample has no answer (set data.fields.answer)")
    if isinstance(answer, list | tuple):
        if not answer:
            raise RewardError("math reward: the sample's list of acceptable answers is empty")
        kwargs = {"pattern": pattern, "fallback_last_number": fallback_last_number, "timeout_s": timeout_s}
        return float(any(score(response, gold, verifier=verifier, **kwargs) for gold in answer))
    gold = str(answer).strip()
    gold = join_digit_groups(last_boxed(gold) or gold)
    pred = extract_answer(response, pattern, fallback_last_number)
    if pred is None or not gold:
        return 0.0
    pred = join_digit_groups(pred)
    gold_choice = choice_letter(gold) if len(gold) <= 16 else None
    if gold_choice is not None:
        return float(choice_letter(pred, single=True) == gold_choice)
    if _normalized(pred) == _normalized(gold):
        return 1.0
    return float((verifier or default_verifier()).is_equivalent(pred, gold, timeout_s))


def is_equivalent(pred: str, gold: str, timeout_s: float = 5.0) -> bool:
    """math-verify's verdict on two answer strings (no extraction), bounded by `timeout_s`."""
    return default_verifier().is_equivalent(pred, gold, timeout_s)


def _normalized(text: str) -> str:
    return "".join(text.split()).strip("$")


__all__ = ["MathVerifier", "choice_letter", "extract_answer", "is_equivalent", "last_boxed", "score"]
