"""The four test forms of the code reward, parsed into cases the sandbox runs and the parent judges.

- a string of statements: each top-level `assert` closes a case (the statements before it are
  its setup); statements after the last assert form one more case (e.g. HumanEval's `check(f)`);
- a list of such strings: each string is one case;
- a list of `{"input": stdin, "output": expected_stdout}` (also `{"inputs": [...], "outputs": [...]}`);
- `{"fn_name", "inputs", "outputs"}`: call `fn_name(*inputs[i])` (or `Solution().fn_name`) and
  compare with `outputs[i]` (a null `fn_name` means stdin/stdout cases).
Tests may also arrive as the JSON text of one of these forms.

`assert <expr> == <literal>` (or `is None/True/False`) becomes a *value* step: only `<expr>`
enters the sandbox, the literal stays here and the parent compares. Other statements are *exec*
steps whose success the sandbox reports.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any

from rlcpm.errors import RewardError


@dataclass(frozen=True)
class Step:
    """One step of a program case. `expected` and `compare` never leave the parent."""

    kind: str  # "exec" | "value" | "call"
    source: str = ""
    fn_name: str = ""
    args: tuple = ()
    expected: Any = None
    compare: str = ""  # value: "eq" | "is"; call: "json"

    def for_sandbox(self) -> dict:
        if self.kind == "call":
            return {"kind": "call", "fn_name": self.fn_name, "args": list(self.args)}
        return {"kind": self.kind, "source": self.source}


@dataclass(frozen=True)
class ProgramCase:
    """Steps run in the program's process after it is loaded; passes if every step passes."""

    steps: tuple[Step, ...]
    description: str


@dataclass(frozen=True)
class StdioCase:
    """The program run as a script on `stdin`; passes if it exits 0 printing `expected_stdout`."""

    stdin: str
    expected_stdout: str


@dataclass(frozen=True)
class CodeTests:
    form: str  # "asserts" | "assert_list" | "stdio" | "call"
    cases: tuple[ProgramCase, ...] | tuple[StdioCase, ...]

    @property
    def is_stdio(self) -> bool:
        return self.form == "stdio"


def parse_tests(tests: Any) -> CodeTests:
    """Recognise the form of `tests` (see the module docstring); RewardError if none fits."""
    if isinstance(tests, str) and tests.lstrip()[:1] in ("{", "["):
        try:
            tests = json.loads(tests)
        except ValueError:
            pass  # Python source that happens to start with a bracket
    if isinstance(tests, str):
        return CodeTests("asserts", tuple(_cases_from_source(tests)))
    if isinstance(tests, dict):
        if tests.get("fn_name") is not None:  # null: a stdio row (APPS, a shared parquet struct)
            return CodeTests("call", tuple(_call_cases(tests)))
        if "inputs" in tests and "outputs" in tests:
            pairs = _paired(tests, "inputs", "outputs")
            return CodeTests("stdio", tuple(StdioCase(_text(i), _text(o)) for i, o in pairs))
        raise RewardError(
            f"code tests: a dict needs 'fn_name' or 'inputs'/'outputs'; got keys {sorted(tests)}"
        )
    if isinstance(tests, (list, tuple)) and tests:
        if all(isinstance(t, str) for t in tests):
            cases = [ProgramCase(tuple(_steps(src)), _short(src)) for src in tests]
            return CodeTests("assert_list", tuple(cases))
        if all(isinstance(t, dict) and "input" in t and "output" in t for t in tests):
            return CodeTests("stdio", tuple(StdioCase(_text(t["input"]), _text(t["output"])) for t in tests))
    raise RewardError(
        "code tests must be a string of asserts, a list of such strings, a list of "
        "{'input', 'output'} cases, or {'fn_name', 'inputs', 'outputs'}; got "
        f"{type(tests).__name__} {_short(repr(tests))}"
    )


def _cases_from_source(source: str) -> list[ProgramCase]:
    nodes = _parse(source)
    cases, pending = [], []
    for node in nodes:
        pending.append(node)
        if isinstance(node, ast.Assert):
            cases.append(ProgramCase(tuple(_step(n) for n in pending), _short(ast.unparse(node))))
            pending = []
    if pending:
        cases.append(ProgramCase(tuple(_step(n) for n in pending), _short(ast.unparse(pending[-1]))))
    return cases


def _steps(source: str) -> list[Step]:
    return [_step(node) for node in _parse(source)]


def _parse(source: str) -> list[ast.stmt]:
    try:
        nodes = ast.parse(source).body
    except SyntaxError as err:
        raise RewardError(f"code tests are not valid Python (line {err.lineno}): {err.msg}") from err
    if not nodes:
        raise RewardError("code tests: the test source holds no statements")
    return nodes


def _step(node: ast.stmt) -> Step:
    """`assert <expr> == <literal>` -> a value step; anything else -> an exec step."""
    if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1:
        op = node.test.ops[0]
        left, right = node.test.left, node.test.comparators[0]
        if isinstance(op, (ast.Eq, ast.Is)):
            for expr, literal in ((left, right), (right, left)):
                found, expected = _literal(literal)
                if not found or (isinstance(op, ast.Is) and not _is_singleton(expected)):
                    continue
                compare = "eq" if isinstance(op, ast.Eq) else "is"
                return Step("value", source=ast.unparse(expr), expected=expected, compare=compare)
    return Step("exec", source=ast.unparse(node))


def _literal(node: ast.expr) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _is_singleton(value: Any) -> bool:
    return value is None or value is True or value is False


def _call_cases(tests: dict) -> list[ProgramCase]:
    fn_name = tests["fn_name"]
    if not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise RewardError(f"code tests: fn_name must be a Python identifier, got {fn_name!r}")
    cases = []
    for args, expected in _paired(tests, "inputs", "outputs"):
        args = tuple(args) if isinstance(args, (list, tuple)) else (args,)
        step = Step("call", fn_name=fn_name, args=args, expected=expected, compare="json")
        cases.append(ProgramCase((step,), _short(f"{fn_name}{args!r}")))
    return cases


def _paired(tests: dict, inputs_key: str, outputs_key: str) -> list[tuple[Any, Any]]:
    inputs, outputs = tests[inputs_key], tests[outputs_key]
    if (
        not isinstance(inputs, list)
        or not isinstance(outputs, list)
        or len(inputs) != len(outputs)
        or not inputs
    ):
        raise RewardError(
            f"code tests: '{inputs_key}' and '{outputs_key}' must be non-empty lists of the same length"
        )
    return list(zip(inputs, outputs))


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value) + "\n"
    if not isinstance(value, str):
        return str(value)
    return value


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
