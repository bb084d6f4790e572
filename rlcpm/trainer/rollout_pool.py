"""RolloutWorker actors seen as one pool: load balancing, weight sync, and restart on failure.

- Load balance by outstanding tokens, not request counts: a group (the G samples of one prompt,
  kept together for prefix sharing) goes to the worker with the fewest tokens to process, and
  stays there while the weights are unchanged so its paused KV can be reused.
- Weight sync streams the learner's named tensors to every worker bucket by bucket with a
  version number; a worker generates only once every bucket arrived, and one whose version does
  not match after the update fails loudly.
- A worker that dies mid-round is replaced, given the current weights, and its share of the
  round is generated again: requests are seeded, so nothing is lost or changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rlcpm.config import Recipe
from rlcpm.errors import EngineError, WeightSyncError
from rlcpm.learner.weights import NamedTensors
from rlcpm.rollout import Request, SamplingParams
from rlcpm.rollout.speculative import acceptance_stats
from rlcpm.trainer.chunk_scheduler import ChunkRequest, ChunkResult

log = logging.getLogger("rlcpm.trainer")

MAX_RETRIES = 3
SPEC_COUNTERS = ("spec_num_rounds", "spec_draft_tokens", "spec_accepted_tokens")  # engine_stats keys


@dataclass
class SyncStats:
    seconds: float
    num_bytes: int
    version: int


class RolloutPool:
    def __init__(self, recipe: Recipe, model_dir: str | Path):
        import ray

        from rlcpm.rollout import RolloutWorker

        self.recipe = recipe
        self.model_dir = str(model_dir)
        threads = recipe.cluster.rollout_threads
        self._actor_class = ray.remote(RolloutWorker).options(
            num_cpus=1,
            num_gpus=recipe.cluster.gpus_per_rollout_worker,
            max_restarts=0,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}} if threads else None,
        )
        self.version = 0
        self._bucket_refs: list = []  # the buckets of the weights pushed, for replacement workers
        self._syncing: int | None = None  # the version being pushed, during a sync
        self._affinity: dict[str, int] = {}  # group id -> worker index (same weights, reusable KV)
        self.num_restarts = 0
        self._spec_seen: dict[int, dict[str, int]] = {}  # worker index -> last speculation counters
        self._preemptions_seen: dict[int, int] = {}  # worker index -> preemptions at the last call
        self.workers = [self._spawn() for _ in range(recipe.rollout.workers)]
        ray.get([w.health.remote() for w in self.workers])

    @property
    def dtype(self) -> str:
        return engine_dtype(self.recipe)

    @property
    def weight_dtype(self) -> torch.dtype:
        return engine_weight_dtype(self.recipe, self.model_dir)

    def _spawn(self):
        rollout = self.recipe.rollout
        return self._actor_class.remote(
            self.model_dir,
            dtype=self.dtype,
            device=self.recipe.model.device,
            tokenizer_path=self.recipe.model.tokenizer,  # None: the model's own
            max_num_seqs=rollout.max_batch_seqs,
            max_num_batched_tokens=rollout.max_batch_tokens,
            kv_budget_gb=rollout.kv_budget_gb,
            attention=self.recipe.model.attention,
            sparse_config=self.recipe.model.sparse_config_override(),
            seed=self.recipe.seed,
            speculative=rollout.speculative.model_dump() if rollout.speculative is not None else None,
            draft_keep_token_ids=list(rollout.stop_token_ids),  # SPECS §3.1: stop tokens stay draftable
        )

    # ------------------------------------------------------------------------------ weights

    def sync_weights(self, buckets: Iterable[NamedTensors], version: int) -> SyncStats:
        """Stream the buckets of (name, tensor) pairs to every worker as `version`, one bucket at
        a time: put it in the object store, have every worker load it in place, then the next.
        From the first bucket until every worker has checked that the last one completed the
        model, the workers refuse to generate; each then holds `version`, verified here. A
        worker that dies meanwhile is replaced and given the buckets sent so far.

        The driver holds one bucket at a time. The object store keeps the current version's
        buckets (one copy of the model) for replacement workers; the previous version's are
        released as this sync starts.

        `buckets` may be the learner's lazy stream (`LearnerGroup.weight_buckets`): the seconds
        returned cover the whole learner -> workers sync, gathering and casting the weights on
        the learner included, not only the transfer and the workers' loads."""
        import ray

        start = time.perf_counter()
        self._syncing, self._bucket_refs = version, []
        self._affinity.clear()  # every worker drops the old weights' KV
        self._on_every_worker(lambda worker, index: worker.begin_weight_update.remote(version))
        num_bytes = 0
        for bucket in buckets:
            ref = ray.put(bucket)
            num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            del bucket  # the next bucket is fetched without this one still held
            self._on_every_worker(lambda worker, index, ref=ref: worker.load_weights.remote(ref))
            self._bucket_refs.append(ref)
        versions = self._on_every_worker(lambda worker, index: worker.finish_weight_update.remote())
        for index, got in enumerate(versions):
            if got != version:
                raise WeightSyncError(
                    f"rollout worker {index} reports weight version {got} after loading {version}"
                )
        self._syncing, self.version = None, version
        return SyncStats(time.perf_counter() - start, num_bytes, version)

    # ----------------------------------------------------------------------------- generate

    def generate(self, requests: Sequence[ChunkRequest], group_of: dict[str, str]) -> list[ChunkResult]:
        """One round: every request generates up to its chunk budget; results in request order.
        A worker that dies mid-round is replaced and its share generated again (seeded: same tokens)."""
        shares = self._assign(requests, group_of)
        busy = [i for i, share in enumerate(shares) if share]
        parts = self._on_workers(busy, lambda worker, i: worker.generate.remote(*self._call_args(shares[i])))
        results = {out.request_id: self._to_result(out) for part in parts for out in part}
        return [results[r.traj_id] for r in requests]

    def _call_args(self, share: list[ChunkRequest]):
        rollout = self.recipe.rollout
        reqs = [
            Request(r.traj_id, r.prompt_token_ids, _params(rollout, r), list(r.output_token_ids))
            for r in share
        ]
        budget = share[0].max_chunk_tokens
        return reqs, None, budget, self.version

    def _to_result(self, out) -> ChunkResult:
        if out.finish_reason == "aborted":
            raise EngineError(f"rollout request {out.request_id} was refused: {out.error}")
        if out.weight_version != self.version:
            raise WeightSyncError(
                f"request {out.request_id} was sampled with weight version {out.weight_version}, "
                f"expected {self.version}: refusing stale samples"
            )
        return ChunkResult(out.request_id, list(out.token_ids), list(out.logprobs), out.finish_reason)

    def _assign(self, requests: Sequence[ChunkRequest], group_of: dict[str, str]) -> list[list[ChunkRequest]]:
        """Groups to workers: keep affinity; otherwise the least-loaded worker by token estimate."""
        groups: dict[str, list[ChunkRequest]] = {}
        for req in requests:
            groups.setdefault(group_of[req.traj_id], []).append(req)
        load = [0] * len(self.workers)
        shares: list[list[ChunkRequest]] = [[] for _ in self.workers]
        new = []
        for group_id, reqs in groups.items():
            index = self._affinity.get(group_id)
            if index is None:
                new.append((group_id, reqs))
                continue
            shares[index].extend(reqs)
            load[index] += _token_cost(reqs, cached=True)
        for group_id, reqs in sorted(new, key=lambda item: -_token_cost(item[1], cached=False)):
            index = min(range(len(load)), key=load.__getitem__)
            shares[index].extend(reqs)
            load[index] += _token_cost(reqs, cached=False)
            self._affinity[group_id] = index
        return shares

    def _replace(self, index: int) -> None:
        import ray

        try:
            ray.kill(self.workers[index], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        worker = self._spawn()
        ray.get(worker.health.remote())
        if self._syncing is not None or self._bucket_refs:
            # the buckets of the version being synced (the sync goes on with the next one and
            # finishes the update) or of the current one, completed here
            version = self._syncing if self._syncing is not None else self.version
            ray.get(worker.begin_weight_update.remote(version))
            for ref in self._bucket_refs:
                ray.get(worker.load_weights.remote(ref))
            if self._syncing is None and ray.get(worker.finish_weight_update.remote()) != self.version:
                raise WeightSyncError(
                    f"replacement rollout worker {index} could not load version {self.version}"
                )
        self.workers[index] = worker
        self._preemptions_seen.pop(index, None)  # a fresh engine counts from 0
        self._spec_seen.pop(index, None)
        self._affinity = {g: w for g, w in self._affinity.items() if w != index}
        self.num_restarts += 1

    def _on_every_worker(self, call) -> list:
        """``call(worker, index)`` (a Ray call) on every worker at once; results in worker order."""
        return self._on_workers(range(len(self.workers)), call)

    def _on_workers(self, indices, call) -> list:
        """``call(worker, index)`` (a Ray call) on the workers ``indices`` at once; results in
        that order. A worker that died (mid-round, during an update) is replaced and called again."""
        import ray

        futures = {index: call(self.workers[index], index) for index in indices}
        results = []
        for index, future in futures.items():
            for attempt in range(MAX_RETRIES + 1):
                try:
                    if future is None:  # a replacement that dies starting up counts as an attempt
                        self._replace(index)
                        future = call(self.workers[index], index)
                    results.append(ray.get(future))
                    break
                except ray.exceptions.RayActorError as err:
                    if attempt == MAX_RETRIES:
                        raise EngineError(f"rollout worker {index} kept failing after {MAX_RETRIES} restarts") from err
                    log.warning("rollout worker %d died (%s); restarting it", index, err)
                    future = None
        return results

    # ----------------------------------------------------------------------------- helpers

    def generate_plain(self, prompts: list[list[int]], params: list[SamplingParams]) -> list:
        """Plain generation (evaluation): prompts spread evenly over the workers, outputs in order."""
        n = len(self.workers)
        parts = self._on_every_worker(
            lambda worker, i: worker.generate.remote(prompts[i::n], params[i::n], None, self.version)
        )
        outputs = [None] * len(prompts)
        for i, part in enumerate(parts):
            outputs[i::n] = part
        return outputs

    def stats(self) -> list[dict]:
        return self._on_every_worker(lambda worker, index: worker.stats.remote())

    def system_metrics(self) -> dict[str, float]:
        """`sys/*` of every worker: resident memory and KV-cache use now (after a step's rollout:
        the KV that paused, carried-over trajectories hold), preemptions since the last call."""
        metrics: dict[str, float] = {}
        preemptions = 0
        for index, stats in enumerate(self.stats()):
            metrics[f"sys/rollout{index}_rss_gb"] = stats["rss_bytes"] / 1e9
            used = stats["num_kv_blocks"] - stats["num_free_kv_blocks"]
            metrics[f"sys/rollout{index}_kv_used_fraction"] = used / max(1, stats["num_kv_blocks"])
            preemptions += stats["num_preemptions"] - self._preemptions_seen.get(index, 0)
            self._preemptions_seen[index] = stats["num_preemptions"]
        metrics["sys/rollout_preemptions"] = float(preemptions)
        return metrics

    def speculation_metrics(self) -> dict[str, float]:
        """Speculative decoding since the last call, over every worker: mean acceptance length
        (tokens per target verification) and the fraction of drafted tokens accepted. Empty
        without a draft. The draft is not trained by RL, so these fall as the policy moves away
        from it: watch them over a run."""
        if self.recipe.rollout.speculative is None:
            return {}
        delta = dict.fromkeys(SPEC_COUNTERS, 0)
        for index, stats in enumerate(self.stats()):
            now = {key: stats.get(key, 0) for key in SPEC_COUNTERS}
            before = self._spec_seen.get(index, {})
            restarted = any(now[key] < before.get(key, 0) for key in SPEC_COUNTERS)  # counters reset
            for key in SPEC_COUNTERS:
                delta[key] += now[key] - (0 if restarted else before.get(key, 0))
            self._spec_seen[index] = now
        metrics = {"rollout/spec_rounds": float(delta["spec_num_rounds"])}
        if delta["spec_num_rounds"]:  # a step served from buffered groups drafted nothing (not 0)
            stats = acceptance_stats(*(delta[key] for key in SPEC_COUNTERS))
            metrics.update({f"rollout/{key}": value for key, value in stats.items()})
        return metrics

    def kill_worker(self, index: int) -> None:
        """Kill a worker (fault-injection in tests and benchmarks); the next round replaces it."""
        import ray

        ray.kill(self.workers[index], no_restart=True)

    def close(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []


def engine_dtype(recipe: Recipe) -> str:
    """The engines' dtype: rollout.dtype, else the model's ("auto": the checkpoint's)."""
    rollout = recipe.rollout
    return rollout.dtype if rollout.dtype != "auto" else recipe.model.dtype


def engine_weight_dtype(recipe: Recipe, model_dir: str | Path) -> torch.dtype:
    """What learner weights are cast to before an engine gets them: the engines' dtype ("auto":
    the checkpoint's torch_dtype, as the engines load it; the learner trains in float32)."""
    from rlcpm.models import read_config

    dtype = engine_dtype(recipe)
    return read_config(model_dir).torch_dtype if dtype == "auto" else getattr(torch, dtype)


def _params(rollout, req: ChunkRequest) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=req.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k,
        seed=req.seed,
        stop=list(rollout.stop),
        stop_token_ids=list(rollout.stop_token_ids),
    )


def _token_cost(reqs: Sequence[ChunkRequest], cached: bool) -> int:
    """Tokens a worker must process for one group this round: prefill (the shared prompt once,
    each sample's earlier output) unless its KV is cached, plus the decode budget."""
    cost = 0 if cached else len(reqs[0].prompt_token_ids)
    for r in reqs:
        done = len(r.output_token_ids)
        cost += min(r.max_chunk_tokens or r.max_new_tokens, r.max_new_tokens - done)
        cost += 0 if cached else done
    return cost
