"""What the data layer hands to the rest of rlcpm: one `Example` per dataset row."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One prompt (GRPO), preference pair (DPO) or demonstration (SFT), ready for the trainer.

    `prompt` is the text the model continues: the system prompt plus the chat template with
    the generation prompt applied, or the raw prompt when `data.apply_chat_template: false`.
    `messages` is the conversation that was rendered into `prompt` (None for raw prompts).
    `fields` holds every other column of the row; `tests`, `tools` and `expected_calls` are
    stored there under those canonical names whatever their column is called.
    """

    id: str
    prompt: str
    messages: list[dict] | None = None
    answer: str | list[str] | None = None  # a list: any of its forms is accepted
    response: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedData:
    """The result of `load_examples`: the examples, and what was skipped (skip_invalid) and why."""

    examples: list[Example]
    num_skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)
