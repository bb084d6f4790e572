"""Tool-use reward: parse the response's tool calls and compare them with the expected calls.

    score(response, expected_calls, tools=None, partial_credit=False) -> float in [0, 1]

Strict (default): 1.0 when the calls pair one-to-one with `expected_calls` (order-insensitive,
so parallel calls may come in any order) and every call is valid; else 0.0. With
`partial_credit`: matched pairs / max(#expected, #predicted), so missing and extra calls both cost.
Either way, malformed JSON, a call to a tool not in `tools`, scores 0.0. When `tools` are given
(OpenAI function format or MCP descriptions) each call's arguments must satisfy the tool's JSON
schema, and the schema guides the comparison (see match.py).
"""

from __future__ import annotations

import logging
from typing import Any

from rlcpm.errors import RewardError
from rlcpm.rewards.tool_use.match import max_matching, values_match
from rlcpm.rewards.tool_use.parse import (
    MalformedToolCall,
    ToolCall,
    decode_json,
    parse_tool_calls,
    to_tool_calls,
)
from rlcpm.rewards.tool_use.tools import ToolSpec, normalize_tools

logger = logging.getLogger("rlcpm.rewards.tool_use")


def score(
    response: str,
    expected_calls: Any,
    tools: Any = None,
    *,
    partial_credit: bool = False,
) -> float:
    """How well the tool calls in `response` match `expected_calls` (list of {"name", "arguments"})."""
    expected = _expected(expected_calls)
    specs = normalize_tools(tools) if tools is not None else None
    try:
        calls = parse_tool_calls(response)
    except (MalformedToolCall, RecursionError) as err:  # RecursionError: JSON nested too deep
        logger.debug("tool_use: malformed call: %s", err)
        return 0.0
    if not calls and not expected:
        return 1.0
    valid = calls
    if specs is not None:
        if any(call.name not in specs for call in calls):
            return 0.0
        valid = [call for call in calls if specs[call.name].validation_error(call.arguments) is None]
    matched = max_matching(expected, valid, specs)
    if partial_credit:
        return matched / max(len(expected), len(calls))
    return float(matched == len(expected) == len(calls))


def _expected(expected_calls: Any) -> list[ToolCall]:
    if expected_calls is None:
        raise RewardError("tool_use reward: the sample has no expected_calls")
    if isinstance(expected_calls, str):
        try:
            expected_calls = decode_json(expected_calls)
        except MalformedToolCall as err:
            raise RewardError(f"tool_use: expected_calls is text but not JSON: {err}") from err
    if isinstance(expected_calls, tuple):  # a sequence of calls, not one call
        expected_calls = list(expected_calls)
    if expected_calls == []:
        return []
    try:
        return to_tool_calls(expected_calls)
    except MalformedToolCall as err:
        raise RewardError(f"tool_use: expected_calls cannot be read: {err}") from err


__all__ = ["ToolCall", "ToolSpec", "normalize_tools", "parse_tool_calls", "score", "values_match"]
