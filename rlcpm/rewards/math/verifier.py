"""Bounded-time math-verify checks, callable from any thread or process.

math-verify bounds its own work with `signal.alarm`, which only works on a process's main thread
(and not at all inside C code). `MathVerifier` runs the checks in worker processes instead
(`worker.py`, whose main thread may use signals); the caller waits at most `timeout_s` (+ a small
grace) and kills a worker that does not answer, starting a fresh one for the next check.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
from pathlib import Path

from rlcpm.errors import RewardError

logger = logging.getLogger("rlcpm.rewards.math")

WORKER = str(Path(__file__).with_name("worker.py"))
KILL_GRACE_S = 0.5  # beyond timeout_s, for the worker's own alarm to answer first
STARTUP_TIMEOUT_S = 120.0


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if self._read_line(STARTUP_TIMEOUT_S) != "ready":
            self.kill()
            raise RewardError(
                f"the math-verify worker ({WORKER}) did not start; check that math-verify is installed "
                f"for {sys.executable}"
            )

    def check(self, gold: str, pred: str, timeout_s: float) -> tuple[bool, str | None]:
        """(equal, error). Raises TimeoutError if the worker does not answer in time."""
        request = json.dumps({"gold": gold, "pred": pred, "timeout_s": timeout_s}) + "\n"
        self.proc.stdin.write(request.encode())
        self.proc.stdin.flush()
        line = self._read_line(timeout_s + KILL_GRACE_S)
        if line is None:
            raise TimeoutError
        reply = json.loads(line)
        return bool(reply["equal"]), reply["error"]

    def _read_line(self, timeout_s: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.decode().strip() if line else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class MathVerifier:
    """A pool of `num_workers` math-verify processes, started on first use.

    `is_equivalent(pred, gold, timeout_s)` is thread-safe; concurrent callers share the workers.
    """

    def __init__(self, num_workers: int = 1):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(num_workers):
            self._idle.put(None)  # a slot; the worker starts when first needed
        self.num_timeouts = 0
        self._live: set[_Worker] = set()
        self._live_lock = threading.Lock()

    def worker_pids(self) -> list[int]:
        """Process ids of the running workers."""
        with self._live_lock:
            return sorted(w.proc.pid for w in self._live if w.proc.poll() is None)

    def _new_worker(self) -> _Worker:
        worker = _Worker()
        with self._live_lock:
            self._live = {w for w in self._live if w.proc.poll() is None} | {worker}
        return worker

    def is_equivalent(self, pred: str, gold: str, timeout_s: float = 5.0) -> bool:
        """math-verify's verdict on `pred` against `gold`; False on error or after `timeout_s`."""
        worker = self._idle.get()
        try:
            if worker is None or worker.proc.poll() is not None:
                worker = self._new_worker()
            equal, error = worker.check(gold, pred, timeout_s)
            if error:
                logger.debug("math-verify: %s (gold %r, pred %r)", error, gold[:100], pred[:100])
            return equal
        except TimeoutError:
            self.num_timeouts += 1
            logger.warning(
                "math-verify: no answer after %.3gs; worker killed (gold %r)", timeout_s, gold[:100]
            )
            worker.kill()
            worker = None
            return False
        except (OSError, ValueError) as err:  # the worker died mid-check (e.g. out of memory)
            logger.warning("math-verify worker failed: %s", err)
            if worker is not None:
                worker.kill()
            worker = None
            return False
        finally:
            self._idle.put(worker)

    def start(self) -> None:
        """Start every worker now (keeps start-up out of benchmark timings and first checks)."""
        workers = [self._idle.get() for _ in range(self.num_workers)]
        try:
            for i, worker in enumerate(workers):
                if worker is None or worker.proc.poll() is not None:
                    workers[i] = self._new_worker()
        finally:
            for worker in workers:
                self._idle.put(worker)

    def close(self) -> None:
        for _ in range(self.num_workers):
            worker = self._idle.get()
            if worker is not None:
                worker.kill()
        for _ in range(self.num_workers):
            self._idle.put(None)


_default: tuple[int, MathVerifier] | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide verifier (one worker per CPU, at most 4); recreated after a fork."""
    global _default
    with _default_lock:
        if _default is None or _default[0] != os.getpid():
            _default = (os.getpid(), MathVerifier(num_workers=min(4, os.cpu_count() or 1)))
        return _default[1]


@atexit.register
def _close_default() -> None:
    if _default is not None and _default[0] == os.getpid():
        _default[1].close()
