"""The built-in rewards on rlcpm.data's synthetic tasks: demonstrations score as labelled."""

from __future__ import annotations

import pytest

from rlcpm.data.synthetic import generate
from rlcpm.rewards import CombinedReward, Sample

CORE = ("id", "prompt", "answer", "response")


def _samples(rows: list[dict], response=None) -> list[Sample]:
    return [
        Sample(
            id=row["id"],
            prompt=row["prompt"],
            response=response(row) if response else row["response"],
            answer=row.get("answer"),
            fields={k: v for k, v in row.items() if k not in CORE},
        )
        for row in rows
    ]


def test_arithmetic_demonstrations_score_as_labelled():
    rows = generate("arithmetic", 24, seed=3, demo_noise=0.5)
    results = CombinedReward.from_specs([{"name": "math"}]).score(_samples(rows))
    assert [r.total for r in results] == [float(row["is_demo_correct"]) for row in rows]
    assert 0 < sum(row["is_demo_correct"] for row in rows) < len(rows)  # both verdicts occur


@pytest.mark.parametrize("test_format", ["assert", "call"])
def test_code_demonstrations_pass_and_a_stub_fails(test_format):
    rows = generate("code", 4, seed=1, test_format=test_format)
    reward = CombinedReward.from_specs([{"name": "code", "kwargs": {"timeout_s": 2.0}}])
    assert [r.total for r in reward.score(_samples(rows))] == [1.0] * len(rows)
    stub = lambda row: f"```python\ndef {row['fn_name']}(*args):\n    return None\n```"  # noqa: E731
    assert [r.total for r in reward.score(_samples(rows, stub))] == [0.0] * len(rows)


def test_tool_use_demonstrations_match_and_a_wrong_tool_does_not():
    rows = generate("tool_use", 12, seed=2)
    reward = CombinedReward.from_specs([{"name": "tool_use"}])
    assert [r.total for r in reward.score(_samples(rows))] == [1.0] * len(rows)
    wrong = lambda row: '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>'  # noqa: E731
    assert [r.total for r in reward.score(_samples(rows, wrong))] == [0.0] * len(rows)
