"""Field mapping, JSON decoding and per-algorithm validation of single rows."""

from __future__ import annotations

import json

import pytest

from rlcpm.config import FieldMap
from rlcpm.data.rows import RowError, parse_row

DEFAULT = FieldMap()


def test_field_map_renames_columns_and_keeps_the_rest():
    fields = FieldMap(prompt="question", answer="solution", tests="test_list", id="task_id")
    row = parse_row(
        {"task_id": 7, "question": "Sum?", "solution": 12, "test_list": ["assert f() == 1"], "level": "easy"},
        fields,
    )
    assert (row.id, row.prompt, row.answer) == ("7", "Sum?", "12")
    assert row.fields == {"tests": ["assert f() == 1"], "level": "easy"}


def test_messages_win_over_prompt_and_final_assistant_turn_becomes_response():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "\\boxed{4}"},
    ]
    row = parse_row({"prompt": "ignored", "messages": messages}, DEFAULT, "sft")
    assert row.messages == messages[:2]
    assert row.response == "\\boxed{4}"
    explicit = parse_row({"messages": messages, "response": "4"}, DEFAULT, "sft")
    assert explicit.response == "4" and explicit.messages == messages[:2]


def test_a_final_assistant_turn_without_text_is_split_off_and_only_sft_needs_its_text():
    """A function-calling conversation ends with the gold call (no content): fine for GRPO."""
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Call f."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    row = parse_row({"messages": messages}, DEFAULT, "grpo")
    assert row.messages == messages[:1] and row.response is None
    with pytest.raises(RowError, match="sft needs a response"):
        parse_row({"messages": messages}, DEFAULT, "sft")


def test_json_strings_are_decoded_for_messages_tools_calls_and_tests():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    calls = {"name": "f", "arguments": {}}
    row = parse_row(
        {
            "messages": json.dumps([{"role": "user", "content": "hi"}]),
            "tools": json.dumps(tools),
            "expected_calls": json.dumps(calls),
            "tests": json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [2]}),
        },
        DEFAULT,
    )
    assert row.messages == [{"role": "user", "content": "hi"}]
    assert row.tools == tools and row.fields["tools"] == tools
    assert row.fields["expected_calls"] == [calls]  # a single call object becomes a list
    assert row.fields["tests"] == {"fn_name": "f", "inputs": [[1]], "outputs": [2]}


def test_tools_given_as_an_mcp_tools_list_result_are_its_list():
    """{"tools": [...]} (MCP tools/list) is the tools themselves, not one tool without a name:
    the chat template must list set_timer and the tool_use reward must find its schema."""
    tools = [{"name": "set_timer", "inputSchema": {"type": "object"}}]
    for cell in ({"tools": tools}, json.dumps({"tools": tools})):
        row = parse_row({"prompt": "p", "tools": cell}, DEFAULT)
        assert row.tools == tools and row.fields["tools"] == tools


def test_expected_calls_in_openai_tool_calls_form_are_accepted():
    """An assistant message's `tool_calls` (wrapped in "function", arguments as JSON text), as
    OpenAI-format datasets store the gold calls: the tool_use reward reads them, so must the loader."""
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    for cell in (calls, {"tool_calls": calls}, json.dumps({"role": "assistant", "tool_calls": calls})):
        assert parse_row({"prompt": "p", "expected_calls": cell}, DEFAULT).fields["expected_calls"] == calls


def test_tests_given_as_python_source_stay_text():
    source = "assert f(1) == 2\nassert f(2) == 3"
    assert parse_row({"prompt": "p", "tests": source}, DEFAULT).fields["tests"] == source
    assert parse_row({"prompt": "p", "tests": "42"}, DEFAULT).fields["tests"] == "42"


def test_dpo_conversational_pair_with_implicit_prompt():
    prompt = [{"role": "user", "content": "2+2?"}]
    row = parse_row(
        {
            "chosen": prompt + [{"role": "assistant", "content": "4"}],
            "rejected": prompt + [{"role": "assistant", "content": "5"}],
        },
        DEFAULT,
        "dpo",
    )
    assert (row.messages, row.chosen, row.rejected) == (prompt, "4", "5")
    with pytest.raises(RowError, match="share the same prompt turns"):
        parse_row(
            {
                "chosen": prompt + [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "5"}],
            },
            DEFAULT,
            "dpo",
        )


@pytest.mark.parametrize(
    ("data", "algorithm", "message"),
    [
        ({"answer": "1"}, "grpo", "no prompt: column 'prompt' and column 'messages'"),
        ({"prompt": "   "}, "grpo", "no prompt"),
        ({"prompt": "p", "chosen": "a"}, "dpo", "dpo needs column 'rejected'"),
        ({"prompt": "p", "rejected": "b"}, "dpo", "dpo needs column 'chosen'"),
        ({"prompt": "p"}, "sft", "sft needs a response"),
        ({"messages": [{"role": "user", "content": "q"}]}, "sft", "does not end with an assistant turn"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "sft", "only an assistant turn"),
        ({"messages": []}, "grpo", "non-empty list"),
        ({"messages": [{"content": "x"}]}, "grpo", r"message \[0\] must be an object with a string 'role'"),
        ({"messages": "[oops"}, "grpo", "'messages' is a string but not valid JSON"),
        ({"prompt": ["a"]}, "grpo", r"column 'prompt': message \[0\] must be an object with a string 'role'"),
        ({"prompt": "p", "answer": {"a": 1}}, "grpo", "answer.*must be a string, a number or a list of them"),
        ({"prompt": "p", "answer": [[1]]}, "grpo", "answer.*must be a string, a number or a list of them"),
        ({"prompt": "p", "answer": []}, "grpo", "answer.*must be a string, a number or a list of them"),
        ({"prompt": "p", "id": 1.5}, "grpo", "row id.*float"),
        ({"prompt": "p", "tools": "{bad"}, "grpo", "'tools' is a string but not valid JSON"),
        ({"prompt": "p", "tools": ["x"]}, "grpo", "must be a list of objects"),
        ({"prompt": "p", "expected_calls": [{"arguments": {}}]}, "grpo", r"call \[0\] has no string 'name'"),
        (["not", "an", "object"], "grpo", "expected an object with named columns, got list"),
    ],
)
def test_invalid_rows_say_what_is_wrong(data, algorithm, message):
    with pytest.raises(RowError, match=message):
        parse_row(data, DEFAULT, algorithm)


@pytest.mark.parametrize(
    "tests",
    [
        "['assert f(1) == 2', 'assert f(2) == 3']",  # pandas' to_csv of a list column
        "['assert f(1) == 2'\n 'assert f(2) == 3']",  # datasets' to_csv (a numpy array's repr)
    ],
)
def test_tests_written_as_a_python_literal_are_refused_not_run_as_test_code(tests):
    """As test source such a cell is one expression statement: it checks nothing, every response passes."""
    with pytest.raises(RowError, match="column 'tests' holds a Python literal"):
        parse_row({"prompt": "p", "tests": tests}, DEFAULT)
    source = "[x] = [2]\nassert f(1) == x"  # test code that starts with a bracket stays code
    assert parse_row({"prompt": "p", "tests": source}, DEFAULT).fields["tests"] == source


@pytest.mark.parametrize("column", ["prompt", "chosen", "rejected"])
def test_a_conversation_written_as_a_python_literal_is_refused_not_used_as_text(column):
    """datasets' to_csv of TRL's conversational format: the cells hold numpy reprs, not JSON."""
    turns = {
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    row = {name: json.dumps(value) for name, value in turns.items()}
    row[column] = "[" + "\n ".join(repr(turn) for turn in turns[column] * 2) + "]"
    with pytest.raises(RowError, match=f"column '{column}' holds a Python literal"):
        parse_row(row, DEFAULT, "dpo")


def test_custom_column_names_appear_in_messages():
    with pytest.raises(RowError, match="column 'question'"):
        parse_row({"text": "x"}, FieldMap(prompt="question"))


def test_nan_and_blank_cells_count_as_missing():
    row = parse_row({"prompt": "p", "answer": float("nan"), "response": " "}, DEFAULT)
    assert row.answer is None and row.response is None


def test_an_answer_column_may_list_several_accepted_forms():
    """docs/rewards.md: a gold answer that is a list accepts any of its forms; the loader refused
    lists, so no dataset could use it."""
    from rlcpm.rewards import math

    row = parse_row({"prompt": "p", "answer": ["1/2", 0.5]}, DEFAULT, "grpo")
    assert row.answer == ["1/2", "0.5"]
    assert math.score("The answer is $\\boxed{0.5}$", row.answer) == 1.0
