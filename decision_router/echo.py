"""What a problem message repeats of its input: a number is shown, not every digit of it.

A rules file, a prediction or a command-line option can hold a 400-digit number (an integer beyond any
float, a duration of 10**400 days); a message quoting it whole is mostly digits. A run of more than
MAX_DIGITS digits is shown as its first KEPT_DIGITS and how many there were:
`12345678901234567890… (400 digits)`. Standard library only: the CLI imports this before any command runs.
"""

from __future__ import annotations

import re
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
