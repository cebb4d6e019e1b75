"""`publish`'s file reading: every line of a JSON-lines or CSV file is published or reported, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from decision_router.contracts import Prediction, Rejection, RejectionReason
from decision_router.publisher import FileFormatError, read_entries, validate_entry
from decision_router.settings import PayloadLimits

COLUMNS = "prediction_id,model,model_version,entity_type,entity_id,score,predicted_at"


def line(pid: str, **extra: object) -> str:
    return json.dumps({
        "prediction_id": pid, "model": "churn", "model_version": "2026.11", "entity_type": "account",
        "entity_id": f"acct-{pid}", "score": 0.9, "predicted_at": "2026-11-25T11:00:00Z", **extra,
    })


def row(pid: str) -> str:
    return f"{pid},churn,2026.11,account,acct-{pid},0.9,2026-11-25T11:00:00Z"


DEFAULT = PayloadLimits()


def checked(path: Path, fmt: str = "auto", limits: PayloadLimits = DEFAULT) -> dict[int, str]:
    """Line number -> the prediction's id, or the rejection's "reason: detail"."""
    results = {}
    for number, entry in read_entries(path, fmt, limits):
        result = validate_entry(entry, limits)
        ok = isinstance(result, Prediction)
        results[number] = result.prediction_id if ok else f"{result.reason.value}: {result.detail}"
    return results


def test_a_line_that_is_not_utf8_is_reported_and_the_rest_read(tmp_path: Path) -> None:
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(f"{line('p1')}\n\xff\n{line('p2')}\n".encode("latin-1"))
    assert checked(jsonl) == {1: "p1", 2: "invalid_encoding: field data is not valid UTF-8 (byte 0)", 3: "p2"}

    csv = tmp_path / "m.csv"
    latin1 = row("p4").replace("acct", "acct\xe9")  # written as one byte 0xe9, which UTF-8 never is alone
    csv.write_bytes(f"{COLUMNS}\n{row('p3')}\n{latin1}\n{row('p5')}\n".encode("latin-1"))
    assert checked(csv) == {2: "p3", 3: "invalid_encoding: field entity_id is not valid UTF-8 (byte 4)", 4: "p5"}


def test_a_csv_column_with_an_empty_name_in_its_dotted_key_is_the_gates_schema_rejection(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text(f"{COLUMNS},context.\n{row('p1')},x\n{row('p2')},\n")
    assert checked(csv) == {2: "schema: context.: empty name in a dotted key", 3: "p2"}  # an empty cell: absent


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path: Path) -> None:
    csv = tmp_path / "excel.csv"
    csv.write_text(f"{COLUMNS}\n{row('p1')}\n", encoding="utf-8-sig")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(f"{line('p2')}\n", encoding="utf-8-sig")
    assert checked(csv) == {2: "p1"} and checked(jsonl) == {1: "p2"}


def test_csv_cells_are_limited_by_the_payload_limit_not_by_csv(tmp_path: Path) -> None:
    # csv's default field limit (131072 characters) raised on a cell the gate may accept.
    csv = tmp_path / "big.csv"
    csv.write_text(f"{COLUMNS},context.note\n{row('p1')},{'x' * 140_000}\n{row('p2')},short\n")
    assert checked(csv, limits=PayloadLimits(max_bytes=1024 * 1024)) == {2: "p1", 3: "p2"}
    # A cell longer than the payload limit: the line is too large, and the next one is read.
    small = checked(csv, limits=PayloadLimits(max_bytes=65536))
    assert small[2].startswith("too_large: a cell holds over 65536 characters") and small[3] == "p2"
    # Cells within the limit, the entry over it: the gate's own too_large.
    csv.write_text(f"{COLUMNS},context.note\n{row('p1')},{'x' * 60_000}\n")
    assert checked(csv, limits=PayloadLimits(max_bytes=65536)) == {2: "p1"}
    assert checked(csv, limits=PayloadLimits(max_bytes=50_000))[2].startswith("too_large: ")


def test_the_payload_limit_is_the_configured_one(tmp_path: Path) -> None:
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(line("p1", context={"note": "x" * 100_000}) + "\n")
    assert checked(jsonl, limits=PayloadLimits(max_bytes=1024 * 1024)) == {1: "p1"}
    assert checked(jsonl, limits=PayloadLimits(max_bytes=65536))[1].startswith("too_large: ")


def test_a_csv_row_with_more_cells_than_the_header_is_a_bad_line(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text(f"{COLUMNS},,context.segment\n{row('p1')},,smb\n{row('p2')},,smb,extra\n{row('p3')},lost,smb\n"
                   f"\n{row('p4')}\n")
    assert checked(csv) == {
        2: "p1",
        3: "schema: 10 cells, but the header names 9 columns",
        4: "schema: a value in a column with no name",
        6: "p4",  # a short row's missing cells are absent fields; a blank line is no row
    }
    rejected = validate_entry(dict(read_entries(csv))[3])
    assert isinstance(rejected, Rejection) and rejected.reason is RejectionReason.SCHEMA
    assert json.loads(rejected.payload)["prediction_id"] == "p2"


def test_empty_cells_past_the_header_such_as_a_trailing_comma_are_nothing(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text(f"{COLUMNS}\n{row('p1')},\n{row('p2')},,\n{row('p3')},,x\n")
    assert checked(csv) == {2: "p1", 3: "p2", 4: "schema: 9 cells, but the header names 7 columns"}


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        (f"{row('p1')}\n{row('p2')}\n", "csv", "the CSV header (line 1) has no prediction_id column: 'p1,churn"),
        (f"{line('p1')}\n", "csv", "line 1 is JSON, not a CSV header (for JSON lines use --format jsonl)"),
        (f"{COLUMNS},score\n{row('p1')},0.1\n", "csv", "the CSV header names score more than once"),
    ],
)
def test_a_csv_without_a_header_is_refused(tmp_path: Path, text: str, fmt: str, message: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(text)
    with pytest.raises(FileFormatError) as caught:
        list(read_entries(path, fmt))
    assert str(caught.value).startswith(f"{path}: {message}")


def test_an_empty_file_has_no_entries(tmp_path: Path) -> None:
    for name in ("empty.csv", "empty.jsonl"):
        (tmp_path / name).write_text("")
        assert list(read_entries(tmp_path / name)) == []
