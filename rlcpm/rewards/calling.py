"""Call reward functions with a time limit per call, sync or async, from any thread.

A Python thread cannot be killed, so `call_all` runs the calls one after another on a daemon
thread and, when one passes its limit, abandons that thread (it is told to stop after the call
it is stuck in) and goes on with the remaining calls on a fresh thread. The caller never waits
longer than the limits; `num_abandoned` tells it how many threads may still be running
(the Ray reward pool replaces such a worker process; see pool.py).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CallOutcome:
    value: Any = None
    error: str | None = None  # "<ExceptionType>: message (at file:line)" or "timed out after Xs"
    timed_out: bool = False


def call_maybe_async(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), running it to completion on the shared event loop if it is a coroutine."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        return asyncio.run_coroutine_threadsafe(_await(result), _shared_loop()).result()
    return result


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _shared_loop() -> asyncio.AbstractEventLoop:
    """The event loop of every async reward call in this process, run by a daemon thread.

    One loop, not one per call: a reward module's async state (an AsyncOpenAI or httpx client,
    an asyncio semaphore) is bound to the loop it was first used on and fails on any other.
    """
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, daemon=True, name="rlcpm-reward-loop").start()
        return _loop


def _forget_loop_in_child() -> None:
    global _loop
    _loop = None  # a forked child has the loop object but not the thread that runs it


os.register_at_fork(after_in_child=_forget_loop_in_child)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def describe_error(err: BaseException) -> str:
    """Type, message and the innermost frame: enough to find the bug from a log line."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def call_all(calls: list[Callable[[], Any]], timeouts_s: list[float]) -> tuple[list[CallOutcome], int]:
    """Run `calls` in order, each within its time limit. Returns (outcomes, num_abandoned threads)."""
    outcomes: list[CallOutcome | None] = [None] * len(calls)
    next_index, num_abandoned = 0, 0
    while next_index < len(calls):
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        thread = threading.Thread(
            target=_run_from, args=(calls, next_index, events, stop), daemon=True, name="rlcpm-reward-call"
        )
        thread.start()
        current, started = None, 0.0
        while next_index < len(calls):
            wait = None if current is None else max(0.0, started + timeouts_s[current] - time.monotonic())
            try:
                event = events.get(timeout=wait)
            except queue.Empty:
                stop.set()  # abandon the stuck thread; the rest runs on a fresh one
                outcomes[current] = CallOutcome(
                    error=f"timed out after {timeouts_s[current]:.3g}s", timed_out=True
                )
                next_index, num_abandoned = current + 1, num_abandoned + 1
                break
            kind, index, payload = event
            if kind == "start":
                current, started = index, payload
            else:
                outcomes[index] = payload
                current, next_index = None, index + 1
    return outcomes, num_abandoned


def _run_from(calls: list[Callable[[], Any]], start: int, events: queue.Queue, stop: threading.Event) -> None:
    for index in range(start, len(calls)):
        if stop.is_set():
            return
        events.put(("start", index, time.monotonic()))
        try:
            outcome = CallOutcome(value=calls[index]())
        except BaseException as err:  # noqa: BLE001 - a reward's failure is reported, never raised
            outcome = CallOutcome(error=describe_error(err))
        events.put(("done", index, outcome))
