"""`decision-router tokens ...` and `decision-router api` as a user runs them: subprocesses,
a real port, real Redis, a SQLite store."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.e2e.helpers import CLI, ROOT, clean_env, free_port, run, wait_for
from tests.integration.conftest import REDIS_URL, redis_server  # noqa: F401  (the fixture: fail or skip without Redis)


def get(url: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def up(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


@pytest.mark.redis
@pytest.mark.usefixtures("redis_server")
def test_tokens_and_api_server_from_the_command_line(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        DECISION_ROUTER_REDIS_URL=REDIS_URL,
        DECISION_ROUTER_DATABASE_URL=f"sqlite:///{tmp_path / 'store.db'}",
        DECISION_ROUTER_RULES_DIR=str(ROOT / "rules"),
        DECISION_ROUTER_STREAM_PREFIX=f"e2e-{uuid.uuid4().hex[:8]}:",
        DECISION_ROUTER_API_PORT=str(port),
    )
    created = run(["tokens", "create", "--role", "ops", "--name", "grafana"], env, tmp_path)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("drt_") and "shown only now" in created.stderr
    unknown = run(["tokens", "create", "--role", "owner", "--owner", "nobody"], env, tmp_path)
    assert unknown.returncode == 2 and "'nobody' is not in the owner directory" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    listed = json.loads(run(["tokens", "list", "--format", "json"], env, tmp_path).stdout)
    assert [(t["name"], t["role"], t["revoked_at"]) for t in listed] == [("grafana", "ops", None)]
    assert token not in json.dumps(listed)

    server = subprocess.Popen(
        [*CLI, "api"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: up(f"{base}/healthz"), what="the API to answer /healthz")
        assert get(f"{base}/readyz") == (
            200,
            {"status": "ready", "checks": {"redis": "ok", "database": "ok", "rules": "ok"}},
        )
        assert get(f"{base}/v1/whoami", token) == (200, {"role": "ops", "owner": None})
        assert get(f"{base}/v1/alerts")[0] == 401
        revoked = run(["tokens", "revoke", listed[0]["id"]], env, tmp_path)
        assert revoked.returncode == 0, revoked.stderr
        assert get(f"{base}/v1/whoami", token)[0] == 401  # at once, in the running server
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=20)
    assert server.returncode == 0, err
    assert "Traceback" not in err + out
    assert "http api listening" in out + err and "http api stopped" in out + err


@pytest.mark.redis
@pytest.mark.usefixtures("redis_server")
def test_api_refuses_a_taken_port_with_one_clear_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = clean_env(
            DECISION_ROUTER_REDIS_URL=REDIS_URL,
            DECISION_ROUTER_DATABASE_URL=f"sqlite:///{tmp_path / 'store.db'}",
            DECISION_ROUTER_RULES_DIR=str(ROOT / "rules"),
        )
        port = taken.getsockname()[1]
        result = run(["api", "--port", str(port)], env, tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.rstrip().endswith("; set --port or DECISION_ROUTER_API_PORT to a free port")


def test_asyncapi_command_writes_the_document(tmp_path: Path) -> None:
    env = clean_env()
    written = run(["asyncapi", "--out", str(tmp_path / "streams.json")], env, tmp_path)
    assert written.returncode == 0, written.stderr
    assert json.loads((tmp_path / "streams.json").read_text())["asyncapi"] == "3.0.0"
    refused = run(["asyncapi", "--out", str(tmp_path / "streams.txt")], env, tmp_path)
    assert refused.returncode == 2 and "must end in .json, .yaml or .yml" in refused.stderr
