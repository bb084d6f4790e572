"""The sandbox supervisor: the trusted process that runs inside the sandbox's namespaces.

Started by `runner.run_sandboxed` as `python -I launcher.py JOB_FD REPORT_FD STATUS_FD`, usually
under `unshare --net --pid --mount --ipc --fork`, which makes it PID 1 of a fresh PID namespace:
when it exits, the kernel kills every process left in the namespace, so nothing the candidate
starts can outlive the run. Standard library only, and never imports rlcpm (fast start).

Steps: read the job (JSON) from JOB_FD; in namespace mode, give the sandbox a private
filesystem view (size-limited tmpfs on /tmp, /var/tmp, /dev/shm, /run/lock and the working
directory; directories the sandbox user cannot enter are replaced by an empty tmpfs, with only the
interpreter's own paths bound back read-only); join the run's cgroups; fork the candidate; in the child set rlimits,
drop to the job's unprivileged uid and run the harness; in the parent wait at most `budget_s`,
SIGKILL the child on time-out, kill and reap every process the candidate left behind, and write
the exit status to STATUS_FD, a pipe the candidate never holds. The candidate's reports go to
REPORT_FD, checked by the parent against a token.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import resource
import select
import signal
import sys
import time

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_MOVE, MS_REC = 4096, 8192, 16384
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
EXIT_SETUP_FAILED = 71  # the child could not be confined: it never ran candidate code

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encoded = [s.encode() if s is not None else None for s in (source, target, fstype, data)]
    if _libc.mount(encoded[0], encoded[1], encoded[2], ctypes.c_ulong(flags), encoded[3]) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source or ''} -> {target}: {os.strerror(errno)}")


def _read_job(fd: int) -> dict:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks))


def _private_filesystem(job: dict) -> None:
    """Fresh writable areas and hidden private directories, visible only inside this mount namespace."""
    tmpfs_flags = MS_NOSUID | MS_NODEV
    # Stage the paths to keep (the interpreter's, which may live under /tmp or a private home)
    # on a scratch tmpfs before /tmp and the private parents are covered. /dev/shm gets a
    # fresh area below anyway, so it can serve as the scratch mount point.
    stage_root = "/dev/shm" if os.path.isdir("/dev/shm") and not os.path.islink("/dev/shm") else None
    if stage_root is not None:
        _mount("tmpfs", stage_root, "tmpfs", tmpfs_flags, "size=1m,mode=700")
    else:
        _mount("tmpfs", "/tmp", "tmpfs", tmpfs_flags, f"size={job['disk_mb']}m,mode=1777")
    staged = []
    for i, path in enumerate(job["expose_paths"]):  # bind before the parent directory is hidden
        stage = f"{stage_root or '/tmp'}/.stage-{i}"
        os.mkdir(stage)
        _mount(path, stage, None, MS_BIND | MS_REC)
        staged.append((stage, path))
    if stage_root is not None:
        _mount("tmpfs", "/tmp", "tmpfs", tmpfs_flags, f"size={job['disk_mb']}m,mode=1777")
    for hidden in job["hide_dirs"]:
        _mount("tmpfs", hidden, "tmpfs", tmpfs_flags, "size=1m,mode=755")
    for stage, path in staged:
        os.makedirs(path, exist_ok=True)
        _mount(stage, path, None, MS_MOVE)
        _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
        os.rmdir(stage)
    for path in ("/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(path) and not os.path.islink(path):
            area = f"/tmp/.{os.path.basename(path)}"
            os.mkdir(area)
            os.chmod(area, 0o1777)
            _mount(area, path, None, MS_BIND)
    workdir = job["workdir"]
    if not workdir.startswith("/tmp/"):
        os.mkdir("/tmp/.work")
        _mount("/tmp/.work", workdir, None, MS_BIND)
    os.makedirs(workdir, exist_ok=True)


def _prepare_workdir(job: dict) -> None:
    workdir, uid = job["workdir"], job["uid"]
    if uid is not None:
        os.chown(workdir, uid, uid)
    os.chmod(workdir, 0o700)


def _confine(job: dict) -> None:
    """In the child: rlimits, no privilege gain through exec, then the unprivileged uid."""
    limits = job["limits"]
    cpu_s = int(job["budget_s"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    memory = limits["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    file_size = limits["file_size_mb"] << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"], limits["max_open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if job["nproc_limit"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (job["nproc_limit"], job["nproc_limit"]))
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    uid = job["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise OSError("could not drop privileges")
    os.chdir(job["workdir"])
    os.umask(0o077)


def _load_harness():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")
    spec = importlib.util.spec_from_file_location("rlcpm_sandbox_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_child(job: dict, harness, report_fd: int, status_fd: int, setup_fd: int) -> None:
    """Never returns. Candidate code runs only after every confinement step succeeded.

    A confinement failure is written to `setup_fd`, which is closed before candidate code runs,
    so the supervisor can tell it from a program's own exit status (which it cannot forge).
    """
    code = EXIT_SETUP_FAILED
    try:
        os.close(status_fd)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        _confine(job)
    except BaseException as err:  # noqa: BLE001 - report why, run nothing
        os.write(setup_fd, f"confining the program: {type(err).__name__}: {err}".encode())
        os._exit(EXIT_SETUP_FAILED)
    os.close(setup_fd)
    try:
        if job["mode"] == "script":
            os.close(report_fd)
            code = harness.run_script(job["program"])
        else:
            code = harness.run_tests(job, report_fd)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a closed or broken stream loses its output
                pass
        os._exit(code)


def _wait_with_deadline(pid: int, budget_s: float) -> dict:
    start = time.monotonic()
    timed_out = False
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd], [], [], budget_s)
    if not ready:
        timed_out = True
        os.kill(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    os.close(pidfd)
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "timed_out": timed_out,
        "wall_s": time.monotonic() - start,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_kb": usage.ru_maxrss,
    }


def _end_descendants(job: dict) -> None:
    """Kill and reap everything the candidate left behind, escaped sessions included.

    Namespaces: as PID 1, kill(-1) reaches every other process of the namespace in one call
    (a process with SIGKILL pending cannot fork, so none slips through). Process mode as root: a
    helper with the run's uid does kill(-1), which reaches every process of that uid. Without
    root: kill this process's children in rounds (best effort). As a child subreaper (or PID 1)
    this process inherits the orphans and reaps them, so no zombies are left.
    """
    if job["namespaces"] and os.getpid() == 1:  # never kill(-1) outside our own PID namespace
        _kill_quietly(-1)
    elif job["uid"] is not None:
        helper = os.fork()
        if helper == 0:
            try:
                os.setresuid(job["uid"], job["uid"], job["uid"])
                _kill_quietly(-1)
            finally:
                os._exit(0)
        os.waitpid(helper, 0)
    else:
        for _ in range(50):
            children = _children()
            if not children:
                break
            for pid in children:
                _kill_quietly(pid)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.005)


def _children() -> set[int]:
    children = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as listing:
            children.update(int(pid) for pid in listing.read().split())
    return children


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _write_status(fd: int, status: dict) -> None:
    os.write(fd, json.dumps(status).encode())
    os.close(fd)


def main(argv: list[str]) -> int:
    job_fd, report_fd, status_fd = (int(a) for a in argv[1:4])
    os.chdir("/")
    try:
        job = _read_job(job_fd)
        # Load the harness while the package directory is still visible: the private filesystem
        # below hides /tmp, /root and other private directories the package may live under.
        harness = _load_harness()
        if job["namespaces"]:
            _private_filesystem(job)
        _prepare_workdir(job)
        for cgroup in job["cgroups"]:  # memory and process caps for everything started from here
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))
    except BaseException as err:  # noqa: BLE001 - an infrastructure failure, reported as such
        _write_status(status_fd, {"setup_error": f"{type(err).__name__}: {err}"})
        return 0
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    sys.stdout.flush()
    sys.stderr.flush()
    setup_r, setup_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(setup_r)
        _run_child(job, harness, report_fd, status_fd, setup_w)
    os.close(setup_w)
    os.close(report_fd)
    status = _wait_with_deadline(pid, job["budget_s"])
    _end_descendants(job)
    setup_error = os.read(setup_r, 1 << 16).decode(errors="replace")  # the child is gone: no block
    _write_status(status_fd, {"setup_error": setup_error} if setup_error else status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
