"""Render a row's prompt into the text the model continues: chat template, system prompt, raw text.

With `data.apply_chat_template: true` the prompt turns go through
`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`, with the
row's `tools` passed to the template and `model.chat_template` (when set) replacing the
tokenizer's own template. A plain `prompt` column becomes one user turn. The system prompt is
prepended as a system turn unless the row already starts with one.

With `apply_chat_template: false` the prompt text is used as is, prefixed by the system prompt
and a blank line. A `messages` row can be used raw only when it is a single user turn (after
an optional system turn); anything longer needs a template.
"""

from __future__ import annotations

from typing import Any

from rlcpm.data.rows import RowError
from rlcpm.errors import DataError


class PromptRenderer:
    """Renders prompts the same way for every row of a dataset; checks the set-up once."""

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        apply_chat_template: bool = True,
        system_prompt: str | None = None,
        chat_template: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.apply_chat_template = apply_chat_template
        self.system_prompt = system_prompt
        self.chat_template = chat_template
        if apply_chat_template:
            self._check_template()

    def _check_template(self) -> None:
        if self.tokenizer is None:
            raise DataError(
                "data.apply_chat_template is true but no tokenizer was given to render the chat "
                "template; pass the model's tokenizer, or set data.apply_chat_template: false"
            )
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
            raise DataError(
                f"tokenizer {name!r} has no chat template; set model.chat_template to a Jinja "
                "template, or data.apply_chat_template: false to use prompts as raw text"
            )

    def render(
        self, prompt: str | None, messages: list[dict] | None, tools: list[dict] | None = None
    ) -> tuple[str, list[dict] | None]:
        """(prompt text, the conversation rendered into it or None for raw text). Raises RowError."""
        if not self.apply_chat_template:
            return self._render_raw(prompt, messages), None
        turns = [dict(m) for m in messages] if messages is not None else [{"role": "user", "content": prompt}]
        if self.system_prompt is not None and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            text = self.tokenizer.apply_chat_template(
                turns,
                tools=tools,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as err:  # jinja2 errors, `raise_exception(...)` inside templates
            raise RowError(f"chat template failed on this row: {type(err).__name__}: {err}") from err
        return text, turns

    def _render_raw(self, prompt: str | None, messages: list[dict] | None) -> str:
        system = self.system_prompt
        if messages is not None:
            turns = list(messages)
            if turns[0]["role"] == "system":
                system = turns.pop(0).get("content")
            if len(turns) != 1 or turns[0]["role"] != "user" or not isinstance(turns[0].get("content"), str):
                raise RowError(
                    "a multi-turn 'messages' prompt cannot be used as raw text; "
                    "set data.apply_chat_template: true (with a tokenizer that has a chat template)"
                )
            prompt = turns[0]["content"]
        assert prompt is not None
        return f"{system}\n\n{prompt}" if system else prompt
