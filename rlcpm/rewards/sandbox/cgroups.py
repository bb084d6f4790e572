"""Per-run control groups: one memory cap and one process cap for all of a sandbox's processes.

RLIMIT_AS bounds each process, RLIMIT_NPROC their number; their product can still exceed the
machine's memory. Where this process may create child cgroups (root in most containers), each
run gets its own: memory (v1 `memory.limit_in_bytes`, v2 `memory.max`; tmpfs pages the program
writes count too) and pids (`pids.max`). The supervisor moves itself in before starting the
program; the parent removes the groups when the run is over. Silently unused where unavailable.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("rlcpm.rewards.sandbox")


@dataclass(frozen=True)
class CgroupParent:
    """A directory where child cgroups may be created, and the file that caps one."""

    path: str
    limit_file: str  # "memory.limit_in_bytes", "memory.max" or "pids.max"


@functools.lru_cache(maxsize=1)
def cgroup_parents() -> tuple[CgroupParent, ...]:
    """Where this process can create capped cgroups: its own memory and pids groups (v1 or v2)."""
    found = []
    for controller, v1_file, v2_file in (
        ("memory", "memory.limit_in_bytes", "memory.max"),
        ("pids", "pids.max", "pids.max"),
    ):
        for path, limit_file in _candidates(controller, v1_file, v2_file):
            if _can_create_child(path, limit_file):
                found.append(CgroupParent(path, limit_file))
                break
    return tuple(found)


def _candidates(controller: str, v1_file: str, v2_file: str) -> list[tuple[str, str]]:
    own: dict[str, str] = {}  # controller ("" for v2) -> this process's cgroup path
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                own[name] = path
    except OSError:
        return []
    candidates = []
    for root, mount_point, fstype, options in _cgroup_mounts():
        if fstype == "cgroup" and controller in options.split(",") and controller in own:
            candidates.append((_below(mount_point, root, own[controller]), v1_file))
        elif fstype == "cgroup2" and "" in own:
            candidates.append((_below(mount_point, root, own[""]), v2_file))
    return [(path, file) for path, file in candidates if os.path.isdir(path)]


def _below(mount_point: str, root: str, cgroup_path: str) -> str:
    """The directory of `cgroup_path` in a cgroup mount showing the hierarchy from `root`."""
    relative = os.path.relpath(cgroup_path, root) if cgroup_path.startswith(root) else "."
    return os.path.normpath(os.path.join(mount_point, relative))


def _cgroup_mounts() -> list[tuple[str, str, str, str]]:
    mounts = []
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            separator = fields.index("-")
            fstype, options = fields[separator + 1], fields[separator + 3]
            if fstype in ("cgroup", "cgroup2"):
                mounts.append((fields[3], fields[4], fstype, options))
    except (OSError, ValueError):
        return []
    return mounts


def _can_create_child(path: str, limit_file: str) -> bool:
    probe = os.path.join(path, f"rlcpm-probe-{secrets.token_hex(4)}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        return os.path.exists(os.path.join(probe, limit_file))
    finally:
        _remove(probe)


def create_run_cgroups(memory_mb: int, max_processes: int) -> list[str]:
    """Child cgroups capped for one run (none where unsupported); the supervisor joins them."""
    created = []
    name = f"rlcpm-sandbox-{secrets.token_hex(6)}"
    for parent in cgroup_parents():
        path = os.path.join(parent.path, name)
        limit = memory_mb << 20 if parent.limit_file.startswith("memory") else max_processes
        try:
            os.mkdir(path)
            created.append(path)
            Path(path, parent.limit_file).write_text(str(limit))
        except OSError as err:
            logger.warning("code sandbox: cannot cap %s (%s)", path, err)
    return created


def remove_run_cgroups(paths: list[str]) -> None:
    for path in paths:
        _remove(path)


def _remove(path: str, attempts: int = 50) -> None:
    """rmdir a cgroup once its last process is gone (exit is asynchronous: retry briefly)."""
    for _ in range(attempts):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    logger.warning("code sandbox: could not remove cgroup %s", path)
