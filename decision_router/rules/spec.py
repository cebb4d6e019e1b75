"""YAML-shaped models of `routing.yaml` and `owners.yaml`.

Strict on purpose: unknown keys are errors (a typo such as `prority:` or a field a later
version adds must not be ignored silently), and validators raise
ValueError with a message that `load.py` shows as-is next to the rule and field.
These models only describe and check shape; whole-file checks live in `load.py` and
evaluation in `compile.py`.
"""

from __future__ import annotations

import math
import re
import string
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import re2
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    HttpUrl,
    SecretStr,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from decision_router.contracts import Prediction, storable_text
from decision_router.drift import PSI_MAX_N, PSI_MIN_N
from decision_router.durations import DurationTooLarge, parse_duration

# Top-level keys of `Prediction.as_document()`: a path starting elsewhere can never match.
DOCUMENT_FIELDS: tuple[str, ...] = tuple(Prediction.model_fields)
OPERATORS: tuple[str, ...] = ("eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "between", "regex", "exists")
CHANNELS: tuple[str, ...] = ("inbox", "webhook", "email")
Priority = Literal["low", "normal", "high", "critical"]
PRIORITIES: tuple[str, ...] = get_args(Priority)
# Names end up in stream keys (`alerts:<owner>`) and audit rows, so no spaces or colons.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}")
# No characters that break a To: header (<>," and controls): the email channel refuses such an address at start.
EMAIL = re.compile(r"[^@\s<>,\"\x00-\x1f\x7f]+@[^@\s<>,\"\x00-\x1f\x7f]+\.[^@\s<>,\"\x00-\x1f\x7f]+")
# Tags of the `owner` union; pydantic puts them in error locations and load.py drops them.
OWNER_TAGS = ("owner-id", "owner-mapping")
# Context looked up at routing time is addressed as lookup.<source>.<field> (see enrich.py).
LOOKUP = "lookup"
# What a context source's key pattern ({name}) and SQL query (:name) may use of a prediction.
SOURCE_PARAMETERS: tuple[str, ...] = ("entity_type", "entity_id", "prediction_id", "model")


def _is_number(value: object) -> bool:
    # bool is an int in Python, but `gte: true` is a mistake, not 1.
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float (1e400 written out): no comparison or fraction can use it
        return False


# PyYAML reads YAML 1.1, where a float needs a dot and a signed exponent: 1e-3, 5e5 and 1.0e3 are
# text there, so a threshold written so was refused as "expected a number" with no hint why.
_TEXT_EXPONENT = re.compile(r"([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+))[eE]([-+]?)([0-9]+)")


def exponent_text(value: object) -> str | None:
    """For text that is a number in exponent form YAML did not read as one (1e5): why, and how to
    write the number ("YAML reads 1e5 as text: ..."); else None."""
    if not isinstance(value, str) or not (match := _TEXT_EXPONENT.fullmatch(value.strip())):
        return None
    mantissa, sign, digits = match.groups()
    written = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{sign or '+'}{digits}"
    return f"YAML reads {value.strip()} as text: an exponent needs a dot and a sign, like {written}"


def _got(value: object) -> str:
    """A value where a number was expected, as a problem quotes it: with the way to write it
    as a number when it is (or a list holds) a number in exponent form that YAML read as text."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if (why := exponent_text(item)) is not None:
            return f"{value!r} ({why})"
    return repr(value)


def got_text(value: object) -> str:
    """A value where a name or text was expected, as a problem quotes it: with the way to write it as
    text when YAML read it as a boolean (YAML 1.1, as PyYAML reads it: `name: yes` is True)."""
    if isinstance(value, bool):
        words = "yes, on or true" if value else "no, off or false"
        return f"{value!r} (YAML reads an unquoted {words} as a boolean: quote the text)"
    return repr(value)


def _name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"expected a name of letters, digits, '-', '_', '.' or '@' (no spaces), got {got_text(value)}")
    return value


def _path(value: object) -> str:
    if not isinstance(value, str) or not value or any(not part for part in value.split(".")):
        raise ValueError(f"expected a dotted field path like 'context.segment', got {got_text(value)}")
    if not storable_text(value):
        # The gate refuses such names in predictions, and the store cannot hold the path where a
        # decision names it (missing_context, fallback_reason): every batch the rule matched failed.
        raise ValueError(f"a field path cannot hold a NUL character or a lone surrogate, got {value!r}")
    head = value.split(".", 1)[0]
    if head == LOOKUP:
        # Looked-up context: lookup.<source>.<field>; load.py checks the source is declared.
        if value.count(".") < 2:
            raise ValueError(f"expected lookup.<source>.<field>, like 'lookup.crm.health_score', got {value!r}")
        return value
    if head not in DOCUMENT_FIELDS:
        raise ValueError(f"unknown field '{head}': a path starts with one of {', '.join((*DOCUMENT_FIELDS, LOOKUP))}")
    return value


def _scalar(value: object) -> object:
    if isinstance(value, date):  # YAML reads an unquoted 2024-06-01 as a date, documents hold strings
        raise ValueError(f"quote dates and times: write '{value.isoformat()}', not {value.isoformat()}")
    if not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"expected a string, number or boolean, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # .nan would equal the text "nan" and no number
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


def _scalars(value: object) -> list[object]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list like [a, b], got {value!r}")
    for item in value:
        _scalar(item)
    return value


def _number(value: object) -> float:
    # Rules are typed by their author, so a quoted number is a mistake here, unlike in
    # the documents, where flat Redis producers legitimately send "0.8".
    if not _is_number(value):
        raise ValueError(f"expected a number, got {_got(value)}")
    return value  # type: ignore[return-value]


def _between(value: object) -> tuple[float, float]:
    if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise ValueError(f"expected [low, high] with two numbers, got {_got(value)}")
    if value[0] > value[1]:
        raise ValueError(f"expected [low, high] with low <= high, got {value!r}")
    return (value[0], value[1])


# A regex condition runs on RE2, whose matching time is linear in the text: no pattern can
# make the router backtrack for ever. RE2 refuses backreferences and lookarounds, and its
# compiled program is bounded in memory; the pattern's length is bounded here too.
MAX_REGEX_LENGTH = 500
# RE2's time is linear in the text times the compiled program's size once its DFA runs out of memory
# (large counted repetitions: `.{0,1000}.{0,1000}`, `(a|b){999}`): 1-3 s on one 64 KiB value. Within this
# many instructions, ~10 ms at worst; patterns rules use are 15-300.
MAX_REGEX_PROGRAM = 1000
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # errors are reported by the loader, not written to stderr


def compile_regex(pattern: str) -> Any:
    """The pattern compiled by RE2 (raises re2.error)."""
    return re2.compile(pattern, _RE2_OPTIONS)


def _regex(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression string, got {got_text(value)}")
    shown = value if len(value) <= 60 else value[:60] + "..."
    if len(value) > MAX_REGEX_LENGTH:
        raise ValueError(f"regular expression of {len(value)} characters is too long (at most {MAX_REGEX_LENGTH})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"regular expression {shown!r} holds a lone surrogate, which no text can hold") from None
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {shown!r}: {exc}") from None
    try:
        compiled = compile_regex(value)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"regular expression {shown!r} is not supported by the linear-time engine (RE2): {reason}; "
                         "backreferences and lookarounds are not available") from None
    if compiled.programsize > MAX_REGEX_PROGRAM:
        raise ValueError(f"regular expression {shown!r} compiles to {compiled.programsize} instructions, more than "
                         f"{MAX_REGEX_PROGRAM}: matching a long value could take seconds; use smaller repetition "
                         "counts ({n}, {m,n})")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {got_text(value)}")
    return value


def _email(value: object) -> str:
    if not isinstance(value, str) or not EMAIL.fullmatch(value) or not storable_text(value):
        raise ValueError(f"expected an email address like name@example.com, got {got_text(value)}")
    return value


def _channels(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of {', '.join(CHANNELS)}, got {value!r}")
    for item in value:
        if item not in CHANNELS:
            raise ValueError(f"unknown channel {item!r}; expected one of {', '.join(CHANNELS)}")
    return tuple(dict.fromkeys(value))  # listing a channel twice must not deliver twice


# Longer than any deadline, cooldown or window means anything; and routing adds these to the time it routes
# at, which must stay inside the calendar (a rule's "999999999d" deadline failed every prediction it matched).
LONGEST_DURATION = timedelta(days=36500)


def _duration(value: object) -> timedelta:
    try:
        result = parse_duration(value)  # type: ignore[arg-type]  # its ValueError names the problem
    except DurationTooLarge:  # longer than any timedelta, so past the rules files' limit below too
        result = timedelta.max
    if result <= timedelta(0):
        raise ValueError(f"expected a duration above zero, got {value!r}")
    if result > LONGEST_DURATION:
        raise ValueError(f"expected at most {LONGEST_DURATION.days}d (100 years), got {value!r}")
    return result


# Escalation sweeps for missed deadlines at most once a second (DECISION_ROUTER_SWEEP_INTERVAL is at least 1s):
# a shorter deadline cannot be kept, and `0.5s` is more likely a slip for 0.5h than a wish.
SHORTEST_DEADLINE = timedelta(seconds=1)


def _deadline(value: object) -> timedelta:
    result = _duration(value)
    if result < SHORTEST_DEADLINE:
        raise ValueError(f"expected a deadline of at least 1s (escalation checks deadlines at most once a second), "
                         f"got {value!r}")
    return result


def _fraction(value: object) -> float:
    if not _is_number(value) or not 0 <= value < 1:  # type: ignore[operator]
        raise ValueError(f"expected a fraction with 0 <= holdout < 1, like 0.1 for 10%, got {_got(value)}")
    return float(value)  # type: ignore[arg-type]


_AWAY_FORMAT = "a date like 2027-01-15 or a date-time with a time zone like 2027-01-15T09:00:00Z"


def _away_until(value: object) -> datetime:
    """A date means "away through the end of that day (UTC)", so the owner is back at the
    next midnight UTC; a date-time is the instant they are back and needs a time zone."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"expected {_AWAY_FORMAT}, got {value!r}") from None
    try:
        if isinstance(value, datetime):  # checked first: a datetime is also a date
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValueError(f"a date-time needs a time zone (Z or +01:00), got {value.isoformat()!r}")
            return value.astimezone(UTC)
        if isinstance(value, date):
            return datetime.combine(value + timedelta(days=1), time(0), tzinfo=UTC)
    except OverflowError:  # 9999-12-31 has no next midnight; 0001-01-01T00:00+01:00 is before the year 1 in UTC
        calendar = "0001-01-01 to 9999-12-30"
        raise ValueError(f"{value.isoformat()!r} falls outside the calendar once in UTC ({calendar})") from None
    raise ValueError(f"expected {_AWAY_FORMAT}, got {value!r}")


Name = Annotated[str, BeforeValidator(_name)]
FieldPath = Annotated[str, BeforeValidator(_path)]
Scalar = Annotated[str | int | float | bool | None, BeforeValidator(_scalar)]
Scalars = Annotated[list[str | int | float | bool] | None, BeforeValidator(_scalars)]
Number = Annotated[float | None, BeforeValidator(_number)]
Duration = Annotated[timedelta | None, BeforeValidator(_duration)]
Deadline = Annotated[timedelta | None, BeforeValidator(_deadline)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionSpec(_Strict):
    """Operators on one field, ANDed. Defaults are None = operator not used (never validated)."""

    eq: Scalar = None
    ne: Scalar = None
    in_: Scalars = Field(None, alias="in")
    not_in: Scalars = None
    gt: Number = None
    gte: Number = None
    lt: Number = None
    lte: Number = None
    between: Annotated[tuple[float, float] | None, BeforeValidator(_between)] = None
    regex: Annotated[str | None, BeforeValidator(_regex)] = None
    exists: Annotated[bool | None, BeforeValidator(_bool)] = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if not value:
                raise ValueError(f"no operator given; use one of {', '.join(OPERATORS)}")
            return value
        if isinstance(value, list):
            raise ValueError(f"a list needs an operator, e.g. {{in: {value!r}}}")
        if value is None:
            raise ValueError("no value given; write a value (eq) or a mapping of operators")
        return {"eq": value}  # `model: churn` is shorthand for `model: {eq: churn}`

    @model_validator(mode="after")
    def _exists_false_alone(self) -> ConditionSpec:
        # Every other operator is false on a missing field, so the pair could never match.
        if self.exists is False and len(self.model_fields_set) > 1:
            raise ValueError("exists: false cannot be combined with other operators (the rule could never match)")
        return self

    def operators(self) -> dict[str, Any]:
        """The operators actually written, by their YAML name, in OPERATORS order."""
        written = {"in" if name == "in_" else name for name in self.model_fields_set}
        return {op: getattr(self, "in_" if op == "in" else op) for op in OPERATORS if op in written}


class OwnerFromSpec(_Strict):
    """`owner: {from: context.account_manager, fallback: desk}`; fallback is checked in load.py."""

    from_: FieldPath = Field(alias="from")
    fallback: Annotated[str | None, BeforeValidator(_name)] = None


def _owner_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return OWNER_TAGS[0]
    return OWNER_TAGS[1] if isinstance(value, dict) else None


OwnerRef = Annotated[
    Annotated[Name, Tag(OWNER_TAGS[0])] | Annotated[OwnerFromSpec, Tag(OWNER_TAGS[1])],
    Discriminator(
        _owner_tag,
        custom_error_type="owner_shape",
        custom_error_message="expected an owner id or {from: FIELD, fallback: OWNER_ID}",
    ),
]


class RuleSpec(_Strict):
    name: Name
    when: dict[FieldPath, ConditionSpec]
    owner: OwnerRef
    priority: Priority | None = None
    action: Literal["alert", "record"] = "alert"
    continue_: Annotated[bool, BeforeValidator(_bool)] = Field(False, alias="continue")
    ack_within: Deadline = None
    act_within: Deadline = None
    context: list[FieldPath] = Field(default_factory=list)
    # Alert rules only (load.py rejects them on record rules).
    cooldown: Duration = None
    holdout: Annotated[float, BeforeValidator(_fraction)] = 0.0

    @property
    def is_catch_all(self) -> bool:
        """Matches every prediction and stops there."""
        return not self.when and not self.continue_


class DefaultsSpec(_Strict):
    ack_within: Annotated[timedelta, BeforeValidator(_deadline)] = timedelta(hours=4)
    act_within: Annotated[timedelta, BeforeValidator(_deadline)] = timedelta(hours=48)
    priority: Priority = "normal"


def _whole(value: object, low: int, what: str, high: int, beyond: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"expected a whole number >= {low} ({what}), got {value!r}")
    if value > high:
        raise ValueError(f"expected at most {high} ({beyond}), got {value!r}")
    return value


def _days(value: object) -> int:
    # The monitor adds these days to dates: beyond the calendar every drift check failed (OverflowError).
    return _whole(value, 1, "days", LONGEST_DURATION.days, "100 years, like every duration in the rules files")


def _min_samples(value: object) -> int:
    # More than the monitor reads per window would leave every PSI "not enough data", silently.
    return _whole(value, PSI_MIN_N, "no PSI is computed on fewer values", PSI_MAX_N, "the monitor reads at most "
                  f"{PSI_MAX_N} values per window, so a PSI would never have enough")


# The monitor splits alpha over a model's figures; a rate this small is no test, and a denormal one such as
# 5e-324 split into parts became 0, which failed every drift check.
SMALLEST_ALPHA = 1e-12


def _alpha(value: object) -> float:
    if not _is_number(value) or not 0 < value < 1:  # type: ignore[operator]
        raise ValueError(f"expected a false-alarm rate with 0 < alpha < 1, like 0.01, got {_got(value)}")
    if value < SMALLEST_ALPHA:  # type: ignore[operator]
        raise ValueError(f"expected a false-alarm rate of at least {SMALLEST_ALPHA:g}, like 0.01, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _version(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML reads an unquoted 2026.10 as 2026.1
        raise ValueError(f"expected a quoted version like '2026.10' (YAML reads an unquoted one as a number), got {value!r}")
    return _text(value)


class ModelDriftSpec(_Strict):
    """`models.<name>.drift`: how the data-quality monitor watches the model. None = the
    monitor's default (decision_router.rules.compile.DriftConfig)."""

    reference_days: Annotated[int | None, BeforeValidator(_days)] = None
    recent: Duration = None
    alpha: Annotated[float | None, BeforeValidator(_alpha)] = None
    min_samples: Annotated[int | None, BeforeValidator(_min_samples)] = None
    baseline_version: Annotated[str | None, BeforeValidator(_version)] = None


class ModelSpec(_Strict):
    """`models.<name>`: who owns the model (receives its data-quality alerts), and drift settings."""

    owner: Name
    drift: ModelDriftSpec = Field(default_factory=ModelDriftSpec)


# --- context_sources ---------------------------------------------------------------------

# Source names are the middle part of lookup.<source>.<field>, so no dots.
_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
# SQLAlchemy's own bind-parameter syntax in text(): `:name`, but not `::cast` or `12:30`.
_BIND = re.compile(r"(?<![:\w\x5c]):(\w+)(?![:\w])")
_KEY_EXAMPLE = "'context:{entity_type}:{entity_id}'"
_PARAMETER_LIST = ", ".join(f":{name}" for name in SOURCE_PARAMETERS)
_PLACEHOLDER_LIST = ", ".join(f"{{{name}}}" for name in SOURCE_PARAMETERS)


def _source_name(value: object) -> str:
    if not isinstance(value, str) or not _SOURCE_NAME.fullmatch(value):
        raise ValueError(f"expected a source name of letters, digits, '-' or '_' (no dots), got {got_text(value)}")
    return value


def _key_pattern(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a key pattern like {_KEY_EXAMPLE}, got {got_text(value)}")
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"invalid key pattern {value!r}: {exc}") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in SOURCE_PARAMETERS or spec or conversion:
            written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"unknown placeholder '{written}' in key pattern {value!r}; use {_PLACEHOLDER_LIST}")
    return value


def key_placeholders(pattern: str) -> tuple[str, ...]:
    """The placeholders a (valid) key pattern uses, in order of first use."""
    return tuple(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(pattern) if name))


def _sql_code(sql: str) -> str:
    """`sql` with string literals, quoted names and comments blanked out (same length), so
    keywords and `;` are only looked for in the SQL itself."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        char = sql[i]
        if char in "'\"":
            j = i + 1
            while True:
                j = sql.find(char, j)
                if j < 0:
                    what = "string" if char == "'" else "quoted name"
                    raise ValueError(f"unterminated {what} starting at {sql[i:i + 20]!r}")
                if sql.startswith(char * 2, j):  # '' inside a string, "" inside a name
                    j += 2
                    continue
                break
            out.append(" " * (j + 1 - i))
            i = j + 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0:
                raise ValueError("unterminated /* comment")
            out.append(" " * (j + 2 - i))
            i = j + 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def sql_parameters(sql: str) -> tuple[str, ...]:
    """The :parameters a query uses (as SQLAlchemy's text() reads them), in order of first use."""
    return tuple(dict.fromkeys(_BIND.findall(sql)))


def _select(value: object) -> str:
    """A single SELECT statement, with parameters only from SOURCE_PARAMETERS. (The enricher
    also runs it in a read-only transaction: this check is the author's early warning.)"""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a SELECT statement, got {got_text(value)}")
    code = _sql_code(value).strip()
    code = code[:-1].rstrip() if code.endswith(";") else code  # one trailing ';' is harmless
    first = re.match(r"[A-Za-z_]+", code)
    if first is None or first.group().lower() != "select":
        got = first.group() if first else code[:20]
        raise ValueError(
            f"expected a single SELECT statement (a context query only reads), got one starting with {got!r}"
        )
    if ";" in code:
        raise ValueError("expected a single SELECT statement, got several separated by ';'")
    if re.search(r"\binto\b", code, re.IGNORECASE):
        raise ValueError("SELECT ... INTO writes a table; a context query only reads")
    for name in sql_parameters(value):
        if name not in SOURCE_PARAMETERS:
            raise ValueError(f"unknown parameter ':{name}'; a context query can use {_PARAMETER_LIST}")
    return value


def _env_name(value: object) -> str:
    if isinstance(value, str) and "://" in value:
        # Never echo what looks like a URL: it may carry a password.
        raise ValueError("expected the name of an environment variable that holds the database URL, "
                         "like DECISION_ROUTER_CONTEXT_DB_URL, not the URL itself")
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ValueError(f"expected an environment variable name like DECISION_ROUTER_CONTEXT_DB_URL, got {got_text(value)}")
    return value


def _timeout(value: object) -> float:
    if not _is_number(value) or not 0 < value <= 60:  # type: ignore[operator]
        raise ValueError(f"expected a number of seconds above 0 and at most 60, like 2, got {_got(value)}")
    return float(value)  # type: ignore[arg-type]


class ContextSourceSpec(_Strict):
    """`context_sources.<name>`: where routing-time context comes from, either a Redis hash
    per entity (`redis_hash: KEY_PATTERN`) or a SQL query (`sql: SELECT ...`)."""

    redis_hash: Annotated[str | None, BeforeValidator(_key_pattern)] = None
    sql: Annotated[str | None, BeforeValidator(_select)] = None
    database_url_env: Annotated[str | None, BeforeValidator(_env_name)] = None
    timeout_s: Annotated[float, BeforeValidator(_timeout)] = 2.0

    @model_validator(mode="after")
    def _one_kind(self) -> ContextSourceSpec:
        if (self.redis_hash is None) == (self.sql is None):
            raise ValueError(f"expected exactly one of redis_hash (a key pattern like {_KEY_EXAMPLE}) "
                             "or sql (a SELECT statement)")
        if self.database_url_env is not None and self.sql is None:
            raise ValueError("database_url_env only applies to a sql source")
        return self


SourceName = Annotated[str, BeforeValidator(_source_name)]


class RoutingFile(_Strict):
    defaults: DefaultsSpec = Field(default_factory=DefaultsSpec)
    rules: list[RuleSpec]
    # Model name (as in predictions) -> its owner and drift settings; owners checked in load.py.
    models: dict[Annotated[str, BeforeValidator(_text)], ModelSpec] = Field(default_factory=dict)
    # Source name -> where lookup.<name>.<field> comes from; rules naming others are rejected in load.py.
    context_sources: dict[SourceName, ContextSourceSpec] = Field(default_factory=dict)


def read_secret_file(path: Path, info: ValidationInfo | None = None) -> SecretStr:
    """Read a secret from a file: surrounding whitespace (the trailing newline) is dropped.

    The error names the path, never the content.
    """
    base = (info.context or {}).get("base_dir") if info is not None else None
    resolved = path if path.is_absolute() or base is None else Path(base) / path
    try:
        text = resolved.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read secret file {resolved}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"secret file {resolved} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"secret file {resolved} is empty")
    return SecretStr(text)


_URL = TypeAdapter(HttpUrl)
_URL_HOST_END = re.compile(r"[/?#]")


def masked_url(value: str) -> str:
    """A webhook URL as it may be printed: its scheme and host (with the port) only, `/…` where
    more followed, and a user or password as `***`. A Slack or Teams incoming-webhook URL is itself
    a credential: the token sits in its path (a signature may sit in its query)."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    host = _URL_HOST_END.split(rest, maxsplit=1)[0]
    more = len(host) < len(rest)
    if "@" in host:
        host = "***@" + host.rpartition("@")[2]
    if len(host) > 100:
        host = host[:100] + "..."
    return f"{scheme}{sep}{host}" + ("/…" if more else "")


def _url_problem(value: object) -> str:
    """What is wrong with a webhook URL the pattern refused; the URL is never echoed in full (masked_url):
    the problem lines of `rules check` end up in CI logs."""
    if not isinstance(value, str):
        got = f"a {type(value).__name__}" if isinstance(value, (dict, list)) else repr(value)
        return f"expected an http:// or https:// URL, got {got}"
    shown = masked_url(value)
    if not value.startswith(("http://", "https://")):
        return f"expected an http:// or https:// URL, got {shown!r}"
    if any(char.isspace() for char in value):
        return f"a URL cannot hold spaces or line breaks (write a space as %20), got {shown!r}"
    return f"expected an http:// or https:// URL with a host, got {shown!r}"


def _http_url(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError(_url_problem(value))
    # Parsed as the webhook channel parses it at start, which disabled the channel of a URL it refused.
    try:
        url = _URL.validate_python(value)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Input should be a valid URL, ")
        raise ValueError(f"expected an http:// or https:// URL, got {masked_url(value)!r}: {reason}") from None
    if url.username or url.password:  # never echoed: it is a credential
        raise ValueError("a webhook URL cannot carry a user or password; sign requests with secret_file or secret_env")
    return value


# Typed like every number in the rules files: `true` or "5" is a mistake, which pydantic's lax
# coercion took as 1 or 5 (`max_attempts: true` delivered with one attempt and no retry).
def _webhook_timeout(value: object) -> float:
    if not _is_number(value) or not 0 < value <= 120:  # type: ignore[operator]
        raise ValueError(f"expected a number of seconds above 0 and at most 120, like 5, got {_got(value)}")
    return float(value)  # type: ignore[arg-type]


def _attempts(value: object) -> int:
    return _whole(value, 1, "attempts", 20, "attempts per delivery")


class WebhookSpec(_Strict):
    """Where an owner's webhook channel posts. The secret never sits in this file: it is
    read from `secret_file` (relative to the rules directory) or the `secret_env` variable."""

    # repr=False: a Slack incoming-webhook URL is itself a credential (an Owner's repr holds this spec).
    url: Annotated[str, BeforeValidator(_http_url), Field(repr=False)]
    format: Literal["json", "slack"] = "json"
    secret_file: Annotated[str | None, BeforeValidator(_text)] = None
    secret_env: Annotated[str | None, BeforeValidator(_text)] = None
    timeout_s: Annotated[float, BeforeValidator(_webhook_timeout)] = 5.0
    max_attempts: Annotated[int, BeforeValidator(_attempts)] = 5


class OwnerSpec(_Strict):
    id: Name
    name: Annotated[str, BeforeValidator(_text)]
    email: Annotated[str | None, BeforeValidator(_email)] = None
    manager: Annotated[str | None, BeforeValidator(_name)] = None
    team: Annotated[str | None, BeforeValidator(_name)] = None
    channels: Annotated[tuple[str, ...], BeforeValidator(_channels)] = ("inbox",)
    away_until: Annotated[datetime | None, BeforeValidator(_away_until)] = None  # UTC, exclusive
    delegate: Annotated[str | None, BeforeValidator(_name)] = None
    webhook: WebhookSpec | None = None
    # Group webhook and email alerts into one message per window (the inbox is not grouped).
    digest: Annotated[timedelta | None, BeforeValidator(_duration)] = None


class OwnersFile(_Strict):
    owners: list[OwnerSpec]
