"""Format reward, DAPO soft overlong penalty, n-gram repetition (reward and filter)."""

from __future__ import annotations

import pytest

from rlcpm.errors import RewardError
from rlcpm.rewards import format_score, is_repetitive, overlong_penalty, repetition_fraction


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>2+2 is 4</think> The answer is 4.", 1.0),
        ("  <think>\nline one\nline two\n</think>\n\\boxed{4}", 1.0),
        ("<think>no answer</think>", 0.0),
        ("<think>no answer</think>   \n", 0.0),
        ("The answer is 4.", 0.0),
        ("<think>a</think><think>b</think> 4", 0.0),
        ("<think>a</think> 4 </think>", 0.0),
        ("preamble <think>a</think> 4", 0.0),
    ],
)
def test_default_format_is_one_think_block_then_an_answer(response, expected):
    assert format_score(response) == expected


def test_custom_format_pattern():
    assert format_score("Answer: 42", r"Answer: \d+") == 1.0
    assert format_score("So... Answer: 42", r"Answer: \d+") == 0.0
    assert format_score("So... Answer: 42", r"Answer: \d+", search=True) == 1.0
    with pytest.raises(RewardError, match="invalid regex"):
        format_score("x", "(unclosed")


@pytest.mark.parametrize(
    "num_tokens, expected",
    [(0, 0.0), (768, 0.0), (769, -1 / 256), (896, -0.5), (1024, -1.0), (1025, -1.0), (5000, -1.0)],
)
def test_dapo_soft_overlong_penalty(num_tokens, expected):
    # L_max = 1024, L_cache = 256: zero up to 768, then linear down to -1 at 1024, -1 beyond
    assert overlong_penalty(num_tokens, max_tokens=1024, buffer_tokens=256) == pytest.approx(expected)


def test_overlong_penalty_scale_and_bad_buffer():
    assert overlong_penalty(896, 1024, 256, penalty=0.5) == pytest.approx(-0.25)
    with pytest.raises(RewardError, match="buffer_tokens"):
        overlong_penalty(10, max_tokens=100, buffer_tokens=200)


def test_repetition_fraction_by_hand():
    # 10 tokens, 3-grams: 8 windows; "1 2 3" repeats: windows (1,2,3),(2,3,1),(3,1,2),(1,2,3),(2,3,1),(3,1,2),(1,2,3),(2,3,4)
    tokens = [1, 2, 3, 1, 2, 3, 1, 2, 3, 4]
    assert repetition_fraction(tokens, ngram=3) == pytest.approx(1 - 4 / 8)
    assert repetition_fraction(list(range(100)), ngram=3) == 0.0
    assert repetition_fraction([7, 7], ngram=3) == 0.0
    assert repetition_fraction("the cat sat the cat sat the cat sat", ngram=2) == pytest.approx(1 - 3 / 8)


def test_looping_text_is_flagged_and_normal_text_is_not():
    loop = [5, 6, 7, 8] * 200
    assert repetition_fraction(loop, ngram=8) > 0.99 and is_repetitive(loop, ngram=8, max_repeat_fraction=0.5)
    assert not is_repetitive(list(range(800)), ngram=8, max_repeat_fraction=0.5)
