"""Pull the final answer and the format signal out of a model response. Pure string functions.

    extract_boxed("... so \\boxed{\\frac{1}{2}}.")       -> "\\frac{1}{2}"
    extract_choice("\\boxed{(B)}")                      -> "B"
    has_think_format("<think>...</think> \\boxed{3}")   -> True

Format rule (`has_think_format`), decided here and scored as 0/1 by `score.py`:
- the response, after leading whitespace, starts with `<think>`;
- it holds exactly one `<think>` and exactly one `</think>` (two blocks, or a nested one, fail);
- the last box after `</think>` is a balanced, non-empty `\\boxed{...}` / `\\fbox{...}` in braces
  (`\\boxed 5` counts as an answer but not as the asked-for format; a box inside the think
  block only fails); anything may follow the box. An empty think block passes, as in
  the PAPO reference code.
Tags are case-sensitive. The answer for accuracy is the last box anywhere in the response
(the reference code's rule), so a box inside the think block still counts for accuracy when it is
the last one; only the format reward is lost.
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# `\boxed 5`: a single token up to whitespace or a math delimiter.
_BOX_TOKEN_RE = re.compile(r"[^\s${}]+")

CHOICE_LETTERS = "ABCDEFGH"
"""Multiple-choice letters recognised (A-E are the common case; some sets go up to H)."""

_TEXT_WRAPPERS_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|textsf|texttt|mathrm|mathbf|mathit|mathsf|mbox|operatorname)\s*\{([^{}]*)\}")
_CHOICE_PREFIX = r"(?:(?:option|choice|answer)\s*:?\s*)?"
# "B", "(B)", "B.", "B:", "B)", "(B).", optionally after "Option"/"Answer:"; any case.
_BARE_CHOICE_RE = re.compile(rf"{_CHOICE_PREFIX}\(?([A-Ha-h])\)?[.:]?", re.IGNORECASE)
# "(B) 42", "B. forty-two", "B: ...", "B) ...": a capital letter with a delimiter, then the option text.
_CHOICE_WITH_TEXT_RE = re.compile(rf"{_CHOICE_PREFIX}(?:\(([A-H])\)|([A-H])[.:)])\s*\S.*", re.DOTALL)


def _balanced_group(text: str, start: int) -> str | None:
    """The content of the brace group opening at text[start] == '{', or None when unbalanced.

    Escaped braces (`\\{`, `\\}`) are literal characters, not grouping."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def _last_box(text: str) -> tuple[str | None, bool]:
    """(raw content of the last box or None, whether it was the braced form `\\boxed{...}`)."""
    matches = list(_BOX_RE.finditer(text)) if text else []
    if not matches:
        return None, False
    end_of_command = i = matches[-1].end()
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        return _balanced_group(text, i), True
    if i == end_of_command:  # `\boxedX` is not a box; `\boxed X` boxes one token
        return None, False
    token = _BOX_TOKEN_RE.match(text, i)
    return (token.group(0) if token else None), False


def extract_boxed(text: str) -> str | None:
    """The stripped content of the LAST `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed X` with a single
    token X) in text; None when there is none or the last one is unbalanced (a cut-off response).

    Braces nest (`\\boxed{\\frac{1}{\\sqrt{2}}}` -> `\\frac{1}{\\sqrt{2}}`); escaped braces do not
    count. An empty box gives ""."""
    content, _ = _last_box(text)
    return None if content is None else content.strip()


def strip_text_wrappers(text: str) -> str:
    """`\\text{red}` -> `red` (also \\textbf, \\mathrm, \\mbox, ...), repeated for nested wrappers."""
    previous = None
    while previous != text:
        previous, text = text, _TEXT_WRAPPERS_RE.sub(r"\1", text)
    return text


def _clean_choice_text(text: str) -> str:
    return strip_text_wrappers(text.replace("\\$", "").replace("$", "")).strip()


def extract_choice(text_or_answer: str) -> str | None:
    """The multiple-choice letter (upper case, A-H) a response or an answer names, else None.

    Reads the last box when there is one, else the whole string. Accepted: "B", "b", "(B)", "B.",
    "B)", "\\text{B}", "$B$", "Option B", and a capital letter with a delimiter followed by the
    option's text ("(B) 42", "B. 42"). A bare word such as "Both" or "A cat" is not a choice."""
    if text_or_answer is None:
        return None
    boxed = extract_boxed(text_or_answer)
    answer = _clean_choice_text(boxed if boxed is not None else text_or_answer)
    if not answer:
        return None
    match = _BARE_CHOICE_RE.fullmatch(answer) or _CHOICE_WITH_TEXT_RE.fullmatch(answer)
    if match is None:
        return None
    letter = next(g for g in match.groups() if g)
    return letter.upper()


def has_think_format(text: str) -> bool:
    """True when text is `<think>...</think>` (leading whitespace allowed, exactly one such block)
    followed by text that contains a balanced, non-empty `\\boxed{...}`. See the module docstring."""
    if not text:
        return False
    body = text.lstrip()
    if not body.startswith("<think>") or body.count("<think>") != 1 or body.count("</think>") != 1:
        return False
    content, braced = _last_box(body[body.index("</think>") + len("</think>"):])
    return braced and bool(content and content.strip())
