"""The sandbox's process session and its pipes: top-down killing, and the I/O loop with caps."""

from __future__ import annotations

import os
import select
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

from rlcpm.rewards.sandbox.isolation import children_of, kill_uid

DRAIN_S = 1.0  # after the supervisor exits, how long stray pipe holders may keep pipes open
LEADER_EXIT_S = 5.0


class Session:
    """The sandbox's session; its leader is the Popen child (`unshare`, or the supervisor itself).

    Killing goes top-down so that every process is reaped by its own parent (this machine's
    init may not reap orphans): first the leader's children (the supervisor under `unshare`,
    whose exit ends the PID namespace; or the candidate under the supervisor, which then cleans
    up and exits), then, once the leader has exited, whatever is left in its process group.
    """

    def __init__(self, proc: subprocess.Popen, sweep_uid: int | None):
        self.proc = proc
        self.sweep_uid = sweep_uid

    def kill(self) -> None:
        for pid in children_of(self.proc.pid):
            _kill_quietly(pid)
        if self.sweep_uid is not None:
            kill_uid(self.sweep_uid)

    def finish(self) -> None:
        """Wait for the leader to exit (killing its children if it takes long), sweep, reap."""
        if not _wait_exit(self.proc.pid, LEADER_EXIT_S):
            self.kill()
            _wait_exit(self.proc.pid, LEADER_EXIT_S)
        try:  # the leader is exited but not reaped: its group id cannot have been reused
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.sweep_uid is not None:
            kill_uid(self.sweep_uid)
        self.proc.wait()


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Whether process `pid` (our child) exits within `timeout_s`; it is not reaped."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout_s)
        return bool(ready)
    finally:
        os.close(pidfd)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class IOResult:
    data: dict[int, bytearray]
    cap_exceeded: bool = False
    deadline_passed: bool = False


def pump_pipes(
    session: Session, writes: dict[int, bytes], caps: dict[int, int], status_fd: int, deadline: float
):
    """Write the job, read every pipe to EOF; kill on deadline or cap; returns what was read."""
    selector = selectors.DefaultSelector()
    result = IOResult({fd: bytearray() for fd in caps})
    for fd in caps:
        selector.register(fd, selectors.EVENT_READ)
    for fd in writes:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_WRITE)

    def close(fd: int) -> None:
        selector.unregister(fd)
        os.close(fd)

    drain_until = None
    try:
        while selector.get_map():
            now = time.monotonic()
            if now >= (drain_until or deadline):
                if drain_until is not None:
                    break
                result.deadline_passed = True
                session.kill()
                drain_until = now + DRAIN_S
                continue
            for key, _ in selector.select(timeout=(drain_until or deadline) - now):
                fd = key.fd
                if fd in writes:
                    if _write_some(fd, writes):
                        close(fd)
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    close(fd)
                    if fd == status_fd and drain_until is None:
                        drain_until = time.monotonic() + DRAIN_S  # the supervisor is done
                    continue
                buffer = result.data[fd]
                room = caps[fd] - len(buffer)
                buffer += chunk[: max(room, 0)]
                if len(chunk) > room and fd != status_fd and not result.cap_exceeded:
                    result.cap_exceeded = True
                    session.kill()
                    drain_until = time.monotonic() + DRAIN_S
    finally:
        for fd in list(selector.get_map()):
            close(fd)
        selector.close()
    return result


def _write_some(fd: int, writes: dict[int, bytes]) -> bool:
    """Write what the pipe takes now; True when all is written or the reader is gone."""
    try:
        written = os.write(fd, writes[fd][: 1 << 16])
    except BlockingIOError:
        return False
    except OSError:  # BrokenPipeError: the supervisor exited without reading the job
        return True
    writes[fd] = writes[fd][written:]
    return not writes[fd]
