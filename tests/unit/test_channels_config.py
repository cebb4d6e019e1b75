"""Receiver configuration: defaults, validation, and secrets that never show."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from decision_router.channels.config import EmailReceiver, SmtpSettings, WebhookReceiver, parse_receiver

SECRET = "whsec-very-secret-value"


def test_webhook_defaults() -> None:
    r = WebhookReceiver(url="https://hooks.example.com/alerts")
    assert (r.format, r.timeout_s, r.max_attempts, r.backoff_initial_s, r.backoff_max_s, r.max_concurrency, r.max_queue) == (
        "json", 5.0, 5, 0.5, 30.0, 4, 1000,
    )
    assert r.secret is None and r.headers == {} and r.channel == "webhook"


def test_secrets_never_show_in_repr_str_or_json() -> None:
    r = WebhookReceiver(url="https://hooks.example.com/T0/B0/tok", secret=SECRET, headers={"Authorization": "Bearer tok-123"})
    for text in (repr(r), str(r), r.model_dump_json(), str(r.model_dump())):
        assert SECRET not in text and "tok-123" not in text
    assert "hooks.example.com/T0" not in repr(r)  # a Slack webhook URL is a credential too
    assert r.redacted_url == "https://hooks.example.com/…"
    assert r.secret is not None and r.secret.get_secret_value() == SECRET
    smtp = SmtpSettings(host="smtp.example.com", sender="alerts@example.com", username="u", password="smtp-pass-1")
    assert "smtp-pass-1" not in repr(smtp) + smtp.model_dump_json()


def test_secret_file_is_read_at_load(tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_text(SECRET + "\n")
    r = WebhookReceiver(url="https://h.example.com/", secret_file=tmp_path / "hook.secret")
    assert r.secret is not None and r.secret.get_secret_value() == SECRET
    # relative to the directory given in the validation context (e.g. the rules dir)
    relative = parse_receiver({"channel": "webhook", "url": "https://h.example.com/", "secret_file": "hook.secret"}, base_dir=tmp_path)
    assert isinstance(relative, WebhookReceiver) and relative.secret is not None and relative.secret.get_secret_value() == SECRET


def test_secret_file_errors_name_the_path_not_the_content(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read secret file .*missing.secret"):
        WebhookReceiver(url="https://h.example.com/", secret_file=tmp_path / "missing.secret")
    (tmp_path / "empty.secret").write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        WebhookReceiver(url="https://h.example.com/", secret_file=tmp_path / "empty.secret")
    (tmp_path / "ok.secret").write_text(SECRET)
    with pytest.raises(ValidationError, match="either secret or secret_file") as caught:
        WebhookReceiver(url="https://h.example.com/", secret="inline-secret", secret_file=tmp_path / "ok.secret")
    assert "inline-secret" not in str(caught.value) and SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"url": "ftp://h.example.com/"}, "URL scheme should be 'http' or 'https'"),
        ({"url": "https://user:pw@h.example.com/"}, "not in the URL"),
        ({"format": "teams"}, "'json' or 'slack'"),
        ({"headers": {"Content-Type": "text/plain"}}, "set by the sender"),
        ({"headers": {"X-Decision-Router-Signature": "v1=0"}}, "set by the sender"),
        ({"headers": {"X-Ok": "a\r\nInjected: 1"}}, "line break"),
        ({"headers": {"Bad Name": "x"}}, "invalid header name"),
        ({"backoff_initial_s": 5, "backoff_max_s": 1}, "backoff_max_s must be >= backoff_initial_s"),
        ({"max_attempts": 0}, "greater than or equal to 1"),
        ({"timeout_s": 0}, "greater than 0"),
        ({"max_queue": 0}, "greater than or equal to 1"),
        ({"retries": 3}, "Extra inputs are not permitted"),
    ],
)
def test_webhook_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WebhookReceiver(**{"url": "https://h.example.com/", **changes})


def test_email_receiver() -> None:
    r = EmailReceiver(to=["alice.moreau@example.com", "desk@example.com"])
    assert r.channel == "email" and r.max_concurrency == 2
    with pytest.raises(ValidationError, match="email address"):
        EmailReceiver(to=["not-an-address"])
    with pytest.raises(ValidationError, match="email address"):
        EmailReceiver(to=["a@example.com>, evil@example.com"])
    with pytest.raises(ValidationError, match="at least 1 item"):
        EmailReceiver(to=[])


def test_parse_receiver_picks_the_model_by_channel() -> None:
    assert isinstance(parse_receiver({"channel": "email", "to": ["a@example.com"]}), EmailReceiver)
    assert isinstance(parse_receiver({"channel": "webhook", "url": "https://h.example.com/", "format": "slack"}), WebhookReceiver)
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        parse_receiver({"channel": "pager", "to": ["a@example.com"]})


def test_smtp_settings(tmp_path: Path) -> None:
    s = SmtpSettings(host="127.0.0.1", sender="Decision Router <alerts@example.com>")
    assert (s.port, s.starttls, s.use_tls, s.timeout_s, s.password) == (25, False, False, 10.0, None)
    (tmp_path / "smtp.pw").write_text("pw-from-file\n")
    s = SmtpSettings(host="h", sender="a@example.com", username="u", password_file=tmp_path / "smtp.pw")
    assert s.password is not None and s.password.get_secret_value() == "pw-from-file"
    with pytest.raises(ValidationError, match="exclusive"):
        SmtpSettings(host="h", sender="a@example.com", starttls=True, use_tls=True)
    with pytest.raises(ValidationError, match="password needs username"):
        SmtpSettings(host="h", sender="a@example.com", password="x")
    with pytest.raises(ValidationError, match="From address"):
        SmtpSettings(host="h", sender="alerts")
    with pytest.raises(ValidationError, match="From address"):
        SmtpSettings(host="h", sender="a@example.com\r\nBcc: x@example.com")


def test_a_webhook_disabled_at_start_is_logged_without_its_url(tmp_path: Path) -> None:
    """The receiver's validation error quoted its input, the owner's webhook URL (a Slack or Teams token sits in
    its path), in the `channel disabled` warning; an Owner's repr showed it too."""
    from decision_router.notify import build_receivers
    from decision_router.rules import load_rules

    url = "https://hooks.slack.com/services/T0/B0/s3cret-token"
    (tmp_path / "routing.yaml").write_text("rules:\n  - {name: rest, when: {}, owner: desk}\n")
    (tmp_path / "owners.yaml").write_text(
        f"owners:\n  - {{id: desk, name: Desk, channels: [webhook],"
        f" webhook: {{url: '{url}', secret_file: hook.key}}}}\n")
    (tmp_path / "hook.key").write_text(SECRET)
    ruleset = load_rules(tmp_path)
    assert "s3cret-token" not in repr(ruleset.owners["desk"])
    (tmp_path / "hook.key").unlink()  # gone between `rules check` and the start
    receivers, warnings = build_receivers(ruleset, None)
    assert receivers == {}
    assert len(warnings) == 1 and warnings[0].startswith("webhook of desk disabled: cannot read secret file "), warnings
    assert "s3cret" not in warnings[0] and "hooks.slack" not in warnings[0] and "input_value" not in warnings[0]


async def test_the_smtp_warning_is_logged_once_not_on_every_rules_reload(tmp_path: Path) -> None:
    """Logged at start and again only when it becomes true anew, not on each reload while it stays true."""
    from structlog.testing import capture_logs

    from decision_router.notify import ChannelDelivery
    from decision_router.rules import load_rules
    from decision_router.settings import Settings

    def owners(channels: str) -> Path:
        (tmp_path / "routing.yaml").write_text("rules:\n  - {name: rest, when: {}, owner: desk}\n")
        (tmp_path / "owners.yaml").write_text(
            f"owners:\n  - {{id: desk, name: Desk, email: desk@example.com, channels: [{channels}]}}\n")
        return tmp_path

    unset = "owners use the email channel but DECISION_ROUTER_SMTP_HOST is unset: email is not sent"
    with capture_logs() as logs:
        delivery = ChannelDelivery(settings=Settings(), ruleset=load_rules(owners("inbox, email")), engine=None,
                                   redis=None, clock=None)
        for _ in range(3):  # SIGHUP, POST /v1/rules/reload, a poll that saw an edit
            await delivery.reconfigure(load_rules(owners("inbox, email")))
        assert [e["reason"] for e in logs if e["event"] == "channel disabled"] == [unset]
        await delivery.reconfigure(load_rules(owners("inbox")))  # no owner uses email: nothing to warn about
        await delivery.reconfigure(load_rules(owners("inbox, email")))  # newly true again
        await delivery.close()
    assert [e["reason"] for e in logs if e["event"] == "channel disabled"] == [unset, unset]
