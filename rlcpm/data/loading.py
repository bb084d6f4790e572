"""`load_examples`: a recipe's `data` section in, a list of ready `Example`s out.

Pipeline per row: read (rlcpm.data.readers or a synthetic generator) -> map and validate
(rlcpm.data.rows) -> render the prompt (rlcpm.data.prompts) -> check length and id. A bad row
raises DataError naming its file and row, or, with `data.skip_invalid: true`, is skipped,
counted, and reported in one warning. The result is shuffled deterministically by `seed`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any, Literal

from rlcpm.config import DataConfig, FieldMap, SyntheticData
from rlcpm.data.example import Example, LoadedData
from rlcpm.data.prompts import PromptRenderer
from rlcpm.data.readers import RawRow, read_rows
from rlcpm.data.rows import Algorithm, RowError, parse_row
from rlcpm.data.synthetic import generate
from rlcpm.errors import DataError

logger = logging.getLogger("rlcpm.data")
NUM_REASONS_SHOWN = 5


def load_examples(
    data_cfg: DataConfig,
    split: Literal["train", "eval"] = "train",
    tokenizer: Any = None,
    seed: int = 0,
    *,
    algorithm: Algorithm = "grpo",
    chat_template: str | None = None,
) -> LoadedData:
    """Load, validate and render the `split` dataset of a recipe's `data` section.

    Args:
        data_cfg: the recipe's `data` section (source, format, field map, template options).
        split: "train" reads `data.train`, "eval" reads `data.eval`.
        tokenizer: a Hugging Face tokenizer; needed to apply the chat template and to enforce
            `data.max_prompt_tokens` (not checked without one).
        seed: shuffling seed (used when `data.shuffle` is true).
        algorithm: which fields a row must have ("grpo", "dpo" or "sft"; see rlcpm.data.rows).
        chat_template: a Jinja template replacing the tokenizer's (the recipe's `model.chat_template`).

    Ids are the row's id column, or `<file>:<row number>`; they must be unique.
    """
    source = data_cfg.train if split == "train" else data_cfg.eval
    if source is None:
        raise DataError(f"data.{split} is not set; give a dataset path or a synthetic task")
    renderer = PromptRenderer(
        tokenizer,
        apply_chat_template=data_cfg.apply_chat_template,
        system_prompt=data_cfg.system_prompt,
        chat_template=chat_template,
    )
    if isinstance(source, SyntheticData):
        label = f"synthetic task {source.task!r}"
        rows: Iterable[RawRow] = synthetic_rows(source)
        fields = FieldMap()  # synthetic rows use rlcpm's names; data.fields maps the user's files
    else:
        label = source
        rows = read_rows(source, data_cfg.format, split)
        fields = data_cfg.fields

    builder = _ExampleBuilder(data_cfg, fields, renderer, tokenizer, algorithm)
    loaded = LoadedData(examples=[], source=label)
    for raw in rows:
        try:
            loaded.examples.append(builder.build(raw))
        except RowError as err:
            reason = f"{raw.source}, {raw.location}: {err}"
            if not data_cfg.skip_invalid:
                raise DataError(
                    f"data.{split}: {reason} (set data.skip_invalid: true to skip bad rows)"
                ) from err
            loaded.num_skipped += 1
            if len(loaded.skip_reasons) < NUM_REASONS_SHOWN:
                loaded.skip_reasons.append(reason)

    if loaded.num_skipped:
        logger.warning(
            "data.%s: skipped %d invalid row(s) of %s; first reasons:\n  %s",
            split,
            loaded.num_skipped,
            label,
            "\n  ".join(loaded.skip_reasons),
        )
    if not loaded.examples:
        detail = f" ({loaded.num_skipped} invalid rows skipped)" if loaded.num_skipped else ""
        raise DataError(f"data.{split}: {label} holds no usable rows{detail}")
    if data_cfg.shuffle:
        random.Random(seed).shuffle(loaded.examples)
    return loaded


def synthetic_rows(source: SyntheticData) -> Iterable[RawRow]:
    """The rows of a seeded synthetic task, numbered like a file's rows."""
    rows = generate(source.task, source.num_samples, source.seed, **source.options)
    for number, data in enumerate(rows, start=1):
        yield RawRow(f"synthetic:{source.task}", source.task, f"row {number}", number, data)


class _ExampleBuilder:
    """Builds one Example per row; remembers ids to reject duplicates."""

    def __init__(
        self, data_cfg: DataConfig, fields: FieldMap, renderer: PromptRenderer, tokenizer: Any, algorithm: Algorithm
    ):
        self.data_cfg = data_cfg
        self.fields = fields
        self.renderer = renderer
        self.tokenizer = tokenizer
        self.algorithm = algorithm
        self.first_seen: dict[str, str] = {}

    def build(self, raw: RawRow) -> Example:
        if raw.parse_error is not None:
            raise RowError(raw.parse_error)
        row = parse_row(raw.data, self.fields, self.algorithm)
        prompt, messages = self.renderer.render(row.prompt, row.messages, row.tools)
        self._check_length(prompt)
        example_id = row.id if row.id is not None else f"{raw.name}:{raw.number}"
        if example_id in self.first_seen:
            raise RowError(f"duplicate id {example_id!r} (first seen at {self.first_seen[example_id]})")
        self.first_seen[example_id] = f"{raw.source}, {raw.location}"
        return Example(
            id=example_id,
            prompt=prompt,
            messages=messages,
            answer=row.answer,
            response=row.response,
            chosen=row.chosen,
            rejected=row.rejected,
            fields=row.fields,
        )

    def _check_length(self, prompt: str) -> None:
        if self.tokenizer is None:
            return
        num_tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        limit = self.data_cfg.max_prompt_tokens
        if num_tokens > limit:
            raise RowError(
                f"prompt has {num_tokens} tokens, more than data.max_prompt_tokens={limit} (raise it to keep such rows)"
            )
