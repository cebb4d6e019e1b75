"""`serve --workers`: a stop signal stops the supervisor wherever its main thread is.

A Python signal handler runs on the main thread between two bytecodes of whatever runs there.
The supervisor once set a threading.Event from its SIGTERM handler while its loop waited on
that Event: a signal landing while Event.wait held the Event's lock made Event.set() wait for
that lock forever, and `serve --workers` never stopped (seen once in CI). Here the signal is
raised at each line the supervisor runs in turn, its waits in the standard library included,
so every place it can land is tried."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from decision_router import workers
from decision_router.settings import Settings

RULES = Path(__file__).resolve().parents[2] / "rules"
WATCHED = (workers.__file__, threading.__file__)  # the supervisor's loop and the waits it calls


def stand_in(worker: workers._Worker) -> None:
    """A worker that needs no Redis: it sleeps until the forwarded signal ends it."""
    worker.process = subprocess.Popen(["sleep", "60"])
    worker.started = workers.time.monotonic()


def run_with_signal_at(line_number: int, settings: Settings) -> tuple[int, list[subprocess.Popen]]:
    """Run the supervisor and raise SIGTERM at the line_number-th line it runs once its workers are up."""
    seen = 0
    spawned: list[workers._Worker] = []

    def spawn(worker: workers._Worker) -> None:
        stand_in(worker)
        spawned.append(worker)

    def trace(frame, event, _arg):
        nonlocal seen
        if event == "line" and len(spawned) == 2 and frame.f_code.co_filename in WATCHED:
            seen += 1
            if seen == line_number:
                signal.raise_signal(signal.SIGTERM)
        return trace

    original = workers._spawn
    workers._spawn = spawn
    sys.settrace(trace)
    try:
        code = workers.run_workers(settings, 2, api=False)
    finally:
        sys.settrace(None)
        workers._spawn = original
    return code, [w.process for w in spawned]


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setattr(workers, "_TICK", 0.01, raising=False)  # more turns of the loop in less time
    monkeypatch.setattr(workers, "load_rules", lambda _directory: None)  # checked before the workers start, not here
    # A Redis URL only so that --workers is allowed; the stand-in workers never connect.
    return Settings(redis_url="redis://127.0.0.1:1/0", database_url=f"sqlite:///{tmp_path / 'store.db'}",
                    rules_dir=RULES)


@pytest.mark.timeout(60)
def test_sigterm_at_any_line_of_the_supervisor_loop_stops_it_and_its_workers(settings: Settings) -> None:
    for line_number in range(1, 80):
        code, processes = run_with_signal_at(line_number, settings)
        assert code == 0, line_number  # each worker ended by the forwarded SIGTERM
        assert [p.returncode for p in processes] == [-signal.SIGTERM] * 2, line_number
