"""Shared fixtures: one Ray instance per test session, CPU only, no network."""

from __future__ import annotations

import os

import pytest

# One intra-op thread per process: the suite runs several processes (pytest, Ray actors, sandboxes)
# on 2 cores, and tiny-model matmuls slow down ~100x when threads oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs actors; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def rlcpm_log(caplog):
    """caplog for rlcpm's loggers at WARNING (rlcpm.monitor.setup_logging stops them propagating
    to the root logger, where caplog listens)."""
    import logging

    logger = logging.getLogger("rlcpm")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)
