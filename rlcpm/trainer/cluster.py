"""Start or join Ray for a run: a local instance by default, `cluster.address` to join one."""

from __future__ import annotations

import logging
import os
import socket

from rlcpm.config import ClusterConfig
from rlcpm.errors import TrainingError

log = logging.getLogger("rlcpm.trainer")

# Every actor runs one intra-op thread unless told otherwise: on small machines several
# processes (learner, rollout workers, reward workers) share the cores.
_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}


def ensure_ray(cluster: ClusterConfig, actor_cpus: int = 0) -> bool:
    """Make sure Ray is running; returns True when this call started it (and should stop it).
    `actor_cpus`: the CPUs the run's actors reserve, that a local Ray has at least (an actor
    without one would wait for it forever)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {"env_vars": dict(_WORKER_ENV)}
    if cluster.address:
        check_reachable(cluster.address)
        log.info("joining Ray at %s", cluster.address)
        ray.init(address=cluster.address, runtime_env=env, log_to_driver=True, configure_logging=False)
    else:
        ray.init(
            num_cpus=max(cluster.num_cpus or os.cpu_count() or 1, 4, actor_cpus),
            num_gpus=cluster.num_gpus,
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=True,
            configure_logging=False,
        )
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once when `host:port` (or `ray://host:port`) takes no connection: Ray itself
    retries an unreachable address for minutes."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():  # "auto" and the like: Ray resolves them
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise TrainingError(
            f"cluster.address {address}: no connection ({err}); start the cluster there "
            "(`ray start --head`), or leave cluster.address unset for a local Ray"
        ) from err
