"""Fixtures for rlcpm.data tests: a real ChatML tokenizer built with `tokenizers`, a row writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Ann has 23 apples. She buys 45 more. How many apples does Ann have now?",
    "You are a helpful assistant. Answer with \\boxed{N}.",
    "def count_greater(nums): return sum(1 for n in nums if n > 3)",
    "Please check the weather in Paris and convert 25 USD to JPY.",
]


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        name_or_path="tiny-chatml",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.fixture
def write_jsonl_lines(tmp_path: Path):
    """Write raw lines (objects are JSON-encoded, strings written verbatim) to a .jsonl file."""

    def write(lines: list, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.write_text(
            "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
        )
        return path

    return write
