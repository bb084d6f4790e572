"""What the learner trains on: typed sequences and batches (no loose dicts between actors).

A sequence is `prompt_token_ids + response_token_ids`; the learner scores the response tokens
(the prompt is context only). Per response token it may carry the behaviour log-prob and the
policy version that sampled it (chunk-level importance sampling, SPECS §1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlcpm.errors import TrainingError


@dataclass
class RLSequence:
    """One response of an RL batch.

    Attributes:
        prompt_token_ids: the prompt (context only, never scored).
        response_token_ids: the sampled response, the tokens the loss is about.
        behaviour_logprobs: per response token, log-prob under the version that sampled it.
        versions: per response token, that policy version.
        advantage: A_i, broadcast to every response token.
        is_loss_masked: True gives the response zero loss weight (overlong / repetitive / dropped).
        ref_logprobs: per response token, reference log-probs (filled by the learner when needed).
        reward: the scalar reward, for logging.
        group_id: the prompt group, for logging.
    """

    prompt_token_ids: list[int]
    response_token_ids: list[int]
    behaviour_logprobs: list[float]
    advantage: float
    versions: list[int] = field(default_factory=list)
    is_loss_masked: bool = False
    ref_logprobs: list[float] | None = None
    reward: float = 0.0
    group_id: str = ""

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise TrainingError(f"group {self.group_id!r}: a sequence needs at least one prompt token")
        num_response = len(self.response_token_ids)
        if len(self.behaviour_logprobs) != num_response:
            raise TrainingError(
                f"group {self.group_id!r}: {num_response} response tokens but "
                f"{len(self.behaviour_logprobs)} behaviour_logprobs"
            )
        if self.ref_logprobs is not None and len(self.ref_logprobs) != num_response:
            raise TrainingError(
                f"group {self.group_id!r}: {num_response} response tokens but {len(self.ref_logprobs)} ref_logprobs"
            )


@dataclass
class RLBatch:
    """The N groups x G responses of one RL step."""

    sequences: list[RLSequence]

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def num_loss_tokens(self) -> int:
        """Global token-mean denominator: response tokens of sequences that are not loss-masked."""
        return sum(len(s.response_token_ids) for s in self.sequences if not s.is_loss_masked)

    @property
    def num_loss_sequences(self) -> int:
        """Global seq-mean denominator: sequences with at least one loss token."""
        return sum(1 for s in self.sequences if not s.is_loss_masked and s.response_token_ids)

    @classmethod
    def from_groups(cls, groups: Sequence, advantages: Sequence[Sequence[float]] | torch.Tensor) -> RLBatch:
        """Build from the RL loop's finished groups (rlcpm.trainer.trajectory.Group) and A [N, G].

        A response is loss-masked when its group marks it so (`loss_mask[i]` False) or it was
        dropped by the reward pool (`dropped[i]` True).
        """
        sequences = []
        for group, group_advantages in zip(groups, advantages):
            for i, trajectory in enumerate(group.trajectories):
                is_kept = group.loss_mask is None or bool(group.loss_mask[i])
                is_dropped = group.dropped is not None and bool(group.dropped[i])
                sequences.append(
                    RLSequence(
                        prompt_token_ids=list(trajectory.prompt_token_ids),
                        response_token_ids=list(trajectory.response_token_ids),
                        behaviour_logprobs=list(trajectory.behaviour_logprobs),
                        versions=list(trajectory.versions),
                        advantage=float(group_advantages[i]),
                        is_loss_masked=not is_kept or is_dropped,
                        reward=float(group.rewards[i]) if group.rewards is not None else 0.0,
                        group_id=group.group_id,
                    )
                )
        return cls(sequences)


@dataclass
class SFTSequence:
    """A demonstration: the loss is the NLL of `response_token_ids` given the prompt."""

    prompt_token_ids: list[int]
    response_token_ids: list[int]


@dataclass
class PreferencePair:
    """A DPO pair: two responses to one prompt, with reference sequence log-probs once computed."""

    prompt_token_ids: list[int]
    chosen_token_ids: list[int]
    rejected_token_ids: list[int]
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None
