"""Shared fixtures. Integration tests use real Redis and PostgreSQL (see tests/integration)."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator

import pytest
import structlog

REQUIRE_SERVICES = os.environ.get("DECISION_ROUTER_REQUIRE_SERVICES") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests under tests/integration are marked by folder so none escapes the CI check.
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the environment: keep the developer's own out of the tests."""
    for name in list(os.environ):
        if name.startswith("DECISION_ROUTER_") and not name.startswith(("DECISION_ROUTER_TEST_", "DECISION_ROUTER_REQUIRE")):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _reset_logging():
    """A test that configures logging (the CLI in-process, a level filter) must not
    change what the next test's capture_logs sees."""
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _restore_signal_mask():
    """`serve` and `api` block SIGHUP from their start until they have a handler (cli.py): run in-process
    (CliRunner), one that stops early would leave it blocked for every later test and the processes they
    start (a mask outlives exec), hiding what SIGHUP does to them."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def unavailable(what: str, error: Exception) -> None:
    message = f"{what} is not reachable ({error}); start it or unset DECISION_ROUTER_REQUIRE_SERVICES"
    if REQUIRE_SERVICES:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port whose listener accepts (the kernel's backlog) and never says a word: a hung PostgreSQL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
