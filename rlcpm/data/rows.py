"""Turn one raw dataset row into rlcpm's fields, checking it has what the algorithm needs.

Columns are found through the recipe's `data.fields` map. What a row must hold:

| algorithm | needs                                                                         |
|-----------|-------------------------------------------------------------------------------|
| grpo      | a prompt (`prompt` text or `messages`)                                        |
| dpo       | a prompt (or conversational chosen/rejected sharing their prompt turns), `chosen`, `rejected` |
| sft       | a prompt and a `response`, or `messages` ending with an assistant turn        |

When `messages` ends with an assistant turn, that turn is split off: the turns before it are
the prompt and its content is the response (unless a `response` column is given). `messages`
wins over `prompt` when a row has both. `tests`, `tools` and `expected_calls` may be JSON
strings (CSV cells, Parquet string columns): they are decoded, and so are conversations
stored as JSON text in `prompt`, `chosen` and `rejected`.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from rlcpm.config import FieldMap

Algorithm = Literal["grpo", "dpo", "sft"]
JSON_FIELDS = ("tests", "tools", "expected_calls")
# the list inside an object: an MCP tools/list result, an OpenAI assistant message
LIST_KEYS = {"tools": "tools", "expected_calls": "tool_calls"}
PYTHON_REPR_OF_OBJECTS = re.compile(r"\s*\[\{'\w+': ")  # "[{'role': 'user', ..." (JSON has double quotes)


class RowError(ValueError):
    """What is wrong with one row; the loader adds the file and row number."""


@dataclass
class ParsedRow:
    """A row's fields under rlcpm's names; `messages` holds only the prompt turns."""

    id: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    answer: str | list[str] | None = None
    response: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    tools: list[dict] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def parse_row(data: Any, fields: FieldMap, algorithm: Algorithm = "grpo") -> ParsedRow:
    """Map, decode and validate one row. Raises RowError saying which column is wrong and how."""
    if not isinstance(data, dict):
        raise RowError(f"expected an object with named columns, got {type(data).__name__}")
    columns = fields.model_dump()
    mapped_columns = set(columns.values())
    row = ParsedRow(fields={k: v for k, v in data.items() if k not in mapped_columns})

    def get(name: str) -> Any:
        return _present(data.get(columns[name]))

    row.id = _as_id(get("id"), columns["id"])
    prompt = _conversation_or_text(get("prompt"), columns["prompt"])
    prompt_turns = None
    if isinstance(prompt, list):  # TRL's conversational format: the prompt column holds the turns
        prompt_turns, prompt = prompt, None
    row.prompt = _as_text(prompt, columns["prompt"])
    row.answer = _as_answer(get("answer"), columns["answer"])
    row.response = _as_text(get("response"), columns["response"])
    for name in JSON_FIELDS:
        value = _decode_json_field(get(name), name, columns[name])
        if value is not None:
            row.fields[name] = value
    row.tools = row.fields.get("tools")

    messages = get("messages") if columns["messages"] != columns["prompt"] else None
    messages_column = columns["messages"]
    if messages is None and prompt_turns is not None:
        messages, messages_column = prompt_turns, columns["prompt"]
    if messages is not None:
        messages = _as_messages(messages, messages_column)
        if messages[-1]["role"] == "assistant":
            final = messages.pop()
            if row.response is None:  # none from a turn without text (a tool call): only SFT needs one
                row.response = _turn_text(final)
            if not messages:
                raise RowError(f"column {messages_column!r} holds only an assistant turn, no prompt")
        row.messages = messages

    chosen_turns, row.chosen = _as_completion(get("chosen"), columns["chosen"])
    rejected_turns, row.rejected = _as_completion(get("rejected"), columns["rejected"])
    if row.messages is None and row.prompt is None and (chosen_turns or rejected_turns):
        if chosen_turns != rejected_turns:
            raise RowError("conversational chosen and rejected must share the same prompt turns")
        row.messages = chosen_turns

    _check_needs(row, columns, algorithm)
    return row


def _check_needs(row: ParsedRow, columns: dict[str, str], algorithm: Algorithm) -> None:
    if row.prompt is None and row.messages is None:
        raise RowError(
            f"no prompt: column {columns['prompt']!r} and column {columns['messages']!r} are both "
            "missing or empty (map other columns with data.fields.prompt / data.fields.messages)"
        )
    if algorithm == "dpo":
        for name in ("chosen", "rejected"):
            if getattr(row, name) is None:
                raise RowError(
                    f"dpo needs column {columns[name]!r} (missing or empty; map it with data.fields.{name})"
                )
    if algorithm == "sft" and row.response is None:
        raise RowError(
            f"sft needs a response: column {columns['response']!r} is missing or empty and "
            f"{columns['messages']!r} does not end with an assistant turn that has text"
        )


def _present(value: Any) -> Any:
    """None for the ways files say 'no value': null, NaN, an empty or blank string."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _as_text(value: Any, column: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise RowError(f"column {column!r} must be a string, got {type(value).__name__}")


def _as_id(value: Any, column: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise RowError(
        f"column {column!r} (the row id) must be a string or an integer, got {type(value).__name__}"
    )


def _as_answer(value: Any, column: str) -> str | list[str] | None:
    """A string, a number, or a non-empty list of them (several accepted forms; docs/rewards.md)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)) and value and not any(isinstance(v, (list, tuple)) for v in value):
        return [_as_answer(item, column) for item in value if item is not None] or None
    raise RowError(
        f"column {column!r} (the answer) must be a string, a number or a list of them, got {value!r:.80}"
    )


def _decode_json_field(value: Any, name: str, column: str) -> Any:
    """Decode JSON text; `tests` may also be plain Python source (a string of assert statements)."""
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError as err:
            if name == "tests" and _is_python_literal(value):
                raise _python_literal_error(
                    column, "neither JSON nor test code: run, it would test nothing"
                ) from err
            if name == "tests":
                return value
            raise RowError(f"column {column!r} is a string but not valid JSON ({err.msg})") from err
        if name == "tests" and not isinstance(decoded, (list, dict)):
            return value
        value = decoded
    if value is None:
        return None
    if name == "tests":
        if not isinstance(value, (list, dict)):
            raise RowError(f"column {column!r} (tests) must be a string, a list or an object")
        return value
    list_key = LIST_KEYS[name]
    if isinstance(value, dict) and isinstance(value.get(list_key), list) and "name" not in value:
        value = value[list_key]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise RowError(f"column {column!r} ({name}) must be a list of objects")
    if name == "expected_calls":
        for index, call in enumerate(value):
            if isinstance(call.get("function"), dict):  # OpenAI: {"type": "function", "function": {...}}
                call = call["function"]
            if not isinstance(call.get("name"), str):
                raise RowError(f"column {column!r}: call [{index}] has no string 'name'")
    return value


def _is_python_literal(text: str) -> bool:
    """True for the repr of a Python list, tuple or dict (or a numpy array's, which lacks commas)."""
    try:
        return isinstance(ast.literal_eval(text.strip()), (list, tuple, dict))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def _python_literal_error(column: str, what: str) -> RowError:
    return RowError(
        f"column {column!r} holds a Python literal, {what} (pandas' and datasets' to_csv write list "
        "columns so); save the column as JSON text"
    )


def _conversation_or_text(value: Any, column: str) -> Any:
    """`decode_conversation`, refusing a conversation written as a Python repr ("[{'role': ...}
    {...}]", a numpy array's, does not even parse): used as text, the model would learn the repr."""
    value = decode_conversation(value)
    if isinstance(value, str) and PYTHON_REPR_OF_OBJECTS.match(value) and "'role': " in value:
        raise _python_literal_error(column, "not JSON")
    return value


def _as_messages(value: Any, column: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RowError(f"column {column!r} is a string but not valid JSON ({err.msg})") from err
    if not isinstance(value, list) or not value:
        raise RowError(f"column {column!r} must be a non-empty list of {{role, content}} messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RowError(f"column {column!r}: message [{index}] must be an object with a string 'role'")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise RowError(f"column {column!r}: message [{index}] has no 'content'")
        if content is not None and not isinstance(content, (str, list)):
            raise RowError(f"column {column!r}: message [{index}] 'content' must be a string or a list")
        messages.append(dict(message))
    return messages


def _turn_text(message: dict) -> str | None:
    """A turn's text; None when it has none (only tool_calls, a list of parts, blank)."""
    content = message.get("content")
    return content if isinstance(content, str) and content.strip() else None


def _content_text(message: dict, column: str) -> str:
    text = _turn_text(message)
    if text is None:
        raise RowError(f"column {column!r}: the final assistant turn has no text content")
    return text


def _as_completion(value: Any, column: str) -> tuple[list[dict], str | None]:
    """A chosen/rejected completion: plain text, or a conversation whose last turn is the assistant's
    (also as JSON text, as CSV and Parquet string columns store one)."""
    value = _conversation_or_text(value, column)
    if value is None or isinstance(value, str):
        return [], value
    messages = _as_messages(value, column)
    if messages[-1]["role"] != "assistant":
        raise RowError(f"column {column!r}: a conversational completion must end with an assistant turn")
    return messages[:-1], _content_text(messages[-1], column)


def decode_conversation(value: Any) -> Any:
    """A conversation stored as JSON text (CSV and Parquet string columns) as its list of
    {role, ...} messages; any other value, JSON or not, is returned unchanged."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list) and all(isinstance(m, dict) and "role" in m for m in decoded):
            return decoded
    return value
