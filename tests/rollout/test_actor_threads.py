"""cluster.rollout_threads / learner_threads reach the actors' processes."""

from __future__ import annotations

from rlcpm.config import load_recipe
from rlcpm.learner.group import learner_env
from rlcpm.trainer.rollout_pool import RolloutPool


def test_rollout_threads_reach_the_worker(ray_session, tiny_dirs, tmp_path):
    model_dir = str(tiny_dirs["llama"])
    recipe = load_recipe(
        data={
            "run_dir": str(tmp_path / "run"),
            "model": {"path": model_dir, "dtype": "float32", "device": "cpu"},
            "data": {"train": {"task": "arithmetic", "num_samples": 8}},
            "rewards": [{"name": "math"}],
            "rollout": {"n_samples": 2, "max_new_tokens": 8, "kv_budget_gb": 0.01},
            "cluster": {"rollout_threads": 2},
            "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        }
    )
    pool = RolloutPool(recipe, model_dir)
    try:
        import ray

        assert [h["threads"] for h in ray.get([w.health.remote() for w in pool.workers])] == [2]
    finally:
        pool.close()


def test_learner_env():
    assert learner_env(None) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert learner_env(3) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
