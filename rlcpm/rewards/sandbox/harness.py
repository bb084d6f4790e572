"""Runs the candidate program inside the sandbox child (already confined). Standard library only.

Two modes:
- `run_script(program)`: the program is `__main__`, reading the real stdin; the parent judges
  its stdout (expected output never enters the sandbox).
- `run_tests(job, report_fd)`: the program is loaded as module `solution`, then each test unit's
  steps run in order, each unit under a `timeout_s` alarm. A step is
    exec  - statements (setup, or an assert the parent cannot check itself): reports ok / error;
    value - an expression (the non-literal side of `assert expr == literal`): reports repr(value);
    call  - `fn_name(*args)` (call-based tests): reports repr(return value).
  For value and call steps the expected result stays in the parent, which compares; a program
  cannot pass them by exiting early, printing, patching, or faking reports without computing
  the right values. Reports are JSON lines carrying the run's token on REPORT_FD.
"""

from __future__ import annotations

import atexit
import builtins
import json
import numbers
import os
import signal
import sys
import time
import traceback
import types

MAX_VALUE_CHARS = 1 << 16


class StepTimeout(BaseException):
    """Raised by the alarm when a unit exceeds its time (BaseException: `except Exception` won't eat it)."""


def _on_alarm(signum, frame):
    raise StepTimeout()


def run_script(program: str) -> int:
    """Execute `program` as `__main__`; return the process exit code."""
    sys.argv = ["solution.py"]
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"}
    code = 0
    try:
        exec(compile(program, "solution.py", "exec"), namespace)
    except SystemExit as stop:
        code = _exit_code(stop)
    except BaseException:  # noqa: BLE001 - the candidate's own error: its traceback, exit 1
        traceback.print_exc()
        code = 1
    # Exit as the interpreter would: wait for non-daemon threads (deep-recursion solutions run
    # `main` on a thread with a big stack), run atexit handlers (fast-output idioms print there),
    # flush the open standard streams, replaced (`sys.stdout = io.StringIO()`) and original alike.
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            if stream is not None and not stream.closed:
                stream.flush()
    except BaseException:  # noqa: BLE001 - a broken stdout
        code = code or 1
    return code


def _exit_code(stop: SystemExit) -> int:
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code & 0xFF
    print(stop.code, file=sys.stderr)
    return 1


def to_literal(value, depth: int = 0):
    """`value` as builtin literal types (numpy scalars/arrays via .item()/.tolist()); TypeError otherwise."""
    if depth > 50:
        raise TypeError("value nested too deeply")
    if value is None or type(value) in (bool, str, bytes, int, float, complex):
        return value  # exact types only: a subclass could override __repr__
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [to_literal(v, depth + 1) for v in value]
        if isinstance(value, list):
            return items
        if isinstance(value, tuple):
            return tuple(items)
        return set(items) if isinstance(value, set) else frozenset(items)
    if isinstance(value, dict):
        return {to_literal(k, depth + 1): to_literal(v, depth + 1) for k, v in value.items()}
    if hasattr(value, "tolist") and callable(value.tolist):
        return to_literal(value.tolist(), depth + 1)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, numbers.Complex):
        return complex(value)
    raise TypeError(f"a {type(value).__name__} cannot be compared outside the sandbox")


def _describe(err: BaseException) -> str:
    if isinstance(err, StepTimeout):
        return "timed out"
    return f"{type(err).__name__}: {err}"[:500]


def run_tests(job: dict, report_fd: int) -> int:
    """Load the program, run every unit, report each step. Returns the exit code (0)."""
    token, timeout_s = job["token"], job["timeout_s"]
    job["token"] = None
    write, dumps = os.write, json.dumps  # bound before candidate code runs

    def report(**fields) -> None:
        write(report_fd, (dumps({"token": token, **fields}) + "\n").encode())

    signal.signal(signal.SIGALRM, _on_alarm)
    sys.argv = ["solution.py"]
    module = types.ModuleType("solution")  # tests may also `from solution import f`
    module.__file__ = "solution.py"
    sys.modules["solution"] = module
    namespace = module.__dict__
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            exec(compile(job["program"], "solution.py", "exec"), namespace)
        except SystemExit:
            pass  # an exit during load ends the load; the tests still decide
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException as err:  # noqa: BLE001
        report(event="load", ok=False, error=_describe(err))
        return 0
    report(event="load", ok=True, error=None)
    for unit_index, steps in enumerate(job["units"]):
        _run_unit(unit_index, steps, namespace, timeout_s, report)
    report(event="done", ok=True, error=None)
    return 0


def _run_unit(unit_index: int, steps: list[dict], namespace: dict, timeout_s: float, report) -> None:
    """Steps share one `timeout_s` budget; the alarm is armed only while candidate code runs."""
    deadline = time.monotonic() + timeout_s
    failed = None
    for step_index, step in enumerate(steps):
        if failed is not None:
            report(unit=unit_index, step=step_index, ok=False, value=None, error="skipped: " + failed)
            continue
        value = None
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StepTimeout()
            signal.setitimer(signal.ITIMER_REAL, remaining)
            try:
                value = _run_step(step, namespace)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as err:  # noqa: BLE001 - the unit fails, the run goes on
            failed = _describe(err)
        report(unit=unit_index, step=step_index, ok=failed is None, value=value, error=failed)


def _run_step(step: dict, namespace: dict) -> str | None:
    kind = step["kind"]
    if kind == "exec":
        exec(compile(step["source"], "tests.py", "exec"), namespace)
        return None
    if kind == "value":
        value = eval(compile(step["source"], "tests.py", "eval"), namespace)
    else:
        function = namespace.get(step["fn_name"])
        if function is None and isinstance(namespace.get("Solution"), type):
            function = getattr(namespace["Solution"](), step["fn_name"])
        if function is None:
            raise NameError(f"name {step['fn_name']!r} is not defined")
        value = function(*step["args"])
    text = repr(to_literal(value))
    if len(text) > MAX_VALUE_CHARS:
        raise ValueError(f"value too large to report ({len(text)} characters)")
    return text
