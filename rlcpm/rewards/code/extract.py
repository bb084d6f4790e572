"""The program in a response: the last fenced Python block, or the whole response when there is none."""

from __future__ import annotations

import re

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}


def extract_program(response: str) -> str:
    """The last ```python (or untagged) block; else the last block of any language; else the text.

    An unterminated final fence (a response cut at the length limit) counts as a block.
    """
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(response)]
    tail = _unterminated_tail(response)
    if tail is not None:
        blocks.append(tail)
    python_blocks = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    return response


def _unterminated_tail(response: str) -> tuple[str, str] | None:
    if response.count("```") % 2 == 0:
        return None
    opening = response.rfind("```")
    header, _, body = response[opening + 3 :].partition("\n")
    tag = header.strip().split(" ")[0].lower() if header.strip() else ""
    return (tag, body) if body.strip() else None
