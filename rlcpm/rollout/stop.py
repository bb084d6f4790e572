"""Stop strings over incrementally detokenised output text.

Only the generated tokens are decoded (the prompt never completes a stop string). Decoding is
incremental in the usual way: the text of a short window of recent tokens is decoded with
and without the newest token, and the difference is appended, unless it ends in an incomplete
UTF-8 character (U+FFFD), in which case the window grows until the character is complete.
Only the new text plus the last ``max(len(stop)) - 1`` characters before it are searched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StopChecker:
    def __init__(self, tokenizer: Any, stop: Sequence[str], previous_token_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.max_stop_len = max(len(s) for s in self.stop)
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # window start: decoded for context only
        self.read_offset = 0  # tokens before this are already in self.text
        for token_id in previous_token_ids:
            self._append(token_id)

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def _append(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        before = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.token_ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self.text += delta
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return delta

    def append_and_check(self, token_id: int) -> bool:
        """Add one generated token; True when the output text now contains a stop string."""
        delta = self._append(token_id)
        if not delta:
            return False
        tail = self.text[-(len(delta) + self.max_stop_len - 1) :]
        return any(s in tail for s in self.stop)
