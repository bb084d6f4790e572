"""cluster.rollout_threads / learner_threads reach the actors' processes."""

from __future__ import annotations

from rlcpm.learner.group import learner_env
from rlcpm.trainer.rollout_pool import RolloutPool


def test_rollout_threads_reach_the_worker(ray_session, tiny_dirs, pool_recipe):
    model_dir = str(tiny_dirs["llama"])
    recipe = pool_recipe({"max_new_tokens": 8}, cluster={"rollout_threads": 2})
    pool = RolloutPool(recipe, model_dir)
    try:
        import ray

        assert [h["threads"] for h in ray.get([w.health.remote() for w in pool.workers])] == [2]
    finally:
        pool.close()


def test_learner_env():
    assert learner_env(None) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert learner_env(3) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
