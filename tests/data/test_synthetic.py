"""Synthetic tasks: seeded, correct (checked by evaluating, running code, validating schemas), as configured."""

from __future__ import annotations

import ast
import json
import operator
import re
import subprocess
import sys
import textwrap

import pytest
from scipy.stats import binomtest

from rlcpm.data.synthetic import SYNTHETIC_TASKS, generate
from rlcpm.data.synthetic.tool_use import TOOLS
from rlcpm.errors import DataError

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
STEP = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)\.")
BOXED = re.compile(r"\\boxed\{(-?\d+)\}$")
VERB_OPS = {"gets": "+", "buys": "+", "finds": "+", "gives": "-", "loses": "-", "sells": "-", "then": "*"}


def evaluate(expression: str) -> int:
    """Evaluate + - * on integers by walking the AST (no eval of generated text)."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected node {ast.dump(node)}")

    return walk(ast.parse(expression, mode="eval").body)


def answer_from_word_prompt(prompt: str) -> int:
    """Re-derive the answer from the story itself: first number, then one (verb, number) per sentence."""
    sentences = prompt.split(". ")
    total = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    for sentence in sentences[1:-1]:
        verb = sentence.split()[1]
        number = int(re.search(r"(\d+)", sentence).group(1))
        total = {"+": operator.add, "-": operator.sub, "*": operator.mul}[VERB_OPS[verb]](total, number)
    return total


@pytest.mark.parametrize("task", sorted(SYNTHETIC_TASKS))
def test_same_seed_same_rows_other_seed_other_rows(task):
    assert generate(task, 30, seed=5) == generate(task, 30, seed=5)
    assert generate(task, 30, seed=5) != generate(task, 30, seed=6)
    rows = generate(task, 30, seed=5)
    assert len({r["id"] for r in rows}) == 30
    json.dumps(rows)  # rows are plain JSON data


@pytest.mark.parametrize("operations", ["+-", "+-*"])
def test_arithmetic_answers_are_correct(operations):
    rows = generate("arithmetic", 300, seed=1, num_steps=[1, 3], operations=operations)
    for row in rows:
        answer = int(row["answer"])
        assert evaluate(row["expression"]) == answer >= 0
        assert answer_from_word_prompt(row["prompt"]) == answer
        steps = STEP.findall(row["response"])
        for left, op, right, result in steps:
            assert evaluate(f"{left}{op}{right}") == int(result)
        assert int(BOXED.search(row["response"]).group(1)) == answer
    assert {len(STEP.findall(r["response"])) for r in rows} == {1, 2, 3}
    used = {op for r in rows for op in re.findall(r"[+\-*]", r["expression"])}
    assert used == set(operations)


def test_arithmetic_expression_style_and_digit_range():
    rows = generate("arithmetic", 200, seed=2, style="expression", digits=3, num_steps=2, operations="+*")
    for row in rows:
        expression = re.fullmatch(r"What is (.+)\?", row["prompt"]).group(1)
        assert evaluate(expression) == int(row["answer"])
        first = int(re.match(r"\(*(\d+)", expression).group(1))
        assert 100 <= first <= 999
        additions = re.findall(r"\+(\d+)", expression)
        assert all(100 <= int(n) <= 999 for n in additions)


def test_demo_noise_fraction_is_exact_and_wrong_demos_are_wrong():
    clean = generate("arithmetic", 250, seed=3)
    noisy = generate("arithmetic", 250, seed=3, demo_noise=0.4)
    assert [r["prompt"] for r in noisy] == [r["prompt"] for r in clean]  # noise does not change problems
    assert [r["answer"] for r in noisy] == [r["answer"] for r in clean]
    wrong = [r for r in noisy if not r["is_demo_correct"]]
    assert len(wrong) == 100
    for row in noisy:
        boxed = int(BOXED.search(row["response"]).group(1))
        assert (boxed == int(row["answer"])) == row["is_demo_correct"]
        if not row["is_demo_correct"]:
            steps = STEP.findall(row["response"])
            slips = [s for s in steps if evaluate(f"{s[0]}{s[1]}{s[2]}") != int(s[3])]
            assert len(slips) == 1  # exactly one arithmetic slip, carried to the end
    assert all(r["is_demo_correct"] for r in clean)


def test_arithmetic_answers_are_what_math_verify_extracts():
    math_verify = pytest.importorskip("math_verify")
    for row in generate("arithmetic", 40, seed=4, demo_noise=0.5):
        verdict = math_verify.verify(math_verify.parse(row["answer"]), math_verify.parse(row["response"]))
        assert verdict == row["is_demo_correct"]


def test_arithmetic_rows_are_short():
    rows = generate("arithmetic", 500, seed=0)
    assert max(len(r["prompt"]) for r in rows) <= 120
    assert max(len(r["response"]) for r in rows) <= 40


def test_preference_pairs():
    for row in generate("preference", 200, seed=7, num_steps=[1, 3]):
        chosen = int(BOXED.search(row["chosen"]).group(1))
        rejected = int(BOXED.search(row["rejected"]).group(1))
        assert chosen == int(row["answer"]) == answer_from_word_prompt(row["prompt"])
        assert rejected != chosen
        assert len(STEP.findall(row["chosen"])) == len(STEP.findall(row["rejected"]))


def run_python(source: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=60)


CALL_HARNESS = textwrap.dedent(
    """
    import json
    tests = json.loads({tests!r})
    fn = globals()[tests["fn_name"]]
    for args, expected in zip(tests["inputs"], tests["outputs"]):
        got = fn(*args)
        assert got == expected, (args, got, expected)
    print("ok", len(tests["inputs"]))
    """
)


def test_code_reference_solutions_pass_their_tests_in_a_subprocess():
    assert_rows = generate("code", 60, seed=8, num_tests=5)
    call_rows = generate("code", 60, seed=9, test_format="call")
    program = []
    for row in assert_rows:
        assert row["fn_name"] in row["prompt"] and row["response"].count(row["reference_solution"]) == 1
        program += [row["reference_solution"], *row["tests"]]
    for row in call_rows:
        tests = json.dumps(row["tests"])
        program += [row["reference_solution"], CALL_HARNESS.format(tests=tests)]
    result = run_python("\n\n".join(program) + "\nprint('all passed')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("all passed")
    assert len({r["fn_name"] for r in assert_rows + call_rows}) >= 10  # many families, not one


def test_code_tests_catch_a_wrong_solution():
    row = next(r for r in generate("code", 40, seed=10) if r["fn_name"] == "add_constant")
    wrong = row["reference_solution"].replace("return x + ", "return x - ")
    result = run_python(wrong + "\n" + "\n".join(row["tests"]))
    assert result.returncode != 0 and "AssertionError" in result.stderr


def test_tool_calls_validate_against_their_schemas():
    from jsonschema import Draft202012Validator

    rows = generate("tool_use", 400, seed=11, parallel_fraction=0.3, num_tools=[2, 4])
    num_parallel = 0
    for row in rows:
        offered = {tool["function"]["name"]: tool["function"]["parameters"] for tool in row["tools"]}
        assert 2 <= len(offered) <= 4 or len(offered) == len({c["name"] for c in row["expected_calls"]})
        for call in row["expected_calls"]:
            schema = offered[call["name"]]
            Draft202012Validator.check_schema(schema)
            assert not list(Draft202012Validator(schema).iter_errors(call["arguments"]))
        parsed = [
            json.loads(block) for block in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", row["response"])
        ]
        assert parsed == row["expected_calls"]
        calls = [json.dumps(c, sort_keys=True) for c in row["expected_calls"]]
        assert len(set(calls)) == len(calls)  # parallel calls are distinct
        num_parallel += len(calls) > 1
    assert binomtest(num_parallel, len(rows), 0.3).pvalue > 1e-3
    # a schema violation is detected (negative control for the validator)
    schema = next(t.schema for t in TOOLS if t.name == "set_timer")["function"]["parameters"]
    assert list(Draft202012Validator(schema).iter_errors({"minutes": "5"}))


def test_tool_names_in_prompts_when_asked():
    rows = generate("tool_use", 20, seed=12, tools_in_prompt=True)
    for row in rows:
        for tool in row["tools"]:
            assert json.dumps(tool) in row["prompt"]
        assert "<tool_call>" in row["prompt"]
    assert all("<tool_call>" not in r["prompt"] for r in generate("tool_use", 20, seed=12))


@pytest.mark.parametrize(
    ("task", "options", "message"),
    [
        ("arithmetic", {"demo_noise": 1.5}, "'demo_noise' must be a number in \\[0, 1\\]"),
        ("arithmetic", {"num_steps": [3, 1]}, "'num_steps' must satisfy 1 <= low <= high"),
        ("arithmetic", {"operations": "+/"}, "'operations' must use only"),
        ("arithmetic", {"style": "poem"}, "'style' must be one of \\['word', 'expression'\\]"),
        ("code", {"test_format": "stdin"}, "'test_format' must be one of"),
        ("tool_use", {"num_tools": 9}, "'num_tools' may be at most 7"),
        ("tool_use", {"colour": 1}, "unknown option\\(s\\) \\['colour'\\]"),
    ],
)
def test_bad_options_name_the_option(task, options, message):
    with pytest.raises(DataError, match=message):
        generate(task, 5, 0, **options)
    with pytest.raises(DataError, match="unknown synthetic task 'poetry'"):
        generate("poetry", 5)


@pytest.mark.parametrize("task", ["arithmetic", "preference"])
def test_train_and_heldout_partitions_never_share_a_problem(task):
    def computations(rows):  # the expression, or the correct chain, identifies the problem
        return {r["expression"] if task == "arithmetic" else r["chosen"] for r in rows}

    train = generate(task, 1500, seed=0, partition="train")
    heldout = generate(task, 200, seed=0, partition="heldout")
    assert not computations(train) & computations(heldout)
    mixed = computations(generate(task, 1500, seed=1))
    assert mixed & computations(heldout) and mixed & computations(train)
    with pytest.raises(DataError, match="no arithmetic problem in partition 'heldout'"):
        generate(task, 1, 0, partition="heldout", heldout_fraction=0.0)
