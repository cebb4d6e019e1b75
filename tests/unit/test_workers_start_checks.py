"""`serve --workers N` with the API port taken, or Redis out of reach: refused at start, as a single
`serve` refuses them (exit 1, one line saying what to do).

The workers found these only once started: worker 1 the taken port (after routing a batch), every
worker the unreachable Redis. Each exited 1, and the supervisor restarted it, 1 s then 2, 4 ... 30 s
apart, forever: the error line scrolled by between restarts, and nothing was ever routed or served."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from decision_router import workers
from decision_router.api.listen import ApiStartError
from decision_router.settings import Settings
from tests.e2e.helpers import clean_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_the_supervisor_refuses_a_taken_api_port_before_starting_any_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken_port: int
) -> None:
    spawned: list[str] = []
    monkeypatch.setattr(workers, "_spawn", lambda worker: spawned.append(worker.name))
    monkeypatch.setattr(workers, "load_rules", lambda _directory: None)
    settings = Settings(redis_url="redis://127.0.0.1:1/0", database_url=f"sqlite:///{tmp_path / 'store.db'}",
                        api_port=taken_port)
    with pytest.raises(ApiStartError, match=f"cannot listen on 127.0.0.1:{taken_port}"):
        workers.run_workers(settings, 2, api=True)
    assert spawned == []


def test_the_api_port_is_not_checked_without_the_api_or_when_any_free_port_will_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken_port: int
) -> None:
    def spawn(worker: workers._Worker) -> None:
        worker.process = subprocess.Popen(["true"])
        worker.process.wait()
        workers.signal.raise_signal(workers.signal.SIGTERM)  # stop the supervisor at once

    async def no_redis(_settings: Settings) -> None:
        pass

    monkeypatch.setattr(workers, "_spawn", spawn)
    monkeypatch.setattr(workers, "load_rules", lambda _directory: None)
    monkeypatch.setattr(workers, "_ensure_groups", no_redis)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert workers.run_workers(Settings(redis_url="redis://127.0.0.1:1/0", database_url=store, api_port=taken_port),
                               1, api=False) == 0
    assert workers.run_workers(Settings(redis_url="redis://127.0.0.1:1/0", database_url=store, api_port=0),
                               1, api=True) == 0


@pytest.mark.timeout(60)
def test_serve_workers_with_the_api_port_taken_exits_1_and_says_how_to_pick_another(
    tmp_path: Path, taken_port: int
) -> None:
    env = clean_env(
        DECISION_ROUTER_REDIS_URL="redis://127.0.0.1:1/0",  # never reached: the port is checked first
        DECISION_ROUTER_DATABASE_URL=f"sqlite:///{tmp_path / 'store.db'}",
        DECISION_ROUTER_RULES_DIR=str(ROOT / "rules"),
        DECISION_ROUTER_API_PORT=str(taken_port),
    )
    try:
        done = subprocess.run([sys.executable, "-m", "decision_router", "serve", "--workers", "2"], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"still running after 30 s, restarting its first worker:\n{exc.stderr}")
    assert done.returncode == 1, done.stderr
    assert f"error: cannot listen on 127.0.0.1:{taken_port}" in done.stderr
    assert "--api-port" in done.stderr and "--no-api" in done.stderr
    assert "Traceback" not in done.stderr
    assert "workers started" not in done.stderr


def test_the_supervisor_refuses_an_unreachable_redis_before_starting_any_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned: list[str] = []
    monkeypatch.setattr(workers, "_spawn", lambda worker: spawned.append(worker.name))
    monkeypatch.setattr(workers, "load_rules", lambda _directory: None)
    settings = Settings(redis_url="redis://127.0.0.1:1/0", database_url=f"sqlite:///{tmp_path / 'store.db'}")
    with pytest.raises(RedisConnectionError):
        workers.run_workers(settings, 2, api=False)
    assert spawned == []


@pytest.mark.timeout(60)
def test_serve_workers_with_redis_out_of_reach_exits_1_and_names_it(tmp_path: Path) -> None:
    env = clean_env(
        DECISION_ROUTER_REDIS_URL="redis://127.0.0.1:1/0",
        DECISION_ROUTER_DATABASE_URL=f"sqlite:///{tmp_path / 'store.db'}",
        DECISION_ROUTER_RULES_DIR=str(ROOT / "rules"),
    )
    try:
        done = subprocess.run([sys.executable, "-m", "decision_router", "serve", "--workers", "2", "--no-api"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"still running after 30 s, restarting its workers:\n{exc.stderr}")
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("error: cannot reach Redis at redis://127.0.0.1:1/0") == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "workers started" not in done.stderr
