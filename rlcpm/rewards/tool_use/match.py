"""Whether a predicted call matches an expected one, and the best one-to-one pairing of two call lists.

Values compare as JSON, guided by the argument schema where one is given:
- numbers by value (1 == 1.0); a bool is never a number;
- a number and a string match only where the schema's type is "string" ("5" == 5 there);
- a property left out on one side matches its schema `default` on the other;
- objects key by key, arrays element by element (order matters inside an argument).
"""

from __future__ import annotations

from typing import Any

from rlcpm.rewards.tool_use.parse import ToolCall
from rlcpm.rewards.tool_use.tools import ToolSpec


def calls_match(expected: ToolCall, actual: ToolCall, spec: ToolSpec | None) -> bool:
    return expected.name == actual.name and values_match(
        expected.arguments, actual.arguments, spec.schema if spec else {}
    )


def values_match(expected: Any, actual: Any, schema: dict) -> bool:
    schema = schema if isinstance(schema, dict) else {}
    if isinstance(expected, dict) and isinstance(actual, dict):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        expected, actual = _with_defaults(expected, properties), _with_defaults(actual, properties)
        if expected.keys() != actual.keys():
            return False
        return all(values_match(expected[k], actual[k], properties.get(k, {})) for k in expected)
    if isinstance(expected, list) and isinstance(actual, list):
        items = schema.get("items")
        items = items if isinstance(items, dict) else {}
        return len(expected) == len(actual) and all(
            values_match(e, a, items) for e, a in zip(expected, actual)
        )
    types = _types(schema)
    if (
        "string" in types
        and not types & {"number", "integer"}
        and (_is_number(expected) or _is_number(actual))
    ):
        return _as_text(expected) == _as_text(actual)
    if _is_number(expected) and _is_number(actual):
        return expected == actual
    return type(expected) is type(actual) and expected == actual


def max_matching(expected: list[ToolCall], actual: list[ToolCall], specs: dict[str, ToolSpec] | None) -> int:
    """Size of the largest one-to-one pairing of matching calls (order-insensitive; Kuhn's algorithm)."""
    specs = specs or {}
    edges = [[j for j, a in enumerate(actual) if calls_match(e, a, specs.get(e.name))] for e in expected]
    owner: dict[int, int] = {}  # actual index -> expected index

    def augment(i: int, visited: set[int]) -> bool:
        for j in edges[i]:
            if j in visited:
                continue
            visited.add(j)
            if j not in owner or augment(owner[j], visited):
                owner[j] = i
                return True
        return False

    return sum(augment(i, set()) for i in range(len(expected)))


def _with_defaults(arguments: dict, properties: dict) -> dict:
    filled = dict(arguments)
    for key, schema in properties.items():
        if isinstance(schema, dict) and "default" in schema and key not in filled:
            filled[key] = schema["default"]
    return filled


def _types(schema: dict) -> set[str]:
    declared = schema.get("type")
    types = {declared} if isinstance(declared, str) else set(declared or [])
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or []:
            if isinstance(option, dict):
                types |= _types(option)
    return types


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
