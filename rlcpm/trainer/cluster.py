"""Start or join Ray for a run: a local instance by default, `cluster.address` to join one."""

from __future__ import annotations

import logging
import os

from rlcpm.config import ClusterConfig

log = logging.getLogger("rlcpm.trainer")

# Every actor runs one intra-op thread unless told otherwise: on small machines several
# processes (learner, rollout workers, reward workers) share the cores.
_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}


def ensure_ray(cluster: ClusterConfig) -> bool:
    """Make sure Ray is running; returns True when this call started it (and should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {"env_vars": dict(_WORKER_ENV)}
    if cluster.address:
        log.info("joining Ray at %s", cluster.address)
        ray.init(address=cluster.address, runtime_env=env, log_to_driver=True, configure_logging=False)
    else:
        ray.init(
            num_cpus=max(cluster.num_cpus or os.cpu_count() or 1, 4),
            num_gpus=cluster.num_gpus,
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=True,
            configure_logging=False,
        )
    return True
