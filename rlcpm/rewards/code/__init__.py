"""Code reward: run the response's program against tests in the local sandbox.

    score(response, tests, timeout_s=2.0, memory_mb=1024) -> fraction of tests passed

`tests` takes four forms (see `cases.py`): a string of asserts, a list of such strings, a list of
`{"input", "output"}` stdin/stdout cases, or `{"fn_name", "inputs", "outputs"}` call cases.
Stdin/stdout cases each run the program in a fresh sandbox; the other forms load the program
once and run every case in that process, each case with its own `timeout_s`.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rlcpm.rewards.code.cases import CodeTests, StdioCase, parse_tests
from rlcpm.rewards.code.extract import extract_program
from rlcpm.rewards.code.judge import CaseOutcome, judge_program, judge_stdio, stdout_matches
from rlcpm.rewards.sandbox import SandboxLimits, SandboxRun, run_sandboxed


@dataclass
class CodeResult:
    """Per-case outcomes (in test order) and the sandbox runs behind them."""

    form: str
    outcomes: list[CaseOutcome]
    runs: list[SandboxRun]

    @property
    def num_passed(self) -> int:
        return sum(o.passed for o in self.outcomes)

    @property
    def fraction(self) -> float:
        return self.num_passed / len(self.outcomes) if self.outcomes else 0.0


def run_tests(
    response: str,
    tests: Any,
    timeout_s: float | None = None,
    memory_mb: int | None = None,
    *,
    limits: SandboxLimits | None = None,
    isolation: str = "auto",
    extract: bool = True,
) -> CodeResult:
    """Run the program of `response` (its last fenced Python block when `extract`) against `tests`.

    `limits` sets the sandbox limits (default `SandboxLimits()`: 2 s, 1024 MB per program);
    `timeout_s` and `memory_mb`, when given, override its fields.
    Raises RewardError for malformed tests and SandboxError if no sandbox can be started.
    """
    parsed: CodeTests = parse_tests(tests)
    program = extract_program(response) if extract else response
    limits = limits or SandboxLimits()
    overrides = {"timeout_s": timeout_s, "memory_mb": memory_mb}
    limits = dataclasses.replace(limits, **{k: v for k, v in overrides.items() if v is not None})
    if parsed.is_stdio:
        runs = [
            run_sandboxed(
                program, stdin=case.stdin.encode(), limits=_stdio_limits(limits, case), isolation=isolation
            )
            for case in parsed.cases
        ]
        outcomes = [judge_stdio(case, run) for case, run in zip(parsed.cases, runs)]
        return CodeResult(parsed.form, outcomes, runs)
    units = [[step.for_sandbox() for step in case.steps] for case in parsed.cases]
    run = run_sandboxed(program, units=units, limits=limits, isolation=isolation)
    return CodeResult(parsed.form, judge_program(parsed, run), [run])


def _stdio_limits(limits: SandboxLimits, case: StdioCase) -> SandboxLimits:
    """The output cap admits twice the case's expected output: a correct program is never cut off."""
    needed = 2 * len(case.expected_stdout.encode())
    return dataclasses.replace(limits, max_output_bytes=max(limits.max_output_bytes, needed))


def score(
    response: str, tests: Any, timeout_s: float | None = None, memory_mb: int | None = None, **options: Any
) -> float:
    """Fraction of `tests` the response's program passes, in [0, 1] (options: see `run_tests`)."""
    return run_tests(response, tests, timeout_s, memory_mb, **options).fraction


def score_many(
    responses: list[str], tests: list[Any], *, max_workers: int = 4, **options: Any
) -> list[float]:
    """Score many programs concurrently (each in its own sandbox); `options` go to `score`."""
    if len(responses) != len(tests):
        raise ValueError(f"{len(responses)} responses but {len(tests)} test sets")
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rlcpm-code") as pool:
        return list(pool.map(lambda pair: score(pair[0], pair[1], **options), zip(responses, tests)))


__all__ = [
    "CaseOutcome",
    "CodeResult",
    "SandboxLimits",
    "extract_program",
    "parse_tests",
    "run_tests",
    "score",
    "score_many",
    "stdout_matches",
]
