"""`LearnerGroup`: N learner ranks as Ray actors in one torch.distributed group (FSDP2 when N > 1).

Same interface as `Learner`. Every call goes to every rank (FSDP2's collectives need all of
them); a batch is put in the object store once and each rank trains on its token-balanced
share. Rank 0 picks the rendezvous address and port, and is the one that streams weights out.

    group = LearnerGroup(recipe, num_ranks=2)
    metrics = group.train_step(batch)
    for bucket in group.weight_buckets():      # [(hf_name, tensor), ...]
        engine.update_weights(bucket)
    group.close()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from rlcpm.config import Recipe
from rlcpm.cpu_memory import retain_freed_memory
from rlcpm.errors import TrainingError
from rlcpm.learner.weights import DEFAULT_BUCKET_BYTES, NamedTensors


def learner_env(num_threads: int | None) -> dict[str, str]:
    """Environment of a learner rank's process (merged into the job's Ray runtime_env).

    OpenMP threads that wait passively: a rank's GEMMs hardly ever wait at a barrier, but its
    spinning threads would take the cores from a rollout worker sampling beside it (one-step
    overlap on a CPU machine: 16.4 -> 14.5 s per step in an A/B of benchmarks/vs_trl's setting)."""
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    if num_threads is not None:
        env["OMP_NUM_THREADS"] = str(num_threads)
    return env


class LearnerRank:
    """One rank (the Ray actor class): joins the process group, then holds a `Learner`."""

    def __init__(self, recipe: Recipe, model_dir: str | None, rank: int, world_size: int):
        self.recipe, self.model_dir, self.rank, self.world_size = recipe, model_dir, rank, world_size
        self.learner = None

    def rendezvous(self) -> tuple[str, int]:
        """(address, free port) of this node: rank 0's is the group's master."""
        from rlcpm.learner.distributed import free_port, node_address

        return node_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> None:
        from rlcpm.learner.distributed import init_process_group
        from rlcpm.learner.learner import Learner

        if self.world_size > 1:
            init_process_group(self.rank, self.world_size, master_addr, master_port)
        self.learner = Learner(
            self.recipe, model_dir=self.model_dir, rank=self.rank, world_size=self.world_size
        )
        if self.recipe.cluster.retain_cpu_memory and self.learner.device.type == "cpu":
            retain_freed_memory()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.learner, method)(*args, **kwargs)

    def get(self, attribute: str) -> Any:
        return getattr(self.learner, attribute)

    def weight_buckets(self, bucket_bytes: int, dtype: torch.dtype | None):
        """A generator; every rank gathers in step, only rank 0 yields the buckets."""
        for bucket in self.learner.weight_buckets(bucket_bytes, dtype):
            if self.rank == 0:
                yield bucket


@dataclass
class PendingCall:
    """A learner call running on every rank (e.g. an update overlapping the next rollout)."""

    refs: list
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.finished: float | None = None  # when the last rank returned (noted as it happens)
        self._left = len(self.refs)
        self._lock = threading.Lock()
        for ref in self.refs:
            ref.future().add_done_callback(self._rank_done)

    def _rank_done(self, _future) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.finished = time.perf_counter()

    def result(self) -> Any:
        """Wait for every rank; rank 0's result."""
        return ray.get(self.refs)[0]

    @property
    def seconds(self) -> float:
        """How long the call ran: until its last rank returned, not until `result()` was asked
        (an update overlapping a rollout is done long before the rollout is)."""
        return (self.finished or time.perf_counter()) - self.started


class LearnerGroup:
    """Data-parallel learner ranks on Ray; see the module docstring."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        model_dir: str | Path | None = None,
        num_ranks: int | None = None,
        num_cpus_per_rank: float = 1.0,
    ):
        if not ray.is_initialized():
            raise TrainingError("LearnerGroup needs a running Ray instance (ray.init() or rlcpm's trainer)")
        self.world_size = num_ranks or recipe.learner.data_parallel
        actor_class = ray.remote(LearnerRank).options(
            num_cpus=num_cpus_per_rank,
            num_gpus=recipe.cluster.gpus_per_learner,
            runtime_env={"env_vars": learner_env(recipe.cluster.learner_threads)},
        )
        model_dir = str(model_dir) if model_dir is not None else None
        self.ranks = [
            actor_class.remote(recipe, model_dir, r, self.world_size) for r in range(self.world_size)
        ]
        master_addr, master_port = ray.get(self.ranks[0].rendezvous.remote())
        ray.get([rank.setup.remote(master_addr, master_port) for rank in self.ranks])

    def start(self, method: str, *args: Any, **kwargs: Any) -> PendingCall:
        """Start `Learner.method` on every rank without waiting; `.result()` waits for it."""
        args = tuple(ray.put(a) for a in args)  # one copy in the object store, not one per rank
        return PendingCall([rank.call.remote(method, *args, **kwargs) for rank in self.ranks])

    def _on_all_ranks(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call `Learner.method` on every rank; returns rank 0's result."""
        return self.start(method, *args, **kwargs).result()

    # The Learner interface ------------------------------------------------------------------

    def compute_logprobs(self, batch, *, reference: bool = False) -> list[list[float]]:
        return self._on_all_ranks("compute_logprobs", batch, reference=reference)

    def response_logprobs(self, prompts, responses, **kwargs) -> list[list[float]]:
        return self._on_all_ranks("response_logprobs", prompts, responses, **kwargs)

    def sequence_logprobs(self, prompts, responses, **kwargs) -> list[float]:
        return self._on_all_ranks("sequence_logprobs", prompts, responses, **kwargs)

    def train_step(self, batch) -> dict[str, float]:
        return self._on_all_ranks("train_step", batch)

    def skip_step(self) -> dict[str, float]:
        return self._on_all_ranks("skip_step")

    def sft_step(self, examples) -> dict[str, float]:
        return self._on_all_ranks("sft_step", examples)

    def dpo_step(self, pairs) -> dict[str, float]:
        return self._on_all_ranks("dpo_step", pairs)

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        return self._on_all_ranks("save_checkpoint", str(path), extra)

    def load_checkpoint(self, path: str | Path) -> dict:
        return self._on_all_ranks("load_checkpoint", str(path))

    def export_hf(self, path: str | Path) -> Path:
        return self._on_all_ranks("export_hf", str(path))

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self.weight_buckets():
            yield from bucket

    def weight_buckets(
        self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype | None = None
    ) -> Iterator[NamedTensors]:
        """Rank 0's buckets, streamed as they are gathered (Ray streaming generators)."""
        streams = [
            rank.weight_buckets.options(num_returns="streaming").remote(bucket_bytes, dtype)
            for rank in self.ranks
        ]
        for ref in streams[0]:
            yield ray.get(ref)
        for stream in streams[1:]:  # the other ranks end their (empty) streams
            for ref in stream:
                ray.get(ref)

    @property
    def step(self) -> int:
        return ray.get(self.ranks[0].get.remote("step"))

    @property
    def policy_version(self) -> int:
        return ray.get(self.ranks[0].get.remote("policy_version"))

    def close(self) -> None:
        """Leave the process group on every rank, then end the actors."""
        if not self.ranks:
            return
        ray.get([rank.call.remote("close") for rank in self.ranks])
        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []
