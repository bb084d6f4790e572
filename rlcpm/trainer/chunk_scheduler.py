"""Chunk-wise rollout bookkeeping (MiniCPM4 §3.2, Algorithm 1; SPECS §1).

Buffers: `in_flight` holds the groups still generating (R); groups whose G responses have all
finished are handed back to the caller, which scores and filters them into the training
buffer (B). Each round asks the engine for at most `chunk_tokens` new tokens per trajectory;
an unfinished trajectory carries over to the next round, re-prefilled under whatever weights
the engine holds then. `chunk_tokens=None` is classic synchronous rollout.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from rlcpm.trainer.trajectory import Group, Trajectory


@dataclass
class ChunkRequest:
    """One trajectory's share of one generation round."""

    traj_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far (the engine continues from here)
    seed: int
    max_new_tokens: int  # the global response limit, counting earlier chunks' tokens too
    max_chunk_tokens: int | None  # this round's budget


@dataclass
class ChunkResult:
    traj_id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "chunk"


class PromptStream:
    """Examples in a seeded order, epoch after epoch; `position` is saved for resume."""

    def __init__(self, examples: Sequence, seed: int, shuffle: bool = True):
        if not examples:
            raise ValueError("the training dataset is empty")
        self.examples = examples
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0
        self._epoch_order: tuple[int, list[int]] | None = None  # (epoch, its order), made once per epoch

    def _order(self, epoch: int) -> list[int]:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def next(self):
        epoch, index = divmod(self.position, len(self.examples))
        self.position += 1
        return self.examples[self._order(epoch)[index]]


class ChunkScheduler:
    def __init__(
        self,
        prompts: PromptStream,
        tokenize,
        *,
        n_samples: int,
        max_new_tokens: int,
        chunk_tokens: int | None,
        seed: int,
    ):
        self.prompts = prompts
        self.tokenize = tokenize
        self.n_samples = n_samples
        self.max_new_tokens = max_new_tokens
        self.chunk_tokens = chunk_tokens
        self.seed = seed
        self.in_flight: dict[str, Group] = {}  # R, by group id, in arrival order
        self.num_groups_started = 0

    # -------------------------------------------------------------------------------- prompts

    def top_up(self, num_groups: int) -> None:
        """Start `num_groups` new prompts, each with G trajectories."""
        for _ in range(num_groups):
            example = self.prompts.next()
            group_index = self.num_groups_started
            self.num_groups_started += 1
            group_id = f"g{group_index}"
            prompt_ids = self.tokenize(example)
            trajectories = [
                Trajectory(
                    traj_id=f"{group_id}.{i}",
                    group_id=group_id,
                    prompt_token_ids=prompt_ids,
                    seed=_trajectory_seed(self.seed, group_index, i),
                )
                for i in range(self.n_samples)
            ]
            self.in_flight[group_id] = Group(group_id=group_id, example=example, trajectories=trajectories)

    # --------------------------------------------------------------------------------- rounds

    def next_requests(self) -> list[ChunkRequest]:
        """Every unfinished trajectory in flight, each with this round's token budget."""
        requests = []
        for group in self.in_flight.values():
            for traj in group.trajectories:
                if traj.is_finished:
                    continue
                requests.append(
                    ChunkRequest(
                        traj_id=traj.traj_id,
                        prompt_token_ids=traj.prompt_token_ids,
                        output_token_ids=list(traj.response_token_ids),
                        seed=traj.seed,
                        max_new_tokens=self.max_new_tokens,
                        max_chunk_tokens=self.chunk_tokens,
                    )
                )
        return requests

    def absorb(self, results: Sequence[ChunkResult], version: int) -> list[Group]:
        """Record a round's tokens under policy `version`; return the groups that just finished."""
        trajectories = {t.traj_id: t for g in self.in_flight.values() for t in g.trajectories}
        for res in results:
            traj = trajectories[res.traj_id]
            traj.extend(res.token_ids, res.logprobs, version)
            if res.finish_reason in ("stop", "length"):
                traj.finish_reason = res.finish_reason
            elif len(traj.response_token_ids) >= self.max_new_tokens:
                traj.finish_reason = "length"
            elif res.finish_reason != "chunk":
                raise ValueError(f"{res.traj_id}: unexpected finish reason {res.finish_reason!r}")
        done = [g for g in self.in_flight.values() if g.is_finished]
        for group in done:
            del self.in_flight[group.group_id]
        return done

    @property
    def num_in_flight_groups(self) -> int:
        return len(self.in_flight)

    # ---------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "position": self.prompts.position,
            "num_groups_started": self.num_groups_started,
            "in_flight": list(self.in_flight.values()),
        }

    def load_state_dict(self, state: dict) -> None:
        self.prompts.position = state["position"]
        self.num_groups_started = state["num_groups_started"]
        self.in_flight = {g.group_id: g for g in state["in_flight"]}


def _trajectory_seed(seed: int, group_index: int, sample_index: int) -> int:
    """A seed per trajectory that depends only on (run seed, group, sample): chunking cannot change it."""
    return (seed * 1_000_003 + group_index * 4099 + sample_index) % (2**31 - 1)
