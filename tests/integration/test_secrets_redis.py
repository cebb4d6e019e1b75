"""Secrets and access on real servers: the service routes a batch end to end through a
password-protected Redis and through Redis over TLS (private redis-server processes on free
ports, never the shared one), and no password reaches logs, error messages or CLI output
when the password is wrong or a server is unreachable."""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from decision_router.keys import Keys
from decision_router.logs import configure_logging
from decision_router.rules import RuleSet
from decision_router.service import running_service
from decision_router.settings import Settings
from decision_router.store import create_schema, make_engine
from tests.conftest import unavailable
from tests.integration.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
WRONG = "wrong-Pa55-also-secret"

# -- private redis-server processes -----------------------------------------------------------

PASSWORD = "s3cret-Pa55-do-not-log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a CA and a certificate for 127.0.0.1 / localhost, valid for a day."""
    now = dt.datetime.now(dt.UTC)
    ca_key, server_key = _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "decision-router test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        _pem(directory / "ca.pem", ca.public_bytes(pem)),
        _pem(directory / "server.pem", server.public_bytes(pem)),
        _pem(directory / "server.key", server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                 serialization.NoEncryption())),
    )


@dataclass(frozen=True)
class PrivateRedis:
    url: str  # with the password (and TLS options)
    port: int
    log: Path


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def supports_tls(binary: str) -> bool:
    """Debian's redis-server is built with TLS; a build without it refuses --tls-port."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    linked = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=10, check=False).stdout
    return "libssl" in linked or "tls" in out.lower()


@contextmanager
def private_redis(directory: Path, *, tls: bool = False) -> Iterator[PrivateRedis]:
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = directory / "redis.log"
    args = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory),
            "--logfile", str(log), "--requirepass", PASSWORD]
    if tls:
        ca, cert, key = make_certificates(directory)
        args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                 "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    else:
        args += ["--port", str(port)]
        url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {process.stderr.read().decode()} {log.read_text() if log.exists() else ''}")
            try:
                client = redis.Redis.from_url(url, socket_connect_timeout=1)
                client.ping()
                client.close()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield PrivateRedis(url=url, port=port, log=log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- tests --------------------------------------------------------------------------------------


def _server(tmp_path_factory: pytest.TempPathFactory, *, tls: bool) -> Iterator[PrivateRedis]:
    binary = redis_server_binary()
    if binary is None or (tls and not supports_tls(binary)):
        unavailable("a redis-server binary" + (" built with TLS" if tls else ""), RuntimeError("not installed"))
    with private_redis(tmp_path_factory.mktemp("tls" if tls else "password"), tls=tls) as server:
        yield server


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    yield from _server(tmp_path_factory, tls=False)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    yield from _server(tmp_path_factory, tls=True)


def prediction(pid: str) -> dict[str, str]:
    document = {
        "prediction_id": pid, "model": "churn", "model_version": "2026.11", "entity_type": "account",
        "entity_id": f"acct-{pid}", "score": 0.93,
        "predicted_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
        "context": {"segment": "enterprise", "account_manager": "alice-moreau", "arr": 120000},
    }
    return {"data": json.dumps(document)}


def cli(args: list[str], tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    env.update(DECISION_ROUTER_LOG_FORMAT="json", DECISION_ROUTER_RULES_DIR=str(ROOT / "rules"),
               DECISION_ROUTER_API_PORT="0",  # `serve` also serves the API: never on a busy 8080
               DECISION_ROUTER_DATABASE_URL=f"sqlite:///{tmp_path / 'store.db'}")
    env.update(settings)
    return subprocess.run([sys.executable, "-m", "decision_router", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text and WRONG not in text, text[-2000:]


@pytest.mark.parametrize("server", ["password_redis", "tls_redis"])
async def test_service_routes_a_batch_through_a_password_and_a_tls_redis(
    server: str, request: pytest.FixtureRequest, ruleset: RuleSet, tmp_path: Path
) -> None:
    private: PrivateRedis = request.getfixturevalue(server)
    logs = io.StringIO()
    configure_logging(fmt="json", level="debug", stream=logs)
    prefix = f"sec-{uuid.uuid4().hex[:8]}:"
    settings = Settings(redis_url=private.url, stream_prefix=prefix, consumer_name="worker-1", batch_size=50)
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    keys = Keys(prefix)
    producer = redis.Redis.from_url(private.url, decode_responses=True)
    try:
        async with running_service(settings, ruleset, engine):
            for i in range(3):
                producer.xadd(keys.predictions, prediction(f"{server}-{i}"))
            producer.xadd(keys.predictions, {"data": "{not json"})
            await wait_until(lambda: producer.xlen(keys.inbox("alice-moreau")) == 3, what="3 alerts in the inbox")
            await wait_until(lambda: producer.xlen(keys.predictions_dlq) == 1, what="the bad entry in the DLQ")
        [(_, dead)] = producer.xrange(keys.predictions_dlq)
        assert dead["reason"] == "invalid_json"
        if server == "tls_redis":
            # The server only speaks TLS: a plain connection to the same port gets nowhere.
            with pytest.raises(redis.RedisError):
                redis.Redis(port=private.port, password=PASSWORD, socket_timeout=2).ping()
    finally:
        producer.close()
        engine.dispose()
        structlog.reset_defaults()
    written = logs.getvalue()
    assert '"batch routed"' in written  # the logs were captured...
    assert ":***@127.0.0.1" in written  # ...the service logged where it connects, masked...
    assert_no_secret(written)  # ...and the password is nowhere


@pytest.mark.parametrize("command", [["health"], ["outcome", "acknowledged", "--alert", "al-1", "--actor", "me"],
                                     ["serve"]], ids=["health", "outcome", "serve"])
def test_a_wrong_redis_password_is_a_clear_error_without_the_password(
    password_redis: PrivateRedis, tmp_path: Path, command: list[str]
) -> None:
    result = cli(command, tmp_path, DECISION_ROUTER_REDIS_URL=password_redis.url.replace(PASSWORD, WRONG))
    assert result.returncode == 1
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{password_redis.port}/0" in result.stderr
    assert "invalid username-password pair" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_secret(result.stdout, result.stderr)


def test_serve_with_redis_down_at_start_is_one_clear_line(tmp_path: Path) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"  # nothing listens there
    result = cli(["serve"], tmp_path, DECISION_ROUTER_REDIS_URL=url)
    assert result.returncode == 1
    assert "cannot reach Redis at redis://:***@127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_secret(result.stdout, result.stderr)


def test_tls_verifies_the_server_certificate(tls_redis: PrivateRedis, tmp_path: Path) -> None:
    # Without the test CA, the self-signed chain is refused: verification is really on.
    url = tls_redis.url.split("&ssl_ca_certs=")[0]
    result = cli(["health"], tmp_path, DECISION_ROUTER_REDIS_URL=url)
    assert result.returncode == 1
    assert "cannot reach Redis at rediss://:***@" in result.stderr and "certificate verify failed" in result.stderr
    assert_no_secret(result.stdout, result.stderr)
    (tmp_path / "store.db").touch()  # `health` reports a missing store as such (it never creates one)
    ok = cli(["health"], tmp_path, DECISION_ROUTER_REDIS_URL=tls_redis.url)
    assert ok.returncode == 0, ok.stderr
    assert_no_secret(ok.stdout, ok.stderr)


def test_an_unreachable_database_is_reported_without_its_password(password_redis: PrivateRedis, tmp_path: Path) -> None:
    database = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/test"  # nothing listens there
    outputs = []
    for command in (["stats"], ["health"], ["serve"]):
        result = cli(command, tmp_path, DECISION_ROUTER_REDIS_URL=password_redis.url,
                     DECISION_ROUTER_DATABASE_URL=database)
        assert result.returncode != 0, command
        outputs += [result.stdout, result.stderr]
    assert "cannot read the store at postgresql+psycopg://postgres:***@127.0.0.1" in outputs[1]
    assert "cannot open the store at postgresql+psycopg://postgres:***@127.0.0.1" in outputs[5]  # serve
    assert not any("Traceback" in output for output in outputs)
    assert_no_secret(*outputs)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DECISION_ROUTER_REDIS_URL", f"http://:{PASSWORD}@127.0.0.1:1/0", "must start with redis://"),
        ("DECISION_ROUTER_DATABASE_URL", f"mysql://root:{PASSWORD}@127.0.0.1/db", "must be a sqlite:///"),
    ],
)
def test_settings_errors_do_not_echo_the_url(tmp_path: Path, variable: str, value: str, message: str) -> None:
    result = cli(["health"], tmp_path, **{variable: value})
    assert result.returncode == 2
    assert f"{variable}: {message}" in result.stderr
    assert_no_secret(result.stdout, result.stderr)
