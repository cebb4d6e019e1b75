"""`decision-router serve --workers N`: N router processes in one consumer group.

One Python process routes on one core (the GIL), so scaling out means processes. Each worker
is a plain `decision-router serve` with its own consumer name (`<consumer_name>-<i>`); Redis
hands each entry to one consumer of the group, so each prediction is routed by one worker.
The parent only supervises: it forwards SIGTERM/SIGINT, waits for the workers to finish their
batches, and restarts a worker that dies under the same consumer name, so the new one picks
up that worker's pending entries at once instead of after claim_idle.

The embedded Redis is refused here: it is fakeredis in one Python thread, slower than a
single worker, so several workers behind it would only add contention.

The workers count their metrics in a temporary directory the supervisor makes and removes at
exit. A supervisor that is killed cannot remove it, so each one writes who made it there
(_OWNER_FILE) and, when it starts, removes the directories whose maker is no longer running:
a container restarting after crashes would otherwise fill its /tmp with them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import structlog
from prometheus_client import multiprocess

from decision_router.api.listen import bind_api_socket
from decision_router.metrics import MULTIPROCESS_DIR
from decision_router.rules import load_rules
from decision_router.settings import ENV_PREFIX, Settings
from decision_router.store import check_writable, create_schema, make_engine

log = structlog.get_logger("decision_router.workers")

_RESTART_FIRST, _RESTART_MAX = 1.0, 30.0  # seconds between restarts of a worker that keeps dying
_STABLE_AFTER = 30.0  # a worker that ran this long resets its restart delay
_TICK = 0.2  # seconds between the supervisor's looks at its workers
_METRICS_PREFIX = "decision-router-metrics-"  # of the metrics directories we make in the temporary directory
_OWNER_FILE = "supervisor.json"  # in each: the supervisor that made it (not *.db: prometheus_client reads those)
SUPERVISOR_PID = f"{ENV_PREFIX}SUPERVISOR_PID"  # set by the supervisor for its workers only; not a setting
_ORPHAN_CHECK = 0.5  # seconds between a worker's looks at whether its supervisor still runs


class _Stop:
    """Set by the SIGTERM/SIGINT handler. Plain attributes, not a threading.Event: the handler runs
    on the main thread between two bytecodes, possibly while Event.wait holds the Event's lock
    there, and Event.set() would then wait for that lock forever."""

    signum: int | None = None
    at: float = 0.0  # time.monotonic() when it came
    gone: tuple[str, ...] = ()  # the workers that had exited already when it came (dead, or awaiting restart)

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
        check_writable(engine)  # once here too: not N workers refusing it
    finally:
        engine.dispose()
    if api and settings.api_port:
        # A taken port, said now (ApiStartError, as by a single `serve`): found by worker 1, it would end
        # it at each start, and the supervisor would restart it forever. Port 0 picks a free one.
        bind_api_socket(settings.api_host, settings.api_port).close()
    # Redis too, once: a worker that cannot reach it (or is refused its consumer groups) exits 1 at each
    # start, as a single `serve` does, and would be restarted forever. Raises what `serve` reports.
    asyncio.run(_ensure_groups(settings))
    first = ("--api-port", str(settings.api_port)) if api else ("--no-api",)
    # Each worker counts its metrics in files there, which the one serving /metrics sums (metrics.exposition).
    # A directory the user named is theirs to keep (and to empty between runs); ours goes at the end.
    _remove_orphaned_metrics_dirs()
    metrics_dir = os.environ.get(MULTIPROCESS_DIR) or _make_metrics_dir()
    workers = [
        _Worker(f"{settings.consumer_name}-{i}", first if i == 1 else ("--no-api",),
                env={MULTIPROCESS_DIR: metrics_dir})
        for i in range(1, count + 1)
    ]
    stop = _Stop()

    def forward(signum: int, _frame: object) -> None:
        if not stop.requested:
            stop.gone = tuple(w.name for w in workers if w.process is not None and w.process.poll() is not None)
        stop.signum, stop.at = signum, time.monotonic()
        _signal_running(workers, signum)

    def reload(signum: int, _frame: object) -> None:
        # SIGHUP means "re-read the rules" (as for a single `serve`): pass it on, keep running.
        _signal_running(workers, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # held back while starting (cli.serve)
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
        return _wait_all(workers, settings.shutdown_timeout.total_seconds() + 5, gone=stop.gone)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if metrics_dir != os.environ.get(MULTIPROCESS_DIR):
            shutil.rmtree(metrics_dir, ignore_errors=True)


async def _ensure_groups(settings: Settings) -> None:
    """The consumer groups the workers read from, created as each worker's start creates them."""
    from decision_router.consumer import ensure_group
    from decision_router.keys import Keys
    from decision_router.redis_client import redis_for

    keys = Keys(settings.stream_prefix)
    redis = redis_for(settings)
    try:
        for stream in (keys.predictions, keys.outcomes):
            await ensure_group(redis, stream, settings.consumer_group)
    finally:
        await redis.aclose()


@dataclass(frozen=True)
class _Owner:
    """The supervisor that made a metrics directory. `started` is its start time in clock ticks
    since boot (/proc/<pid>/stat), which tells it from a later process given the same pid; None
    where there is no /proc."""

    pid: int
    started: int | None
    host: str


def _make_metrics_dir() -> str:
    path = tempfile.mkdtemp(prefix=_METRICS_PREFIX)
    owner = {"pid": os.getpid(), "started": _process_state(os.getpid())[1], "host": socket.gethostname()}
    # Written whole or not at all: a directory without its owner file is never removed, so another
    # supervisor starting at this instant leaves this one alone.
    staged = os.path.join(path, f"{_OWNER_FILE}.part")
    with open(staged, "w", encoding="utf-8") as file:
        json.dump(owner, file)
    os.replace(staged, os.path.join(path, _OWNER_FILE))
    return path


def _remove_orphaned_metrics_dirs(parent: str | None = None) -> list[str]:
    """Remove the metrics directories in `parent` (the temporary directory) left by supervisors that
    were killed; returns their paths. Only directories of this user with our owner file are touched,
    and only when the supervisor named there is no longer running."""
    parent = parent or tempfile.gettempdir()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not entry.name.startswith(_METRICS_PREFIX) or not _is_own_directory(entry):
            continue
        owner = _read_owner(entry.path)
        if owner is None or _is_running(owner):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        log.info("removed the metrics directory of a supervisor that was killed", path=entry.path, pid=owner.pid)
        removed.append(entry.path)
    return removed


def _is_own_directory(entry: os.DirEntry) -> bool:
    """A directory (not a link to one) of this user; False too if it is gone (another supervisor's sweep)."""
    try:
        return entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid()
    except OSError:
        return False


def _read_owner(directory: str) -> _Owner | None:
    """The directory's owner, or None if it has no readable owner file (not ours, or not made by this version)."""
    try:
        with open(os.path.join(directory, _OWNER_FILE), encoding="utf-8") as file:
            fields = json.load(file)
        return _Owner(int(fields["pid"]), None if fields["started"] is None else int(fields["started"]),
                      str(fields["host"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_running(owner: _Owner) -> bool:
    """Whether the supervisor `owner` names still runs; when in doubt, yes (its directory is kept)."""
    if owner.host != socket.gethostname():
        return True  # a temporary directory shared with another machine: its processes are not visible here
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user has that pid; its start time says whether it is ours
    state, started = _process_state(owner.pid)
    if state is None:
        return not os.path.exists("/proc/self/stat")  # no /proc here: a live pid is taken for ours
    if state in ("Z", "X"):
        return False  # killed, and not yet reaped by its parent
    return owner.started is None or started == owner.started  # else the pid was given to a later process


def _process_state(pid: int) -> tuple[str | None, int | None]:
    """The process's state letter and start time (fields 3 and 22 of /proc/<pid>/stat); Nones without it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as file:
            stat = file.read()
    except OSError:
        return None, None
    # The command name (field 2) is in parentheses and may hold spaces and parentheses itself.
    fields = stat.rpartition(")")[2].split()
    return fields[0], int(fields[19])


def _signal_running(workers: list[_Worker], signum: int) -> None:
    """Pass a signal to each worker still running (Popen.poll never waits: safe in a signal handler)."""
    for worker in workers:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.send_signal(signum)


def _spawn(worker: _Worker) -> None:
    env = {**os.environ, **worker.env, f"{ENV_PREFIX}CONSUMER_NAME": worker.name, SUPERVISOR_PID: str(os.getpid())}
    # The worker starts with SIGHUP blocked (a signal mask outlives exec): one passed on while it starts stays
    # pending until its service has a handler (service.serve), instead of ending it. Ours is delivered after.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        worker.process = subprocess.Popen([sys.executable, "-m", "decision_router", "serve", *worker.args], env=env)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    worker.started = time.monotonic()


def _supervise(worker: _Worker, stop: _Stop) -> None:
    assert worker.process is not None
    code = worker.process.poll()
    if code is None or stop.requested:
        return
    now = time.monotonic()
    if worker.restart_at == 0.0:
        _forget_live_gauges(worker)
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


def _wait_all(workers: list[_Worker], timeout: float, *, gone: tuple[str, ...] = ()) -> int:
    """After the stop signal: wait for each worker to finish its batch; kill what hangs. The exit code is that of
    the stop: a worker `gone` before it (its death logged then, its restart due) is named, not counted. Its
    pending entries are picked up as after any crash: by the next start under its name, or reclaimed."""
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
        _forget_live_gauges(worker)  # in a directory the user named, kept for the next run
    log.info("workers stopped", codes=codes)
    for worker, code in zip(workers, codes, strict=True):
        if worker.name in gone:
            log.warning("worker had exited before the stop; not restarted", worker=worker.name, code=code)
    # Killed by the forwarded signal itself: a worker still starting, before its handlers were
    # installed, so it held no work. Anything else is a worker that failed.
    clean = (0, -signal.SIGTERM, -signal.SIGINT)
    stopped = [code for worker, code in zip(workers, codes, strict=True) if worker.name not in gone]
    return 0 if all(c in clean for c in stopped) else 1


def _forget_live_gauges(worker: _Worker) -> None:
    """A worker that ended: drop its "live*" gauges, which count only while their process runs, from
    the sum /metrics serves. Its counters stay: they are totals of what it did."""
    metrics_dir = worker.env.get(MULTIPROCESS_DIR)
    if metrics_dir and worker.process is not None:
        multiprocess.mark_process_dead(worker.process.pid, metrics_dir)


async def stop_when_orphaned(stop: asyncio.Event) -> None:
    """In a worker: set `stop` (as SIGTERM would) once its supervisor is gone. SIGKILL or the OOM killer
    ends the supervisor alone; a worker left running would route unsupervised beside the workers of the
    supervisor started next under the same names, keep the API port from them, and serve /metrics from a
    directory that supervisor removes. Polled (getppid changes when the parent dies): no Linux-only prctl."""
    supervisor = os.environ.get(SUPERVISOR_PID, "")
    if not supervisor.isdigit():
        return  # a plain `serve` (or a value no supervisor of ours set)
    while os.getppid() == int(supervisor):
        await asyncio.sleep(_ORPHAN_CHECK)
    log.warning("the supervisor is gone; stopping", supervisor=int(supervisor))
    stop.set()
