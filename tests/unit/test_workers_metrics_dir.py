"""`serve --workers`: the metrics directory of a killed supervisor is removed at the next start,
never a running one's nor anything we did not make; a dead worker's live gauges leave /metrics.

Real processes stand in for supervisors: one that ran and was reaped, one killed and not reaped
(a zombie), and this test's own process, alive, under its true start time and a false one (the
pid given to a later process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from decision_router import workers
from decision_router.metrics import MULTIPROCESS_DIR
from decision_router.settings import Settings

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="start times come from /proc")


def leftover(parent: Path, name: str, *, pid: int, started: int | None, host: str | None = None) -> Path:
    """A metrics directory as a supervisor writes it, with a worker's counter file in it."""
    directory = parent / f"decision-router-metrics-{name}"
    directory.mkdir()
    owner = {"pid": pid, "started": started, "host": host or socket.gethostname()}
    (directory / "supervisor.json").write_text(json.dumps(owner))
    (directory / "counter_123.db").write_bytes(b"\0" * 16)
    return directory


def start_time(pid: int) -> int:
    return int((Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split())[19])


@pytest.fixture
def reaped_pid() -> int:
    """The pid of a process that started, was killed and was waited for: no longer running."""
    process = subprocess.Popen(["sleep", "60"])
    process.kill()
    process.wait()
    return process.pid


@pytest.fixture
def zombie() -> Iterator[subprocess.Popen]:
    """A killed process its parent (this test) has not reaped yet: os.kill(pid, 0) still finds it."""
    process = subprocess.Popen(["sleep", "60"])
    started = start_time(process.pid)
    process.kill()
    while Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        time.sleep(0.001)  # the kill lands
    process.started = started  # type: ignore[attr-defined]
    yield process
    process.wait()


def sweep(parent: Path) -> set[str]:
    return {Path(p).name for p in workers._remove_orphaned_metrics_dirs(str(parent))}


@needs_proc
def test_the_directory_of_a_supervisor_that_ended_is_removed(tmp_path: Path, reaped_pid: int) -> None:
    dead = leftover(tmp_path, "dead", pid=reaped_pid, started=1)
    assert sweep(tmp_path) == {dead.name}
    assert not dead.exists()


@needs_proc
def test_the_directory_of_a_killed_supervisor_not_yet_reaped_is_removed(
    tmp_path: Path, zombie: subprocess.Popen
) -> None:
    dead = leftover(tmp_path, "zombie", pid=zombie.pid, started=zombie.started)  # type: ignore[attr-defined]
    assert sweep(tmp_path) == {dead.name}


@needs_proc
def test_a_running_supervisors_directory_is_kept_and_a_reused_pid_is_told_apart(tmp_path: Path) -> None:
    me = os.getpid()
    running = leftover(tmp_path, "running", pid=me, started=start_time(me))
    reused = leftover(tmp_path, "reused", pid=me, started=start_time(me) - 1)  # its supervisor started earlier
    assert sweep(tmp_path) == {reused.name}
    assert (running / "counter_123.db").exists()


def test_what_is_not_plainly_ours_is_never_touched(tmp_path: Path, reaped_pid: int) -> None:
    elsewhere = leftover(tmp_path, "elsewhere", pid=reaped_pid, started=1, host="another-machine")
    unowned = tmp_path / "decision-router-metrics-unowned"  # an earlier version's, or one being made now
    unowned.mkdir()
    garbled = leftover(tmp_path, "garbled", pid=reaped_pid, started=1)
    (garbled / "supervisor.json").write_text('{"pid": ')
    other_name = tmp_path / "other-metrics-dead"
    leftover(tmp_path, "target", pid=reaped_pid, started=1).rename(other_name)
    a_file = tmp_path / "decision-router-metrics-file"
    a_file.write_text("not a directory")
    link = tmp_path / "decision-router-metrics-link"
    link.symlink_to(other_name)
    assert sweep(tmp_path) == set()
    assert all(p.exists() for p in (elsewhere, unowned, garbled, other_name, a_file, link))


def test_a_missing_temporary_directory_is_no_error(tmp_path: Path) -> None:
    assert sweep(tmp_path / "missing") == set()


async def no_redis(_settings: Settings) -> None:
    """The consumer groups, made by the supervisor before its workers start: no Redis here."""


@needs_proc
def test_run_workers_removes_a_killed_supervisors_directory_and_names_itself_in_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reaped_pid: int
) -> None:
    monkeypatch.setattr(workers.tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(MULTIPROCESS_DIR, raising=False)
    monkeypatch.setattr(workers, "load_rules", lambda _directory: None)
    monkeypatch.setattr(workers, "_ensure_groups", no_redis)
    dead = leftover(tmp_path, "dead", pid=reaped_pid, started=1)
    seen: list[tuple[Path, dict, bool]] = []

    def spawn(worker: workers._Worker) -> None:
        """Instead of a worker: look at the directory it would count in, then stop the supervisor."""
        directory = Path(worker.env[MULTIPROCESS_DIR])
        seen.append((directory, json.loads((directory / "supervisor.json").read_text()), dead.exists()))
        worker.process = subprocess.Popen(["true"])
        worker.process.wait()
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(workers, "_spawn", spawn)
    settings = Settings(redis_url="redis://127.0.0.1:1/0", database_url=f"sqlite:///{tmp_path / 'store.db'}")
    assert workers.run_workers(settings, 1, api=False) == 0
    ((directory, owner, dead_there),) = seen
    assert not dead_there  # removed before the workers started
    assert owner == {"pid": os.getpid(), "started": start_time(os.getpid()), "host": socket.gethostname()}
    assert directory.parent == tmp_path
    assert not directory.exists()  # its own removed at the clean stop, as before


def test_a_dead_workers_live_gauges_leave_metrics_and_its_counters_stay(tmp_path: Path) -> None:
    """A worker sets a "livesum" gauge and counts, then dies: once the supervisor has seen it die,
    the sum /metrics serves no longer holds the gauge, and still holds the count."""
    script = (
        "from prometheus_client import Counter, Gauge\n"
        "Gauge('in_flight', 'entries in hand', multiprocess_mode='livesum').set(7)\n"
        "Counter('routed', 'routed').inc(5)\n"
    )
    env = {**os.environ, MULTIPROCESS_DIR: str(tmp_path)}
    worker = workers._Worker("box-1", env={MULTIPROCESS_DIR: str(tmp_path)})
    worker.process = subprocess.Popen([sys.executable, "-c", script], env=env)
    assert worker.process.wait() == 0
    assert "in_flight 7.0" in exposition(tmp_path)

    workers._supervise(worker, workers._Stop())

    served = exposition(tmp_path)
    assert "in_flight 7.0" not in served
    assert "routed_total 5.0" in served


def exposition(directory: Path) -> str:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return generate_latest(registry).decode()
