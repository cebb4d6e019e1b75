"""Running the HTTP API: next to the consumers in `serve`, or alone in `decision-router api`.

uvicorn serves the app inside our event loop. Its own signal handling is turned off: the
process owner (service.serve or the `api` command) handles SIGINT/SIGTERM and stops the
server, so one signal stops consumers and API together, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy.engine import Engine

from decision_router import tallies
from decision_router.api.app import create_app
from decision_router.api.listen import ApiStartError, bind_api_socket
from decision_router.keys import Keys
from decision_router.reloads import Job, RulesFollower, finish_tasks, run_every
from decision_router.rules import RuleSet, RulesWatcher
from decision_router.settings import Settings

log = structlog.get_logger("decision_router.api")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # signals belong to the process owner, see the module docstring


class ApiServer:
    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app, self.host, self.requested_port = app, host, port
        self.port = port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Bind here, not in uvicorn, so a taken port is a clear error rather than sys.exit.
        sock = bind_api_socket(self.host, self.requested_port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", server_header=False)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-api")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise ApiStartError(f"the API on {self.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.01)
        log.info(
            "http api listening", url=f"http://{self.host}:{self.port}", docs=f"http://{self.host}:{self.port}/docs"
        )

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        log.info("http api stopped")


@contextlib.asynccontextmanager
async def api_running(
    settings: Settings,
    *,
    engine: Engine,
    redis: Redis,
    ruleset: Callable[[], RuleSet],
    reload_rules: Callable[[], Any] | None = None,
    reload_origin: str | None = None,
    pipeline: Any = None,
    port: int | None = None,
) -> AsyncIterator[ApiServer]:
    app = create_app(
        settings, engine=engine, redis=redis, ruleset=ruleset, reload_rules=reload_rules,
        reload_origin=reload_origin, pipeline=pipeline,
    )
    server = ApiServer(app, settings.api_host, settings.api_port if port is None else port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def api_for_service(service: Any, engine: Engine, *, enabled: bool = True) -> AsyncIterator[ApiServer | None]:
    """`serve`: the API shares the running service's pipeline, so actions use its channels
    and its current rules, and POST /v1/rules/reload is the SIGHUP reload."""
    if not enabled:
        yield None
        return
    pipeline = service.pipeline
    async with api_running(
        pipeline.settings,
        engine=engine,
        redis=pipeline.redis,
        ruleset=lambda: pipeline.ruleset,
        reload_rules=lambda: service.check_rules(force=True),
        reload_origin=service.instance,
        pipeline=pipeline,
    ) as server:
        yield server


class _Rules:
    """What the standalone API's follower swaps: the rules its requests read (the app's own pipeline
    follows them, api/actions.py)."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset


async def run_api(settings: Settings, ruleset: RuleSet, engine: Engine, redis: Redis, stop: asyncio.Event) -> None:
    """`decision-router api`: the API alone (the consumers run elsewhere), until `stop`. It follows rule
    changes as `serve` does (reloads.py): the file poll, SIGHUP (held back by the `api` command until
    the handler is here), and reload requests any process publishes on `<prefix>rules:reload`."""
    current = _Rules(ruleset)
    rules = RulesFollower(RulesWatcher(settings.rules_dir, ruleset), current, redis=redis,
                          keys=Keys(settings.stream_prefix), stopping=stop, log=log)
    tasks: list[asyncio.Task[None]] = []

    def every(name: str, interval: float, job: Job) -> None:
        tasks.append(asyncio.create_task(run_every(name, interval, job, stop, log), name=name))

    def reload_now() -> None:  # SIGHUP: the task kept (the loop holds only a weak reference), waited for at stop
        tasks[:] = [t for t in tasks if not (t.done() and t.get_name() == "rules-sighup")] + [rules.reload_now()]

    if engine.dialect.name == "postgresql":
        # `serve` folds the stats' running counts; a deployment whose stats are read by this API alone (or
        # whose `serve` is down while the API acks) would otherwise sum ever more rows (tallies.py). Several
        # folding processes are safe: a fold already running makes the others skip.
        every("tallies", tallies.FOLD_INTERVAL_S, lambda: asyncio.to_thread(tallies.fold_tallies, engine))
    try:
        # Subscribed before listening: a reload requested once the API answers reaches it.
        await rules.start(every, settings.rules_poll_interval.total_seconds())
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_now)
        # One held back while starting (the `api` command blocks it first) is delivered now, to it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        async with api_running(settings, engine=engine, redis=redis, ruleset=lambda: current.ruleset,
                               reload_rules=lambda: rules.check(force=True), reload_origin=rules.instance):
            await stop.wait()
            log.info("stopping")
    finally:
        stop.set()
        await finish_tasks(tasks, settings.shutdown_timeout.total_seconds(), log)
