from datetime import UTC, datetime, timedelta

import pytest

from decision_router.durations import EARLIEST, format_duration, format_span, parse_duration, parse_since

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - timedelta(days=7)),
        ("90m", NOW - timedelta(minutes=90)),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),  # naive: read as UTC
        ("2026-11-01T10:00:00+02:00", datetime(2026, 11, 1, 8, tzinfo=UTC)),
    ],
)
def test_since_is_a_duration_ago_or_a_moment_in_utc(text: str, expected: datetime) -> None:
    assert parse_since(text, now=NOW) == expected


def test_neither_a_duration_nor_a_date_says_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"expected a duration like 7d or an ISO date like 2026-11-01, not 'soon'"):
        parse_since("soon", now=NOW)


@pytest.mark.parametrize(
    ("value", "shown"),
    [("1000000000d", "'1000000000d'"), ("99999999999999999999s", "'99999999999999999999s'"),
     ("99999999999999999999", "'99999999999999999999'"), (10**20, str(10**20)), (1e300, "1e+300")],
)
def test_a_duration_too_long_for_python_is_a_value_error_saying_so(value: object, shown: str) -> None:
    # ValueError is what rules and settings validation report with the file, rule and field;
    # an OverflowError would escape it as a traceback.
    with pytest.raises(ValueError) as raised:
        parse_duration(value)  # type: ignore[arg-type]
    assert str(raised.value) == f"duration {shown} is too large: the maximum is 999999999d"
    assert parse_duration("999999999d") == timedelta(days=999999999)  # the maximum itself


def test_not_a_duration_is_not_too_large() -> None:
    with pytest.raises(ValueError, match=r"^expected a duration like '30s', '15m', '4h', '2d' or '1w', got '1e400'$"):
        parse_duration("1e400")


@pytest.mark.parametrize("text", ["²", "5²", "⑤"])
def test_digits_int_cannot_read_are_not_a_duration(text: str) -> None:
    """str.isdigit() takes these, and int() then said "invalid literal for int() with base 10"."""
    with pytest.raises(ValueError, match=r"^expected a duration like '30s', '15m', '4h', '2d' or '1w', got "):
        parse_duration(text)


@pytest.mark.parametrize("text", ["99999999999d", "1000000000d", "999999999d", "1000000d", "99999999999999999999"])
def test_since_too_far_back_says_it_is_too_large_not_that_a_duration_was_expected(text: str) -> None:
    """Longer than any timedelta, or back before the year 1: either way the most is back to the year 1."""
    longest = (NOW - EARLIEST).days
    with pytest.raises(ValueError) as raised:
        parse_since(text, now=NOW)
    assert str(raised.value) == f"duration {text!r} is too large: the maximum is {longest}d, back to the year 1"
    assert parse_since(f"{longest}d", now=NOW) - EARLIEST < timedelta(days=1)  # the maximum itself


@pytest.mark.parametrize(
    ("text", "shown"),
    [("9" * 400 + "d", "'99999999999999999999… (400 digits)d'"), ("9" * 400, "'99999999999999999999… (400 digits)'"),
     ("1" * 5000, "'11111111111111111111… (5000 digits)'"), (10**400, "10000000000000000000… (401 digits)")],
)
def test_a_duration_of_hundreds_of_digits_is_quoted_by_its_start_and_length(text: object, shown: str) -> None:
    """Not every digit; and 5000 digits (more than int() reads) is too large, not "expected a duration"."""
    with pytest.raises(ValueError) as raised:
        parse_duration(text)  # type: ignore[arg-type]
    assert str(raised.value) == f"duration {shown} is too large: the maximum is 999999999d"
    if isinstance(text, str):
        with pytest.raises(ValueError) as raised:
            parse_since(text, now=NOW)
        longest = (NOW - EARLIEST).days
        assert str(raised.value) == f"duration {shown} is too large: the maximum is {longest}d, back to the year 1"


def test_not_a_duration_of_hundreds_of_digits_is_quoted_by_its_start_and_length() -> None:
    with pytest.raises(ValueError, match=r"^expected a duration like '30s', '15m', '4h', '2d' or '1w', "
                                         r"got '12345678901234567890… \(400 digits\)x'$"):
        parse_duration("1234567890" * 40 + "x")
    with pytest.raises(ValueError, match=r"^expected a duration like 7d or an ISO date like 2026-11-01, "
                                         r"not '12345678901234567890… \(400 digits\)x'$"):
        parse_since("1234567890" * 40 + "x", now=NOW)


@pytest.mark.parametrize(
    ("span", "shown"),
    [
        (timedelta(days=1, hours=5, minutes=41, seconds=6, microseconds=130401), "1d5h41m6s"),
        (timedelta(days=1), "1d"),
        (timedelta(hours=29, minutes=59, seconds=59, microseconds=600000), "1d6h"),  # rounded up a unit
        (timedelta(minutes=5, seconds=0.4), "5m"),
        (timedelta(seconds=0.4), "0s"),
        (-timedelta(minutes=10, seconds=1), "-10m1s"),
        (timedelta(days=800_000, seconds=1), "800000d1s"),
    ],
)
def test_a_measured_span_reads_to_the_second_and_parses_back(span: timedelta, shown: str) -> None:
    assert format_span(span) == shown
    assert parse_duration(shown.lstrip("-")) == abs(timedelta(seconds=round(span.total_seconds())))


@pytest.mark.parametrize(("text", "seconds"), [("0.5", 0.5), ("1.25", 1.25), ("30", 30), (" 2.0 ", 2.0)])
def test_a_bare_number_of_seconds_may_have_a_fraction(text: str, seconds: float) -> None:
    # As settings come from the environment (DECISION_ROUTER_CLAIM_IDLE=0.5): "0.5s" was taken, "0.5" refused.
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", [".5", "5.", "1.2.3", "-0.5", "1e3", "nan"])
def test_a_bare_number_is_digits_with_at_most_one_fraction(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "shown"),
    [(timedelta(hours=4), "4h"), (timedelta(seconds=90), "90s"), (timedelta(0), "0s"),
     # int() of the seconds showed these as "0s" and "1s": a 0.5s cooldown in `rules test`, an escalation reason.
     (timedelta(seconds=0.5), "0.5s"), (timedelta(seconds=1.5), "1.5s"), (timedelta(microseconds=1), "0.000001s"),
     (timedelta(days=1, milliseconds=250), "86400.25s")],
)
def test_format_duration_shows_a_fraction_of_a_second_and_reads_back(value: timedelta, shown: str) -> None:
    assert format_duration(value) == shown
    assert parse_duration(shown) == value
