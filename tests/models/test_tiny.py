"""Tiny HF model directories with a real tokenizer, loadable by rlcpm and by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlcpm.errors import CheckpointError
from rlcpm.models import build_tiny_model_dir, load_model, load_tokenizer
from rlcpm.models.tiny import train_bpe_tokenizer
from rlcpm.models.tiny_tokenizer import builtin_corpus


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_tiny_dir_loads_in_rlcpm_and_transformers(model_type, tokenizer, tmp_path):
    path = build_tiny_model_dir(tmp_path / "m", model_type, tokenizer=tokenizer, seed=3)
    files = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= files
    ours = load_model(path)
    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("What is 12 + 34? The answer is 46.")["input_ids"]])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-5
    assert ours.config.vocab_size == len(tok)
    assert ours.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert ours.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert theirs.generation_config.eos_token_id == [
        tok.eos_token_id,
        tok.convert_tokens_to_ids("<|endoftext|>"),
    ]


def test_tiny_dir_is_seeded(tokenizer, tmp_path):
    a = build_tiny_model_dir(tmp_path / "a", tokenizer=tokenizer, seed=1)
    b = build_tiny_model_dir(tmp_path / "b", tokenizer=tokenizer, seed=1)
    c = build_tiny_model_dir(tmp_path / "c", tokenizer=tokenizer, seed=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tiny_minicpm_dir_with_extra_vocab(tokenizer, tmp_path):
    path = build_tiny_model_dir(tmp_path, "minicpm", tokenizer=tokenizer, vocab_size=len(tokenizer) + 8)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "minicpm" and config["rope_scaling"]["rope_type"] == "longrope"
    model = load_model(path)
    assert model.config.vocab_size == len(tokenizer) + 8 and model.config.scale_emb == 12.0


def test_load_tokenizer_of_a_config_transformers_cannot_parse(tokenizer, tmp_path):
    # MiniCPM4's config (model_type minicpm, longrope) needs remote code in transformers, and
    # AutoTokenizer parses it before reading tokenizer_config.json; load_tokenizer does not need it.
    path = build_tiny_model_dir(tmp_path, "minicpm", tokenizer=tokenizer)
    loaded = load_tokenizer(path)
    text = "12 + 7 = 19"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.eos_token, loaded.pad_token, loaded.chat_template) == (
        tokenizer.eos_token, tokenizer.pad_token, tokenizer.chat_template,
    )  # fmt: skip


def test_load_tokenizer_names_the_directory_when_there_is_none(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_chat_template_is_chatml(tokenizer, tmp_path):
    build_tiny_model_dir(tmp_path, tokenizer=tokenizer)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    tool_text = tok.apply_chat_template(messages[1:], tools=[{"name": "add"}], tokenize=False)
    assert tool_text.startswith(
        '<|im_start|>system\nYou may call these tools:\n[{"name": "add"}]<|im_end|>\n'
    )
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tokenizer.chat_template


def test_tokenizer_roundtrip_specials_and_digits(tokenizer):
    text = 'def f(x):\n    return x ** 2  # héllo, 世界! 12345 <tool_call>{"a": 1}</tool_call>'
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.tokenize("2026") == ["2", "0", "2", "6"]
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        encoded = tokenizer(f"a{special}b")["input_ids"]
        assert tokenizer.convert_tokens_to_ids(special) in encoded
        assert len(encoded) == 3
    assert len(tokenizer) == 512


def test_train_bpe_tokenizer_vocab_size_and_determinism():
    corpus = builtin_corpus(num_lines=2000, seed=5)
    first = train_bpe_tokenizer(corpus, vocab_size=700)
    second = train_bpe_tokenizer(corpus, vocab_size=700)
    assert len(first) == 700
    assert first.get_vocab() == second.get_vocab()
    sample = "What is 17 * 3? The answer is \\boxed{51}."
    assert first.decode(first(sample)["input_ids"]) == sample
    assert len(first(sample)["input_ids"]) < len(sample.encode())  # merges actually compress
