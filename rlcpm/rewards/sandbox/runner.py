"""Run one untrusted Python program in a disposable sandbox and collect what it did.

The parent side of the sandbox: it starts `launcher.py` (under `unshare` when namespaces are
available) in a new session with an empty environment, feeds it the job (and stdin as a file), reads stdout,
stderr, the harness's reports and the supervisor's status with caps, and kills the whole session
on the deadline or when an output cap is passed. Safe to call from any thread; many runs may go
on at once (each has its own pipes, uid and working directory).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlcpm.errors import SandboxError
from rlcpm.rewards.sandbox.cgroups import create_run_cgroups, remove_run_cgroups
from rlcpm.rewards.sandbox.isolation import (
    UNSHARE_FLAGS,
    Isolation,
    count_tasks_of_uid,
    detect_isolation,
    new_sandbox_uid,
)
from rlcpm.rewards.sandbox.session import Session, pump_pipes

LAUNCHER = str(Path(__file__).with_name("launcher.py"))
MAX_REPORT_BYTES = 4 << 20


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run.

    timeout_s: wall-clock seconds for the program (script mode) or for loading it and for each
        test unit (test mode); the sandbox's own start-up is not counted (`startup_grace_s`).
    memory_mb: address space (RLIMIT_AS) of each process.   max_processes: RLIMIT_NPROC.
    total_memory_mb: memory of all its processes together, tmpfs files included (a cgroup,
        where this process may create one).
    file_size_mb: largest file it may write (RLIMIT_FSIZE).  disk_mb: size of its tmpfs areas.
    max_output_bytes: cap on stdout and on stderr; passing it kills the run.
    """

    timeout_s: float = 2.0
    memory_mb: int = 1024
    max_processes: int = 32
    total_memory_mb: int = 2048
    file_size_mb: int = 16
    disk_mb: int = 64
    max_output_bytes: int = 1 << 20
    max_open_files: int = 256
    startup_grace_s: float = 10.0

    def __post_init__(self):
        for name in (
            "timeout_s",
            "memory_mb",
            "max_processes",
            "total_memory_mb",
            "file_size_mb",
            "disk_mb",
            "max_output_bytes",
            "max_open_files",
        ):
            if getattr(self, name) <= 0:
                raise SandboxError(f"sandbox limit {name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class SandboxRun:
    """What happened in one run. `reports` are the harness's token-checked JSON reports (test mode)."""

    stdout: bytes
    stderr: bytes
    exit_code: int | None
    timed_out: bool
    output_limit_exceeded: bool
    tampered: bool
    wall_s: float
    isolation: str
    session_id: int
    workdir: str
    uid: int | None = None
    cpu_s: float | None = None
    reports: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Exited with status 0, in time, within the output caps, without forged reports."""
        return self.exit_code == 0 and not (self.timed_out or self.output_limit_exceeded or self.tampered)


def run_sandboxed(
    program: str,
    *,
    stdin: bytes = b"",
    units: list[list[dict]] | None = None,
    limits: SandboxLimits | None = None,
    isolation: str = "auto",
) -> SandboxRun:
    """Run `program` confined. Script mode (units None): as `__main__` with `stdin`.
    Test mode: load it as a module, then run each unit's steps (see harness.py) and report."""
    limits = limits or SandboxLimits()
    iso = detect_isolation(isolation)
    uid = new_sandbox_uid() if iso.can_drop_uid else None
    token = secrets.token_hex(16)
    budget_s = limits.timeout_s if units is None else limits.timeout_s * (len(units) + 1)
    workdir = tempfile.mkdtemp(prefix="rlcpm-sandbox-")
    job = {
        "mode": "script" if units is None else "tests",
        "program": program,
        "units": units or [],
        "token": token,
        "timeout_s": limits.timeout_s,
        "budget_s": budget_s,
        "uid": uid,
        "nproc_limit": _nproc_limit(iso, uid, limits.max_processes),
        "namespaces": iso.namespaces,
        "workdir": workdir,
        "disk_mb": limits.disk_mb,
        "hide_dirs": list(iso.hide_dirs),
        "expose_paths": list(iso.expose_paths),
        "limits": {
            "memory_mb": limits.memory_mb,
            "file_size_mb": limits.file_size_mb,
            "max_open_files": limits.max_open_files,
        },
    }
    try:
        job["cgroups"] = create_run_cgroups(limits.total_memory_mb, limits.max_processes + 2)
        return _execute(job, stdin, limits, iso, token)
    finally:
        remove_run_cgroups(job.get("cgroups", []))
        shutil.rmtree(workdir, ignore_errors=True)


def _nproc_limit(iso: Isolation, uid: int | None, max_processes: int) -> int | None:
    if uid is not None:
        return max_processes  # a fresh uid: the budget is the run's alone
    if iso.is_root:
        return None  # the kernel does not apply RLIMIT_NPROC to root
    return count_tasks_of_uid(os.getuid()) + max_processes


def _sandbox_env(workdir: str) -> dict[str, str]:
    """Nothing of the caller's environment: no tokens, keys or paths leak in."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _execute(job: dict, stdin: bytes, limits: SandboxLimits, iso: Isolation, token: str) -> SandboxRun:
    job_r, job_w = os.pipe()
    report_r, report_w = os.pipe()
    status_r, status_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    stdin_fd = _stdin_file(stdin) if stdin else None
    argv = [sys.executable, "-I", LAUNCHER, str(job_r), str(report_w), str(status_w)]
    if iso.namespaces:
        argv = [iso.unshare, *UNSHARE_FLAGS, *argv]
    child_ends = [job_r, report_w, status_w, stdout_w, stderr_w] + (
        [stdin_fd] if stdin_fd is not None else []
    )
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=stdin_fd if stdin_fd is not None else subprocess.DEVNULL,
            stdout=stdout_w,
            stderr=stderr_w,
            pass_fds=(job_r, report_w, status_w),
            start_new_session=True,
            env=_sandbox_env(job["workdir"]),
            cwd="/",
        )
    except OSError as err:
        for fd in child_ends + [job_w, report_r, status_r, stdout_r, stderr_r]:
            os.close(fd)
        raise SandboxError(f"could not start the sandbox ({argv[0]}): {err}") from err
    for fd in child_ends:
        os.close(fd)
    session = Session(proc, job.get("uid") if not iso.namespaces else None)
    writes = {job_w: json.dumps(job).encode()}
    caps = {stdout_r: limits.max_output_bytes, stderr_r: limits.max_output_bytes}
    caps |= {report_r: MAX_REPORT_BYTES, status_r: 1 << 16}
    deadline = start + job["budget_s"] + limits.startup_grace_s
    io = pump_pipes(session, writes, caps, status_r, deadline)
    session.finish()
    status = _parse_status(io.data[status_r])
    if "setup_error" in status:
        raise SandboxError(f"sandbox setup failed ({iso.level} isolation): {status['setup_error']}")
    reports, tampered = _parse_reports(io.data[report_r], token)
    return SandboxRun(
        stdout=bytes(io.data[stdout_r]),
        stderr=bytes(io.data[stderr_r]),
        exit_code=status.get("exit_code"),
        timed_out=bool(status.get("timed_out")) or io.deadline_passed,
        output_limit_exceeded=io.cap_exceeded,
        tampered=tampered,
        wall_s=time.monotonic() - start,
        isolation=iso.level,
        session_id=proc.pid,
        workdir=job["workdir"],
        uid=job["uid"],
        cpu_s=status.get("cpu_s"),
        reports=reports,
    )


def _stdin_file(data: bytes) -> int:
    """`data` in an anonymous file, for the program's stdin: judges give stdin as a file, and the
    fast-input idiom `os.read(0, os.fstat(0).st_size)` reads nothing from a pipe (size 0)."""
    fd = os.memfd_create("rlcpm-sandbox-stdin")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _parse_status(raw: bytes) -> dict:
    try:
        status = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


def _parse_reports(raw: bytes, token: str) -> tuple[list[dict], bool]:
    """Reports with the run's token, each (unit, step) or event at most once; anything else is tampering."""
    reports, seen, tampered = [], set(), False
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            report = json.loads(line)
        except ValueError:
            tampered = True
            continue
        if not isinstance(report, dict) or report.pop("token", None) != token:
            tampered = True
            continue
        key = report.get("event") or (report.get("unit"), report.get("step"))
        if key in seen:
            tampered = True
            continue
        seen.add(key)
        reports.append(report)
    return reports, tampered
