"""Publishing predictions and outcome events from Python, files or the shell.

Entries are written as one `data` field holding JSON, the same form any Redis client
can produce with `XADD predictions * data '<json>'`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from decision_router.contracts import OutcomeEvent, Prediction, Rejection, RejectionReason
from decision_router.pipeline import utcnow
from decision_router.quality import DEFAULT_LIMITS, RawEntry, check_prediction, original_payload
from decision_router.settings import PayloadLimits
from decision_router.streams import xadd_all


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


@dataclass
class FileSummary:
    published: int = 0
    bad: list[BadLine] = field(default_factory=list)


class FileFormatError(ValueError):
    """The file as a whole cannot be read as predictions (a CSV whose first line is no header): one line."""


def read_entries(
    path: Path, fmt: str = "auto", limits: PayloadLimits = DEFAULT_LIMITS
) -> Iterator[tuple[int, RawEntry | Rejection]]:
    """(line number, raw entry) per record: JSON lines as {"data": line}, CSV rows as flat fields; a
    record that cannot be made an entry (a CSV row with cells no column names) as its Rejection."""
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
    # Bytes that are not UTF-8 are kept (surrogateescape) and handed to the gate as bytes, which
    # rejects just that line as invalid_encoding; utf-8-sig drops the byte-order mark some editors write.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        if fmt == "csv":
            yield from _csv_entries(path, handle, limits)
        else:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, {"data": undecoded(line)}


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as surrogateescape keeps it


def undecoded(text: str) -> str | bytes:
    """`text`, or its original bytes if some were not UTF-8 (a strict decode never yields these surrogates)."""
    return text.encode("utf-8", "surrogateescape") if _ESCAPED_BYTE.search(text) else text


def _csv_entries(
    path: Path, handle: Iterable[str], limits: PayloadLimits
) -> Iterator[tuple[int, RawEntry | Rejection]]:
    # A longer cell makes the entry too large anyway; the default limit (128 Ki characters) raised
    # csv.Error for cells the gate may accept. Process-wide, but only `publish` reads CSV.
    csv.field_size_limit(limits.max_bytes)
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None:
        return
    _check_header(path, header)
    names = [undecoded(name) for name in header]
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "field limit" in str(exc):  # csv's only way to say so: "field larger than field limit (N)"
                detail = f"a cell holds over {limits.max_bytes} characters; the limit is {limits.max_bytes} bytes"
                yield reader.line_num, _unreadable(RejectionReason.TOO_LARGE, detail, {})
            else:
                yield reader.line_num, _unreadable(RejectionReason.SCHEMA, f"not CSV: {exc}", {})
            continue
        if not row:
            continue  # a blank line
        # Empty cells are absent fields, as a flat XADD would omit them.
        fields = {name: undecoded(value) for name, value in zip(names, row, strict=False) if name and value}
        if any(row[len(names):]):  # cells past the header's columns; empty ones (a trailing comma) carry nothing
            detail = f"{len(row)} cells, but the header names {len(names)} columns"
            yield reader.line_num, _unreadable(RejectionReason.SCHEMA, detail, fields)
        elif any(value for name, value in zip(names, row, strict=False) if not name):
            yield reader.line_num, _unreadable(RejectionReason.SCHEMA, "a value in a column with no name", fields)
        else:
            yield reader.line_num, fields


def _check_header(path: Path, header: list[str]) -> None:
    """A first line that names no prediction_id column is data (or JSON), not a header: refuse the
    file rather than read it as the header and publish nothing."""
    if "prediction_id" in header:
        duplicates = sorted({name for name in header if name and header.count(name) > 1})
        if duplicates:
            raise FileFormatError(f"{path}: the CSV header names {', '.join(duplicates)} more than once")
        return
    first = ",".join(header)
    if first.lstrip().startswith(("{", "[")):
        raise FileFormatError(f"{path}: line 1 is JSON, not a CSV header (for JSON lines use --format jsonl)")
    shown = first if len(first) <= 80 else first[:80] + "..."
    raise FileFormatError(f"{path}: the CSV header (line 1) has no prediction_id column: {shown!r}")


def _unreadable(reason: RejectionReason, detail: str, fields: RawEntry) -> Rejection:
    return Rejection(reason=reason, detail=detail, source_stream="file", payload=original_payload(fields))


def validate_entry(entry: RawEntry | Rejection, limits: PayloadLimits = DEFAULT_LIMITS) -> Prediction | Rejection:
    """The gate's own checks except age and duplicates, which only the service can judge."""
    if isinstance(entry, Rejection):  # read_entries could not make it an entry
        return entry
    return check_prediction(
        entry,
        now=utcnow(),
        max_age=timedelta(days=36500),
        max_skew=timedelta(days=36500),
        source_stream="file",
        limits=limits,
    )


def prediction_fields(prediction: Prediction) -> dict[str, str]:
    return {"data": prediction.model_dump_json()}


async def publish_predictions(redis: Redis, stream: str, predictions: Sequence[Prediction]) -> None:
    await xadd_all(redis, stream, [prediction_fields(prediction) for prediction in predictions])


def outcome_fields(event: OutcomeEvent) -> dict[str, str]:
    return {"data": event.model_dump_json(exclude_none=True)}


async def publish_outcome(redis: Redis, stream: str, event: OutcomeEvent) -> str:
    entry_id = await redis.xadd(stream, outcome_fields(event))
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def describe(rejection: Rejection) -> str:
    return f"{rejection.reason.value}: {rejection.detail}"
