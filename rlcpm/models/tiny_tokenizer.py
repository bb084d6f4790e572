"""Real tokenizers built offline with the `tokenizers` library (no hub access).

A byte-level BPE (every string encodes; digits are split one per token, as Qwen does, which
keeps arithmetic readable) trained on a built-in corpus of digits, arithmetic, English, Python
and JSON tool calls, or on any corpus you pass (`train_bpe_tokenizer`, e.g. 32k+ vocabularies
for FR-Spec experiments). Special tokens follow ChatML:

    <|endoftext|>  document end (also an EOS for generation)
    <|im_start|>, <|im_end|>   chat turns; <|im_end|> is the tokenizer's eos_token
    <|pad|>        padding

The returned object is a transformers fast tokenizer with a ChatML `chat_template`;
`tokenizer.save_pretrained(dir)` writes tokenizer.json + tokenizer_config.json that
`transformers.AutoTokenizer.from_pretrained(dir)` loads back.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlcpm.errors import CheckpointError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"

# ChatML; an optional `tools` list is rendered as JSON in a system turn.
CHATML_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{ 'You may call these tools:\\n' + (tools | tojson) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the a an of to and in is it that for on with as was be by this are or at from not what how "
    "many much number answer question solve compute calculate sum total difference product "
    "step first then finally so therefore result equals plus minus times divided each has have "
    "apples books students tickets price cost left more less than twice half write function "
    "returns list string given input output example test call tool weather city search query "
    "name value true false none you user assistant system please think reason about final boxed"
).split()
_CODE = [
    "def add(a, b):\n    return a + b\n",
    "def solve(n):\n    total = 0\n    for i in range(n):\n        total += i\n    return total\n",
    "import math\nprint(math.sqrt(16))\n",
    "if x > 0:\n    y = x * 2\nelse:\n    y = -x\n",
    "assert f([1, 2, 3]) == [3, 2, 1]\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "while n != 1:\n    n = n // 2 if n % 2 == 0 else 3 * n + 1\n",
]
_TOOLS = [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    '{"name": "search", "arguments": {"query": "python list sort"}}',
    '{"type": "function", "function": {"name": "add", "parameters": {"a": 1, "b": 2}}}',
]


def builtin_corpus(num_lines: int = 3000, seed: int = 0) -> list[str]:
    """A deterministic training corpus: arithmetic, English, Python, JSON tool calls, math markup."""
    rng = random.Random(seed)
    lines = [" ".join(_WORDS), "".join(chr(c) for c in range(32, 127))]
    lines += _CODE + _TOOLS
    for _ in range(num_lines):
        kind = rng.randrange(4)
        a, b = rng.randrange(1000), rng.randrange(1, 100)
        op = rng.choice("+-*/")
        if kind == 0:
            lines.append(f"What is {a} {op} {b}? The answer is \\boxed{{{a + b}}}.")
        elif kind == 1:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 16))).capitalize() + ".")
        elif kind == 2:
            lines.append(rng.choice(_CODE).replace("n", rng.choice("nmk"), 1))
        else:
            lines.append(f"{a} {op} {b} = <think>{a} {op} {b}</think> #### {a * b}")
    return lines


def train_bpe_tokenizer(
    corpus: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: list[str] | None = None,
    min_frequency: int = 1,
    chat_template: str = CHATML_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` with at most `vocab_size` tokens.

    The 256 byte symbols and the special tokens are always in the vocabulary, so
    vocab_size must exceed 256 + len(special_tokens); the result may be smaller than
    vocab_size when the corpus has too few distinct merges.
    """
    specials = list(special_tokens or SPECIAL_TOKENS)
    if vocab_size <= 256 + len(specials):
        raise CheckpointError(
            f"vocab_size {vocab_size} must exceed 256 byte tokens + {len(specials)} special tokens"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return wrap_tokenizer(tokenizer, chat_template=chat_template)


def wrap_tokenizer(tokenizer: Tokenizer, chat_template: str = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer around a `tokenizers.Tokenizer` with the ChatML specials."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        additional_special_tokens=[ENDOFTEXT_TOKEN, "<|im_start|>"],
        model_max_length=1 << 20,
        padding_side="left",
    )
    fast.chat_template = chat_template
    return fast


def build_tokenizer(
    vocab_size: int = 512, extra_words: Iterable[str] = (), extra_corpus: Iterable[str] = (), seed: int = 0
) -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer: byte-level BPE on the built-in corpus (+ your words/lines)."""
    words = list(extra_words)
    corpus = builtin_corpus(seed=seed) + list(extra_corpus) + [" ".join(words)] * 20 * bool(words)
    return train_bpe_tokenizer(corpus, vocab_size)
