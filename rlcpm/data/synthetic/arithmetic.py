r"""Multi-step arithmetic word problems with short step-by-step demonstrations ending in \boxed{N}.

Made for the quickstart: prompts and responses are a few dozen characters, answers are checked
by rlcpm.rewards.math, and two knobs leave headroom for RL over an SFT start on a tiny model:
more steps (`num_steps`) and wrong demonstrations (`demo_noise`, a fraction of the SFT
demonstrations whose chain contains one arithmetic slip carried through to a wrong final
answer). The `answer` column is always the true answer.

    prompt:   "Ann has 23 apples. She buys 45 more. She sells 17. How many apples does Ann have now?"
    response: "23+45=68. 68-17=51. \boxed{51}"
    answer:   "51"

Operations are applied left to right to a running total that never goes negative
(subtraction takes at most what there is; multiplication factors are 2..max_factor).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from rlcpm.data.synthetic.options import choice, fraction, int_range, positive_int
from rlcpm.errors import DataError

NAMES = [
    ("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dan", "He"), ("Eva", "She"), ("Finn", "He"),
    ("Gia", "She"), ("Hugo", "He"), ("Ivy", "She"), ("Jack", "He"), ("Kim", "She"), ("Leo", "He"),
]  # fmt: skip
ITEMS = ["apples", "books", "coins", "marbles", "stamps", "cards", "pens", "shells", "stickers", "cookies"]
STEP_PHRASES = {
    "+": ["{pronoun} gets {n} more.", "{pronoun} buys {n} more.", "{pronoun} finds {n} more."],
    "-": ["{pronoun} gives away {n}.", "{pronoun} loses {n}.", "{pronoun} sells {n}."],
    "*": ["{pronoun} then has {n} times as many."],
}
MAX_SLIP = 9  # a wrong demonstration is off by 1..MAX_SLIP at the slipped step
MAX_DRAWS = 10_000


@dataclass(frozen=True)
class Problem:
    """start, then (operation, operand) pairs applied left to right."""

    start: int
    steps: tuple[tuple[str, int], ...]

    def running_values(self) -> list[int]:
        """The running total after each step (its last entry is the answer)."""
        values, total = [], self.start
        for op, operand in self.steps:
            total = apply(op, total, operand)
            values.append(total)
        return values

    @property
    def answer(self) -> int:
        return self.running_values()[-1]

    def expression(self) -> str:
        """A Python/maths expression equal to the answer, e.g. "(23+45-17)*3"."""
        text = str(self.start)
        for op, operand in self.steps:
            if op == "*" and ("+" in text or "-" in text):
                text = f"({text})"
            text = f"{text}{op}{operand}"
        return text


def apply(op: str, left: int, right: int) -> int:
    return left + right if op == "+" else left - right if op == "-" else left * right


def word_prompt(rng: random.Random, problem: Problem) -> str:
    name, pronoun = rng.choice(NAMES)
    items = rng.choice(ITEMS)
    sentences = [f"{name} has {problem.start} {items}."]
    for op, operand in problem.steps:
        sentences.append(rng.choice(STEP_PHRASES[op]).format(pronoun=pronoun, n=operand))
    sentences.append(f"How many {items} does {name} have now?")
    return " ".join(sentences)


def expression_prompt(problem: Problem) -> str:
    return f"What is {problem.expression()}?"


def demonstration(problem: Problem, slip_step: int | None = None, slip: int = 0) -> tuple[str, int]:
    r"""The chain "a+b=c. c-d=e. \boxed{e}" and its final value.

    With `slip_step`, the result written at that step is off by `slip` and later steps
    compute correctly from the wrong value, so the final answer is wrong too.
    """
    parts, total = [], problem.start
    for index, (op, operand) in enumerate(problem.steps):
        result = apply(op, total, operand) + (slip if index == slip_step else 0)
        parts.append(f"{total}{op}{operand}={result}.")
        total = result
    parts.append(rf"\boxed{{{total}}}")
    return " ".join(parts), total


def wrong_demonstration(rng: random.Random, problem: Problem) -> tuple[str, int]:
    """A demonstration with one slip (a positive offset keeps every total >= 0 and the answer wrong)."""
    slip_step = rng.randrange(len(problem.steps))
    text, final = demonstration(problem, slip_step, rng.randint(1, MAX_SLIP))
    assert final != problem.answer
    return text, final


@dataclass(frozen=True)
class ArithmeticOptions:
    num_steps: tuple[int, int]
    digits: tuple[int, int]
    operations: str
    max_factor: int
    style: str
    partition: str
    heldout_fraction: float


def parse_options(
    num_steps: int | list[int] = (1, 2),
    digits: int | list[int] = (1, 2),
    operations: str = "+-",
    max_factor: int = 9,
    style: str = "word",
    partition: str = "all",
    heldout_fraction: float = 0.1,
) -> ArithmeticOptions:
    if not operations or any(op not in STEP_PHRASES for op in operations):
        raise DataError(f"synthetic option 'operations' must use only '+', '-', '*', got {operations!r}")
    return ArithmeticOptions(
        num_steps=int_range(num_steps, "num_steps", 1),
        digits=int_range(digits, "digits", 1),
        operations=operations,
        max_factor=positive_int(max_factor, "max_factor", 2),
        style=choice(style, "style", ["word", "expression"]),
        partition=choice(partition, "partition", ["all", "train", "heldout"]),
        heldout_fraction=fraction(heldout_fraction, "heldout_fraction"),
    )


def make_problem(rng: random.Random, options: ArithmeticOptions) -> Problem:
    """A random problem in the options' partition; operands have `digits` digits, totals stay >= 0."""
    for _ in range(MAX_DRAWS):
        problem = _draw_problem(rng, options)
        if options.partition == "all" or is_heldout(problem, options.heldout_fraction) == (
            options.partition == "heldout"
        ):
            return problem
    raise DataError(
        f"no arithmetic problem in partition {options.partition!r} after {MAX_DRAWS} draws; "
        "widen 'digits' / 'num_steps' or change 'heldout_fraction'"
    )


def is_heldout(problem: Problem, heldout_fraction: float) -> bool:
    """A fixed, seed-independent share of all problems (by a hash of the expression) is held out."""
    return zlib.crc32(problem.expression().encode()) % 10_000 < heldout_fraction * 10_000


def _draw_problem(rng: random.Random, options: ArithmeticOptions) -> Problem:
    def draw() -> int:
        width = rng.randint(*options.digits)
        return rng.randint(10 ** (width - 1), 10**width - 1)

    start = draw()
    total, steps = start, []
    for _ in range(rng.randint(*options.num_steps)):
        op = rng.choice(options.operations)
        if op == "-" and total == 0:
            op = "+"
        operand = rng.randint(2, options.max_factor) if op == "*" else draw()
        if op == "-" and operand > total:
            operand = rng.randint(1, total)
        steps.append((op, operand))
        total = apply(op, total, operand)
    return Problem(start, tuple(steps))


def make_prompt(rng: random.Random, problem: Problem, style: str) -> str:
    return word_prompt(rng, problem) if style == "word" else expression_prompt(problem)


def generate_arithmetic(
    num_samples: int,
    seed: int = 0,
    *,
    num_steps: int | list[int] = (1, 2),
    digits: int | list[int] = (1, 2),
    operations: str = "+-",
    max_factor: int = 9,
    style: str = "word",
    partition: str = "all",
    heldout_fraction: float = 0.1,
    demo_noise: float = 0.0,
) -> list[dict]:
    """Seeded arithmetic word problems: rows {id, prompt, answer, response, expression, is_demo_correct}.

    Args:
        num_steps: operations per problem, an int or [low, high].
        digits: digits per operand, an int or [low, high] (1: 1..9, 2: 10..99, ...).
        operations: which of "+", "-", "*" to use.
        max_factor: largest multiplication factor.
        style: "word" (a short story) or "expression" ("What is 23+45-17?").
        partition: "all", or "train" / "heldout" to draw only problems outside / inside a
            fixed share of the problem space (`heldout_fraction`, chosen by a hash of the
            expression), so a train set and an eval set never share a computation whatever
            their seeds.
        demo_noise: the fraction of rows (exactly round(demo_noise * num_samples)) whose
            `response` carries a wrong final answer; `answer` stays correct. The problems do
            not depend on demo_noise: the same seed gives the same prompts at any noise level.
    """
    options = parse_options(num_steps, digits, operations, max_factor, style, partition, heldout_fraction)
    noise = fraction(demo_noise, "demo_noise")
    num_samples = positive_int(num_samples, "num_samples")
    rng = random.Random(seed)
    noise_rng = random.Random(f"{seed}-demo-noise")
    noisy_rows = set(noise_rng.sample(range(num_samples), round(noise * num_samples)))
    rows = []
    for index in range(num_samples):
        problem = make_problem(rng, options)
        prompt = make_prompt(rng, problem, options.style)
        is_noisy = index in noisy_rows
        response, _ = wrong_demonstration(noise_rng, problem) if is_noisy else demonstration(problem)
        rows.append(
            {
                "id": f"arithmetic-{seed}-{index}",
                "prompt": prompt,
                "answer": str(problem.answer),
                "response": response,
                "expression": problem.expression(),
                "is_demo_correct": not is_noisy,
            }
        )
    return rows
