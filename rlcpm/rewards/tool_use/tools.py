"""Tool definitions in OpenAI function format or as MCP tool descriptions, and schema validation.

Accepted per tool: `{"type": "function", "function": {"name", "description", "parameters"}}`,
the flat `{"name", "description", "parameters"}`, MCP `{"name", "description", "inputSchema"}`
(also `input_schema`). A list of tools, `{"tools": [...]}` (MCP `tools/list`), or their JSON text.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from rlcpm.errors import RewardError

_SCHEMA_KEYS = ("parameters", "inputSchema", "input_schema")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    schema: dict  # JSON schema of the arguments object

    def validation_error(self, arguments: dict) -> str | None:
        """None if `arguments` satisfies the schema, else the first error."""
        validator = _validator(json.dumps(self.schema, sort_keys=True))
        error = next(iter(validator.iter_errors(arguments)), None)
        return (
            None
            if error is None
            else f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        )


def normalize_tools(tools: Any) -> dict[str, ToolSpec]:
    """name -> ToolSpec. RewardError names the tool (by index) that cannot be read."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as err:
            raise RewardError(f"tool_use: `tools` is text but not JSON: {err}") from err
    if isinstance(tools, dict):
        tools = tools.get("tools", [tools])
    if isinstance(tools, tuple):
        tools = list(tools)
    if not isinstance(tools, list):
        raise RewardError(f"tool_use: `tools` must be a list of tool definitions, got {type(tools).__name__}")
    specs = {}
    for index, tool in enumerate(tools):
        spec = _to_spec(tool, index)
        specs[spec.name] = spec
    return specs


def _to_spec(tool: Any, index: int) -> ToolSpec:
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        tool = tool["function"]
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise RewardError(f"tool_use: tool #{index} has no 'name' (OpenAI function or MCP tool format)")
    schema = next((tool[k] for k in _SCHEMA_KEYS if k in tool), None) or {"type": "object"}
    if not isinstance(schema, dict):
        raise RewardError(f"tool_use: the argument schema of tool {tool['name']!r} must be an object")
    _validator(json.dumps(schema, sort_keys=True))  # a broken schema is the dataset's error, say so now
    return ToolSpec(tool["name"], schema)


@functools.lru_cache(maxsize=1024)
def _validator(schema_json: str):
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise RewardError(f"tool_use: invalid JSON schema {schema_json[:120]}: {err.message}") from err
    return cls(schema)
