"""The quality gate: a raw stream entry becomes a typed message or a Rejection with a reason.

Nothing here raises on bad input; every failure is a value the pipeline sends to a
dead-letter stream and counts. Hostile input is bounded before it is parsed (size), while
it is parsed (nesting depth) and after (text and numbers no store can hold), so what
passes the gate can be routed and stored without surprises.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from decision_router.contracts import OutcomeEvent, Prediction, Rejection, RejectionReason, storable_text
from decision_router.durations import format_span
from decision_router.echo import cap_digits
from decision_router.settings import PayloadLimits
from decision_router.streams import as_text

RawEntry = Mapping[bytes | str, bytes | str]
ID_FIELDS = ("prediction_id", "entity_type", "entity_id")
# Flat producers cannot nest, so these may arrive as JSON text or as dotted keys.
NESTED_FIELDS = ("features", "context")
# A Rejection's detail and model are stored in the DLQ stream and the rejections table:
# bounded, so a hostile field name cannot make them huge.
MAX_DETAIL_CHARS = 500
MAX_MODEL_CHARS = 200
# Integers beyond this many bits do not fit a float; a rule comparing one would overflow.
MAX_INT_BITS = 1000


DEFAULT_LIMITS = PayloadLimits()


class _Reject(Exception):
    def __init__(self, reason: RejectionReason, detail: str, *, document: dict[str, Any] | None = None) -> None:
        self.reason, self.detail = reason, detail
        # The decoded document a value of which was rejected: it still names its model.
        self.document = document


def original_payload(entry: RawEntry) -> str:
    """The entry's fields as JSON text, kept verbatim in the dead-letter stream."""
    return json.dumps({as_text(k): as_text(v) for k, v in entry.items()}, ensure_ascii=False)


def _truncated_payload(entry: RawEntry, budget: int) -> str:
    """The fields of an oversized entry as JSON text, each value cut so the whole stays near
    `budget` characters: the DLQ keeps enough to identify the producer, not the whole blob."""
    kept: dict[str, str] = {}
    for key, value in entry.items():
        if budget <= 0:
            kept["..."] = "[more fields left out]"
            break
        name = as_text(key[:200])
        size = len(value)
        text = as_text(value[:budget])
        if size > budget:
            text += f"... [{size} in all]"
        kept[name] = text
        budget -= len(name) + len(text)
    return json.dumps(kept, ensure_ascii=False)


def _size(value: bytes | str) -> int:
    if isinstance(value, bytes):
        return len(value)
    text = str(value)
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _check_size(entry: RawEntry, limits: PayloadLimits) -> None:
    """First and cheap: lengths only, nothing decoded or parsed."""
    total = 0
    for key, value in entry.items():
        total += (len(key) if type(key) is bytes else _size(key)) + (len(value) if type(value) is bytes else _size(value))
    if total > limits.max_bytes:
        raise _Reject(RejectionReason.TOO_LARGE, f"{total} bytes; the limit is {limits.max_bytes}")


def _text(value: bytes | str, field: str | None) -> str:
    """Strict UTF-8: a replaced byte would silently change an id or a rule's input."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            what = "a field name" if field is None else f"field {_clean(field, 100)}"
            raise _Reject(RejectionReason.INVALID_ENCODING, f"{what} is not valid UTF-8 (byte {exc.start})") from None
    return str(value)


# The one-field `data` entry that nearly every producer sends is parsed by orjson (3x faster than
# json) when its text shows that orjson and the value walk can only agree with json.loads and find
# nothing: orjson rejects NaN, Infinity, numbers that overflow a float, raw control characters
# and lone surrogate escapes (json accepts all but control characters), and parses integers
# beyond 64 bits as floats (json: exact ints), which need 19+ digits in a row. Anything else
# takes the json path, so every rejection keeps its reason and detail.
_ONLY_DIGITS = bytes(ord("9") if ord("0") <= b <= ord("9") else ord(" ") for b in range(256))
_LONG_NUMBER = b"9" * 19
# An empty name ("": ...) is refused by the walk; `""` then `:` is the only way JSON can write one.
_EMPTY_NAME = re.compile(r'""[ \t\n\r]*:')
# Brackets beyond this may nest deeper than json.loads can recurse (its RecursionError has its
# own detail), so such a text takes the json path whatever the depth limit.
_PROVEN_MAX_BRACKETS = 64


def _proven_document(entry: RawEntry, max_depth: int) -> dict[str, Any] | None:
    """The document of a one-field `data` entry, parsed by orjson, when it is provably what
    `decode_entry` returns and `_check_document` passes; None when that is not shown (then the
    caller takes that path, which also finds the reason of a rejection)."""
    if len(entry) != 1:
        return None
    ((key, value),) = entry.items()
    if key != "data" and key != b"data":
        return None
    try:
        text = value.decode("utf-8") if type(value) is bytes else value
        raw = value if type(value) is bytes else text.encode("utf-8")  # raises on a lone surrogate
    except (UnicodeError, AttributeError):
        return None
    if (
        text.count("{") + text.count("[") > min(max_depth, _PROVEN_MAX_BRACKETS)  # nesting: at most one level per bracket
        or "\\u0000" in text  # NUL: the only escape orjson accepts that no store takes
        or _LONG_NUMBER in raw.translate(_ONLY_DIGITS)  # a 64-bit-plus integer: orjson makes it a float
        or ('""' in text and _EMPTY_NAME.search(text) is not None)  # an empty name, which the walk refuses
    ):
        return None
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return document if type(document) is dict else None


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise _Reject(RejectionReason.TOO_DEEP, f"{what} is nested too deeply to parse") from None
    except ValueError as exc:
        raise _Reject(RejectionReason.INVALID_JSON, f"{what} is not valid JSON: {_clean(str(exc), 200)}") from None


def decode_entry(entry: RawEntry) -> dict[str, Any]:
    """`XADD s * data '<json>'` or flat fields (`XADD s * prediction_id p1 score 0.9 ...`) -> dict."""
    fields: dict[str, str] = {}
    for raw_key, raw_value in entry.items():
        key = _text(raw_key, None)
        fields[key] = _text(raw_value, key)
    if set(fields) == {"data"}:
        document = _loads(fields["data"], "data")
        if not isinstance(document, dict):
            raise _Reject(RejectionReason.INVALID_JSON, "data must hold a JSON object")
        return document
    try:
        return _flat_document(fields)
    except _Reject as rejected:
        # A flat entry names its model in a field of its own, whatever else is wrong with it: the
        # per-model rejection counts (stats quality, the drift monitor) need it as for the `data` form.
        rejected.document = rejected.document or fields
        raise


def _flat_document(fields: dict[str, str]) -> dict[str, Any]:
    """Flat fields -> the document: dotted keys nest, `context` / `features` may hold JSON text."""
    document: dict[str, Any] = {}
    dotted: dict[str, list[tuple[str, list[str], str]]] = {}
    for key, value in fields.items():
        head, dot, rest = key.partition(".")
        if dot and head in NESTED_FIELDS:
            names = rest.split(".")
            if "" in names:  # "context.", "context..a": a name no rule or alert field can address
                raise _Reject(RejectionReason.SCHEMA, f"{_clean(key, 100)}: empty name in a dotted key")
            dotted.setdefault(head, []).append((key, names, value))
        elif key in NESTED_FIELDS:
            nested = _loads(value, key)
            if not isinstance(nested, dict):
                raise _Reject(RejectionReason.INVALID_JSON, f"{key} must hold a JSON object")
            document[key] = nested
        else:
            document[key] = value
    for head, keys in dotted.items():
        tree = _dotted_tree(head, keys)
        document[head] = _merge(head, document[head], tree) if head in document else tree
    return document


def _dotted_tree(head: str, keys: list[tuple[str, list[str], str]]) -> dict[str, Any]:
    """The dotted keys of one nested field as nested objects, as a rule path reads them: `context.a.b`
    is {"a": {"b": ...}}, addressed by the path context.a.b. A name given both as a value and as an
    object (`context.a` and `context.a.b`) is refused: either would hide the other. (A key may hold
    thousands of dots: paths are only built for a message.)"""
    tree: dict[str, Any] = {}
    for key, names, value in keys:
        node = tree
        for depth, name in enumerate(names[:-1]):
            child = node.setdefault(name, {})
            if not isinstance(child, dict):  # a value given by a shorter key seen before
                shorter = ".".join([head, *names[: depth + 1]])
                raise _conflict(shorter, shorter, key)
            node = child
        if names[-1] in node:  # an object made by a longer key seen before
            longer = next(k for k, n, _ in keys if k != key and n[: len(names)] == names)
            raise _conflict(key, key, longer)
        node[names[-1]] = value
    return tree


def _merge(head: str, given: dict[str, Any], tree: dict[str, Any]) -> dict[str, Any]:
    """The JSON text of a nested field (`given`, fresh from json.loads, updated in place) with its dotted
    keys over it: where both give a value, the dotted key wins; objects are merged; an object on one side
    and a value on the other is refused. A loop, not recursion: both may nest hundreds of levels deep."""
    todo: list[tuple[dict[str, Any], dict[str, Any], tuple[Any, str]]] = [(given, tree, ((), head))]
    while todo:
        into, over, where = todo.pop()
        for name, value in over.items():
            if name not in into:
                into[name] = value
                continue
            old = into[name]
            if isinstance(old, dict) and isinstance(value, dict):
                todo.append((old, value, (where, name)))
            elif isinstance(old, dict) or isinstance(value, dict):
                path = _path_of((where, name))
                if isinstance(old, dict):
                    raise _conflict(path, path, f"in the {head} JSON text")
                raise _conflict(path, f"in the {head} JSON text", _first_key(path, value))
            else:
                into[name] = value
    return given


def _path_of(where: tuple[Any, str]) -> str:
    """The dotted path of a (parent, name) chain."""
    names: list[str] = []
    while where:
        where, name = where
        names.append(name)
    return ".".join(reversed(names))


def _first_key(path: str, tree: dict[str, Any]) -> str:
    """A dotted key that made `tree`, an object of dotted keys: for a message."""
    while isinstance(tree, dict) and tree:
        name, tree = next(iter(tree.items()))
        path = f"{path}.{name}"
    return path


def _conflict(path: str, as_value: str, as_object: str) -> _Reject:
    return _Reject(RejectionReason.SCHEMA, f"{_clean(path, 100)}: given both as a value ({_clean(as_value, 100)}) "
                                           f"and as an object ({_clean(as_object, 100)})")


class _Bad(Exception):
    """A bad value deep in a document; containers add their key on the way up, so the
    path is built only for the one value that fails."""

    def __init__(self, reason: RejectionReason, problem: str) -> None:
        self.reason, self.problem, self.path = reason, problem, []


def _check_values(value: Any, depth: int, max_depth: int) -> None:
    """Every value in the decoded document: nesting, text and numbers the store and the rules
    can take (JSON allows NaN, Infinity, 1e999 and 400-digit integers; a float column and
    PostgreSQL's JSON do not)."""
    kind = type(value)
    if kind is str:
        if not storable_text(value):
            raise _Bad(RejectionReason.INVALID_ENCODING, "text holds a NUL character or a lone surrogate")
    elif kind is float:
        if not math.isfinite(value):
            raise _Bad(RejectionReason.SCHEMA, f"{value} is not a finite number")
    elif kind is int:
        if value.bit_length() > MAX_INT_BITS:
            raise _Bad(RejectionReason.SCHEMA, f"an integer of {value.bit_length()} bits is too large")
    elif kind is dict or kind is list:
        if depth > max_depth:
            raise _Bad(RejectionReason.TOO_DEEP, f"nested more than {max_depth} levels deep")
        items = value.items() if kind is dict else enumerate(value)
        for key, item in items:
            try:
                if kind is dict and not storable_text(key):
                    raise _Bad(RejectionReason.INVALID_ENCODING, "field name holds a NUL character or a lone surrogate")
                if kind is dict and not key:  # {"context": {"": 1}}: a name no rule path can address
                    raise _Bad(RejectionReason.SCHEMA, "an empty name, which no rule path can address")
                _check_values(item, depth + 1, max_depth)
            except _Bad as bad:
                bad.path.append(key)
                raise


def _check_document(document: dict[str, Any], max_depth: int) -> None:
    try:
        _check_values(document, 1, max_depth)
    except _Bad as bad:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{_clean(p, 60)}" for p in reversed(bad.path))
        raise _Reject(bad.reason, f"{path.lstrip('.') or 'message'}: {bad.problem}", document=document) from None


def _checked_document(entry: RawEntry, limits: PayloadLimits) -> dict[str, Any]:
    """The decoded document, every value of it checked (see `_proven_document`)."""
    document = _proven_document(entry, limits.max_depth)
    if document is None:
        document = decode_entry(entry)
        _check_document(document, limits.max_depth)
    return document


def _clean(text: str, limit: int) -> str:
    """Text safe to store and print: NUL and lone surrogates escaped, length bounded, a long number (a field
    named by 400 digits) quoted by its start and length before it is cut."""
    text = cap_digits(text)
    if len(text) > limit:
        text = text[:limit] + "..."
    if storable_text(text):
        return text
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def bounded_detail(text: str) -> str:
    """A rejection's detail written after the gate (an outcome's alert or owner not found), bounded and storable
    as the gate's are: it quotes what was sent, an entity id or owner of any length."""
    return _clean(text, MAX_DETAIL_CHARS)


def _schema_detail(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(_clean(str(p), 60) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _validate(model: type[BaseModel], document: dict[str, Any]) -> Any:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise _Reject(RejectionReason.SCHEMA, _schema_detail(exc)) from None


def _rejection(rejected: _Reject, entry: RawEntry, limits: PayloadLimits, **fields: Any) -> Rejection:
    payload = (
        _truncated_payload(entry, limits.max_bytes)
        if rejected.reason is RejectionReason.TOO_LARGE
        else original_payload(entry)
    )
    return Rejection(reason=rejected.reason, detail=_clean(rejected.detail, MAX_DETAIL_CHARS), payload=payload, **fields)


def _model_name(document: dict[str, Any]) -> str | None:
    model = document.get("model")
    # A blank model names none: its rejections count under the unknown model, not under "  ".
    if (isinstance(model, str) and model and not model.isspace() and len(model) <= MAX_MODEL_CHARS
            and storable_text(model)):
        return model
    return None


def check_prediction(
    entry: RawEntry,
    *,
    now: datetime,
    max_age: timedelta,
    max_skew: timedelta,
    source_stream: str,
    source_id: str | None = None,
    limits: PayloadLimits = DEFAULT_LIMITS,
) -> Prediction | Rejection:
    """Everything but duplicates, which need the store; the pipeline checks those."""
    document: dict[str, Any] = {}
    try:
        _check_size(entry, limits)
        document = _checked_document(entry, limits)
        missing = [f for f in ID_FIELDS if not str(document.get(f) or "").strip()]
        if missing:
            raise _Reject(RejectionReason.MISSING_ID, f"missing or empty: {', '.join(missing)}")
        prediction: Prediction = _validate(Prediction, document)
        if not 0.0 <= prediction.score <= 1.0:
            raise _Reject(RejectionReason.SCORE_OUT_OF_RANGE, f"score {prediction.score} is outside 0..1")
        age = now - prediction.predicted_at
        if age > max_age:
            raise _Reject(
                RejectionReason.STALE, f"predicted_at is {format_span(age)} old; the limit is {format_span(max_age)}"
            )
        if -age > max_skew:
            raise _Reject(RejectionReason.FROM_FUTURE, f"predicted_at is {format_span(-age)} in the future")
        return prediction
    except _Reject as rejected:
        return _rejection(
            rejected, entry, limits, source_stream=source_stream, source_id=source_id,
            # A value the walk rejects (a NaN score, say) still names its model, for the per-model counts.
            model=_model_name(document if rejected.document is None else rejected.document),
        )


def check_outcome(
    entry: RawEntry,
    *,
    source_stream: str,
    source_id: str | None = None,
    limits: PayloadLimits = DEFAULT_LIMITS,
    now: datetime | None = None,
    max_skew: timedelta | None = None,
) -> OutcomeEvent | Rejection:
    """Parse an outcome event; whether its alert exists is the tracker's question. With `now`,
    an `at` later than now + max_skew is refused: it would count as an action years away."""
    try:
        _check_size(entry, limits)
        document = _checked_document(entry, limits)
        # Flat producers send "" for fields they do not use.
        document = {k: v for k, v in document.items() if v != ""}
        event: OutcomeEvent = _validate(OutcomeEvent, document)
        if event.at is not None and now is not None and event.at - now > (max_skew or timedelta(0)):
            raise _Reject(RejectionReason.FROM_FUTURE, f"at is {format_span(event.at - now)} in the future")
        return event
    except _Reject as rejected:
        return _rejection(rejected, entry, limits, source_stream=source_stream, source_id=source_id)
