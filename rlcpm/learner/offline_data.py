"""Token-level items for offline training, and the deterministic order they are visited in.

SFT: prompt ids + response ids + EOS (the response is what the loss is about). DPO: one prompt
and two responses, each + EOS. Prompt and response are tokenised separately, exactly as the
engine sees a prompt and then generates (`prompt_ids`: a raw prompt with the tokenizer's BOS,
as the GRPO loop sends it). Items longer than `max_seq_len` lose the end of their
response (an item whose prompt alone is too long is skipped and counted).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from rlcpm.errors import DataError
from rlcpm.learner.batch import PreferencePair, SFTSequence


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, example) -> list[int]:
    """The prompt's ids as the GRPO loop gives them to the engine: a raw prompt (no chat template,
    `messages` None) with the tokenizer's special tokens (a BOS), a rendered template without (it
    holds its own)."""
    return list(tokenizer(example.prompt, add_special_tokens=example.messages is None)["input_ids"])


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token: responses need one to learn when to stop")
    return tokenizer.eos_token_id


def tokenize_demonstrations(examples: Sequence, tokenizer, max_seq_len: int) -> tuple[list[SFTSequence], int]:
    """SFT items from rlcpm.data.Example rows with a `response`; returns (items, num_skipped)."""
    eos = _eos_id(tokenizer)
    items, skipped = [], 0
    for example in examples:
        if example.response is None:
            raise DataError(
                f"row {example.id!r}: SFT needs a `response` column (map it with data.fields.response)"
            )
        prompt = prompt_ids(tokenizer, example)
        room = max_seq_len - len(prompt)
        if not prompt or room < 1:
            skipped += 1
            continue
        items.append(SFTSequence(prompt, (_ids(tokenizer, example.response) + [eos])[:room]))
    return items, skipped


def tokenize_preferences(examples: Sequence, tokenizer, max_seq_len: int) -> tuple[list[PreferencePair], int]:
    """DPO pairs from rows with `chosen` and `rejected`; returns (pairs, num_skipped)."""
    eos = _eos_id(tokenizer)
    pairs, skipped = [], 0
    for example in examples:
        if example.chosen is None or example.rejected is None:
            raise DataError(f"row {example.id!r}: DPO needs `chosen` and `rejected` columns (data.fields)")
        prompt = prompt_ids(tokenizer, example)
        room = max_seq_len - len(prompt)
        if not prompt or room < 1:
            skipped += 1
            continue
        chosen = (_ids(tokenizer, example.chosen) + [eos])[:room]
        rejected = (_ids(tokenizer, example.rejected) + [eos])[:room]
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs, skipped


def step_indices(num_items: int, batch_size: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
    """Item indices of training step `step`: consecutive slices of seeded per-epoch permutations
    (with `shuffle` false, of the items' own order: `data.shuffle: false`).

    A pure function of (step, seed), so a resumed run visits exactly what the straight run would.
    """
    if num_items == 0:
        raise DataError("no training items left (all skipped as too long for max_seq_len?)")
    indices = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, num_items)
        order = list(range(num_items))
        if shuffle:
            random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
        take = min(batch_size - len(indices), num_items - offset)
        indices += order[offset : offset + take]
        position += take
    return indices
