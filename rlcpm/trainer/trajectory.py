"""What the RL loop tracks per response: tokens, behaviour log-probs and the policy version of each token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trajectory:
    """One response to one prompt, possibly generated over several chunks and policy versions.

    `behaviour_logprobs[t]` is the log-prob of response token t under the policy version
    `versions[t]` that sampled it (chunk-level importance sampling, SPECS §1).
    """

    traj_id: str
    group_id: str
    prompt_token_ids: list[int]
    seed: int
    response_token_ids: list[int] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # None while in flight; "stop" | "length" when done
    num_chunks: int = 0

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_versions(self) -> int:
        return len(set(self.versions))

    def extend(self, token_ids: list[int], logprobs: list[float], version: int) -> None:
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{self.traj_id}: {len(token_ids)} tokens but {len(logprobs)} log-probs")
        self.response_token_ids.extend(token_ids)
        self.behaviour_logprobs.extend(float(x) for x in logprobs)
        self.versions.extend([version] * len(token_ids))
        self.num_chunks += 1


@dataclass
class Group:
    """The G trajectories of one prompt, with the example they answer and, once scored, rewards."""

    group_id: str
    example: Any  # rlcpm.data.Example
    trajectories: list[Trajectory]
    rewards: list[float] | None = None
    scores: list[float] | None = None  # the rewards before algorithm.overlong_penalty: what dynamic sampling judges
    reward_components: list[dict[str, float]] | None = None
    dropped: list[bool] | None = None  # reward on_error: drop
    loss_mask: list[bool] | None = None  # False: the response carries zero loss weight

    @property
    def is_finished(self) -> bool:
        return all(t.is_finished for t in self.trajectories)
