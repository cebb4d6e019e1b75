"""Publishing predictions and outcome events from Python, files or the shell.

Entries are written as one `data` field holding JSON, the same form any Redis client
can produce with `XADD predictions * data '<json>'`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from decision_router.contracts import OutcomeEvent, Prediction, Rejection
from decision_router.pipeline import utcnow
from decision_router.quality import check_prediction
from decision_router.streams import xadd_all


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


@dataclass
class FileSummary:
    published: int = 0
    bad: list[BadLine] = field(default_factory=list)


def read_entries(path: Path, fmt: str = "auto") -> Iterator[tuple[int, Mapping[str, str]]]:
    """(line number, raw entry) per record: JSON lines as {"data": line}, CSV rows as flat fields."""
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
    with path.open(encoding="utf-8", newline="") as handle:
        if fmt == "csv":
            reader = csv.DictReader(handle)
            for row in reader:
                # Empty cells are absent fields, as a flat XADD would omit them.
                yield reader.line_num, {k: v for k, v in row.items() if k and v not in (None, "")}
        else:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, {"data": line}


def validate_entry(entry: Mapping[str, str]) -> Prediction | Rejection:
    """The gate's own checks except age and duplicates, which only the service can judge."""
    return check_prediction(
        entry,
        now=utcnow(),
        max_age=timedelta(days=36500),
        max_skew=timedelta(days=36500),
        source_stream="file",
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
