"""load_examples end to end: files and synthetic tasks in, rendered Examples out; bad rows fail or skip."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from rlcpm.config import DataConfig, load_recipe
from rlcpm.data import load_examples, write_jsonl
from rlcpm.data.synthetic import generate
from rlcpm.errors import DataError


def config(train, **kwargs) -> DataConfig:
    kwargs.setdefault("apply_chat_template", False)
    kwargs.setdefault("shuffle", False)
    return DataConfig(train=str(train) if not isinstance(train, dict) else train, **kwargs)


def test_jsonl_to_examples_with_ids_answers_and_fields(write_jsonl_lines):
    path = write_jsonl_lines(
        [
            {"id": "q1", "prompt": "What is 2+3?", "answer": 5, "difficulty": "easy"},
            {"prompt": "What is 7-4?", "answer": "3", "tests": '["assert True"]'},
        ],
        name="math.jsonl",
    )
    loaded = load_examples(config(path))
    first, second = loaded.examples
    assert (first.id, first.prompt, first.answer, first.messages) == ("q1", "What is 2+3?", "5", None)
    assert first.fields == {"difficulty": "easy"}
    assert second.id == "math.jsonl:2"  # file:row when the row has no id
    assert second.fields == {"tests": ["assert True"]}
    assert loaded.num_skipped == 0 and len(loaded) == 2


def test_malformed_rows_fail_naming_file_and_line(write_jsonl_lines):
    good = {"prompt": "ok", "answer": "1"}
    path = write_jsonl_lines([good, good, "{broken json", good])
    with pytest.raises(DataError) as err:
        load_examples(config(path))
    message = str(err.value)
    assert f"{path}, line 3: not valid JSON" in message and "data.skip_invalid" in message

    path = write_jsonl_lines([good, good, good, {"answer": "7"}], name="missing.jsonl")
    with pytest.raises(DataError, match=r"missing.jsonl, line 4: no prompt: column 'prompt'"):
        load_examples(config(path))


def test_skip_invalid_counts_and_warns(write_jsonl_lines, caplog):
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(6)]
    lines = [rows[0], "not json", rows[1], {"answer": "x"}, rows[2], [1, 2], rows[3], {"prompt": 5}]
    path = write_jsonl_lines(lines)
    with caplog.at_level(logging.WARNING, logger="rlcpm.data"):
        loaded = load_examples(config(path, skip_invalid=True))
    assert [e.prompt for e in loaded.examples] == ["p0", "p1", "p2", "p3"]
    assert loaded.num_skipped == 4
    assert loaded.skip_reasons[0].endswith("line 2: not valid JSON (Expecting value)")
    assert "line 4: no prompt" in loaded.skip_reasons[1]
    warning = caplog.records[-1].getMessage()
    assert "skipped 4 invalid row(s)" in warning and "line 6: expected an object" in warning


def test_all_rows_invalid_is_an_error_even_when_skipping(write_jsonl_lines):
    path = write_jsonl_lines([{"answer": "1"}, {"answer": "2"}])
    with pytest.raises(DataError, match=r"holds no usable rows \(2 invalid rows skipped\)"):
        load_examples(config(path, skip_invalid=True))


def test_duplicate_ids_are_rows_errors(write_jsonl_lines):
    path = write_jsonl_lines(
        [{"id": "x", "prompt": "a"}, {"id": "y", "prompt": "b"}, {"id": "x", "prompt": "c"}]
    )
    with pytest.raises(DataError, match=r"line 3: duplicate id 'x' \(first seen at .*data.jsonl, line 1\)"):
        load_examples(config(path))
    assert [e.id for e in load_examples(config(path, skip_invalid=True)).examples] == ["x", "y"]


def test_csv_json_cells_are_decoded_and_rows_numbered_by_line(tmp_path):
    path = tmp_path / "tools.csv"
    tools = [{"type": "function", "function": {"name": "set_timer", "parameters": {"type": "object"}}}]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "tools", "expected_calls"])
        writer.writerow(
            ["Set a timer for 5 minutes.", json.dumps(tools), json.dumps([{"name": "set_timer"}])]
        )
        writer.writerow(["Broken tools.", "{not json", "[]"])
    with pytest.raises(DataError, match=r"tools.csv, line 3: column 'tools' is a string but not valid JSON"):
        load_examples(config(path))
    loaded = load_examples(config(path, skip_invalid=True))
    (example,) = loaded.examples
    assert example.fields["tools"] == tools
    assert example.fields["expected_calls"] == [{"name": "set_timer"}]
    assert example.id == "tools.csv:2"


def test_field_mapping_from_a_recipe(tmp_path):
    path = tmp_path / "gsm.jsonl"
    write_jsonl([{"question": "Q?", "final": "42", "uid": "g1"}], path)
    recipe = load_recipe(
        data={
            "model": {"path": "unused"},
            "data": {
                "train": str(path),
                "apply_chat_template": False,
                "fields": {"prompt": "question", "answer": "final", "id": "uid"},
            },
            "rewards": [{"name": "math"}],
        }
    )
    (example,) = load_examples(recipe.data).examples
    assert (example.id, example.prompt, example.answer) == ("g1", "Q?", "42")


def test_a_synthetic_split_beside_a_mapped_file_keeps_its_own_column_names(tmp_path):
    """data.fields names the user's file columns; synthetic rows always use rlcpm's names."""
    path = tmp_path / "gsm.jsonl"
    write_jsonl([{"question": "Q?", "final": "42"}], path)
    cfg = config(
        path,
        eval={"task": "arithmetic", "num_samples": 3, "seed": 0},
        fields={"prompt": "question", "answer": "final"},
    )
    (example,) = load_examples(cfg, "train").examples
    assert (example.prompt, example.answer) == ("Q?", "42")
    expected = generate("arithmetic", 3, seed=0)
    examples = load_examples(cfg, "eval").examples
    assert [(e.prompt, e.answer) for e in examples] == [(r["prompt"], r["answer"]) for r in expected]


def test_chat_template_and_system_prompt_applied(write_jsonl_lines, chatml_tokenizer):
    path = write_jsonl_lines([{"prompt": "2+2?", "answer": "4"}])
    cfg = config(path, apply_chat_template=True, system_prompt="Use \\boxed{}.")
    (example,) = load_examples(cfg, tokenizer=chatml_tokenizer).examples
    assert example.prompt == (
        "<|im_start|>system\nUse \\boxed{}.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert example.messages == [
        {"role": "system", "content": "Use \\boxed{}."},
        {"role": "user", "content": "2+2?"},
    ]
    override = "{{ messages[-1]['content'] }} =>"
    (example,) = load_examples(cfg, tokenizer=chatml_tokenizer, chat_template=override).examples
    assert example.prompt == "2+2? =>"
    with pytest.raises(DataError, match="no tokenizer was given"):
        load_examples(cfg)


def test_max_prompt_tokens(write_jsonl_lines, chatml_tokenizer):
    long_prompt = "Ann has 23 apples. " * 20
    path = write_jsonl_lines([{"prompt": "short"}, {"prompt": long_prompt}])
    num_tokens = len(chatml_tokenizer(long_prompt, add_special_tokens=False)["input_ids"])
    assert num_tokens > 40
    with pytest.raises(
        DataError, match=rf"line 2: prompt has {num_tokens} tokens, more than data.max_prompt_tokens=40"
    ):
        load_examples(config(path, max_prompt_tokens=40), tokenizer=chatml_tokenizer)
    loaded = load_examples(config(path, max_prompt_tokens=40, skip_invalid=True), tokenizer=chatml_tokenizer)
    assert [e.prompt for e in loaded.examples] == ["short"] and loaded.num_skipped == 1


def test_algorithm_decides_what_a_row_needs(write_jsonl_lines):
    path = write_jsonl_lines([{"prompt": "p", "chosen": "good"}])
    assert load_examples(config(path), algorithm="grpo").examples[0].chosen == "good"
    with pytest.raises(DataError, match="line 1: dpo needs column 'rejected'"):
        load_examples(config(path), algorithm="dpo")
    with pytest.raises(DataError, match="line 1: sft needs a response"):
        load_examples(config(path), algorithm="sft")


def test_shuffle_is_deterministic_by_seed(write_jsonl_lines):
    path = write_jsonl_lines([{"id": str(i), "prompt": f"p{i}"} for i in range(30)])
    order = lambda seed, **kw: [e.id for e in load_examples(config(path, **kw), seed=seed).examples]
    assert order(0) == [str(i) for i in range(30)]  # shuffle: false keeps file order
    assert order(1, shuffle=True) == order(1, shuffle=True)
    assert order(1, shuffle=True) != order(2, shuffle=True)
    assert sorted(order(1, shuffle=True), key=int) == order(0)


def test_synthetic_sources_and_eval_split():
    cfg = config(
        {"task": "arithmetic", "num_samples": 20, "seed": 3, "options": {"num_steps": 2}},
        eval={"task": "preference", "num_samples": 5, "seed": 4},
    )
    train = load_examples(cfg, "train").examples
    assert [e.id for e in train] == [r["id"] for r in generate("arithmetic", 20, 3, num_steps=2)]
    assert all(e.answer is not None and e.response.endswith("}") for e in train)
    assert train[0].fields["expression"] and "is_demo_correct" in train[0].fields
    pairs = load_examples(cfg, "eval", algorithm="dpo").examples
    assert len(pairs) == 5 and all(e.chosen != e.rejected for e in pairs)
    with pytest.raises(DataError, match="data.eval is not set"):
        load_examples(config(cfg.train), "eval")
    bad = config({"task": "arithmetic", "options": {"num_step": 2}})
    with pytest.raises(DataError, match=r"unknown option\(s\) \['num_step'\]; allowed: \['num_steps'"):
        load_examples(bad)


def test_write_jsonl_round_trip_for_every_task(tmp_path):
    for task in ("arithmetic", "code", "tool_use", "preference"):
        rows = generate(task, 8, seed=0)
        path = write_jsonl(rows, tmp_path / "out" / f"{task}.jsonl")
        algorithm = "dpo" if task == "preference" else "sft"
        loaded = load_examples(config(path), algorithm=algorithm)
        assert [e.id for e in loaded.examples] == [r["id"] for r in rows]
        assert [e.prompt for e in loaded.examples] == [r["prompt"] for r in rows]
        if task == "tool_use":
            assert [e.fields["tools"] for e in loaded.examples] == [r["tools"] for r in rows]


@pytest.mark.parametrize(
    "name, text",
    [
        ("excel.csv", 'prompt,answer\r\nWhat is 2+2?,4\r\nWhat is 3+3?,6\r\n'),
        ("notepad.jsonl", '{"prompt": "What is 2+2?", "answer": "4"}\n{"prompt": "What is 3+3?", "answer": "6"}\n'),
        ("list.json", '[{"prompt": "What is 2+2?", "answer": "4"}, {"prompt": "What is 3+3?", "answer": "6"}]'),
    ],
)
def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # as Excel and Notepad save UTF-8
    loaded = load_examples(config(path, skip_invalid=True))
    assert [(e.prompt, e.answer) for e in loaded.examples] == [("What is 2+2?", "4"), ("What is 3+3?", "6")]
    assert loaded.num_skipped == 0


def test_json_lines_in_a_json_file_as_datasets_to_json_writes_them(tmp_path):
    path = tmp_path / "hf.json"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [e.prompt for e in load_examples(config(path)).examples] == ["a", "b"]


def test_trl_conversational_preferences_with_an_explicit_prompt(write_jsonl_lines, tmp_path):
    row = {
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    pair = load_examples(config(write_jsonl_lines([row])), algorithm="dpo").examples[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q", "good", "bad")  # one user turn, raw mode
    # the same conversations as JSON text in CSV string columns
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow(["Q", json.dumps(row["chosen"]), json.dumps(row["rejected"])])
    pair = load_examples(config(path), algorithm="dpo").examples[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q", "good", "bad")


def test_a_conversational_prompt_stored_as_json_text_is_the_prompt_conversation(tmp_path):
    """TRL's conversational format written to CSV: the prompt cell is JSON text like chosen/rejected."""
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow(
            [json.dumps([{"role": "user", "content": "Q"}])]
            + [json.dumps([{"role": "assistant", "content": text}]) for text in ("good", "bad")]
        )
    pair = load_examples(config(path), algorithm="dpo").examples[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q", "good", "bad")


def test_a_csv_record_over_several_lines_is_located_where_it_starts(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('prompt,answer\n,"multi\nline\nanswer"\nok,1\n')
    with pytest.raises(DataError, match=r"multi.csv, line 2: no prompt"):
        load_examples(config(path))
    path.write_text('prompt,answer\n"multi\nline",1\nok,2\n')
    assert [e.id for e in load_examples(config(path)).examples] == ["multi.csv:2", "multi.csv:4"]
