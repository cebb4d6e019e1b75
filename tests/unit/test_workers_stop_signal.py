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


async def _no_redis(_settings: Settings) -> None:
    pass


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setattr(workers, "_TICK", 0.01, raising=False)  # more turns of the loop in less time
    monkeypatch.setattr(workers, "load_rules", lambda _directory: None)  # checked before the workers start, not here
    monkeypatch.setattr(workers, "_ensure_groups", _no_redis)  # so is Redis
    # A Redis URL only so that --workers is allowed; the stand-in workers never connect.
    return Settings(redis_url="redis://127.0.0.1:1/0", database_url=f"sqlite:///{tmp_path / 'store.db'}",
                    rules_dir=RULES)


@pytest.mark.timeout(60)
def test_sigterm_at_any_line_of_the_supervisor_loop_stops_it_and_its_workers(settings: Settings) -> None:
    for line_number in range(1, 80):
        code, processes = run_with_signal_at(line_number, settings)
        assert code == 0, line_number  # each worker ended by the forwarded SIGTERM
        assert [p.returncode for p in processes] == [-signal.SIGTERM] * 2, line_number


def process_state(pid: int) -> str:
    """The state letter in /proc/<pid>/stat (Z: exited, not yet reaped), without reaping it."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def stop_with_one_worker_gone(monkeypatch: pytest.MonkeyPatch, settings: Settings, *, seen: bool) -> tuple[int, list]:
    """Run the supervisor with two stand-in workers, the second exiting (code 3) on its own; SIGTERM once it is
    gone: `seen` by the supervisor (logged, its restart due), or not yet (between two of its looks)."""
    from structlog.testing import capture_logs

    monkeypatch.setattr(workers, "_RESTART_FIRST", 60.0)  # not restarted before the stop
    if not seen:
        monkeypatch.setattr(workers, "_TICK", 3.0)  # the supervisor sleeps past the worker's exit (0.3 s)
    spawned: list[workers._Worker] = []

    def spawn(worker: workers._Worker) -> None:
        command = ["sleep", "60"] if not spawned else ["sh", "-c", "sleep 0.3; exit 3"]
        worker.process = subprocess.Popen(command)
        worker.started = workers.time.monotonic()
        spawned.append(worker)

    def signal_once_gone() -> None:
        deadline = workers.time.monotonic() + 30
        while workers.time.monotonic() < deadline:
            if len(spawned) == 2 and (spawned[1].restart_at if seen else process_state(spawned[1].process.pid) == "Z"):
                break
            workers.time.sleep(0.01)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # its handler runs in the sleep

    monkeypatch.setattr(workers, "_spawn", spawn)
    threading.Thread(target=signal_once_gone, daemon=True).start()
    with capture_logs() as logs:
        code = workers.run_workers(settings, 2, api=False)
    return code, logs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seen", [True, False], ids=["seen-dead", "dead-unseen"])
def test_a_stop_with_one_worker_already_dead_is_clean_and_names_it(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, seen: bool
) -> None:
    # The stop itself went well: the live worker finished on the forwarded SIGTERM. The dead one was a crash
    # the supervisor was handling (logged, restart due), not a failure of the stop: exit 0, the worker named.
    code, logs = stop_with_one_worker_gone(monkeypatch, settings, seen=seen)

    assert code == 0
    (named,) = [e for e in logs if e["event"] == "worker had exited before the stop; not restarted"]
    assert named["worker"].endswith("-2") and named["code"] == 3
    assert [e["codes"] for e in logs if e["event"] == "workers stopped"] == [[-signal.SIGTERM, 3]]
