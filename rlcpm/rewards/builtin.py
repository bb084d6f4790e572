"""The rewards available by name in a recipe: math, code, tool_use, format, overlong, repetition.

Each is a thin function of a Sample over the module that does the work; recipe `kwargs` are
passed as keyword arguments.
"""

from __future__ import annotations

from rlcpm.errors import RewardError
from rlcpm.rewards import code, math, tool_use
from rlcpm.rewards.formatting import THINK_THEN_ANSWER, format_score
from rlcpm.rewards.length import overlong_penalty
from rlcpm.rewards.registry import reward
from rlcpm.rewards.repetition import repetition_fraction
from rlcpm.rewards.sample import Sample


@reward("math")
def math_reward(
    sample: Sample, *, pattern: str | None = None, fallback_last_number: bool = True, timeout_s: float = 5.0
) -> float:
    """1.0 if the response's final answer equals `sample.answer` (rlcpm.rewards.math.score)."""
    return math.score(
        sample.response,
        sample.answer,
        pattern=pattern,
        fallback_last_number=fallback_last_number,
        timeout_s=timeout_s,
    )


@reward("code")
def code_reward(
    sample: Sample,
    *,
    timeout_s: float = 2.0,
    memory_mb: int = 1024,
    tests_field: str = "tests",
    isolation: str = "auto",
) -> float:
    """Fraction of the row's tests (`sample.tests`) the response's program passes, sandboxed."""
    return code.score(
        sample.response, getattr(sample, tests_field), timeout_s, memory_mb, isolation=isolation
    )


@reward("tool_use")
def tool_use_reward(sample: Sample, *, partial_credit: bool = False) -> float:
    """Tool calls of the response against `sample.expected_calls`, validated against `sample.tools`."""
    return tool_use.score(
        sample.response, sample.expected_calls, sample.get("tools"), partial_credit=partial_credit
    )


@reward("format")
def format_reward(sample: Sample, *, pattern: str = THINK_THEN_ANSWER, search: bool = False) -> float:
    """1.0 if the response has the required format (default: <think>...</think> then an answer)."""
    return format_score(sample.response, pattern, search=search)


@reward("overlong")
def overlong_reward(
    sample: Sample, *, max_tokens: int, buffer_tokens: int = 256, penalty: float = 1.0
) -> float:
    """DAPO's soft overlong penalty on the response length in tokens (0 down to -penalty)."""
    if sample.response_token_ids is None:
        raise RewardError("overlong reward needs sample.response_token_ids")
    return overlong_penalty(len(sample.response_token_ids), max_tokens, buffer_tokens, penalty)


@reward("repetition")
def repetition_reward(
    sample: Sample, *, ngram: int = 8, max_repeat_fraction: float = 0.5, penalty: float = 1.0
) -> dict[str, float]:
    """-penalty when more than `max_repeat_fraction` of the response's n-grams repeat, else 0.

    Uses the token ids when present, else the words of the text. Logs the fraction as a component.
    """
    tokens = sample.response_token_ids if sample.response_token_ids is not None else sample.response
    fraction = repetition_fraction(tokens, ngram)
    return {"total": -penalty if fraction > max_repeat_fraction else 0.0, "fraction": fraction}
