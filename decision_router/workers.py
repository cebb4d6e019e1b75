"""`decision-router serve --workers N`: N router processes in one consumer group.

One Python process routes on one core (the GIL), so scaling out means processes. Each worker
is a plain `decision-router serve` with its own consumer name (`<consumer_name>-<i>`); Redis
hands each entry to one consumer of the group, so each prediction is routed by one worker.
The parent only supervises: it forwards SIGTERM/SIGINT, waits for the workers to finish their
batches, and restarts a worker that dies under the same consumer name, so the new one picks
up that worker's pending entries at once instead of after claim_idle.

The embedded Redis is refused here: it is fakeredis in one Python thread, slower than a
single worker, so several workers behind it would only add contention.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import structlog

from decision_router.metrics import MULTIPROCESS_DIR
from decision_router.rules import load_rules
from decision_router.settings import ENV_PREFIX, Settings
from decision_router.store import create_schema, make_engine

log = structlog.get_logger("decision_router.workers")

_RESTART_FIRST, _RESTART_MAX = 1.0, 30.0  # seconds between restarts of a worker that keeps dying
_STABLE_AFTER = 30.0  # a worker that ran this long resets its restart delay
_TICK = 0.2  # seconds between the supervisor's looks at its workers


class _Stop:
    """Set by the SIGTERM/SIGINT handler. Plain attributes, not a threading.Event: the handler runs
    on the main thread between two bytecodes, possibly while Event.wait holds the Event's lock
    there, and Event.set() would then wait for that lock forever."""

    signum: int | None = None
    at: float = 0.0  # time.monotonic() when it came

    @property
    def requested(self) -> bool:
        return self.signum is not None


class WorkersError(Exception):
    pass


@dataclass
class _Worker:
    name: str
    args: tuple[str, ...] = ()
    process: subprocess.Popen | None = None
    started: float = 0.0
    delay: float = _RESTART_FIRST
    restart_at: float = field(default=0.0)
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment


def run_workers(settings: Settings, count: int, *, api: bool = True) -> int:
    """Run `count` workers until SIGTERM/SIGINT; returns the exit code (0 if all stopped cleanly).

    With `api`, the first worker also serves the HTTP API (one port, one listener); the others
    run consumers only."""
    if settings.embedded:
        raise WorkersError(
            "--workers needs a real Redis: set DECISION_ROUTER_REDIS_URL (the embedded Redis serves one process)"
        )
    load_rules(settings.rules_dir)  # invalid rules: refuse once here, not N times in the workers
    # The schema too, once, before the workers race to create it on a new store.
    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)
    finally:
        engine.dispose()
    first = ("--api-port", str(settings.api_port)) if api else ("--no-api",)
    # Each worker counts its metrics in files there, which the one serving /metrics sums (metrics.exposition).
    # A directory the user named is theirs to keep (and to empty between runs); ours goes at the end.
    metrics_dir = os.environ.get(MULTIPROCESS_DIR) or tempfile.mkdtemp(prefix="decision-router-metrics-")
    workers = [
        _Worker(f"{settings.consumer_name}-{i}", first if i == 1 else ("--no-api",),
                env={MULTIPROCESS_DIR: metrics_dir})
        for i in range(1, count + 1)
    ]
    stop = _Stop()

    def forward(signum: int, _frame: object) -> None:
        stop.signum, stop.at = signum, time.monotonic()
        _signal_running(workers, signum)

    def reload(signum: int, _frame: object) -> None:
        # SIGHUP means "re-read the rules" (as for a single `serve`): pass it on, keep running.
        _signal_running(workers, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    try:
        for worker in workers:
            _spawn(worker)
        log.info("workers started", workers=[w.name for w in workers], pids=[w.process.pid for w in workers])
        while not stop.requested:
            for worker in workers:
                _supervise(worker, stop)
            time.sleep(_TICK)  # the handler runs during it; the loop sees the stop within a tick
        # A worker restarted as the signal came, which the handler did not reach.
        _signal_running([w for w in workers if w.started >= stop.at], stop.signum)
        return _wait_all(workers, settings.shutdown_timeout.total_seconds() + 5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics_dir != os.environ.get(MULTIPROCESS_DIR):
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _signal_running(workers: list[_Worker], signum: int) -> None:
    """Pass a signal to each worker still running (Popen.poll never waits: safe in a signal handler)."""
    for worker in workers:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.send_signal(signum)


def _spawn(worker: _Worker) -> None:
    env = {**os.environ, **worker.env, f"{ENV_PREFIX}CONSUMER_NAME": worker.name}
    worker.process = subprocess.Popen([sys.executable, "-m", "decision_router", "serve", *worker.args], env=env)
    worker.started = time.monotonic()


def _supervise(worker: _Worker, stop: _Stop) -> None:
    assert worker.process is not None
    code = worker.process.poll()
    if code is None or stop.requested:
        return
    now = time.monotonic()
    if worker.restart_at == 0.0:
        if now - worker.started > _STABLE_AFTER:
            worker.delay = _RESTART_FIRST
        worker.restart_at = now + worker.delay
        log.error("worker exited; restarting it", worker=worker.name, pid=worker.process.pid, code=code,
                  restart_in=worker.delay)
        worker.delay = min(_RESTART_MAX, worker.delay * 2)
    elif now >= worker.restart_at:
        worker.restart_at = 0.0
        _spawn(worker)
        log.info("worker restarted", worker=worker.name, pid=worker.process.pid)


def _wait_all(workers: list[_Worker], timeout: float) -> int:
    """After the stop signal: wait for each worker to finish its batch; kill what hangs."""
    deadline = time.monotonic() + timeout
    codes = []
    for worker in workers:
        assert worker.process is not None
        try:
            codes.append(worker.process.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            log.error("worker did not stop in time; killed", worker=worker.name, pid=worker.process.pid)
            worker.process.kill()
            codes.append(worker.process.wait())
    log.info("workers stopped", codes=codes)
    # Killed by the forwarded signal itself: a worker still starting, before its handlers were
    # installed, so it held no work. Anything else is a worker that failed.
    clean = (0, -signal.SIGTERM, -signal.SIGINT)
    return 0 if all(c in clean for c in codes) else 1
