"""The final answer of a math response: a configured pattern, else the last `\\boxed{}`, else
"the answer is ...", else (optionally) the last number in the text."""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_IS = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.\s+(?=[A-Z])")
# A minus sign may be ASCII or Unicode (U+2212); a decimal may start at its point (".5").
_NUMBER = re.compile(r"[-\u2212]?(?:\d+(?:,\d{3})*(?:\.\d+)?|(?<!\d)\.\d+)(?:/\d+)?")
# A choice is a letter alone, or a marked letter ("(B)", "B.", "B)", "B:") before its option text.
# "A = 12", "C = 2\pi r" or "A \cup B" are not choices: a bare letter must stand alone.
_CHOICE = re.compile(r"^(?:\(([A-J])\)|([A-J])[.:)]|([A-J])$)")
# Another option named in a choice's text: "(C)", "C.", "C)" or "or C" / "and C" (not an article "A").
_ANOTHER_CHOICE = re.compile(r"\([A-J]\)|\b[A-J][.:)](?=\s|$)|\b(?:or|and)\s+\(?[A-J]\b")
_BOLD = re.compile(r"\*\*(.+?)\*\*")  # markdown bold: "The answer is **12**."
# A LaTeX space between digit groups is a thousands separator ("10\\,000"), which math-verify
# would read as a product (10 * 000 = 0).
_SPACED_DIGIT_GROUP = re.compile(r"(?<=\d)(?:\\[,;: ]|~)(?=\d{3}(?!\d))")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


def extract_answer(
    response: str, pattern: str | None = None, fallback_last_number: bool = True
) -> str | None:
    """The answer text, or None when the response states none (or its last box is cut off).

    pattern: a regex; its last match wins (group 1 if it has groups, else the whole match), and
    nothing else is tried.
    """
    if pattern is not None:
        matches = list(re.finditer(pattern, response))
        if not matches:
            return None
        last = matches[-1]
        return _clean(last.group(1) if last.re.groups else last.group(0))
    boxed = last_boxed(response)
    if boxed is not None:
        return _clean(boxed)
    if any(command in response for command in _BOX_COMMANDS):
        return None  # the box was cut off (length limit): no stated answer
    stated = list(_ANSWER_IS.finditer(response))
    if stated:  # up to the end of its line, or of its sentence ("... is 42 apples. Then ...")
        return _clean(_SENTENCE_END.split(stated[-1].group(1).splitlines()[0])[0])
    if fallback_last_number:
        numbers = _NUMBER.findall(response)
        return numbers[-1].replace("\u2212", "-") if numbers else None
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces), or of `\\boxed 5`."""
    start, command = max((text.rfind(command), command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start + len(command) :]
    if rest.startswith(" "):
        token = rest.strip().split()
        return token[0].rstrip("$.") if token else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += char == "{"
        depth -= char == "}"
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced: the response was cut inside the box


def join_digit_groups(text: str) -> str:
    """`10\\,000`, `1\\ 234\\ 567`, `10~000` -> `10000`, `1234567`, `10000`."""
    return _SPACED_DIGIT_GROUP.sub("", text)


def choice_letter(text: str, single: bool = False) -> str | None:
    """`B`, `(B)`, `B.`, `\\text{(B)}`, `(B) 42` -> "B"; None if the text is not a choice A-J.

    single: also None when the option text names another choice ("A) 3, B) 4", "B or C"): a
    prediction that hedges between options picks none."""
    text = _TEXT_WRAPPER.sub(r"\1", text.strip().strip("$").strip()).strip()
    match = _CHOICE.match(text)
    if match is None:
        return None
    if single and _ANOTHER_CHOICE.search(text[match.end() :]):
        return None
    return next(group for group in match.groups() if group)


def _clean(answer: str) -> str:
    answer = _BOLD.sub(r"\1", answer).strip().strip("*").rstrip(".").strip()
    for opening, closing in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(opening) and answer.endswith(closing) and len(answer) > len(opening + closing):
            answer = answer[len(opening) : -len(closing)].strip()
    return answer.rstrip(".").strip()
