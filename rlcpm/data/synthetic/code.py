'''Small Python function tasks with tests, for the code reward (rlcpm.rewards.code).

Each task comes from a family (count_greater, clamp, running_sum, ...) with random constants,
so prompts differ in what they ask, not only in names. A row holds a docstring prompt, the
function name, tests, a reference solution and a demonstration response:

    prompt:   Complete the Python function below. ...
              ```python
              def count_greater(nums: list[int]) -> int:
                  """Return how many numbers in nums are greater than 7."""
              ```
    tests:    ["assert count_greater([3, 9, 12]) == 2", ...]                    (test_format "assert")
              {"fn_name": "count_greater", "inputs": [[[3, 9, 12]]], "outputs": [2]}  (test_format "call")

Expected outputs come from a Python implementation kept apart from the reference solution's
source text, so the tests check the reference rather than restate it.
'''

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlcpm.data.synthetic.options import choice, positive_int

WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "lemon", "paper", "music", "ocean",
         "bread", "light", "sugar", "table", "zebra", "quiet", "north", "pixel"]  # fmt: skip
PALINDROMES = ["level", "radar", "noon", "civic", "kayak", "refer", "stats", "wow", "a", ""]
PROMPT_HEAD = "Complete the Python function below. Reply with the whole function in a ```python code block."


@dataclass(frozen=True)
class FunctionFamily:
    """A kind of task. `doc` and `body` are format strings over the constants drawn by `constants`."""

    fn_name: str
    signature: str
    doc: str
    body: str
    constants: Callable[[random.Random], dict]
    compute: Callable[..., Any]  # (constants, *args) -> expected output
    sample_args: Callable[[random.Random], tuple]


def _ints(rng: random.Random, low: int = 0, high: int = 8) -> list[int]:
    return [rng.randint(-20, 30) for _ in range(rng.randint(low, high))]


def _words(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))


def _maybe_palindrome(rng: random.Random) -> str:
    return rng.choice(PALINDROMES) if rng.random() < 0.5 else rng.choice(WORDS)


FAMILIES = [
    FunctionFamily(
        "add_constant", "(x: int) -> int", "Return x plus {k}.", "return x + {k}",
        lambda r: {"k": r.randint(1, 20)}, lambda c, x: x + c["k"], lambda r: (r.randint(-50, 50),),
    ),
    FunctionFamily(
        "count_greater", "(nums: list[int]) -> int",
        "Return how many numbers in nums are greater than {k}.", "return sum(1 for n in nums if n > {k})",
        lambda r: {"k": r.randint(-10, 20)}, lambda c, nums: sum(n > c["k"] for n in nums),
        lambda r: (_ints(r),),
    ),
    FunctionFamily(
        "sum_multiples", "(nums: list[int]) -> int",
        "Return the sum of the numbers in nums that are divisible by {k}.",
        "return sum(n for n in nums if n % {k} == 0)",
        lambda r: {"k": r.randint(2, 5)}, lambda c, nums: sum(n for n in nums if n % c["k"] == 0),
        lambda r: (_ints(r),),
    ),
    FunctionFamily(
        "repeat_text", "(s: str) -> str", "Return s repeated {k} times.", "return s * {k}",
        lambda r: {"k": r.randint(2, 4)}, lambda c, s: "".join([s] * c["k"]), lambda r: (r.choice(WORDS),),
    ),
    FunctionFamily(
        "count_letter", "(s: str) -> int", "Return how many times the letter '{c}' occurs in s.",
        "return s.count('{c}')",
        lambda r: {"c": r.choice("aeiorstln")}, lambda c, s: sum(ch == c["c"] for ch in s),
        lambda r: (_words(r),),
    ),
    FunctionFamily(
        "reverse_words", "(s: str) -> str",
        "Return the words of s in reverse order, joined by single spaces.",
        "return ' '.join(reversed(s.split()))",
        lambda r: {}, lambda c, s: " ".join(s.split()[::-1]), lambda r: (_words(r),),
    ),
    FunctionFamily(
        "is_palindrome", "(s: str) -> bool", "Return True if s reads the same forwards and backwards.",
        "return s == s[::-1]",
        lambda r: {}, lambda c, s: all(s[i] == s[-1 - i] for i in range(len(s))),
        lambda r: (_maybe_palindrome(r),),
    ),
    FunctionFamily(
        "clamp", "(x: int) -> int", "Return x limited to the range [{lo}, {hi}].",
        "return min(max(x, {lo}), {hi})",
        lambda r: {"lo": (lo := r.randint(-10, 5)), "hi": lo + r.randint(1, 15)},
        lambda c, x: c["lo"] if x < c["lo"] else c["hi"] if x > c["hi"] else x,
        lambda r: (r.randint(-30, 30),),
    ),
    FunctionFamily(
        "digit_sum", "(n: int) -> int", "Return the sum of the decimal digits of n, ignoring its sign.",
        "return sum(int(d) for d in str(abs(n)))",
        lambda r: {}, lambda c, n: sum(abs(n) // 10**i % 10 for i in range(12)),
        lambda r: (r.randint(-9999, 9999),),
    ),
    FunctionFamily(
        "scale_list", "(nums: list[int]) -> list[int]",
        "Return a new list with every number of nums multiplied by {k}.", "return [n * {k} for n in nums]",
        lambda r: {"k": r.randint(2, 9)}, lambda c, nums: list(map(lambda n: n * c["k"], nums)),
        lambda r: (_ints(r),),
    ),
    FunctionFamily(
        "value_range", "(nums: list[int]) -> int",
        "Return the largest number in nums minus the smallest; nums is never empty.",
        "return max(nums) - min(nums)",
        lambda r: {}, lambda c, nums: sorted(nums)[-1] - sorted(nums)[0], lambda r: (_ints(r, low=1),),
    ),
    FunctionFamily(
        "fizz", "(n: int) -> str", "Return 'Fizz' if n is divisible by {k}, otherwise n as a string.",
        "if n % {k} == 0:\n        return 'Fizz'\n    return str(n)",
        lambda r: {"k": r.randint(2, 7)}, lambda c, n: "Fizz" if n % c["k"] == 0 else f"{n}",
        lambda r: (r.randint(0, 60),),
    ),
    FunctionFamily(
        "count_vowels", "(s: str) -> int", "Return how many vowels (a, e, i, o, u) s contains.",
        "return sum(1 for ch in s if ch in 'aeiou')",
        lambda r: {}, lambda c, s: len([ch for ch in s if ch in "aeiou"]), lambda r: (_words(r),),
    ),
    FunctionFamily(
        "running_sum", "(nums: list[int]) -> list[int]",
        "Return the running sums of nums: element i is nums[0] + ... + nums[i].",
        "total, out = 0, []\n    for n in nums:\n        total += n\n        out.append(total)\n    return out",
        lambda r: {}, lambda c, nums: [sum(nums[: i + 1]) for i in range(len(nums))], lambda r: (_ints(r),),
    ),
]  # fmt: skip


def function_source(family: FunctionFamily, constants: dict, with_body: bool) -> str:
    doc = family.doc.format(**constants)
    header = f'def {family.fn_name}{family.signature}:\n    """{doc}"""'
    return f"{header}\n    {family.body.format(**constants)}" if with_body else header


def _distinct_cases(rng: random.Random, family: FunctionFamily, num_tests: int) -> list[tuple]:
    cases: list[tuple] = []
    for _ in range(num_tests * 10):
        args = family.sample_args(rng)
        if args not in cases:
            cases.append(args)
        if len(cases) == num_tests:
            break
    return cases


def generate_code(
    num_samples: int,
    seed: int = 0,
    *,
    num_tests: int = 4,
    test_format: str = "assert",
) -> list[dict]:
    """Seeded function tasks: rows {id, prompt, fn_name, tests, reference_solution, response}.

    Args:
        num_tests: test cases per task (fewer when a family has fewer distinct inputs).
        test_format: "assert" (a list of assert statements) or "call"
            ({"fn_name", "inputs": [[args...], ...], "outputs": [...]}).
    """
    num_samples = positive_int(num_samples, "num_samples")
    num_tests = positive_int(num_tests, "num_tests")
    test_format = choice(test_format, "test_format", ["assert", "call"])
    rng = random.Random(seed)
    rows = []
    for index in range(num_samples):
        family = rng.choice(FAMILIES)
        constants = family.constants(rng)
        cases = _distinct_cases(rng, family, num_tests)
        outputs = [family.compute(constants, *args) for args in cases]
        name = family.fn_name
        if test_format == "assert":
            tests: Any = [
                f"assert {name}({', '.join(map(repr, args))}) == {out!r}" for args, out in zip(cases, outputs)
            ]
        else:
            tests = {"fn_name": name, "inputs": [list(args) for args in cases], "outputs": outputs}
        solution = function_source(family, constants, with_body=True)
        prompt_stub = function_source(family, constants, with_body=False)
        rows.append(
            {
                "id": f"code-{seed}-{index}",
                "prompt": f"{PROMPT_HEAD}\n\n```python\n{prompt_stub}\n```",
                "fn_name": name,
                "tests": tests,
                "reference_solution": solution,
                "response": f"```python\n{solution}\n```",
            }
        )
    return rows
