"""Email delivery against a real SMTP server (aiosmtpd) on 127.0.0.1, a free port; plain
SMTP, STARTTLS with a certificate made in the test, and SMTP AUTH over STARTTLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from decision_router.channels.config import EmailReceiver, SmtpSettings
from decision_router.channels.dispatcher import Dispatcher
from decision_router.channels.render import Renderer
from decision_router.channels.send import DeliveryResult, EmailSender
from tests.unit.test_channels_render import make_alert

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}
SENDER = "Decision Router <alerts@router.example.com>"


@dataclass
class Mailbox:
    """The aiosmtpd handler: keeps what it receives; can answer with scripted errors."""

    messages: list[tuple[str, list[str], EmailMessage]] = field(default_factory=list)
    # Replies for the next DATA commands, in order (e.g. "451 4.3.0 try again later").
    script: list[str] = field(default_factory=list)
    # Seconds each DATA takes, to make overlapping sessions observable.
    delay: float = 0.0
    active: int = 0
    peak: int = 0

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        if self.script:
            return self.script.pop(0)
        self.active += 1  # one server thread and loop: no lock needed
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        content = envelope.original_content or envelope.content
        assert isinstance(content, bytes)
        message = message_from_bytes(content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append((envelope.mail_from or "", list(envelope.rcpt_tos), message))
        return "250 2.0.0 OK"


class _FreePortController(Controller):
    """aiosmtpd's Controller on port 0: learn the port the OS chose before it self-connects."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., tuple[Mailbox, int]]]:
    """Starts SMTP servers on free loopback ports; `start(**smtp_options)`."""
    controllers: list[Controller] = []

    def start(**options: Any) -> tuple[Mailbox, int]:
        mailbox = Mailbox()
        controller = _FreePortController(mailbox, hostname="127.0.0.1", port=0, **options)
        controller.start()
        controllers.append(controller)
        return mailbox, controller.port

    yield start
    for controller in controllers:
        controller.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "decision-router test SMTP")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_file, key_file


def server_tls_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    return context


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


@pytest.fixture
async def senders(renderer: Renderer) -> Any:
    made: list[EmailSender] = []

    def make(port: int, to: list[str] | None = None, *, smtp: dict[str, Any] | None = None, **options: Any) -> EmailSender:
        settings = SmtpSettings(**{"host": "127.0.0.1", "port": port, "sender": SENDER, "timeout_s": 5.0, **(smtp or {})})
        receiver = EmailReceiver(to=to or ["alice.moreau@example.com"], **{"max_attempts": 3, "timeout_s": 5.0, **FAST, **options})
        sender = EmailSender("alice-moreau:email", receiver, settings, renderer)
        made.append(sender)
        return sender

    yield make
    for sender in made:
        await sender.aclose()


def parts(message: EmailMessage) -> dict[str, str]:
    return {part.get_content_type(): part.get_content() for part in message.iter_parts()}


# --- tests ---------------------------------------------------------------------------


async def test_multipart_email_reaches_the_server(smtp_server: Any, senders: Any) -> None:
    mailbox, port = smtp_server()
    alert = make_alert()
    result = await senders(port, ["alice.moreau@example.com", "desk@example.com"]).send(alert)
    assert (result.ok, result.attempts, result.status_code, result.error, result.channel) == (True, 1, 250, None, "email")
    [(mail_from, rcpt_tos, message)] = mailbox.messages
    assert mail_from == "alerts@router.example.com"
    assert rcpt_tos == ["alice.moreau@example.com", "desk@example.com"]
    assert message["From"] == SENDER
    assert message["To"] == "alice.moreau@example.com, desk@example.com"
    assert message["Subject"] == "[HIGH] enterprise-churn-risk: account acct-17 scored 0.91"
    assert message["Message-ID"] == f"<{alert.alert_id}.alice-moreau@router.example.com>"
    assert message["X-Decision-Router-Alert"] == alert.alert_id
    assert message.get_content_type() == "multipart/alternative"
    bodies = parts(message)
    assert list(bodies) == ["text/plain", "text/html"]
    for body in bodies.values():
        assert "acct-17" in body and "0.91" in body and "enterprise-churn-risk" in body


async def test_html_part_is_escaped(smtp_server: Any, senders: Any) -> None:
    mailbox, port = smtp_server()
    result = await senders(port).send(make_alert(entity_id="<script>alert('x')</script>"))
    assert result.ok
    bodies = parts(mailbox.messages[0][2])
    assert "<script>" not in bodies["text/html"]
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in bodies["text/html"]
    assert "<script>alert('x')</script>" in bodies["text/plain"]  # plain text is not HTML
    assert "<script>" in mailbox.messages[0][2]["Subject"]  # nor is a header


async def test_transient_4xx_is_retried(smtp_server: Any, senders: Any) -> None:
    mailbox, port = smtp_server()
    mailbox.script = ["451 4.3.0 try again later", "421 4.7.0 too busy"]
    result = await senders(port, max_attempts=4).send(make_alert())
    assert (result.ok, result.attempts, result.status_code) == (True, 3, 250)
    assert [(a.status_code, a.retryable) for a in result.attempt_log] == [(451, True), (421, True), (250, False)]
    assert len(mailbox.messages) == 1


async def test_permanent_5xx_is_not_retried(smtp_server: Any, senders: Any) -> None:
    mailbox, port = smtp_server()
    mailbox.script = ["554 5.7.1 rejected by policy"]
    result = await senders(port, max_attempts=4).send(make_alert())
    assert (result.ok, result.attempts, result.status_code, result.retryable) == (False, 1, 554, False)
    assert result.error is not None and "rejected by policy" in result.error
    assert mailbox.messages == []


async def test_no_server_is_retried_then_reported(senders: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await senders(port, max_attempts=2).send(make_alert())
    assert (result.ok, result.attempts, result.status_code, result.retryable) == (False, 2, None, True)
    assert result.error is not None and "SMTPConnectError" in result.error


async def test_starttls_with_a_verified_certificate(smtp_server: Any, senders: Any, tls_files: tuple[Path, Path]) -> None:
    mailbox, port = smtp_server(tls_context=server_tls_context(tls_files), require_starttls=True)
    result = await senders(port, smtp={"starttls": True, "ca_file": tls_files[0]}).send(make_alert())
    assert result.ok, result.error
    assert len(mailbox.messages) == 1


async def test_plain_smtp_to_a_server_requiring_starttls_fails_permanently(smtp_server: Any, senders: Any, tls_files: tuple[Path, Path]) -> None:
    mailbox, port = smtp_server(tls_context=server_tls_context(tls_files), require_starttls=True)
    result = await senders(port, smtp={"starttls": False}).send(make_alert())
    assert (result.ok, result.attempts, result.status_code, result.retryable) == (False, 1, 530, False)
    assert mailbox.messages == []


async def test_starttls_with_an_untrusted_certificate_fails_permanently(smtp_server: Any, senders: Any, tls_files: tuple[Path, Path]) -> None:
    _, port = smtp_server(tls_context=server_tls_context(tls_files), require_starttls=True)
    result = await senders(port, smtp={"starttls": True}).send(make_alert())  # system CAs only
    assert not result.ok and result.attempts == 1 and not result.retryable
    assert result.error is not None and "CERTIFICATE_VERIFY_FAILED" in result.error


async def test_starttls_required_but_not_offered_fails_permanently(smtp_server: Any, senders: Any) -> None:
    _, port = smtp_server()  # no TLS at all
    result = await senders(port, smtp={"starttls": True}).send(make_alert())
    assert (result.ok, result.attempts, result.retryable) == (False, 1, False)
    assert result.error is not None and "STARTTLS" in result.error


def _authenticator(server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"router", b"s3cret-pw")
    return AuthResult(success=ok, handled=False)


async def test_login_over_starttls(smtp_server: Any, senders: Any, tls_files: tuple[Path, Path]) -> None:
    mailbox, port = smtp_server(tls_context=server_tls_context(tls_files), require_starttls=True, authenticator=_authenticator, auth_required=True)
    tls = {"starttls": True, "ca_file": tls_files[0]}
    good = await senders(port, smtp={**tls, "username": "router", "password": "s3cret-pw"}).send(make_alert())
    assert good.ok, good.error
    bad = await senders(port, smtp={**tls, "username": "router", "password": "wrong"}, max_attempts=3).send(make_alert())
    assert (bad.ok, bad.attempts, bad.status_code, bad.retryable) == (False, 1, 535, False)
    assert "s3cret-pw" not in bad.model_dump_json() and "wrong" not in (bad.error or "")
    assert len(mailbox.messages) == 1


async def test_dispatcher_bounds_smtp_connections_across_email_receivers(smtp_server: Any) -> None:
    mailbox, port = smtp_server()
    mailbox.delay = 0.02
    results: list[DeliveryResult] = []
    smtp = SmtpSettings(host="127.0.0.1", port=port, sender=SENDER, max_connections=2)
    receivers = {f"owner-{i}:email": EmailReceiver(to=[f"owner-{i}@example.com"], **FAST) for i in range(3)}
    dispatcher = Dispatcher.from_config(receivers, smtp=smtp, on_result=lambda a, r, attempts: results.append(r))
    try:
        for i in range(3):
            for j in range(4):
                assert await dispatcher.submit(f"owner-{i}:email", make_alert(alert_id=f"al-{i}-{j}", owner=f"owner-{i}"))
        await dispatcher.drain()
    finally:
        await dispatcher.close()
    assert len(results) == 12 and all(r.ok and r.attempts == 1 for r in results)
    assert sorted(rcpt[0] for _, rcpt, _ in mailbox.messages) == sorted(f"owner-{i}@example.com" for i in range(3) for _ in range(4))
    # 3 receivers x 2 workers could hold 6 connections; SmtpSettings.max_connections is 2.
    assert mailbox.peak == 2
