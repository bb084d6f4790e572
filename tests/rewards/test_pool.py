"""RewardPool on real Ray actors: same scores as in-process, user modules in workers, hangs bounded."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rlcpm.errors import RewardError
from rlcpm.rewards import CombinedReward, RewardPool, Sample

USERLAND = str(Path(__file__).parent / "userland")
SPECS = [
    {"name": "math", "weight": 1.0},
    {"name": "code", "weight": 0.5, "kwargs": {"timeout_s": 1.0}},
    {"fn": "rlcpm_user_rewards:keyword", "weight": 0.25},
    {"name": "user_short_answer", "weight": 0.1, "kwargs": {"limit": 30}},
    {"fn": "rlcpm_user_rewards:fragile", "weight": 0.0},
]


def _batch() -> list[Sample]:
    rows = [
        (r"yes \boxed{4}", 1),
        (r"\boxed{5}", 1),
        ("```python\ndef f(x):\n    return 2 * x\n``` so yes yes, \\boxed{\\frac{8}{2}}", 2),
        ("```python\ndef f(x):\n    return x\n```", 0),
    ]
    tests = ["assert f(2) == 4", "assert f(0) == 0"]
    return [
        Sample(
            id=f"row-{i}-{j}",
            response=response,
            answer="4",
            fields={"tests": tests, "denominator": denominator},
        )
        for j in range(3)
        for i, (response, denominator) in enumerate(rows)
    ]


@pytest.fixture(scope="module")
def pool(ray_session, user_module):
    pool = RewardPool(SPECS, num_workers=2)
    yield pool
    pool.close()


def test_pool_scores_like_the_in_process_reward(pool):
    samples = _batch()
    expected = CombinedReward.from_specs(SPECS).score(samples)
    results = pool.score(samples)
    assert [r.components for r in results] == [e.components for e in expected]
    assert [r.total for r in results] == pytest.approx([e.total for e in expected])
    assert results[2].components == {
        "math": 1.0,
        "code": 1.0,
        "keyword": 1.0,
        "keyword/mentions": 2.0,
        "user_short_answer": 0.0,
        "fragile": 0.5,
    }
    assert USERLAND in pool.python_path  # how the workers import the user's module


def test_errors_from_workers_name_the_function_and_sample(pool):
    results = pool.score(_batch())
    failed = {r.error.split("sample ")[1].split(":")[0] for r in results if r.error}
    assert failed == {"'row-3-0'", "'row-3-1'", "'row-3-2'"}  # denominator 0
    assert all(
        "rlcpm_user_rewards:fragile" in r.error and "ZeroDivisionError" in r.error for r in results if r.error
    )


def test_unknown_reward_fails_before_any_worker_starts(ray_session):
    with pytest.raises(RewardError, match="unknown reward name 'maths'"):
        RewardPool([{"name": "maths"}], num_workers=1)


def test_hung_rewards_never_block_a_step(ray_session, user_module):
    """A sleeping reward is cut by its time limit; one spinning in C with the GIL held loses its worker."""
    specs = [
        {"fn": "rlcpm_user_rewards:sleepy", "timeout_s": 0.5, "kwargs": {"seconds": 120}},
        {"fn": "rlcpm_user_rewards:gil_hog", "timeout_s": 0.5},
    ]
    with RewardPool(specs, num_workers=3, chunk_size=1, slack_s=1.0) as pool:
        samples = [
            Sample(id="ok-1"),
            Sample(id="sleeps", fields={"hang": True}),
            Sample(id="spins", fields={"spin": True}),
            Sample(id="ok-2"),
        ]
        start = time.monotonic()
        results = pool.score(samples)
        elapsed = time.monotonic() - start
        assert [r.total for r in results] == [2.0, 1.0, 0.0, 2.0]
        assert (
            "sleepy" in results[1].error
            and "timed out after 0.5s" in results[1].error
            and "'sleeps'" in results[1].error
        )
        assert "did not answer" in results[2].error and "'spins'" in results[2].error
        assert "rlcpm_user_rewards:gil_hog" in results[2].error  # the suspects are named
        assert elapsed < 6.0  # the slowest chunk's budget is 2 x 0.5 s + 1 s slack
        assert pool.num_restarts >= 1
        again = pool.score([Sample(id="after-1"), Sample(id="after-2")])
        assert [r.total for r in again] == [2.0, 2.0] and all(r.error is None for r in again)
