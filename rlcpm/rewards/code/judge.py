"""Pass/fail of each case, decided here (outside the sandbox) from what the sandbox run produced."""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass
from typing import Any

from rlcpm.rewards.code.cases import CodeTests, StdioCase, Step
from rlcpm.rewards.sandbox import SandboxRun


@dataclass(frozen=True)
class CaseOutcome:
    passed: bool
    reason: str  # "passed", "wrong answer", "timed out", the error, ...


PASSED = CaseOutcome(True, "passed")


def judge_stdio(case: StdioCase, run: SandboxRun) -> CaseOutcome:
    """Passes if the run exited 0, in time, within caps, and its stdout matches (`stdout_matches`)."""
    failure = _run_failure(run)
    if failure:
        return CaseOutcome(False, failure)
    if run.exit_code != 0:
        return CaseOutcome(False, f"exit status {run.exit_code}")
    actual = run.stdout.decode("utf-8", errors="replace")
    return PASSED if stdout_matches(actual, case.expected_stdout) else CaseOutcome(False, "wrong answer")


def judge_program(tests: CodeTests, run: SandboxRun) -> list[CaseOutcome]:
    """One outcome per case from the harness's reports; a step with no report fails."""
    failure = "forged report" if run.tampered else None
    load = next((r for r in run.reports if r.get("event") == "load"), None)
    if failure is None and load is not None and not load.get("ok"):
        failure = f"program failed to load: {load.get('error')}"
    if failure is None and load is None:
        failure = _run_failure(run) or "program exited before the tests ran"
    if failure:
        return [CaseOutcome(False, failure)] * len(tests.cases)
    reports = {(r.get("unit"), r.get("step")): r for r in run.reports if "event" not in r}
    missing = _run_failure(run) or "program exited during the tests"
    return [
        _judge_case(case.steps, [reports.get((i, j)) for j in range(len(case.steps))], missing)
        for i, case in enumerate(tests.cases)
    ]


def _judge_case(steps: tuple[Step, ...], reports: list[dict | None], missing: str) -> CaseOutcome:
    for step, report in zip(steps, reports):
        if report is None:
            return CaseOutcome(False, missing)
        if not report.get("ok"):
            return CaseOutcome(False, str(report.get("error")))
        if step.kind != "exec" and not value_matches(step, report.get("value")):
            return CaseOutcome(False, "wrong answer")
    return PASSED


def _run_failure(run: SandboxRun) -> str | None:
    if run.tampered:
        return "forged report"
    if run.output_limit_exceeded:
        return "output limit exceeded"
    if run.timed_out:
        return "timed out"
    return None


def value_matches(step: Step, reported: Any) -> bool:
    """Compare the sandbox's repr of a value with the expected value kept in the parent.

    "eq": Python `==` (1 == 1.0, (1, 2) != [1, 2]); "is": identity with None/True/False;
    "json": both sides as JSON would hold them (tuples are lists, dict keys are strings).
    """
    if not isinstance(reported, str):
        return False
    try:
        value = ast.literal_eval(reported)
        if step.compare == "is":
            return value is step.expected
        if step.compare == "json":
            return json.loads(json.dumps(value)) == step.expected
        return bool(value == step.expected)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def stdout_matches(actual: str, expected: str) -> bool:
    """Line by line ignoring trailing whitespace; else token by token, decimals within 1e-6.

    Integers compare exactly; tolerance applies only to tokens written with '.' or an exponent.
    """
    if _lines(actual) == _lines(expected):
        return True
    actual_tokens, expected_tokens = actual.split(), expected.split()
    if len(actual_tokens) != len(expected_tokens):
        return False
    return all(a == e or _close_decimals(a, e) for a, e in zip(actual_tokens, expected_tokens))


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


def _close_decimals(a: str, e: str) -> bool:
    if not any(c in token for token in (a, e) for c in ".eE"):
        return False
    try:
        x, y = float(a), float(e)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6)
