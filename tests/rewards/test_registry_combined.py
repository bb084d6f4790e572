"""Reward registry, recipe resolution (`name` / `fn`), combined scoring, errors, time limits."""

from __future__ import annotations

import functools
import json
import time

import pytest

import rlcpm
from rlcpm.errors import RewardError
from rlcpm.rewards import CombinedReward, Sample, get_reward, registered_rewards, resolve_terms, summarize


def _samples(*responses: str, **fields) -> list[Sample]:
    return [
        Sample(id=f"s{i}", prompt="p", response=r, answer="4", fields=dict(fields))
        for i, r in enumerate(responses)
    ]


def test_builtin_rewards_are_registered():
    assert {"math", "code", "tool_use", "format", "overlong", "repetition"} <= set(registered_rewards())


def test_decorator_forms_register_and_return_the_function():
    @rlcpm.reward
    def plain_name_reward(sample):
        return 1.0

    @rlcpm.reward("custom_name_reward", batched=True, timeout_s=3)
    def other(samples):
        return [0.0 for _ in samples]

    assert plain_name_reward(None) == 1.0  # still a plain callable
    assert get_reward("plain_name_reward").fn is plain_name_reward
    entry = get_reward("custom_name_reward")
    assert entry.fn is other and entry.batched and entry.timeout_s == 3


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(RewardError, match="already registered"):

        @rlcpm.reward("math")
        def my_math(sample):
            return 0.0


@pytest.mark.parametrize("name", [123, "", ("a", "b")])
def test_a_reward_name_must_be_a_non_empty_string(name):
    """A non-string name used to be registered, and then every lookup crashed sorting the names."""
    with pytest.raises(RewardError, match="name must be a non-empty string"):
        rlcpm.reward(name)(lambda sample: 1.0)
    assert get_reward("math").name == "math"


def test_a_callable_without_a_name_needs_one_given():
    scaled = functools.partial(lambda sample, factor: factor, factor=2.0)
    with pytest.raises(RewardError, match=r"has no __name__.*@rlcpm.reward\("):
        rlcpm.reward(scaled)
    assert rlcpm.reward("partial_reward")(scaled) is scaled
    assert get_reward("partial_reward").fn is scaled


@pytest.mark.parametrize("timeout_s", [0, float("nan"), float("inf"), "30", True])
def test_a_decorator_timeout_must_be_a_finite_number_of_seconds(timeout_s):
    """NaN timed every call out at once, inf crashed score() with OverflowError, "30" with TypeError."""
    with pytest.raises(RewardError, match=r"timeout_s must be a finite number of seconds > 0"):
        rlcpm.reward("bad_timeout_reward", timeout_s=timeout_s)(lambda sample: 1.0)


def test_a_bound_method_registers_as_a_reward():
    class Judge:
        def __init__(self, bonus):
            self.bonus = bonus

        def score(self, sample):
            return self.bonus

    judge = Judge(0.5)
    assert rlcpm.reward("bound_method_reward")(judge.score) == judge.score
    [result] = CombinedReward.from_specs([{"name": "bound_method_reward"}]).score(_samples("x"))
    assert result.total == 0.5 and result.error is None


def test_a_malformed_spec_dict_is_a_recipe_error_with_a_did_you_mean():
    """CombinedReward.from_specs / RewardPool with a typo in a dict raised pydantic's raw ValidationError."""
    from rlcpm.errors import RecipeError

    with pytest.raises(
        RecipeError, match=r"in rewards\[1\]:\n  - wieght: unknown key; did you mean 'weight'\?"
    ):
        CombinedReward.from_specs([{"name": "math"}, {"name": "math", "wieght": 2.0}])
    with pytest.raises(RecipeError, match=r"in rewards\[0\]"):
        CombinedReward.from_specs(["math"])


def test_unknown_name_suggests_the_close_one():
    with pytest.raises(RewardError, match="did you mean 'tool_use'"):
        get_reward("tool_uses")


def test_sample_fields_read_as_attributes():
    sample = Sample(id="row-7", response="x", fields={"tests": ["assert True"], "difficulty": 3})
    assert sample.tests == ["assert True"] and sample.difficulty == 3 and sample.get("missing", 5) == 5
    with pytest.raises(AttributeError, match=r"row-7.*'expected_calls'.*difficulty, tests"):
        _ = sample.expected_calls


def test_custom_reward_by_path_and_by_registered_name(user_module):
    specs = [
        {"fn": "rlcpm_user_rewards:keyword", "weight": 0.5, "kwargs": {"word": "yes"}},
        {"name": "user_short_answer", "weight": 2.0, "kwargs": {"limit": 5}},
    ]
    reward = CombinedReward.from_specs(specs)
    results = reward.score(_samples("yes yes", "no, definitely not"))
    assert results[0].components == {"keyword": 1.0, "keyword/mentions": 2.0, "user_short_answer": 0.0}
    assert results[0].total == pytest.approx(0.5 * 1.0 + 2.0 * 0.0)
    assert results[1].components["user_short_answer"] == 0.0 and results[1].total == 0.0
    assert reward.score(_samples("yes"))[0].total == pytest.approx(0.5 + 2.0)


def test_rewards_from_a_recipe_yaml(user_module, tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        "model: {tiny: {}}\n"
        "data: {train: {task: arithmetic}}\n"
        "rewards:\n"
        "  - {name: math, weight: 1.0}\n"
        "  - {fn: 'rlcpm_user_rewards:keyword', weight: 0.2, kwargs: {word: boxed}}\n"
        "  - {name: user_async_exact, weight: 1.0, on_error: drop}\n"
    )
    recipe = rlcpm.load_recipe(recipe_file)
    terms = resolve_terms(recipe.rewards)
    assert [t.label for t in terms] == ["math", "keyword", "user_async_exact"]
    assert terms[2].timeout_s == 5.0 and terms[2].on_error == "drop"  # from the decorator
    (result,) = CombinedReward(terms).score([Sample(id="a", response=r"\boxed{4}", answer="4")])
    assert result.components == {
        "math": 1.0,
        "keyword": 1.0,
        "keyword/mentions": 1.0,
        "user_async_exact": 0.0,
    }
    assert result.total == pytest.approx(1.2)


def test_async_and_batched_rewards(user_module):
    reward = CombinedReward.from_specs(
        [{"name": "user_async_exact"}, {"name": "user_lengths", "weight": 0.1}]
    )
    results = reward.score(_samples("4", "five"))
    assert [r.components["user_async_exact"] for r in results] == [1.0, 0.0]
    assert [r.components["user_lengths"] for r in results] == [1.0, 4.0]
    assert results[1].total == pytest.approx(0.4)


@pytest.mark.parametrize("array", ["numpy", "torch"])
def test_a_batched_reward_may_return_an_array(array):
    """A batched reward model's scores as a numpy array or a tensor were refused ('returned ndarray')."""
    import numpy as np
    import torch

    to_array = np.array if array == "numpy" else torch.tensor

    @rlcpm.reward(f"batched_{array}_scores", batched=True)
    def scores(samples):
        return to_array([float(len(s.response)) for s in samples])

    results = CombinedReward.from_specs([{"name": f"batched_{array}_scores"}]).score(_samples("ab", "abc"))
    assert [r.total for r in results] == [2.0, 3.0] and all(r.error is None for r in results)


def test_async_rewards_share_one_event_loop(user_module):
    """Module-level async state (an AsyncOpenAI client, a semaphore) works on every call, every step."""
    reward = CombinedReward.from_specs([{"fn": "rlcpm_user_rewards:async_shared_state"}])
    for _ in range(2):
        results = reward.score(_samples("a", "b", "c"))
        assert [(r.total, r.error) for r in results] == [(1.0, None)] * 3


def test_errors_name_the_function_and_the_sample(user_module, caplog):
    reward = CombinedReward.from_specs(
        [{"fn": "rlcpm_user_rewards:fragile"}, {"name": "format", "weight": 0.0}]
    )
    samples = [
        Sample(id="ok-row", response="x", fields={"denominator": 4}),
        Sample(id="bad-row", response="x", fields={"denominator": 0}),
    ]
    with caplog.at_level("WARNING", logger="rlcpm.rewards"):
        ok, bad = reward.score(samples)
    assert ok.error is None and ok.total == 0.25
    assert "fragile" in bad.error and "rlcpm_user_rewards:fragile" in bad.error and "'bad-row'" in bad.error
    assert "ZeroDivisionError" in bad.error and "rlcpm_user_rewards.py" in bad.error
    assert bad.total == 0.0 and bad.components["fragile"] == 0.0 and not bad.dropped
    assert "bad-row" in caplog.text and "fragile" in caplog.text


def test_a_callable_object_as_reward_reports_its_errors(user_module):
    """A reward that is an instance with __call__ (no __qualname__): its failures are logged, not raised."""
    reward = CombinedReward.from_specs([{"fn": "rlcpm_user_rewards:scaled", "kwargs": {"offset": 1.0}}])
    ok, bad = reward.score(
        [Sample(id="a", fields={"denominator": 1}), Sample(id="b", fields={"denominator": 0})]
    )
    assert ok.total == 3.0 and ok.error is None
    assert bad.total == 0.0 and "rlcpm_user_rewards:Scaled" in bad.error and "ZeroDivisionError" in bad.error
    with pytest.raises(RewardError, match="rlcpm_user_rewards:Scaled.*do not fit"):
        CombinedReward.from_specs([{"fn": "rlcpm_user_rewards:scaled", "kwargs": {"limit": 1}}])


def test_on_error_drop_marks_the_sample(user_module):
    reward = CombinedReward.from_specs([{"fn": "rlcpm_user_rewards:fragile", "on_error": "drop"}])
    ok, bad = reward.score(
        [Sample(id="a", fields={"denominator": 1}), Sample(id="b", fields={"denominator": 0})]
    )
    assert not ok.dropped and bad.dropped


def test_bad_return_values_are_errors(user_module):
    (result,) = CombinedReward.from_specs([{"fn": "rlcpm_user_rewards:not_a_number"}]).score(_samples("x"))
    assert "not_a_number" in result.error and "'s0'" in result.error and "str" in result.error


def test_a_hung_reward_is_cut_at_its_time_limit(user_module):
    reward = CombinedReward.from_specs(
        [{"fn": "rlcpm_user_rewards:sleepy", "timeout_s": 0.3, "kwargs": {"seconds": 30}}]
    )
    samples = [Sample(id="fine-1"), Sample(id="stuck", fields={"hang": True}), Sample(id="fine-2")]
    start = time.monotonic()
    results = reward.score(samples)
    assert time.monotonic() - start < 2.0
    assert [r.total for r in results] == [1.0, 0.0, 1.0]
    assert (
        "timed out after 0.3s" in results[1].error
        and "'stuck'" in results[1].error
        and "sleepy" in results[1].error
    )
    assert reward.num_abandoned_calls == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"fn": "no_such_module_xyz:f"}, "cannot import module 'no_such_module_xyz'"),
        ({"fn": "rlcpm_user_rewards:missing"}, "has no attribute 'missing'"),
        (
            {"fn": "rlcpm_user_rewards:keyword", "kwargs": {"wrod": "x"}},
            r"kwargs \['wrod'\] do not fit keyword",
        ),
        ({"name": "overlong"}, "max_tokens"),
    ],
)
def test_resolution_errors_are_actionable(user_module, spec, message):
    with pytest.raises(RewardError, match=message):
        resolve_terms([spec])


def test_builtin_rewards_on_samples():
    tools = [{"name": "add", "inputSchema": {"type": "object", "properties": {"a": {"type": "integer"}}}}]
    sample = Sample(
        id="mixed",
        response='<think>ok</think> ```python\ndef f(x):\n    return x + 1\n``` <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>',
        response_token_ids=list(range(900)),
        answer="1",
        fields={
            "tests": ["assert f(1) == 2", "assert f(2) == 4"],
            "expected_calls": [{"name": "add", "arguments": {"a": 1}}],
            "tools": tools,
        },
    )
    specs = [
        {"name": "code", "kwargs": {"timeout_s": 1.0}},
        {"name": "tool_use"},
        {"name": "format"},
        {"name": "overlong", "kwargs": {"max_tokens": 1024, "buffer_tokens": 256}},
        {"name": "repetition", "kwargs": {"ngram": 4}},
    ]
    (result,) = CombinedReward.from_specs(specs).score([sample])
    assert result.error is None
    assert result.components == pytest.approx(
        {
            "code": 0.5,
            "tool_use": 1.0,
            "format": 1.0,
            "overlong": (768 - 900) / 256,
            "repetition": 0.0,
            "repetition/fraction": 0.0,
        }
    )


def test_summarize_reward_metrics():
    results = [
        rlcpm.rewards.RewardResult(1.0, {"math": 1.0, "format": 0.0}),
        rlcpm.rewards.RewardResult(0.0, {"math": 0.0, "format": 0.0}, dropped=True, error="boom"),
    ]
    metrics = summarize(results)
    assert metrics == {  # the dropped sample trains on nothing: the means leave it out
        "reward/total_mean": 1.0,
        "reward/total_std": 0.0,
        "reward/num_errors": 1.0,
        "reward/num_dropped": 1.0,
        "reward/math_mean": 1.0,
        "reward/format_mean": 0.0,
    }
    assert json.dumps(metrics)  # plain floats for the JSONL log


@pytest.mark.parametrize("value", ["1", True, b"1"], ids=["str", "bool", "bytes"])
def test_strings_and_bools_are_not_reward_values(value):
    name = f"test_returns_{type(value).__name__}"
    if name not in registered_rewards():
        rlcpm.reward(name)(lambda sample: value)
    (result,) = CombinedReward.from_specs([{"name": name}]).score(_samples("x"))
    assert result.error is not None and type(value).__name__ in result.error and result.total == 0.0


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_numpy_and_torch_bools_are_refused_like_python_bools(kind):
    """`(pred == gold).all()` is a numpy / torch bool: refused as a bool is, not scored 1.0."""
    import numpy as np
    import torch

    value = np.bool_(True) if kind == "numpy" else torch.tensor(True)
    name = f"test_returns_{kind}_bool"
    if name not in registered_rewards():
        rlcpm.reward(name)(lambda sample: value)
    (result,) = CombinedReward.from_specs([{"name": name}]).score(_samples("x"))
    assert result.error is not None and "the reward is a bool" in result.error and name in result.error
    assert result.total == 0.0
    number = np.float32(0.5) if kind == "numpy" else torch.tensor(0.5)  # numeric scalars still count
    if f"{name}_number" not in registered_rewards():
        rlcpm.reward(f"{name}_number")(lambda sample: number)
    (ok,) = CombinedReward.from_specs([{"name": f"{name}_number"}]).score(_samples("x"))
    assert ok.error is None and ok.total == 0.5


def test_labels_stay_unique_when_a_name_looks_like_a_renamed_duplicate():
    """[dup, dup, dup_2]: the second `dup` must not take the label of the real `dup_2`, which
    would merge two terms' components (one value lost from the logs) under one key."""
    for name, value in (("test_dup", 1.0), ("test_dup_2", 5.0)):
        if name not in registered_rewards():
            rlcpm.reward(name)(lambda sample, value=value: value)
    terms = resolve_terms([{"name": "test_dup"}, {"name": "test_dup"}, {"name": "test_dup_2"}])
    labels = [t.label for t in terms]
    assert len(set(labels)) == 3 and labels[0] == "test_dup" and labels[2] == "test_dup_2"
    (result,) = CombinedReward(terms).score(_samples("x"))
    assert sorted(result.components.values()) == [1.0, 1.0, 5.0]
    assert result.total == pytest.approx(sum(result.components.values()))


def test_a_reward_named_total_does_not_hide_the_weighted_total():
    """reward/total_mean is the weighted total's mean; a term labelled `total` (fn: pkg:total)
    logged its own mean under that key and replaced it."""
    if "total" not in registered_rewards():
        rlcpm.reward("total")(lambda sample: 1.0)
    terms = resolve_terms([{"name": "total", "weight": 0.5}, {"name": "format"}])
    assert "total" not in [t.label for t in terms]
    metrics = summarize(CombinedReward(terms).score(_samples("no think tags")))
    assert metrics["reward/total_mean"] == 0.5
