"""Code reward: each test form with passing and failing programs, extraction, judging rules."""

from __future__ import annotations

import json

import pytest

from rlcpm.errors import RewardError, SandboxError
from rlcpm.rewards import code
from rlcpm.rewards.code import extract_program, parse_tests, stdout_matches

GOOD_ADD = "Sure.\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
BAD_ADD = "```python\ndef add(a, b):\n    return a - b\n```"
SUM_STDIN = "```python\nimport sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums))\n```"


def test_string_of_asserts_counts_each_assert():
    tests = "import math\nassert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 5\nassert math.isclose(add(0.1, 0.2), 0.3)"
    result = code.run_tests(GOOD_ADD, tests)
    assert result.form == "asserts"
    assert [o.passed for o in result.outcomes] == [True, True, False, True]
    assert result.fraction == 0.75
    assert code.score(BAD_ADD, tests) == 0.0


def test_list_of_assert_strings_each_string_is_one_case():
    tests = [
        "assert add(1, 2) == 3",
        "x = add(2, 3)\nassert x == 5\nassert add(x, 1) == 6",
        "assert add('a', 'b') == 'ab'",
    ]
    assert code.score(GOOD_ADD, tests) == 1.0
    assert code.score(BAD_ADD, tests) == 0.0
    assert code.run_tests(GOOD_ADD, tests).form == "assert_list"
    assert code.score(GOOD_ADD, ["from solution import add as plus\nassert plus(2, 2) == 4"]) == 1.0


def test_stdin_stdout_cases():
    tests = [
        {"input": "1 2 3\n", "output": "6\n"},
        {"input": "10\n-4", "output": "6"},
        {"input": "1", "output": "2"},
    ]
    result = code.run_tests(SUM_STDIN, tests)
    assert result.form == "stdio" and len(result.runs) == 3  # one fresh sandbox per case
    assert [o.passed for o in result.outcomes] == [True, True, False]
    assert code.score(SUM_STDIN, {"inputs": ["2 2\n", "5"], "outputs": ["4\n", "5\n"]}) == 1.0
    # a null fn_name (APPS-style rows, or a parquet struct column shared with call-based rows) is stdio
    assert parse_tests({"fn_name": None, "inputs": ["2 2\n"], "outputs": ["4\n"]}).form == "stdio"


def test_stdin_is_a_file_as_judges_give_it():
    """The fast-input idiom sizes stdin with fstat, which a pipe reports as 0 bytes."""
    fast_input = (
        "```python\nimport io, os\ninput = io.BytesIO(os.read(0, os.fstat(0).st_size)).readline\n"
        "n = int(input())\nprint(sum(map(int, input().split())))\n```"
    )
    assert code.score(fast_input, [{"input": "3\n1 2 3\n", "output": "6\n"}]) == 1.0


def test_stdio_output_cap_admits_the_expected_output():
    """A correct program printing a long expected answer is not killed by the output cap."""
    limits = code.SandboxLimits(max_output_bytes=1000)
    expected = "".join(f"{i}\n" for i in range(2000))  # 8890 bytes
    program = "```python\nprint(*range(int(input())), sep='\\n')\n```"
    assert code.score(program, [{"input": "2000", "output": expected}], limits=limits) == 1.0
    flood = "```python\nprint('x' * 100000)\n```"
    result = code.run_tests(flood, [{"input": "", "output": expected}], limits=limits)
    assert result.outcomes[0].reason == "output limit exceeded"


def test_limits_timeout_and_memory_are_kept_unless_overridden():
    """SandboxLimits(timeout_s=...) passed as `limits` was silently replaced by the 2 s default."""
    slow = "```python\nimport time\ntime.sleep(0.6)\nprint(1)\n```"
    case = [{"input": "", "output": "1"}]
    assert code.score(slow, case, limits=code.SandboxLimits(timeout_s=0.3)) == 0.0
    assert code.score(slow, case, 3.0, limits=code.SandboxLimits(timeout_s=0.3)) == 1.0  # explicit wins
    assert code.run_tests(slow, case, limits=code.SandboxLimits(timeout_s=0.3)).runs[0].timed_out


def test_stdio_program_must_exit_zero():
    crashing = "```python\nprint(6)\nraise SystemExit(3)\n```"
    assert code.score(crashing, [{"input": "", "output": "6"}]) == 0.0


def test_stdio_program_exits_as_the_interpreter_would():
    """Non-daemon threads are waited for (deep-recursion idiom), atexit handlers run and the original
    stdout is flushed (fast-output idiom), a closed stdout is fine."""
    buffered = (
        "```python\nimport atexit, io, sys\nbuffer = io.StringIO()\nsys.stdout = buffer\n"
        "atexit.register(lambda: sys.__stdout__.write(buffer.getvalue()))\nprint(int(input()) * 2)\n```"
    )
    closing = "```python\nimport sys\nprint(int(input()) * 2)\nsys.stdout.close()\n```"
    threaded = (
        "```python\nimport threading\nthreading.stack_size(1 << 26)\n"
        "def depth(k):\n    return 0 if k == 0 else 1 + depth(k - 1)\n"
        "def main():\n    import sys\n    sys.setrecursionlimit(100000)\n    print(2 * depth(int(input())))\n"
        "threading.Thread(target=main).start()\n```"
    )
    for program in (buffered, closing, threaded):
        assert code.score(program, [{"input": "21\n", "output": "42\n"}]) == 1.0, program


def test_call_based_cases():
    tests = {"fn_name": "add", "inputs": [[1, 2], [[1], [2]], ["x", "y"]], "outputs": [3, [1, 2], "xy"]}
    assert code.score(GOOD_ADD, tests) == 1.0
    assert code.score(BAD_ADD, tests) == pytest.approx(0.0)
    leetcode = "```python\nclass Solution:\n    def add(self, a, b):\n        return (a + b)\n```"
    assert code.score(leetcode, {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 8]}) == 0.5


def test_call_based_compares_as_json():
    pairs = "```python\ndef pair(a):\n    return (a, {1: a})\n```"
    assert code.score(pairs, {"fn_name": "pair", "inputs": [[5]], "outputs": [[5, {"1": 5}]]}) == 1.0


def test_tests_given_as_json_text():
    tests = json.dumps({"fn_name": "add", "inputs": [[2, 3]], "outputs": [5]})
    assert code.score(GOOD_ADD, tests) == 1.0


def test_hung_case_fails_alone():
    program = "```python\ndef f(x):\n    while x == 2:\n        pass\n    return x\n```"
    result = code.run_tests(
        program, ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"], timeout_s=0.5
    )
    assert [o.passed for o in result.outcomes] == [True, False, True]
    assert result.outcomes[1].reason == "timed out"


def test_program_that_fails_to_load_fails_every_case():
    result = code.run_tests("```python\ndef add(a, b)\n    return a + b\n```", "assert add(1, 2) == 3")
    assert result.fraction == 0.0 and "SyntaxError" in result.outcomes[0].reason


def test_values_are_compared_outside_the_sandbox():
    """An object that claims equality with anything does not pass a literal assert."""
    always_equal = (
        "```python\nclass Anything:\n    def __eq__(self, other):\n        return True\n"
        "def add(a, b):\n    return Anything()\n```"
    )
    assert code.score(always_equal, "assert add(1, 2) == 3") == 0.0
    assert code.score(always_equal, {"fn_name": "add", "inputs": [[1, 2]], "outputs": [3]}) == 0.0
    lying_repr = "```python\nclass Three(str):\n    def __repr__(self):\n        return '3'\ndef add(a, b):\n    return Three()\n```"
    assert code.score(lying_repr, "assert add(1, 2) == 3") == 0.0


def test_literal_assert_semantics_follow_python():
    program = "```python\ndef f():\n    return 1\ndef g():\n    return (1, 2)\ndef h():\n    return None\n```"
    tests = [
        "assert f() == 1.0",
        "assert g() == [1, 2]",
        "assert g() == (1, 2)",
        "assert h() is None",
        "assert f() is True",
    ]
    assert [o.passed for o in code.run_tests(program, tests).outcomes] == [True, False, True, True, False]


def test_numpy_results_are_comparable():
    program = "```python\nimport numpy as np\ndef f():\n    return np.arange(3) * 2\ndef s():\n    return np.int64(4)\n```"
    assert code.score(program, ["assert f() == [0, 2, 4]", "assert s() == 4"]) == 1.0


@pytest.mark.parametrize(
    "response, expected",
    [
        ("```python\na = 1\n```\ntext\n```python\nb = 2\n```", "b = 2\n"),
        ("```\nplain = 1\n```", "plain = 1\n"),
        ("```bash\nls\n```", "ls\n"),
        ("```python\nx = 1\n```\n```bash\nls\n```", "x = 1\n"),
        ("print('no fence')", "print('no fence')"),
        ("```python\ncut = 1\nmore", "cut = 1\nmore"),
    ],
)
def test_extract_program(response, expected):
    assert extract_program(response) == expected


def test_stdout_matching_rules():
    assert stdout_matches("1 2\n3  \n\n", "1 2\n3")
    assert stdout_matches("0.3333333", "0.333333333")
    assert not stdout_matches("1000000", "1000001")
    assert not stdout_matches("1 2", "1 2 3")
    assert not stdout_matches("yes", "no")


@pytest.mark.parametrize(
    "tests, message",
    [
        (42, "code tests must be"),
        ({"fn_name": "1bad", "inputs": [[1]], "outputs": [1]}, "identifier"),
        ({"fn_name": "f", "inputs": [[1]], "outputs": []}, "same length"),
        ("assert (", "not valid Python"),
        ({"cases": []}, "fn_name"),
    ],
)
def test_malformed_tests_raise_reward_error(tests, message):
    with pytest.raises(RewardError, match=message):
        parse_tests(tests)


@pytest.mark.parametrize(
    "limits", [{"memory_mb": 1024.0}, {"limits": code.SandboxLimits(max_open_files=1 << 40)}]
)
def test_a_program_the_sandbox_cannot_confine_raises_instead_of_scoring_zero(limits):
    """A limit the sandboxed child cannot apply is a setup failure, not 'program exited' for every sample."""
    for tests in ("assert add(1, 1) == 2", [{"input": "1 1", "output": "2"}]):
        with pytest.raises(SandboxError, match="sandbox setup failed.*(TypeError|ValueError)"):
            code.run_tests(GOOD_ADD, tests, **limits)
    assert code.score(GOOD_ADD, "assert add(1, 1) == 2") == 1.0


@pytest.mark.parametrize("field", ["timeout_s", "total_memory_mb", "max_open_files"])
def test_sandbox_limits_must_be_positive(field):
    """total_memory_mb=0 made every run die before the tests ('program exited'), silently scoring 0."""
    with pytest.raises(SandboxError, match=f"{field} must be > 0"):
        code.SandboxLimits(**{field: 0})


def test_score_many_runs_programs_concurrently():
    scores = code.score_many([GOOD_ADD, BAD_ADD, GOOD_ADD], ["assert add(1, 1) == 2"] * 3, max_workers=3)
    assert scores == [1.0, 0.0, 1.0]


def test_process_isolation_fallback_still_judges_and_kills(assert_no_survivors):
    """isolation='process': the documented fallback where namespaces are unavailable."""
    assert code.score(GOOD_ADD, "assert add(2, 2) == 4", isolation="process", timeout_s=10.0) == 1.0
    stubborn = (
        "```python\nimport signal, subprocess, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
        "subprocess.Popen(['sleep', '30'])\ntime.sleep(30)\n```"
    )
    result = code.run_tests(stubborn, "assert True", timeout_s=0.5, isolation="process")
    run = result.runs[0]
    assert result.fraction == 0.0 and run.timed_out and run.isolation == "process" and run.wall_s < 5
    assert_no_survivors([run])
