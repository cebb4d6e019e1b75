from __future__ import annotations

import io
import json

import pytest
import structlog

from decision_router.logs import configure_logging


@pytest.fixture(autouse=True)
def _reset_structlog():
    yield
    structlog.reset_defaults()


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_when_not_a_tty() -> None:
    stream = io.StringIO()
    configure_logging(fmt="auto", stream=stream)
    structlog.get_logger("t").info("batch routed", accepted=3)
    event = json.loads(stream.getvalue())
    assert event["event"] == "batch routed" and event["accepted"] == 3 and event["level"] == "info"
    assert event["timestamp"].endswith("Z")


def test_readable_in_a_terminal_and_json_when_asked() -> None:
    tty = Tty()
    configure_logging(fmt="auto", stream=tty)
    structlog.get_logger("t").info("router started", rules=10)
    assert "router started" in tty.getvalue() and "rules" in tty.getvalue()
    assert not tty.getvalue().lstrip().startswith("{")
    forced = Tty()
    configure_logging(fmt="json", stream=forced)
    structlog.get_logger("t").warning("x", y=1)
    assert json.loads(forced.getvalue())["y"] == 1


def test_level_filters() -> None:
    stream = io.StringIO()
    configure_logging(fmt="json", level="warning", stream=stream)
    structlog.get_logger("t").info("hidden")
    structlog.get_logger("t").warning("shown")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["shown"]


class CountingWrites(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_each_line_is_one_write_so_workers_sharing_stderr_do_not_interleave() -> None:
    stream = CountingWrites()
    configure_logging(fmt="json", stream=stream)
    structlog.get_logger("t").info("stopping")
    structlog.get_logger("t").info("stopping")
    assert len(stream.writes) == 2 and all(w.endswith("\n") and w.count("\n") == 1 for w in stream.writes)
