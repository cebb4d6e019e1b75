"""Wire messages: what producers send and what owners receive. The public API.

These are pydantic models only; SQL tables live in `tables.py` and the tracker maps
one onto the other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

NonEmpty = Field(min_length=1, max_length=200)


def not_blank(value: str) -> str:
    """Whitespace alone names nothing: refused as an empty value is (the gate refuses blank ids alike)."""
    if value.isspace():
        raise ValueError("blank (only whitespace)")
    return value


# A required name that is not an id (the gate checks those first, as missing_id): not empty, not whitespace alone.
NonBlank = Annotated[str, NonEmpty, AfterValidator(not_blank)]
# An optional id or name (an outcome's address, a new owner): no length limit of its own, but whitespace alone would
# be looked up as a name and end as unknown_alert or unknown_owner; refused as blank instead.
NotBlank = Annotated[str, AfterValidator(not_blank)]


def utc(value: datetime) -> datetime:
    """Naive datetimes are read as UTC, as the contract says timestamps are UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 9999-12-31T23:59:59-23:59 is after 9999 in UTC: a ValueError here is pydantic's schema error.
        raise ValueError("out of range: in UTC it would fall before the year 1 or after 9999") from None


def not_a_boolean(value: Any) -> Any:
    """JSON true/false where a number is expected is a producer's bug, not a score of 1 or 0 (pydantic's
    lax mode would read it so)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number here")
    return value


class Prediction(BaseModel):
    """One model output. `prediction_id` is the idempotency key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prediction_id: str = NonEmpty
    model: NonBlank
    model_version: NonBlank
    entity_type: str = NonEmpty
    entity_id: str = NonEmpty
    # Range is checked by the quality gate so it gets its own rejection reason.
    score: float = Field(allow_inf_nan=False)
    label: str | None = None
    predicted_at: datetime
    features: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)

    _utc = field_validator("predicted_at")(lambda cls, v: utc(v))
    _number = field_validator("score", mode="before")(lambda cls, v: not_a_boolean(v))

    def as_document(self) -> dict[str, Any]:
        """Plain dict for rule evaluation and compact storage."""
        return self.model_dump(mode="json")


class Escalation(BaseModel):
    """Why an alert reached someone other than its owner."""

    model_config = ConfigDict(extra="forbid")

    level: int  # 1 = the owner's manager, 2 = theirs, ...
    kind: str  # ack | act: the deadline that was missed
    reason: str
    original_owner: str
    from_owner: str
    to_owner: str


class Alert(BaseModel):
    """What an owner receives on `alerts:<owner_id>` (one `data` field holding this JSON)."""

    model_config = ConfigDict(extra="forbid")

    alert_id: str
    prediction_id: str
    owner: str
    owner_source: str
    rule: str
    priority: str
    model: str
    model_version: str
    entity_type: str
    entity_id: str
    score: float
    label: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)
    missing_context: list[str] = Field(default_factory=list)
    ack_by: AwareDatetime
    act_by: AwareDatetime
    rules_version: str
    predicted_at: AwareDatetime
    created_at: AwareDatetime
    reassigned_from: str | None = None
    # The owner was away; this is their delegate.
    delegated_from: str | None = None
    # Set on the copy delivered to a manager when the owner missed a deadline.
    escalation: Escalation | None = None
    # Which hand-off of the alert to `owner` this is: 1 the first, 2 and up once it is reassigned back to an owner
    # who had it before. Not in the alert JSON: it keys the delivery (inbox dedupe, channel outbox row, delivery
    # header), so that a hand-back reaches the owner again and a redelivered one does not. A class default that
    # `handed_off` shadows on its copy, not a pydantic private attribute: those cost every alert built on the hot
    # path ~1 µs to set up and each read a trip through BaseModel.__getattr__.
    handoff: ClassVar[int] = 1

    def handed_off(self, handoff: int) -> Alert:
        """This alert as its `handoff`-th hand-off to its owner."""
        alert = self.model_copy()
        object.__setattr__(alert, "handoff", handoff)  # BaseModel refuses to set a ClassVar name
        return alert


class OutcomeType(StrEnum):
    ACKNOWLEDGED = "acknowledged"
    INTERVENED = "intervened"
    OUTCOME = "outcome"
    REASSIGNED = "reassigned"


class OutcomeResult(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


class OutcomeEvent(BaseModel):
    """Something that happened to an alert, addressed by alert, prediction or entity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alert_id: NotBlank | None = None
    prediction_id: NotBlank | None = None
    entity_type: NotBlank | None = None
    entity_id: NotBlank | None = None
    type: OutcomeType
    actor: NonBlank
    action: str | None = None
    result: OutcomeResult | None = None
    value: float | None = Field(default=None, allow_inf_nan=False)
    # New owner of a reassigned alert.
    owner: NotBlank | None = None
    note: str | None = None
    at: datetime | None = None

    _number = field_validator("value", mode="before")(lambda cls, v: not_a_boolean(v))

    @field_validator("at")
    @classmethod
    def _at_utc(cls, value: datetime | None) -> datetime | None:
        return utc(value) if value is not None else None

    @model_validator(mode="after")
    def _addressed_once(self) -> OutcomeEvent:
        by_entity = self.entity_type is not None or self.entity_id is not None
        modes = [self.alert_id is not None, self.prediction_id is not None, by_entity]
        if sum(modes) != 1:
            raise ValueError("address the event by exactly one of alert_id, prediction_id, or entity_type+entity_id")
        if by_entity and not (self.entity_type and self.entity_id):
            raise ValueError("entity addressing needs both entity_type and entity_id")
        if self.type is OutcomeType.OUTCOME and self.result is None:
            raise ValueError("an outcome event needs result: success or failure")
        if self.type is not OutcomeType.OUTCOME and self.result is not None:
            raise ValueError("result is only allowed on type: outcome")
        if self.type is OutcomeType.REASSIGNED and not self.owner:
            raise ValueError("a reassigned event needs owner: the new owner's id")
        if self.type is not OutcomeType.REASSIGNED and self.owner is not None:
            # Ignored otherwise, so a producer would believe it had handed the alert over.
            raise ValueError("owner is only allowed on type: reassigned")
        return self


class RejectionReason(StrEnum):
    """Why an input went to a dead-letter stream. Machine-readable; counted per model."""

    INVALID_JSON = "invalid_json"  # `data` field is not a JSON object
    SCHEMA = "schema"  # wrong types, unknown or missing fields
    MISSING_ID = "missing_id"  # prediction_id, entity_id or entity_type absent or empty
    SCORE_OUT_OF_RANGE = "score_out_of_range"
    STALE = "stale"  # predicted_at older than the configured max age
    FROM_FUTURE = "from_future"  # predicted_at ahead of the clock by more than the allowed skew
    DUPLICATE = "duplicate"  # prediction_id seen before, in another stream entry
    UNKNOWN_ALERT = "unknown_alert"  # outcome addressed to no known alert
    UNKNOWN_OWNER = "unknown_owner"  # reassignment to an owner not in the directory
    TOO_LARGE = "too_large"  # entry larger than DECISION_ROUTER_MAX_PAYLOAD_BYTES (checked before parsing)
    TOO_DEEP = "too_deep"  # objects/lists nested deeper than DECISION_ROUTER_MAX_PAYLOAD_DEPTH
    INVALID_ENCODING = "invalid_encoding"  # bytes not UTF-8, or text with NUL / lone surrogates no store can hold
    PROCESSING_FAILED = "processing_failed"  # passed the gate but failed processing max_attempts times


class Rejection(BaseModel):
    """A rejected input, as written to a `...:dlq` stream."""

    reason: RejectionReason
    detail: str
    model: str | None = None
    source_stream: str
    source_id: str | None = None
    payload: str  # the original entry, as JSON text of its fields


class DataQualityWindow(BaseModel):
    """The periods a data-quality figure compares: reference (a version's first days, or a
    pinned baseline version's) against recent."""

    model_config = ConfigDict(extra="forbid")

    reference_version: str
    reference_from: AwareDatetime | None = None  # None: no reference data (then nothing is flagged)
    reference_to: AwareDatetime | None = None
    recent_from: AwareDatetime
    recent_to: AwareDatetime


class DataQualityAlert(BaseModel):
    """What a model's owner receives on `alerts:<owner_id>` when its data drifts or its quality
    drops: one `data` field holding this JSON (plus a `kind: data_quality` field on the entry,
    so readers tell it from an `Alert`, which has no `kind`).

    `alert_id` derives from (model, model_version, metric, day): at most one per metric and day.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["data_quality"] = "data_quality"
    alert_id: str
    model: str
    model_version: str  # "*" for model-level figures (rejection_rate)
    metric: str  # score | feature:<name> | rejection_rate | missing_context_rate
    value: float | None  # PSI for score and features; the recent rate for rates
    threshold: float | None  # PSI threshold; for rates the lowest recent rate that is flagged
    reference_value: float | None = None  # rates: the reference rate
    p_value: float | None = None  # rates: one-sided Fisher p-value
    alpha: float | None = None  # false-alarm rate this metric was tested at
    n_reference: int
    n_recent: int
    window: DataQualityWindow
    owner: str | None
    created_at: AwareDatetime
    detail: str


# What the channel outbox (`deliveries.payload`) and the senders carry: a routed alert or a
# data-quality alert (told apart by `kind`).
AnyAlert = Alert | DataQualityAlert


def handoff_suffix(alert: AnyAlert, separator: str = ":") -> str:
    """What tells the delivery of a hand-back (`Alert.handoff` 2 and up) from the owner's first: nothing for the
    first, so that the keys and ids of alerts never handed back stay as they were."""
    return f"{separator}{alert.handoff}" if isinstance(alert, Alert) and alert.handoff > 1 else ""


def alert_from_payload(payload: dict[str, Any]) -> AnyAlert:
    """The alert a stored delivery payload holds: a `DataQualityAlert` when its `kind` is
    `data_quality`, otherwise an `Alert`."""
    if payload.get("kind") == "data_quality":
        return DataQualityAlert.model_validate(payload)
    return Alert.model_validate(payload)


def storable_text(text: str) -> bool:
    """Whether every store and Redis can hold `text` (the gate's check, also the rules files')."""
    # PostgreSQL text cannot hold NUL; no UTF-8 encoder (SQLite, PostgreSQL, Redis) takes a
    # lone surrogate, which JSON can smuggle in as "\ud800".
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
