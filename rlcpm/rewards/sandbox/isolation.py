"""What confinement this machine allows, the per-run sandbox uid, and sweeping up processes.

Two levels, picked once per process (`detect_isolation`):

- "namespaces" (root with `unshare`): new network (no interface but a down loopback, so no
  connection anywhere, 127.0.0.1 included), PID (the supervisor is PID 1: when it exits the
  kernel kills everything left), mount (private tmpfs areas; private directories hidden) and IPC
  namespaces; the candidate runs as a fresh unprivileged uid, so RLIMIT_NPROC is its own budget,
  it cannot signal or ptrace anything outside, and cannot write where that uid has no permission.
- "process" (fallback where namespaces are unavailable): a new session killed as a whole, rlimits,
  empty environment, fresh working directory. As root it still drops to a fresh uid (when the
  interpreter is readable by other users) and kills every process of that uid afterwards. Not
  provided: network isolation, and — without root — protection of the caller's own processes
  and files from a program running as the same user. Run as root (or in a container) for RL.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rlcpm.errors import SandboxError

logger = logging.getLogger("rlcpm.rewards.sandbox")

SANDBOX_UID_BASE = 1_500_000_000
SANDBOX_UID_SPAN = 1 << 24
UNSHARE_FLAGS = ("--net", "--pid", "--mount", "--ipc", "--fork", "--mount-proc", "--kill-child")


@dataclass(frozen=True)
class Isolation:
    """How sandboxes are confined on this machine (see the module docstring)."""

    level: str  # "namespaces" | "process"
    unshare: str | None
    is_root: bool
    can_drop_uid: bool
    hide_dirs: tuple[str, ...] = ()
    expose_paths: tuple[str, ...] = ()

    @property
    def namespaces(self) -> bool:
        return self.level == "namespaces"


def is_sandbox_uid(uid: int) -> bool:
    return SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + SANDBOX_UID_SPAN


def new_sandbox_uid() -> int:
    """A random uid no account uses; concurrent runs (other threads or processes) never share one in practice."""
    return SANDBOX_UID_BASE + secrets.randbelow(SANDBOX_UID_SPAN)


@functools.lru_cache(maxsize=4)
def detect_isolation(level: str = "auto") -> Isolation:
    """The strongest confinement available ("auto"), or the one asked for ("namespaces" / "process")."""
    if level not in ("auto", "namespaces", "process"):
        raise SandboxError(f"sandbox isolation must be 'auto', 'namespaces' or 'process', got {level!r}")
    is_root = os.geteuid() == 0
    unshare = shutil.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.path.exists(p)), None
    )
    hide_dirs, expose_paths = _private_ancestors(_interpreter_paths())
    expose_paths = _minimal([*expose_paths, *_under_replaced_dirs(_interpreter_paths())])
    namespaces_ok = is_root and unshare is not None and _unshare_works(unshare)
    if level == "namespaces" and not namespaces_ok:
        raise SandboxError(
            "sandbox isolation 'namespaces' needs root and a working `unshare` (util-linux); "
            "use isolation='auto' to fall back to 'process'"
        )
    requested = level
    if level == "auto":
        level = "namespaces" if namespaces_ok else "process"
    can_drop_uid = is_root and (level == "namespaces" or not hide_dirs)
    if level == "process":
        logger.warning(
            "code sandbox: %s; using process isolation: no network isolation%s",
            "process isolation requested"
            if requested == "process"
            else "Linux namespaces unavailable (need root and `unshare`)",
            "" if can_drop_uid else ", candidate runs as the caller's user",
        )
    return Isolation(level, unshare, is_root, can_drop_uid, tuple(hide_dirs), tuple(expose_paths))


def _unshare_works(unshare: str) -> bool:
    try:
        done = subprocess.run(
            [unshare, *UNSHARE_FLAGS, "true"], capture_output=True, timeout=30, env={}, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@functools.lru_cache(maxsize=1)
def _interpreter_paths() -> tuple[str, ...]:
    """Every directory the sandboxed interpreter (`python -I`) reads modules from, resolved."""
    probe = "import json, sys; print(json.dumps([sys.base_prefix, sys.prefix, sys.exec_prefix, *sys.path]))"
    try:
        out = subprocess.run(
            [sys.executable, "-I", "-c", probe], capture_output=True, timeout=60, check=True, env={}
        ).stdout
        paths = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        raise SandboxError(f"cannot start the sandbox interpreter {sys.executable}: {err}") from err
    paths.append(os.path.dirname(os.path.realpath(sys.executable)))
    return tuple(dict.fromkeys(os.path.realpath(p) for p in paths if p and os.path.exists(p)))


def _private_ancestors(paths: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Directories other users cannot enter that lie above `paths`, and the paths to bind back."""
    hide: dict[str, None] = {}
    expose: list[str] = []
    for path in paths:
        parts = Path(path).parts
        for depth in range(2, len(parts) + 1):
            ancestor = str(Path(*parts[:depth]))
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                hide.setdefault(ancestor)
                expose.append(path)
                break
    return list(hide), _minimal(expose)


# The launcher mounts fresh, empty areas on these: interpreter paths below them are bound back.
REPLACED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def _under_replaced_dirs(paths: tuple[str, ...]) -> list[str]:
    """Interpreter paths (e.g. a virtualenv in /tmp) that the sandbox's fresh /tmp would hide."""
    return [p for p in paths if any(p == d or p.startswith(d + os.sep) for d in REPLACED_DIRS)]


def _minimal(paths: list[str]) -> list[str]:
    """Sorted, without duplicates, and without paths that lie inside another listed path."""
    unique = sorted(set(paths))
    return [p for p in unique if not any(p != q and p.startswith(q + os.sep) for q in unique)]


def processes_of_uid(uid: int, include_zombies: bool = False) -> list[int]:
    """PIDs of the processes owned by `uid` (zombies, already dead, only when asked)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if include_zombies or state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def children_of(pid: int) -> list[int]:
    """Direct children of process `pid` ([] if it is gone)."""
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            children.extend(int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    except OSError:
        return []
    return children


def count_tasks_of_uid(uid: int) -> int:
    """Threads included: what RLIMIT_NPROC counts against a user."""
    total = 0
    for pid in processes_of_uid(uid, include_zombies=True):
        try:
            total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return total


def processes_in_session(session_id: int) -> list[int]:
    """PIDs of every live process whose session id is `session_id`."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # fields after ')': state ppid pgrp session ...
            found.append(int(entry.name))
    return found


def kill_uid(uid: int, rounds: int = 100) -> None:
    """SIGKILL every process of `uid` until none is left (new forks are bounded by RLIMIT_NPROC)."""
    for _ in range(rounds):
        pids = processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    logger.error("code sandbox: processes of uid %d survived %d kill rounds", uid, rounds)
