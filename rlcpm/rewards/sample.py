"""`rlcpm.Sample`: what a reward function sees of one response."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One scored response and the dataset row it answers.

    Every extra column of the row (tests, tools, expected_calls, ...) is in `fields` and also
    readable as an attribute: `sample.tests` is `sample.fields["tests"]`.
    """

    id: str
    prompt: str = ""
    response: str = ""
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    response_token_ids: list[int] | None = None
    answer: str | list[str] | None = None  # a list: any of its forms is accepted
    fields: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None

    def __getattr__(self, name: str) -> Any:
        # Called only when normal lookup fails; guard the names pickling and copying probe.
        if name.startswith("__") or name == "fields":
            raise AttributeError(name)
        fields = self.__dict__.get("fields") or {}
        if name in fields:
            return fields[name]
        raise AttributeError(
            f"sample {self.__dict__.get('id')!r} has no field {name!r} "
            f"(dataset columns here: {', '.join(sorted(fields)) or 'none'}; map yours with data.fields)"
        )

    def get(self, name: str, default: Any = None) -> Any:
        """A dataset field (or attribute) by name, `default` when absent."""
        try:
            return getattr(self, name)
        except AttributeError:
            return default
