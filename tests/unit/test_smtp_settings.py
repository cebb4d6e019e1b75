"""The email channel's settings (DECISION_ROUTER_SMTP_*) as README "Configuration" documents them: the
defaults work once DECISION_ROUTER_SMTP_HOST is set, and a bad value or combination stops `serve`, `api` and `redrive deliveries`
at start with exit 2 and one line naming the variables, not a pydantic traceback from the channel."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from decision_router import cli
from decision_router.notify import smtp_settings
from decision_router.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_sender_is_one_the_email_channel_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    # README: DECISION_ROUTER_SMTP_SENDER defaults to decision-router@localhost; setting only the host
    # turns email on. The channel refused that default, so `serve` stopped at start.
    monkeypatch.setenv("DECISION_ROUTER_SMTP_HOST", "127.0.0.1")
    smtp = smtp_settings(load_settings())
    assert smtp is not None and smtp.sender == "decision-router@localhost"


@pytest.mark.parametrize("sender", ["alerts@example.com", "Decision Router <alerts@relay>", "router@mailhost"])
def test_senders_on_a_host_name_are_accepted(monkeypatch: pytest.MonkeyPatch, sender: str) -> None:
    monkeypatch.setenv("DECISION_ROUTER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("DECISION_ROUTER_SMTP_SENDER", sender)
    smtp = smtp_settings(load_settings())
    assert smtp is not None and smtp.sender == sender


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"DECISION_ROUTER_SMTP_SENDER": "nobody"}, "DECISION_ROUTER_SMTP_SENDER: expected a From address"),
        ({"DECISION_ROUTER_SMTP_SENDER": "a@example.com\r\nBcc: x@example.com"}, "DECISION_ROUTER_SMTP_SENDER:"),
        ({"DECISION_ROUTER_SMTP_STARTTLS": "true", "DECISION_ROUTER_SMTP_USE_TLS": "true"},
         "DECISION_ROUTER_SMTP_STARTTLS and DECISION_ROUTER_SMTP_USE_TLS are exclusive"),
        ({"DECISION_ROUTER_SMTP_PASSWORD": "pw"}, "DECISION_ROUTER_SMTP_PASSWORD needs DECISION_ROUTER_SMTP_USERNAME"),
        ({"DECISION_ROUTER_SMTP_PASSWORD_FILE": "/pw"},
         "DECISION_ROUTER_SMTP_PASSWORD_FILE needs DECISION_ROUTER_SMTP_USERNAME"),
        ({"DECISION_ROUTER_SMTP_USERNAME": "u", "DECISION_ROUTER_SMTP_PASSWORD": "pw",
          "DECISION_ROUTER_SMTP_PASSWORD_FILE": "/pw"},
         "DECISION_ROUTER_SMTP_PASSWORD and DECISION_ROUTER_SMTP_PASSWORD_FILE: set one, not both"),
    ],
)
def test_bad_smtp_settings_are_refused_at_start_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], message: str
) -> None:
    monkeypatch.setenv("DECISION_ROUTER_SMTP_HOST", "127.0.0.1")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value).startswith(message), refused.value
    assert "pw" not in str(refused.value)  # a password is never shown


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.app, list(args))


@pytest.mark.parametrize("command", [["serve", "--no-api"], ["api"], ["redrive", "deliveries"]])
def test_an_unreadable_password_file_stops_serve_api_and_redrive_with_one_line(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(ROOT / "rules"))
    monkeypatch.setenv("DECISION_ROUTER_EMBEDDED_PORT", str(_free_port()))
    monkeypatch.setenv("DECISION_ROUTER_API_PORT", "0")
    monkeypatch.setenv("DECISION_ROUTER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("DECISION_ROUTER_SMTP_USERNAME", "router")
    monkeypatch.setenv("DECISION_ROUTER_SMTP_PASSWORD_FILE", str(tmp_path / "missing.pw"))
    result = _invoke(*command)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: DECISION_ROUTER_SMTP_PASSWORD_FILE: cannot read secret file"), lines[0]


@pytest.mark.parametrize("command", [["demo", "--predictions", "20"], ["simulate", "--entities", "20", "--days", "1"]])
def test_the_simulator_does_not_use_the_environments_mail_server(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its owners have an inbox only; a password file it cannot read stopped it with a traceback.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DECISION_ROUTER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("DECISION_ROUTER_SMTP_USERNAME", "router")
    monkeypatch.setenv("DECISION_ROUTER_SMTP_PASSWORD_FILE", str(tmp_path / "missing.pw"))
    result = _invoke(*command, "--database", f"sqlite:///{tmp_path / 'sim.db'}")
    assert (result.exit_code, result.exception) == (0, None), result.output
    assert "SMTP" not in result.output and "sim.db" in result.output, result.output  # ran to its end
