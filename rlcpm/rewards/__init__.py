"""Rewards: plain Python functions of a `Sample`, registered by name or imported by path.

    import rlcpm

    @rlcpm.reward("brevity")
    def brevity(sample: rlcpm.Sample, limit: int = 200) -> float:
        return 1.0 if len(sample.response) <= limit else 0.0

Built in (by name in a recipe): math, code, tool_use, format, overlong, repetition.
In-process scoring: CombinedReward.from_specs(recipe.rewards).score(samples);
on Ray workers: RewardPool(recipe.rewards, num_workers).score(samples).
See docs/rewards.md.
"""

from rlcpm.rewards import builtin as _builtin  # noqa: F401 - registers the built-in rewards
from rlcpm.rewards import code, math, tool_use
from rlcpm.rewards.combined import CombinedReward, RewardResult, RewardTerm, resolve_terms
from rlcpm.rewards.formatting import format_score
from rlcpm.rewards.length import overlong_penalty
from rlcpm.rewards.metrics import summarize
from rlcpm.rewards.pool import RewardPool
from rlcpm.rewards.registry import RewardFunction, get_reward, import_function, registered_rewards, reward
from rlcpm.rewards.repetition import is_repetitive, repetition_fraction
from rlcpm.rewards.sample import Sample

__all__ = [
    "CombinedReward",
    "RewardFunction",
    "RewardPool",
    "RewardResult",
    "RewardTerm",
    "Sample",
    "code",
    "format_score",
    "get_reward",
    "import_function",
    "is_repetitive",
    "math",
    "overlong_penalty",
    "registered_rewards",
    "repetition_fraction",
    "resolve_terms",
    "reward",
    "summarize",
    "tool_use",
]
