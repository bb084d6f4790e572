"""Tool-use reward: every call format with both verdicts, schemas, tolerance rules, partial credit."""

from __future__ import annotations

import json

import pytest

from rlcpm.errors import RewardError
from rlcpm.rewards import tool_use
from rlcpm.rewards.tool_use import parse_tool_calls

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "units": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "days": {"type": "integer", "minimum": 1, "default": 1},
    },
    "required": ["city"],
}
CONVERT_SCHEMA = {
    "type": "object",
    "properties": {"amount": {"type": "number"}, "currency": {"type": "string"}, "code": {"type": "string"}},
    "required": ["amount", "currency"],
}
OPENAI_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA},
    },
    {"type": "function", "function": {"name": "convert", "description": "FX", "parameters": CONVERT_SCHEMA}},
]
MCP_TOOLS = [
    {"name": "get_weather", "description": "Weather", "inputSchema": WEATHER_SCHEMA},
    {"name": "convert", "description": "FX", "inputSchema": CONVERT_SCHEMA},
]
LIMA = [{"name": "get_weather", "arguments": {"city": "Lima"}}]


def _call(name: str, arguments: dict | str) -> dict:
    return {"name": name, "arguments": arguments}


GOOD_LIMA = _call("get_weather", {"city": "Lima"})
BAD_LIMA = _call("get_weather", {"city": "Quito"})

# (format, response builder): each format is scored with a matching and a non-matching call.
FORMATS = {
    "hermes tag": lambda c: f"<tool_call>\n{json.dumps(c)}\n</tool_call>",
    "bare object": lambda c: json.dumps(c),
    "bare list with text around": lambda c: f"I will call it: {json.dumps([c])} now.",
    "arguments as JSON string": lambda c: json.dumps(
        {"name": c["name"], "arguments": json.dumps(c["arguments"])}
    ),
    "openai function wrapper": lambda c: json.dumps({"type": "function", "function": c}),
    "openai tool_calls": lambda c: json.dumps(
        {"tool_calls": [{"id": "call_1", "type": "function", "function": c}]}
    ),
    "json fence": lambda c: f"```json\n{json.dumps(c)}\n```",
    "llama parameters": lambda c: json.dumps({"name": c["name"], "parameters": c["arguments"]}),
}


@pytest.mark.parametrize(
    "tools", [None, OPENAI_TOOLS, MCP_TOOLS], ids=["no tools", "openai tools", "mcp tools"]
)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_both_verdicts(fmt, tools):
    build = FORMATS[fmt]
    assert tool_use.score(build(GOOD_LIMA), LIMA, tools) == 1.0
    assert tool_use.score(build(BAD_LIMA), LIMA, tools) == 0.0


def test_parallel_calls_are_order_insensitive():
    expected = [_call("get_weather", {"city": "Lima"}), _call("convert", {"amount": 25, "currency": "JPY"})]
    response = "".join(f"<tool_call>{json.dumps(c)}</tool_call>" for c in reversed(expected))
    assert tool_use.score(response, expected, OPENAI_TOOLS) == 1.0
    same_tool_twice = [_call("get_weather", {"city": "Lima"}), _call("get_weather", {"city": "Oslo"})]
    assert tool_use.score(json.dumps(same_tool_twice[::-1]), same_tool_twice, MCP_TOOLS) == 1.0
    assert tool_use.score(json.dumps([same_tool_twice[0]] * 2), same_tool_twice, MCP_TOOLS) == 0.0


def test_type_tolerance_follows_the_schema():
    expected = [_call("convert", {"amount": 25, "currency": "JPY", "code": "5"})]
    as_float_and_int = json.dumps(_call("convert", {"amount": 25.0, "currency": "JPY", "code": 5}))
    assert tool_use.score(as_float_and_int, expected) == 0.0  # no schema: "5" and 5 differ
    code_is_string_schema = [{"name": "convert", "parameters": CONVERT_SCHEMA}]
    loose = json.dumps(_call("convert", {"amount": 25.0, "currency": "JPY", "code": "5"}))
    assert tool_use.score(loose, expected, code_is_string_schema) == 1.0  # 25 == 25.0
    number_as_string = json.dumps(_call("convert", {"amount": "25", "currency": "JPY", "code": "5"}))
    assert tool_use.score(number_as_string, expected, code_is_string_schema) == 0.0  # schema says number
    no_schema_numbers = json.dumps(_call("convert", {"amount": 25.0, "currency": "JPY", "code": "5"}))
    assert tool_use.score(no_schema_numbers, expected) == 1.0


def test_string_schema_tolerates_a_number_for_a_string():
    """A dataset that wrote zip 2139 for a string parameter still matches the model's "2139"."""
    tools = [{"name": "lookup", "parameters": {"type": "object", "properties": {"zip": {"type": "string"}}}}]
    sloppy_expected = [_call("lookup", {"zip": 2139})]
    as_string = json.dumps(_call("lookup", {"zip": "2139"}))
    assert tool_use.score(as_string, sloppy_expected, tools) == 1.0
    assert tool_use.score(as_string, sloppy_expected) == 0.0  # no schema: no coercion
    # the model's own number for a string parameter fails validation
    assert tool_use.score(json.dumps(_call("lookup", {"zip": 2139})), sloppy_expected, tools) == 0.0


def test_values_match_string_schema_coerces_numbers():
    schema = {"type": "object", "properties": {"code": {"type": "string"}}}
    assert tool_use.values_match({"code": "5"}, {"code": 5}, schema)
    assert not tool_use.values_match({"code": "5"}, {"code": 5}, {})
    assert not tool_use.values_match({"n": 1}, {"n": True}, {})
    assert tool_use.values_match({"n": [1, 2]}, {"n": [1.0, 2]}, {})
    assert not tool_use.values_match({"n": [1, 2]}, {"n": [2, 1]}, {})


def test_defaults_count_as_matching():
    with_defaults = json.dumps(_call("get_weather", {"city": "Lima", "units": "celsius", "days": 1}))
    assert tool_use.score(with_defaults, LIMA, OPENAI_TOOLS) == 1.0
    assert (
        tool_use.score(json.dumps(GOOD_LIMA), [_call("get_weather", {"city": "Lima", "days": 1})], MCP_TOOLS)
        == 1.0
    )
    non_default = json.dumps(_call("get_weather", {"city": "Lima", "units": "fahrenheit"}))
    assert tool_use.score(non_default, LIMA, OPENAI_TOOLS) == 0.0
    assert tool_use.score(with_defaults, LIMA) == 0.0  # without the schema there are no defaults


def test_schema_violations_fail():
    assert (
        tool_use.score(
            json.dumps(_call("get_weather", {"city": "Lima", "units": "kelvin"})), LIMA, OPENAI_TOOLS
        )
        == 0.0
    )
    assert tool_use.score(json.dumps(_call("get_weather", {"units": "celsius"})), LIMA, OPENAI_TOOLS) == 0.0


def test_unknown_tools_and_malformed_json_score_zero():
    unknown = f"<tool_call>{json.dumps(GOOD_LIMA)}</tool_call><tool_call>{json.dumps(_call('rm_rf', {}))}</tool_call>"
    assert tool_use.score(unknown, LIMA, OPENAI_TOOLS) == 0.0
    assert tool_use.score(unknown, LIMA, OPENAI_TOOLS, partial_credit=True) == 0.0
    for broken in (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}',
        '{"name": "get_weather", "arguments": "{city: Lima}"}',
        '{"arguments": {"city": "Lima"}}',
        '{"name": "get_weather", "arguments": {"city": "Lima"',
    ):
        assert tool_use.score(broken, LIMA, OPENAI_TOOLS, partial_credit=True) == 0.0, broken


def test_partial_credit():
    expected = [_call("get_weather", {"city": "Lima"}), _call("convert", {"amount": 25, "currency": "JPY"})]
    one_of_two = json.dumps([expected[0]])
    assert tool_use.score(one_of_two, expected, OPENAI_TOOLS) == 0.0
    assert tool_use.score(one_of_two, expected, OPENAI_TOOLS, partial_credit=True) == 0.5
    with_extra = json.dumps([*expected, _call("get_weather", {"city": "Oslo"})])
    assert tool_use.score(with_extra, expected, OPENAI_TOOLS, partial_credit=True) == pytest.approx(2 / 3)
    one_invalid = json.dumps([expected[0], _call("convert", {"amount": "lots", "currency": "JPY"})])
    assert tool_use.score(one_invalid, expected, OPENAI_TOOLS, partial_credit=True) == 0.5


def test_no_call_expected():
    assert tool_use.score("It is sunny in {the} city [1].", []) == 1.0
    for answer in ('{"answer": 42}', '```json\n{"answer": 42}\n```', "```\nprint(42)\n```"):
        assert tool_use.score(answer, []) == 1.0, answer  # an answer in a fence is not a call either
    assert tool_use.score(json.dumps(GOOD_LIMA), []) == 0.0
    assert tool_use.score("no call at all", LIMA) == 0.0


def test_expected_calls_and_tools_as_tuples():
    # a tuple was read as one call and raised "a tool call needs a 'name'"
    assert tool_use.score(json.dumps(GOOD_LIMA), tuple(LIMA)) == 1.0
    assert tool_use.score("no call at all", ()) == 1.0
    assert tool_use.score(json.dumps(GOOD_LIMA), LIMA, tuple(MCP_TOOLS)) == 1.0


def test_parse_normalises_every_format():
    calls = parse_tool_calls(
        '<tool_call>[{"name": "a", "arguments": "{\\"x\\": 1}"}, {"name": "b"}]</tool_call>'
    )
    assert [(c.name, c.arguments) for c in calls] == [("a", {"x": 1}), ("b", {})]


def test_expected_calls_and_tools_as_json_text():
    assert tool_use.score(json.dumps(GOOD_LIMA), json.dumps(LIMA), json.dumps({"tools": MCP_TOOLS})) == 1.0


@pytest.mark.parametrize(
    "expected, tools, message",
    [
        (None, None, "no expected_calls"),
        ([{"arguments": {}}], None, "cannot be read"),
        (LIMA, [{"description": "nameless"}], "tool #0 has no 'name'"),
        (LIMA, [{"name": "t", "parameters": {"type": "nonsense"}}], "invalid JSON schema"),
    ],
)
def test_bad_dataset_rows_raise_reward_error(expected, tools, message):
    with pytest.raises(RewardError, match=message):
        tool_use.score(json.dumps(GOOD_LIMA), expected, tools)


def test_calls_drafted_in_the_reasoning_do_not_count_and_deep_nesting_scores_zero():
    expected = [_call("zip", {"code": "1"})]
    draft, final = json.dumps(_call("zip", {"code": "2"})), json.dumps(_call("zip", {"code": "1"}))
    assert tool_use.score(f"<think>Plan: {draft}</think>\n{final}", expected) == 1.0
    tagged = f"<think><tool_call>{draft}</tool_call></think><tool_call>{final}</tool_call>"
    assert tool_use.score(tagged, expected) == 1.0
    # the chat template opened <think> in the prompt: the response holds only its closing tag
    opened_in_prompt = f"Plan: <tool_call>{draft}</tool_call></think>\n<tool_call>{final}</tool_call>"
    assert tool_use.score(opened_in_prompt, expected) == 1.0
    assert tool_use.score(f"Plan: {draft}</think>\n{final}", expected) == 1.0
    # cut off while reasoning: a call drafted there is no answer
    assert tool_use.score(f"<think>Plan: <tool_call>{final}</tool_call> then", expected) == 0.0
    assert tool_use.score(f"{final}\n<think>why it works", expected) == 1.0
    assert tool_use.score("[" * 100_000 + "]" * 100_000, expected) == 0.0  # not a RecursionError
