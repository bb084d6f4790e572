"""`RewardPool`: score batches on Ray worker actors in parallel, with per-sample time limits.

The driver resolves the recipe's rewards (so a bad name or path fails at once, with a clear
message) and ships them to `num_workers` actors; a batch is cut into chunks handed to whichever
worker is free. Inside a worker every call has its own time limit (calling.py). Two backstops
keep a step moving whatever a reward does:
- a worker that abandoned a hung call is replaced after answering (its stuck thread may spin);
- a worker that does not answer a chunk in len(chunk) * sum(term timeouts) + `slack_s` (stuck in
  C code holding the GIL, deadlocked, crashed) is killed and replaced. Which term hung is not
  known then, and the scores it finished are lost: every sample of that chunk scores 0.0, and is
  dropped if any term has on_error: drop (`_failed`).

Custom reward modules must be importable in the workers: the directory each reward function's
module was imported from is put on the workers' sys.path, plus any `python_path` given.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rlcpm.config import RewardSpec
from rlcpm.errors import RewardError
from rlcpm.rewards.combined import CombinedReward, RewardResult, RewardTerm, resolve_terms
from rlcpm.rewards.sample import Sample

logger = logging.getLogger("rlcpm.rewards.pool")

WORKER_START_TIMEOUT_S = 300.0


class RewardWorker:
    """Ray actor body: a CombinedReward in its own process."""

    def __init__(self, payload: bytes, python_path: list[str]):
        for path in reversed(python_path):
            if path not in sys.path:
                sys.path.insert(0, path)
        from ray import cloudpickle

        self.reward = CombinedReward(cloudpickle.loads(payload))

    def ready(self) -> bool:
        return True

    def score(self, samples: list[Sample]) -> tuple[list[RewardResult], int]:
        """(results, number of calls abandoned while scoring them)."""
        before = self.reward.num_abandoned_calls
        results = self.reward.score(samples)
        return results, self.reward.num_abandoned_calls - before


class RewardPool:
    """Score samples with the recipe's rewards on `num_workers` Ray actors.

        pool = RewardPool(recipe.rewards, num_workers=4)
        results = pool.score(samples)   # list[RewardResult], in order
        pool.close()

    num_cpus_per_worker: CPUs Ray reserves per worker (default 0: rewards run between rollout
    and training phases). chunk_size: samples per task (default: a batch split in 2 per worker).
    """

    def __init__(
        self,
        rewards: Sequence[RewardSpec | dict],
        num_workers: int = 2,
        *,
        python_path: Sequence[str] = (),
        num_cpus_per_worker: float = 0.0,
        chunk_size: int | None = None,
        slack_s: float = 30.0,
    ):
        import ray
        from ray import cloudpickle

        if not ray.is_initialized():
            raise RewardError("RewardPool needs a running Ray instance: call ray.init() first")
        if num_workers < 1:
            raise RewardError(f"RewardPool needs num_workers >= 1, got {num_workers}")
        self.terms: list[RewardTerm] = resolve_terms(rewards)
        self.python_path = list(dict.fromkeys([*python_path, *_import_roots(self.terms)]))
        self._payload = cloudpickle.dumps(self.terms)
        self._actor_class = ray.remote(num_cpus=num_cpus_per_worker, max_restarts=0)(RewardWorker)
        self.chunk_size = chunk_size
        self.slack_s = slack_s
        self.num_restarts = 0
        self._starting: dict = {}  # ready ref of a replacement worker -> its index
        self._workers = [self._start_worker() for _ in range(num_workers)]
        self._wait_ready(self._workers)

    def _start_worker(self):
        return self._actor_class.remote(self._payload, self.python_path)

    def _wait_ready(self, workers: list) -> None:
        import ray

        try:
            ray.get([w.ready.remote() for w in workers], timeout=WORKER_START_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the actor's own error, with its cause
            self.close()
            raise RewardError(f"reward workers could not load the rewards: {err}") from err

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        """One RewardResult per sample, in order; returns within the time limits whatever the rewards do."""
        import ray

        samples = list(samples)
        if not samples:
            return []
        size = self.chunk_size or max(1, math.ceil(len(samples) / (2 * len(self._workers))))
        pending = [(start, samples[start : start + size]) for start in range(0, len(samples), size)][::-1]
        results: list[RewardResult | None] = [None] * len(samples)
        idle = [i for i in range(len(self._workers)) if i not in self._starting.values()]
        in_flight: dict = {}  # ref -> (worker index, start, chunk, deadline)
        while pending or in_flight:
            while idle and pending:
                index, (start, chunk) = idle.pop(), pending.pop()
                ref = self._workers[index].score.remote(chunk)
                in_flight[ref] = (index, start, chunk, time.monotonic() + self._chunk_budget(len(chunk)))
            if not in_flight:  # every worker is (re)starting: wait for one
                idle.append(self._wait_started(ray))
                continue
            wait_s = max(0.0, min(entry[3] for entry in in_flight.values()) - time.monotonic())
            ready, _ = ray.wait([*in_flight, *self._starting], num_returns=1, timeout=wait_s)
            for ref in ready:
                if ref in self._starting:
                    idle.append(self._started(ref))
                    continue
                index, start, chunk, _ = in_flight.pop(ref)
                try:
                    chunk_results, num_abandoned = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - the worker died: score the chunk by on_error
                    chunk_results, num_abandoned = self._failed(chunk, f"reward worker failed: {err}"), 1
                results[start : start + len(chunk)] = chunk_results
                if num_abandoned:
                    self._replace(index)  # its stuck threads may spin: a fresh process instead
                else:
                    idle.append(index)
            now = time.monotonic()
            for ref in [r for r, entry in in_flight.items() if entry[3] <= now]:
                index, start, chunk, _ = in_flight.pop(ref)
                budget = self._chunk_budget(len(chunk))
                message = f"reward worker did not answer within {budget:.3g}s; worker replaced"
                results[start : start + len(chunk)] = self._failed(chunk, message)
                self._replace(index)
        return results

    def _wait_started(self, ray) -> int:
        ready, _ = ray.wait(list(self._starting), num_returns=1, timeout=WORKER_START_TIMEOUT_S)
        if not ready:
            raise RewardError(f"no reward worker started within {WORKER_START_TIMEOUT_S:.0f}s")
        return self._started(ready[0])

    def _started(self, ref) -> int:
        """A replacement worker answered `ready` (or failed to start: raise)."""
        import ray

        index = self._starting.pop(ref)
        try:
            ray.get(ref)
        except Exception as err:  # noqa: BLE001
            raise RewardError(f"a replacement reward worker could not load the rewards: {err}") from err
        return index

    def _chunk_budget(self, num_samples: int) -> float:
        return num_samples * sum(term.timeout_s for term in self.terms) + self.slack_s

    def _failed(self, chunk: list[Sample], reason: str) -> list[RewardResult]:
        """The chunk of a worker that died or missed its deadline: which term failed is unknown,
        so each sample scores 0.0 and is dropped if any term would drop a sample it failed on."""
        functions = ", ".join(f"{t.label!r} ({t.function.path})" for t in self.terms)
        reason = f"{reason}; rewards: {functions}"
        logger.warning("%s (samples %s)", reason, [s.id for s in chunk])
        dropped = any(term.on_error == "drop" for term in self.terms)
        return [
            RewardResult(
                0.0,
                {term.label: 0.0 for term in self.terms},
                dropped=dropped,
                error=f"{reason} (sample {sample.id!r})",
            )
            for sample in chunk
        ]

    def _replace(self, index: int) -> None:
        """Kill worker `index` and start a new one; it takes work once it answers `ready`."""
        import ray

        ray.kill(self._workers[index], no_restart=True)
        self._workers[index] = self._start_worker()
        self._starting[self._workers[index].ready.remote()] = index
        self.num_restarts += 1

    def close(self) -> None:
        import ray

        for worker in self._workers if hasattr(self, "_workers") else []:
            ray.kill(worker, no_restart=True)
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _import_roots(terms: list[RewardTerm]) -> list[str]:
    """For each reward function's module, the sys.path entry it was imported from."""
    roots = []
    for term in terms:
        module = sys.modules.get(term.function.fn.__module__)
        file = getattr(module, "__file__", None)
        if module is None or file is None or module.__name__ == "__main__":
            continue  # __main__ functions are pickled by value
        depth = module.__name__.count(".") + (2 if Path(file).name == "__init__.py" else 1)
        root = Path(file).resolve().parents[depth - 1]
        roots.append(str(root))
    return roots
