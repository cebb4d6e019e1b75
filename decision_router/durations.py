"""Human durations ("30s", "15m", "4h", "2d", "1w") used by rules and settings."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from decision_router.echo import cap_digits

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_BARE_DECIMAL = re.compile(r"[0-9]+\.[0-9]+")  # a bare number of seconds with a fraction
MAX_DAYS = timedelta.max.days  # the longest duration Python can hold: 999999999 days


class DurationTooLarge(ValueError):
    """A well-formed duration longer than MAX_DAYS: a problem of its own, not "expected a duration"."""


def parse_duration(text: str | int | float | timedelta) -> timedelta:
    """Parse "4h", "1d12h", "90m" or a number of seconds; raise ValueError with the reason."""
    if isinstance(text, timedelta):
        return text
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text != text:  # NaN (YAML's .nan): not "cannot convert float NaN to integer" from timedelta
            raise ValueError(f"expected a duration like '4h' or '2d', got {_shown(text)}")
        if text < 0:
            raise ValueError("duration must not be negative")
        return _seconds(text, text)
    if not isinstance(text, str):
        raise ValueError(f"expected a duration like '4h' or '2d', got {_shown(text)}")
    compact = text.strip().lower().replace(" ", "")
    if compact.isdecimal():  # not isdigit(): it takes "²", which int() refuses
        try:
            seconds = int(compact.lstrip("0") or "0")
        except ValueError:  # more digits than int() reads (4300): far beyond MAX_DAYS
            raise DurationTooLarge(f"duration {_shown(text)} is too large: the maximum is {MAX_DAYS}d") from None
        return _seconds(seconds, text)
    if _BARE_DECIMAL.fullmatch(compact):  # "0.5", as a unit part takes it ("0.5s")
        return _seconds(float(compact), text)
    pos, seconds = 0, 0.0
    for match in _PART.finditer(compact):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(compact) or not compact:
        raise ValueError(f"expected a duration like '30s', '15m', '4h', '2d' or '1w', got {_shown(text)}")
    return _seconds(seconds, text)


def _seconds(seconds: float, given: object) -> timedelta:
    try:
        return timedelta(seconds=seconds)
    except OverflowError:  # a rule's "1000000000d" is a mistake to report, not a crash
        raise DurationTooLarge(f"duration {_shown(given)} is too large: the maximum is {MAX_DAYS}d") from None


def _shown(value: object) -> str:
    """The value as a message quotes it: a 400-digit number by its start and length (decision_router.echo)."""
    return cap_digits(repr(value))


def format_duration(value: timedelta) -> str:
    """Inverse of parse_duration: 14400 s -> "4h"; with a fraction of a second, in seconds: "1.5s" (int()
    of the seconds showed a 0.5s cooldown as "0s")."""
    if value.microseconds:
        return f"{value.total_seconds():.6f}".rstrip("0") + "s"
    seconds = int(value.total_seconds())
    for unit, size in sorted(_UNITS.items(), key=lambda kv: -kv[1]):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_span(value: timedelta) -> str:
    """A measured span to the nearest second, largest unit first: 1 day, 5:41:06.13 -> "1d5h41m6s"
    (parse_duration reads it back); "0s" under half a second."""
    seconds = (abs(value) // timedelta(microseconds=1) + 500_000) // 1_000_000
    parts = []
    for unit in "dhms":
        count, seconds = divmod(seconds, _UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return ("-" if value < timedelta(0) else "") + ("".join(parts) or "0s")


# The first moment an aware datetime can hold.
EARLIEST = datetime.min.replace(tzinfo=UTC)


def earlier(moment: datetime, span: timedelta) -> datetime:
    """`moment - span`, or EARLIEST where that would fall before the year 1 (a long window, a date
    near the start of the calendar) instead of an OverflowError. `moment` is aware."""
    return moment - span if moment - EARLIEST > span else EARLIEST


def parse_since(text: str, *, now: datetime) -> datetime:
    """A moment given as a duration ago (`7d`, `24h`) or an ISO date/time (naive = UTC), as the
    CLI's and the API's `since`/`until` filters take it; ValueError says what was expected."""
    try:
        return now - parse_duration(text)
    except (OverflowError, DurationTooLarge):  # back before the year 1, or longer than any timedelta
        longest = (now - EARLIEST).days
        raise ValueError(
            f"duration {_shown(text)} is too large: the maximum is {longest}d, back to the year 1") from None
    except ValueError:
        pass  # not a duration: perhaps a date
    try:
        moment = datetime.fromisoformat(text)
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{_shown(text)} is out of range") from None
    except ValueError:
        raise ValueError(f"expected a duration like 7d or an ISO date like 2026-11-01, not {_shown(text)}") from None
