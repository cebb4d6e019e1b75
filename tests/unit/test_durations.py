from datetime import datetime, timedelta, timezone

import pytest

from decision_router.durations import parse_duration, parse_since

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - timedelta(days=7)),
        ("90m", NOW - timedelta(minutes=90)),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=timezone.utc)),  # naive: read as UTC
        ("2026-11-01T10:00:00+02:00", datetime(2026, 11, 1, 8, tzinfo=timezone.utc)),
    ],
)
def test_since_is_a_duration_ago_or_a_moment_in_utc(text: str, expected: datetime) -> None:
    assert parse_since(text, now=NOW) == expected


def test_neither_a_duration_nor_a_date_says_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"expected a duration like 7d or an ISO date like 2026-11-01, not 'soon'"):
        parse_since("soon", now=NOW)


@pytest.mark.parametrize("value", ["1000000000d", "99999999999999999999s", 10**20, 1e300, "1e400"])
def test_a_duration_too_long_for_python_is_a_value_error(value: object) -> None:
    # ValueError is what rules and settings validation report with the file, rule and field;
    # an OverflowError would escape it as a traceback.
    with pytest.raises(ValueError, match="too long|expected a duration"):
        parse_duration(value)  # type: ignore[arg-type]
