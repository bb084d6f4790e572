"""Seeded synthetic tasks, pure Python: arithmetic, code, tool_use, preference.

    rows = generate("arithmetic", 1000, seed=0, num_steps=[2, 3], demo_noise=0.4)
    write_jsonl(rows, "arith.jsonl")          # or use {task: arithmetic, ...} as data.train

Each task is `generate_<task>(num_samples, seed, **options) -> list[dict]`; rows use the
default column names of `data.fields` (prompt, answer, response, tests, tools,
expected_calls, chosen, rejected, id), so they load with no field mapping.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from rlcpm.data.synthetic.arithmetic import generate_arithmetic
from rlcpm.data.synthetic.code import generate_code
from rlcpm.data.synthetic.preference import generate_preference
from rlcpm.data.synthetic.tool_use import generate_tool_use
from rlcpm.errors import DataError

SYNTHETIC_TASKS: dict[str, Callable[..., list[dict]]] = {
    "arithmetic": generate_arithmetic,
    "code": generate_code,
    "tool_use": generate_tool_use,
    "preference": generate_preference,
}


def generate(task: str, num_samples: int, seed: int = 0, **options) -> list[dict]:
    """Rows of a registered synthetic task. Unknown tasks or options raise DataError listing the allowed ones."""
    if task not in SYNTHETIC_TASKS:
        raise DataError(f"unknown synthetic task {task!r}; known: {sorted(SYNTHETIC_TASKS)}")
    generator = SYNTHETIC_TASKS[task]
    allowed = [
        name
        for name, param in inspect.signature(generator).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"synthetic task {task!r}: unknown option(s) {unknown}; allowed: {allowed}")
    return generator(num_samples, seed, **options)


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSON Lines (one object per line, UTF-8); parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


__all__ = [
    "SYNTHETIC_TASKS",
    "generate",
    "generate_arithmetic",
    "generate_code",
    "generate_preference",
    "generate_tool_use",
    "write_jsonl",
]
