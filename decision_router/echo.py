"""What a problem message repeats of its input: a number is shown, not every digit of it.

A rules file, a prediction or a command-line option can hold a 400-digit number (an integer beyond any
float, a duration of 10**400 days); a message quoting it whole is mostly digits. A run of more than
MAX_DIGITS digits is shown as its first KEPT_DIGITS and how many there were:
`12345678901234567890… (400 digits)`. Standard library only: the CLI imports this before any command runs.

Also the small helpers every message shares: a count with its noun (`1 prediction`, `2 predictions`) and the
"did you mean" hint for a mistyped name.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

MAX_DIGITS = 24  # shown whole up to this many digits in a row
KEPT_DIGITS = 20  # the start of a longer run that is shown
_LONG_RUN = re.compile(rf"[0-9]{{{MAX_DIGITS + 1},}}")


def _cut(match: re.Match[str]) -> str:
    digits = match.group()
    return f"{digits[:KEPT_DIGITS]}… ({len(digits)} digits)"


def validation_problems(exc: Any, *, nameless: str = "") -> str:
    """A pydantic ValidationError as `field: what is wrong; ...`, without the input values its str() repeats
    (a webhook URL there is a credential). `nameless` names an error of the whole input."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or nameless
        parts.append((f"{where}: " if where else "") + error["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


def cap_digits(text: str) -> str:
    """`text` with every run of more than MAX_DIGITS digits cut to its start and its length."""
    if len(text) <= MAX_DIGITS:
        return text
    return _LONG_RUN.sub(_cut, text)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 prediction`, `2 predictions`; `plural` for a noun that does not just take an s (entry, entries)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def close_match(value: str, known: Iterable[str]) -> str | None:
    """The one of `known` that `value` most likely mistypes (difflib's closest, if close enough)."""
    close = difflib.get_close_matches(value, list(known), n=1)
    return close[0] if close else None


def did_you_mean(value: str, known: Iterable[str]) -> str:
    """`; did you mean 'alice-moreau'?` when `value` is close to one of `known`, else ""."""
    close = close_match(value, known)
    return f"; did you mean '{close}'?" if close is not None else ""
