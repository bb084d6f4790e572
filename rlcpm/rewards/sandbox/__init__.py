"""A local sandbox for untrusted Python: disposable, confined processes (see isolation.py)."""

from rlcpm.rewards.sandbox.isolation import (
    Isolation,
    detect_isolation,
    processes_in_session,
    processes_of_uid,
)
from rlcpm.rewards.sandbox.runner import SandboxLimits, SandboxRun, run_sandboxed

__all__ = [
    "Isolation",
    "SandboxLimits",
    "SandboxRun",
    "detect_isolation",
    "processes_in_session",
    "processes_of_uid",
    "run_sandboxed",
]
