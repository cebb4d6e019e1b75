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
from datetime import date, datetime, time, timedelta, timezone
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

from decision_router.contracts import Prediction
from decision_router.durations import parse_duration

# Top-level keys of `Prediction.as_document()`: a path starting elsewhere can never match.
DOCUMENT_FIELDS: tuple[str, ...] = tuple(Prediction.model_fields)
OPERATORS: tuple[str, ...] = ("eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "between", "regex", "exists")
CHANNELS: tuple[str, ...] = ("inbox", "webhook", "email")
Priority = Literal["low", "normal", "high", "critical"]
PRIORITIES: tuple[str, ...] = get_args(Priority)
# Names end up in stream keys (`alerts:<owner>`) and audit rows, so no spaces or colons.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
# Tags of the `owner` union; pydantic puts them in error locations and load.py drops them.
OWNER_TAGS = ("owner-id", "owner-mapping")


def _is_number(value: object) -> bool:
    # bool is an int in Python, but `gte: true` is a mistake, not 1.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"expected a name of letters, digits, '-', '_', '.' or '@' (no spaces), got {value!r}")
    return value


def _path(value: object) -> str:
    if not isinstance(value, str) or not value or any(not part for part in value.split(".")):
        raise ValueError(f"expected a dotted field path like 'context.segment', got {value!r}")
    head = value.split(".", 1)[0]
    if head not in DOCUMENT_FIELDS:
        raise ValueError(f"unknown field '{head}': a path starts with one of {', '.join(DOCUMENT_FIELDS)}")
    return value


def _scalar(value: object) -> object:
    if isinstance(value, date):  # YAML reads an unquoted 2024-06-01 as a date, documents hold strings
        raise ValueError(f"quote dates and times: write '{value.isoformat()}', not {value.isoformat()}")
    if not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"expected a string, number or boolean, got {value!r}")
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
        raise ValueError(f"expected a number, got {value!r}")
    return value  # type: ignore[return-value]


def _between(value: object) -> tuple[float, float]:
    if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise ValueError(f"expected [low, high] with two numbers, got {value!r}")
    if value[0] > value[1]:
        raise ValueError(f"expected [low, high] with low <= high, got {value!r}")
    return (value[0], value[1])


def _regex(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression string, got {value!r}")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _email(value: object) -> str:
    if not isinstance(value, str) or not _EMAIL.fullmatch(value):
        raise ValueError(f"expected an email address like name@example.com, got {value!r}")
    return value


def _channels(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of {', '.join(CHANNELS)}, got {value!r}")
    for item in value:
        if item not in CHANNELS:
            raise ValueError(f"unknown channel {item!r}; expected one of {', '.join(CHANNELS)}")
    return tuple(dict.fromkeys(value))  # listing a channel twice must not deliver twice


def _duration(value: object) -> timedelta:
    result = parse_duration(value)  # type: ignore[arg-type]  # its ValueError names the problem
    if result <= timedelta(0):
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return result


def _fraction(value: object) -> float:
    if not _is_number(value) or not 0 <= value < 1:  # type: ignore[operator]
        raise ValueError(f"expected a fraction with 0 <= holdout < 1, like 0.1 for 10%, got {value!r}")
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
    if isinstance(value, datetime):  # checked first: a datetime is also a date
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"a date-time needs a time zone (Z or +01:00), got {value.isoformat()!r}")
        return value.astimezone(timezone.utc)
    if isinstance(value, date):
        return datetime.combine(value + timedelta(days=1), time(0), tzinfo=timezone.utc)
    raise ValueError(f"expected {_AWAY_FORMAT}, got {value!r}")


Name = Annotated[str, BeforeValidator(_name)]
FieldPath = Annotated[str, BeforeValidator(_path)]
Scalar = Annotated[Union[str, int, float, bool, None], BeforeValidator(_scalar)]
Scalars = Annotated[Union[list[Union[str, int, float, bool]], None], BeforeValidator(_scalars)]
Number = Annotated[Union[float, None], BeforeValidator(_number)]
Duration = Annotated[Union[timedelta, None], BeforeValidator(_duration)]


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
    between: Annotated[Union[tuple[float, float], None], BeforeValidator(_between)] = None
    regex: Annotated[Union[str, None], BeforeValidator(_regex)] = None
    exists: Annotated[Union[bool, None], BeforeValidator(_bool)] = None

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
    def _exists_false_alone(self) -> "ConditionSpec":
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
    fallback: Annotated[Union[str, None], BeforeValidator(_name)] = None


def _owner_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return OWNER_TAGS[0]
    return OWNER_TAGS[1] if isinstance(value, dict) else None


OwnerRef = Annotated[
    Union[Annotated[Name, Tag(OWNER_TAGS[0])], Annotated[OwnerFromSpec, Tag(OWNER_TAGS[1])]],
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
    ack_within: Duration = None
    act_within: Duration = None
    context: list[FieldPath] = Field(default_factory=list)
    # Alert rules only (load.py rejects them on record rules).
    cooldown: Duration = None
    holdout: Annotated[float, BeforeValidator(_fraction)] = 0.0

    @property
    def is_catch_all(self) -> bool:
        """Matches every prediction and stops there."""
        return not self.when and not self.continue_


class DefaultsSpec(_Strict):
    ack_within: Annotated[timedelta, BeforeValidator(_duration)] = timedelta(hours=4)
    act_within: Annotated[timedelta, BeforeValidator(_duration)] = timedelta(hours=48)
    priority: Priority = "normal"


class RoutingFile(_Strict):
    defaults: DefaultsSpec = Field(default_factory=DefaultsSpec)
    rules: list[RuleSpec]


class OwnerSpec(_Strict):
    id: Name
    name: Annotated[str, BeforeValidator(_text)]
    email: Annotated[Union[str, None], BeforeValidator(_email)] = None
    manager: Annotated[Union[str, None], BeforeValidator(_name)] = None
    team: Annotated[Union[str, None], BeforeValidator(_name)] = None
    channels: Annotated[tuple[str, ...], BeforeValidator(_channels)] = ("inbox",)
    away_until: Annotated[Union[datetime, None], BeforeValidator(_away_until)] = None  # UTC, exclusive
    delegate: Annotated[Union[str, None], BeforeValidator(_name)] = None


class OwnersFile(_Strict):
    owners: list[OwnerSpec]
