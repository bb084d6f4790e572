"""Preference pairs for DPO on the arithmetic task: chosen = a correct chain, rejected = a chain with a slip.

Both completions have the same shape ("a+b=c. c-d=e. \\boxed{e}"), so the only thing that
separates them is arithmetic correctness: what a DPO run on this data must learn.
"""

from __future__ import annotations

import random

from rlcpm.data.synthetic.arithmetic import (
    demonstration,
    make_problem,
    make_prompt,
    parse_options,
    wrong_demonstration,
)
from rlcpm.data.synthetic.options import positive_int


def generate_preference(
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
) -> list[dict]:
    """Seeded pairs: rows {id, prompt, chosen, rejected, answer}; options as in generate_arithmetic."""
    options = parse_options(num_steps, digits, operations, max_factor, style, partition, heldout_fraction)
    num_samples = positive_int(num_samples, "num_samples")
    rng = random.Random(seed)
    rows = []
    for index in range(num_samples):
        problem = make_problem(rng, options)
        prompt = make_prompt(rng, problem, options.style)
        chosen, _ = demonstration(problem)
        rejected, _ = wrong_demonstration(rng, problem)
        rows.append(
            {
                "id": f"preference-{seed}-{index}",
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "answer": str(problem.answer),
            }
        )
    return rows
