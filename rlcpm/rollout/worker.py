"""RolloutWorker: the engine inside a Ray actor.

    Worker = ray.remote(RolloutWorker).options(num_cpus=1)
    worker = Worker.remote(model_dir, dtype="float32", max_num_seqs=64)
    ray.get(worker.health.remote())
    outs = ray.get(worker.generate.remote(requests, None, 512, expected_version))
    version = ray.get(worker.update_weights.remote(named_tensors, version + 1))

The class is plain Python (no ``@ray.remote``) so it can also run in-process; callers choose
the actor resources. Outputs are ``RequestOutput`` dataclasses (picklable).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from rlcpm.cpu_memory import resident_bytes
from rlcpm.errors import WeightSyncError
from rlcpm.rollout.engine import Engine
from rlcpm.rollout.sampling import SamplingParams
from rlcpm.rollout.sequence import RequestOutput


class RolloutWorker:
    """One engine over a HF model directory; see ``Engine`` for the arguments."""

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        max_num_seqs: int = 64,
        max_num_batched_tokens: int | None = None,
        kv_budget_gb: float | None = None,
        attention: str = "dense",
        seed: int = 0,
        **engine_kwargs: Any,
    ):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if max_num_batched_tokens is None:  # CPU: smaller forwards keep their activations in cache
            max_num_batched_tokens = 2048 if torch.device(device).type == "cpu" else 8192
        self.model_dir = model_dir
        self.engine = Engine.from_pretrained(
            model_dir,
            dtype=dtype,
            device=device,
            attention=attention,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            kv_budget_gb=kv_budget_gb,
            seed=seed,
            **engine_kwargs,
        )

    def health(self) -> dict[str, Any]:
        """Cheap liveness probe: one forward of one token, plus where the worker runs."""
        self.engine.weights.check_consistent()
        with torch.inference_mode():
            logits = self.engine.model(torch.zeros(1, 1, dtype=torch.long, device=self.engine.device))
        if not bool(torch.isfinite(logits).all()):
            raise WeightSyncError(
                f"rollout worker on {socket.gethostname()}: the model produces non-finite logits"
            )
        return {
            "ok": True,
            "weight_version": self.engine.weight_version,
            "device": str(self.engine.device),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
        }

    def generate(
        self,
        prompts: Sequence,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        max_chunk_tokens: int | None = None,
        expected_version: int | None = None,
    ) -> list[RequestOutput]:
        """``Engine.generate``; with ``expected_version``, refuse to sample under other weights."""
        if expected_version is not None and expected_version != self.engine.weight_version:
            raise WeightSyncError(
                f"rollout worker holds weight version {self.engine.weight_version}, "
                f"the caller expects {expected_version}: push the weights first"
            )
        return self.engine.generate(prompts, params, max_chunk_tokens)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Stream new weights in place (``Engine.update_weights``); returns the version now held."""
        self.engine.update_weights(named_tensors, version)
        return self.engine.weight_version

    def begin_weight_update(self, version: int) -> None:
        """Start an update sent bucket by bucket (``Engine.begin_weight_update``): until
        ``finish_weight_update`` the worker refuses to generate."""
        self.engine.begin_weight_update(version)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.engine.load_weights(named_tensors)

    def finish_weight_update(self) -> int:
        """Check that every parameter arrived and take the update's version; returns the version now held."""
        self.engine.finish_weight_update()
        return self.engine.weight_version

    def drop_paused(self, request_ids: Sequence | None = None) -> int:
        return self.engine.drop_paused(request_ids)

    def stats(self) -> dict[str, float]:
        """``Engine.engine_stats`` and the worker process's resident memory (``rss_bytes``)."""
        return {**self.engine.engine_stats(), "rss_bytes": resident_bytes()}
