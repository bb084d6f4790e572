"""Tool calls in a response, in the common formats, normalised to `ToolCall(name, arguments)`.

- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call
  (a block may also hold a list);
- a bare JSON object or list of objects (optionally in a ```json fence, with text around it);
- OpenAI style: `{"name", "arguments"}` where arguments is an object or a JSON string, also
  wrapped as `{"type": "function", "function": {...}}` or `{"tool_calls": [...]}`;
  `parameters` (Llama 3.1) is read as `arguments`.
Malformed JSON or a call without a name raises `MalformedToolCall`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


class MalformedToolCall(ValueError):
    """The response tried to call a tool but the call cannot be read."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)


_TAGGED = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
MAX_JSON_STARTS = 64


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def parse_tool_calls(response: str) -> list[ToolCall]:
    """Every tool call in `response`, in order; [] when it calls none. Reasoning in
    `<think>...</think>` is not part of the answer: calls drafted there do not count. Nor do
    calls before a lone `</think>` (the template put `<think>` in the prompt) or after a `<think>`
    that is never closed (a response cut off while reasoning)."""
    response = _THINK.sub("", response)
    response = response.rpartition("</think>")[2].partition("<think>")[0]
    if "<tool_call>" in response:
        blocks = _TAGGED.findall(response)
        if response.count("<tool_call>") != len(blocks):
            raise MalformedToolCall("a <tool_call> block is not closed")
        calls: list[ToolCall] = []
        for block in blocks:
            calls.extend(to_tool_calls(decode_json(block)))
        return calls
    value = _first_json_value(response)
    return [] if value is None else to_tool_calls(value)


def to_tool_calls(value: Any) -> list[ToolCall]:
    """A decoded call, list of calls or `{"tool_calls": [...]}` -> ToolCalls."""
    if isinstance(value, dict) and "tool_calls" in value and "name" not in value:
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    return [_to_call(item) for item in items]


def _to_call(item: Any) -> ToolCall:
    if isinstance(item, dict) and isinstance(item.get("function"), dict):
        item = item["function"]
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        raise MalformedToolCall(f"a tool call needs a 'name': {str(item)[:80]}")
    arguments = next((item[k] for k in ("arguments", "parameters", "args") if k in item), {})
    if isinstance(arguments, str):
        arguments = decode_json(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise MalformedToolCall(
            f"arguments of {item['name']!r} must be an object, got {type(arguments).__name__}"
        )
    return ToolCall(item["name"], arguments)


def decode_json(text: str) -> Any:
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except ValueError as err:
        raise MalformedToolCall(f"not valid JSON: {err}") from err


def _first_json_value(response: str) -> Any:
    """The first JSON value in the text that looks like a tool call (or a list of them).

    None when there is none; MalformedToolCall when the text mentions `"name"` (an attempted
    call) but no such value decodes. A ```json fence needs no special case: its value is found
    like any other, and a fenced answer that is not a call is not one.
    """
    text = response.strip()
    decoder = json.JSONDecoder()
    starts = [i for i, char in enumerate(text) if char in "{["][:MAX_JSON_STARTS]
    for start in starts:
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if _looks_like_calls(value):
            return value
    if '"name"' in text:
        raise MalformedToolCall("the response mentions a tool call but holds no valid JSON call")
    return None


def _looks_like_calls(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_looks_like_calls(v) for v in value)
    return isinstance(value, dict) and bool({"name", "function", "tool_calls"} & set(value))
