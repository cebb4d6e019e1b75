"""`decision-router tokens ...` and `decision-router api` as a user runs them: subprocesses,
a real port, real Redis, a SQLite store."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
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


class ApiProcess:
    """`decision-router api` with its own copy of the rules and the file poll off (only SIGHUP or a
    request reloads), its JSON log lines collected as they come."""

    def __init__(self, tmp_path: Path) -> None:
        self.rules = tmp_path / "rules"
        shutil.copytree(ROOT / "rules", self.rules)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.env = clean_env(
            DECISION_ROUTER_REDIS_URL=REDIS_URL,
            DECISION_ROUTER_DATABASE_URL=f"sqlite:///{tmp_path / 'store.db'}",
            DECISION_ROUTER_RULES_DIR=str(self.rules),
            DECISION_ROUTER_STREAM_PREFIX=f"e2e-{uuid.uuid4().hex[:8]}:",
            DECISION_ROUTER_API_PORT=str(port),
            DECISION_ROUTER_RULES_POLL_INTERVAL="0",
        )
        created = run(["tokens", "create", "--role", "ops"], self.env, tmp_path)
        assert created.returncode == 0, created.stderr
        self.ops = created.stdout.strip()
        self.process = subprocess.Popen(
            [*CLI, "api"], env=self.env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            # Unblocked, whatever this test process's mask: the command must block SIGHUP itself.
            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP}),
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True)
        self.reader.start()

    def logged(self, event: str) -> list[dict]:
        events = [json.loads(line) for line in list(self.lines) if line.startswith("{")]
        return [e for e in events if e.get("event") == event]

    def new_hire(self) -> int:
        """GET /v1/stats?owner=new-hire: 422 while its rules lack the owner, 200 once they have it."""
        return get(f"{self.base}/v1/stats?owner=new-hire", self.ops)[0]

    def add_new_hire(self) -> None:
        owners = self.rules / "owners.yaml"
        owners.write_text(owners.read_text() + "  - {id: new-hire, name: New Hire, channels: [inbox]}\n")

    def route_to(self, old: str, new: str) -> None:
        routing = self.rules / "routing.yaml"
        routing.write_text(routing.read_text().replace(f"owner: {old}", f"owner: {new}", 1))

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=20)
        self.reader.join(timeout=5)
        assert self.process.returncode == 0, "".join(self.lines)[-3000:]
        return "".join(self.lines)


@pytest.mark.redis
@pytest.mark.usefixtures("redis_server")
def test_api_rereads_the_rules_on_sighup_and_a_bad_edit_keeps_the_old_ones(tmp_path: Path) -> None:
    api = ApiProcess(tmp_path)
    try:
        wait_for(lambda: up(f"{api.base}/healthz") or api.process.poll() is not None, what="the API to answer")
        assert api.new_hire() == 422
        api.add_new_hire()
        api.route_to("smb-desk", "nobody-here")  # an owner no directory has: the whole edit is refused
        api.process.send_signal(signal.SIGHUP)
        wait_for(lambda: bool(api.logged("rules reload rejected")), what="the bad edit to be refused")
        assert "nobody-here" in api.logged("rules reload rejected")[0]["problem"]
        assert api.new_hire() == 422  # the old rules kept
        api.route_to("nobody-here", "smb-desk")  # mended; the new owner stays
        api.process.send_signal(signal.SIGHUP)
        wait_for(lambda: bool(api.logged("rules reloaded")), what="the good edit to be loaded")
        assert api.new_hire() == 200
    finally:
        log = api.stop()
    assert len(api.logged("SIGHUP: re-reading the rules")) == 2 and len(api.logged("rules reloaded")) == 1
    assert "Traceback" not in log


def sighup_blocked(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        blocked = next(line for line in status if line.startswith("SigBlk:")).split()[1]
    return bool(int(blocked, 16) & (1 << (signal.SIGHUP - 1)))


@pytest.mark.redis
@pytest.mark.usefixtures("redis_server")
def test_a_sighup_while_api_starts_is_acted_on_once_it_can(tmp_path: Path) -> None:
    """SIGHUP's default action ends a process: the `api` command holds it back from its start until its
    handler is installed (as `serve` does), then re-reads the rules once and goes on."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc to see the signal mask")
    api = ApiProcess(tmp_path)
    try:
        # Sent while the command has it blocked: before, that window did not exist, and a SIGHUP ended it.
        wait_for(lambda: api.process.poll() is not None or sighup_blocked(api.process.pid), timeout=30,
                 what="the api command to hold SIGHUP back")
        assert api.process.poll() is None, "".join(api.lines)[-3000:]
        api.process.send_signal(signal.SIGHUP)
        wait_for(lambda: len(api.logged("SIGHUP: re-reading the rules")) == 1 or api.process.poll() is not None,
                 what="the held-back SIGHUP to be acted on")
        wait_for(lambda: up(f"{api.base}/healthz") or api.process.poll() is not None, what="the API to answer")
        assert api.process.poll() is None, "".join(api.lines)[-3000:]
    finally:
        log = api.stop()
    assert len(api.logged("SIGHUP: re-reading the rules")) == 1 and "Traceback" not in log


def test_asyncapi_command_writes_the_document(tmp_path: Path) -> None:
    env = clean_env()
    written = run(["asyncapi", "--out", str(tmp_path / "streams.json")], env, tmp_path)
    assert written.returncode == 0, written.stderr
    assert json.loads((tmp_path / "streams.json").read_text())["asyncapi"] == "3.0.0"
    refused = run(["asyncapi", "--out", str(tmp_path / "streams.txt")], env, tmp_path)
    assert refused.returncode == 2 and "must end in .json, .yaml or .yml" in refused.stderr
