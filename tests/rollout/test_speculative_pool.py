"""The recipe's `rollout.speculative` reaches the trainer's Ray rollout workers, and their
engine stats report acceptance; a weight sync updates the target, not the draft."""

from __future__ import annotations

import torch

from rlcpm.config import load_recipe
from rlcpm.trainer.chunk_scheduler import ChunkRequest
from rlcpm.trainer.rollout_pool import RolloutPool


def test_rollout_pool_workers_decode_speculatively(ray_session, tiny_dirs, tmp_path):
    model_dir = str(tiny_dirs["llama"])
    recipe = load_recipe(
        data={
            "seed": 0,
            "run_dir": str(tmp_path / "run"),
            "model": {"path": model_dir, "dtype": "float32", "device": "cpu"},
            "data": {"train": {"task": "arithmetic", "num_samples": 8, "seed": 0}},
            "rewards": [{"name": "math"}],
            "algorithm": {"name": "grpo", "groups_per_step": 1},
            "rollout": {
                "n_samples": 2,
                "max_new_tokens": 16,
                "kv_budget_gb": 0.01,
                # the target as its own draft: every draft token must be accepted
                "speculative": {"draft": model_dir, "num_draft_tokens": 3},
            },
            "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        }
    )
    pool = RolloutPool(recipe, model_dir)
    try:
        requests = [ChunkRequest(f"t{i}", [5, 17, 301, 42 + i], [], i, 16, 8) for i in range(2)]
        results = pool.generate(requests, {"t0": "g", "t1": "g"})
        assert all(len(r.token_ids) == 8 or r.finish_reason == "stop" for r in results)
        stats = pool.stats()[0]
        assert stats["spec_draft_tokens"] > 0
        assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"]
        assert stats["spec_acceptance_len"] > 3
        metrics = pool.speculation_metrics()  # what the RL loop logs each step
        assert metrics["rollout/spec_acceptance_rate"] == 1.0 and metrics["rollout/spec_acceptance_len"] > 3

        # RL weight sync: the target changes, the draft stays -> drafts now get rejected
        from rlcpm.models import load_model

        weights = [
            (n, p.detach() * 1.3) for n, p in load_model(model_dir, dtype="float32").named_parameters()
        ]
        pool.sync_weights([weights], version=1)  # one bucket
        pool.generate([ChunkRequest("t2", [5, 17, 301, 42], [], 7, 16, 16)], {"t2": "h"})
        after = pool.stats()[0]
        new_drafts = after["spec_draft_tokens"] - stats["spec_draft_tokens"]
        new_accepts = after["spec_accepted_tokens"] - stats["spec_accepted_tokens"]
        assert new_drafts > 0 and new_accepts < new_drafts
        assert torch.isfinite(torch.tensor(after["spec_acceptance_rate"]))
        metrics = pool.speculation_metrics()  # only the rounds since the last call
        assert metrics["rollout/spec_acceptance_rate"] == new_accepts / new_drafts
        assert pool.speculation_metrics()["rollout/spec_rounds"] == 0
    finally:
        pool.close()


def test_speculation_metrics_count_every_round_of_a_replacement_worker(ray_session, tiny_dirs, pool_recipe):
    """A replaced worker's counters start at 0, but the pool subtracted the dead worker's last
    counters from them: a replacement that drafted more rounds than its predecessor had was
    reported short by that many."""
    model_dir = str(tiny_dirs["llama"])
    recipe = pool_recipe({"speculative": {"draft": model_dir}})
    pool = RolloutPool(recipe, model_dir)
    try:
        pool.generate([ChunkRequest("a", [5, 17, 301, 42], [], 0, 4, None)], {"a": "g"})
        assert pool.speculation_metrics()["rollout/spec_rounds"] >= 1
        pool.kill_worker(0)
        pool.generate([ChunkRequest("b", [5, 17, 301, 43], [], 1, 16, None)], {"b": "h"})
        rounds = pool.stats()[0]["spec_num_rounds"]  # the replacement's, all since this last call
        assert rounds > 1
        assert pool.speculation_metrics()["rollout/spec_rounds"] == rounds
    finally:
        pool.close()
