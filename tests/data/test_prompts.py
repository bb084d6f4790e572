"""Chat templates through a real tokenizer (built with `tokenizers`), system prompts, raw prompts."""

from __future__ import annotations

import pytest

from rlcpm.data.prompts import PromptRenderer
from rlcpm.data.rows import RowError
from rlcpm.errors import DataError


def chatml(*turns: tuple[str, str]) -> str:
    """ChatML written out by hand: the oracle for the template rendering."""
    body = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return body + "<|im_start|>assistant\n"


def test_plain_prompt_becomes_a_user_turn(chatml_tokenizer):
    text, messages = PromptRenderer(chatml_tokenizer).render("What is 2+3?", None)
    assert text == chatml(("user", "What is 2+3?"))
    assert messages == [{"role": "user", "content": "What is 2+3?"}]
    ids = chatml_tokenizer(text, add_special_tokens=False)["input_ids"]
    im_start = chatml_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 2  # special tokens stay single ids


def test_system_prompt_is_prepended_unless_the_row_has_one(chatml_tokenizer):
    renderer = PromptRenderer(chatml_tokenizer, system_prompt="Answer in \\boxed{}.")
    text, messages = renderer.render("2+2?", None)
    assert text == chatml(("system", "Answer in \\boxed{}."), ("user", "2+2?"))
    assert messages[0] == {"role": "system", "content": "Answer in \\boxed{}."}
    own = [{"role": "system", "content": "Row system."}, {"role": "user", "content": "hi"}]
    text, _ = renderer.render(None, own)
    assert text == chatml(("system", "Row system."), ("user", "hi"))


def test_multi_turn_messages(chatml_tokenizer):
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
    ]
    text, messages = PromptRenderer(chatml_tokenizer).render(None, turns)
    assert text == chatml(("user", "hi"), ("assistant", "hello"), ("user", "2+2?"))
    assert messages == turns


def test_model_chat_template_overrides_the_tokenizers(chatml_tokenizer):
    override = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    text, _ = PromptRenderer(chatml_tokenizer, chat_template=override).render("2+2?", None)
    assert text == "[user] 2+2?\n[assistant] "


def test_tools_reach_the_template(chatml_tokenizer):
    template = (
        "{% if tools %}TOOLS:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}{{ '\\n' }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text, _ = PromptRenderer(chatml_tokenizer, chat_template=template).render("weather?", None, tools)
    assert text == "TOOLS: get_weather\nweather?\n"


def test_template_errors_become_row_errors(chatml_tokenizer):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}ok"
    )
    renderer = PromptRenderer(chatml_tokenizer, chat_template=template)
    assert renderer.render("q", None)[0] == "ok"
    with pytest.raises(RowError, match="chat template failed on this row.*must start with user"):
        renderer.render(None, [{"role": "assistant", "content": "x"}, {"role": "user", "content": "q"}])


def test_missing_template_or_tokenizer_is_a_clear_error(chatml_tokenizer):
    bare = chatml_tokenizer.__class__(
        tokenizer_object=chatml_tokenizer.backend_tokenizer, name_or_path="bare"
    )
    assert bare.chat_template is None
    with pytest.raises(DataError, match="tokenizer 'bare' has no chat template; set model.chat_template"):
        PromptRenderer(bare)
    with pytest.raises(DataError, match="no tokenizer was given"):
        PromptRenderer(None)
    # an explicit template makes a template-less tokenizer usable
    assert PromptRenderer(bare, chat_template="{{ messages[0]['content'] }}").render("x", None)[0] == "x"


def test_raw_prompts(chatml_tokenizer):
    raw = PromptRenderer(None, apply_chat_template=False)
    assert raw.render("What is 2+3?", None) == ("What is 2+3?", None)
    prefixed = PromptRenderer(None, apply_chat_template=False, system_prompt="Be exact.")
    assert prefixed.render("What is 2+3?", None)[0] == "Be exact.\n\nWhat is 2+3?"
    single = [{"role": "system", "content": "Row sys."}, {"role": "user", "content": "q"}]
    assert prefixed.render(None, single)[0] == "Row sys.\n\nq"
    with pytest.raises(RowError, match="multi-turn 'messages' prompt cannot be used as raw text"):
        raw.render(None, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, single[1]])
