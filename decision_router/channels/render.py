"""Alert -> message text, with Jinja2 templates.

The defaults ship in `decision_router/templates/`. A directory of overrides (the rules'
`rules/templates/`) replaces any of them by file name; an override can still include or
extend a default as `default/<name>`. Every template is compiled and test-rendered when
the `Renderer` is built, so a syntax error or a misspelt variable fails at start-up with
the file and line, not on the first real alert.

| template | used for | autoescape |
|---|---|---|
| `webhook.json.j2` | webhook body, `format: json` (default: the alert JSON) | no; must render JSON |
| `slack.json.j2` | webhook body, `format: slack` (`blocks` + `text`) | no; must render JSON |
| `email_subject.txt.j2` | email Subject (whitespace collapsed to one line) | no |
| `email_body.txt.j2` | email text/plain part | no |
| `email_body.html.j2` | email text/html part | yes (HTML) |
| `webhook_digest.json.j2` | digest webhook body, `format: json` | no; must render JSON |
| `slack_digest.json.j2` | digest webhook body, `format: slack` | no; must render JSON |
| `email_digest_subject.txt.j2` | digest email Subject | no |
| `email_digest_body.txt.j2` | digest email text/plain part | no |
| `email_digest_body.html.j2` | digest email text/html part | yes (HTML) |
| `webhook_data_quality.json.j2` | data-quality alert webhook body, `format: json` (default: its JSON) | no; must render JSON |
| `slack_data_quality.json.j2` | data-quality alert webhook body, `format: slack` | no; must render JSON |
| `email_data_quality_subject.txt.j2` | data-quality alert email Subject | no |
| `email_data_quality_body.txt.j2` | data-quality alert email text/plain part | no |
| `email_data_quality_body.html.j2` | data-quality alert email text/html part | yes (HTML) |

A digest is several alerts for one recipient in one message (an owner's `digest:` window,
see notify.py); its templates see `digest_variables`. A `DataQualityAlert` (drift or a
data-quality jump, monitor.py) is rendered with the data-quality templates, which see
`data_quality_variables`; it is never part of a digest.

Files in the override directory whose name starts with `_` are partials (for
`{% include %}`); any other unknown `*.j2` file is an error, to catch misspelt overrides.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel

from decision_router.contracts import Alert, AnyAlert, DataQualityAlert, DataQualityWindow, Escalation
from decision_router.durations import format_duration

__all__ = [
    "DATA_QUALITY_EMAIL_HTML",
    "DATA_QUALITY_EMAIL_SUBJECT",
    "DATA_QUALITY_EMAIL_TEXT",
    "DATA_QUALITY_NAMES",
    "DATA_QUALITY_SLACK",
    "DATA_QUALITY_WEBHOOK_JSON",
    "DIGEST_EMAIL_HTML",
    "DIGEST_EMAIL_SUBJECT",
    "DIGEST_EMAIL_TEXT",
    "DIGEST_NAMES",
    "DIGEST_SLACK",
    "DIGEST_WEBHOOK_JSON",
    "SLACK_DIGEST_MAX_ALERTS",
    "EMAIL_HTML",
    "EMAIL_SUBJECT",
    "EMAIL_TEXT",
    "RenderedEmail",
    "Renderer",
    "SLACK",
    "SLACK_LIMITS",
    "TEMPLATE_NAMES",
    "TemplateError",
    "WEBHOOK_JSON",
    "data_quality_variables",
    "digest_variables",
    "fit_slack_message",
    "sample_alerts",
    "sample_data_quality_alerts",
]

WEBHOOK_JSON = "webhook.json.j2"
SLACK = "slack.json.j2"
EMAIL_SUBJECT = "email_subject.txt.j2"
EMAIL_TEXT = "email_body.txt.j2"
EMAIL_HTML = "email_body.html.j2"
DIGEST_WEBHOOK_JSON = "webhook_digest.json.j2"
DIGEST_SLACK = "slack_digest.json.j2"
DIGEST_EMAIL_SUBJECT = "email_digest_subject.txt.j2"
DIGEST_EMAIL_TEXT = "email_digest_body.txt.j2"
DIGEST_EMAIL_HTML = "email_digest_body.html.j2"
DIGEST_NAMES: tuple[str, ...] = (DIGEST_WEBHOOK_JSON, DIGEST_SLACK, DIGEST_EMAIL_SUBJECT, DIGEST_EMAIL_TEXT, DIGEST_EMAIL_HTML)
DATA_QUALITY_WEBHOOK_JSON = "webhook_data_quality.json.j2"
DATA_QUALITY_SLACK = "slack_data_quality.json.j2"
DATA_QUALITY_EMAIL_SUBJECT = "email_data_quality_subject.txt.j2"
DATA_QUALITY_EMAIL_TEXT = "email_data_quality_body.txt.j2"
DATA_QUALITY_EMAIL_HTML = "email_data_quality_body.html.j2"
DATA_QUALITY_NAMES: tuple[str, ...] = (
    DATA_QUALITY_WEBHOOK_JSON, DATA_QUALITY_SLACK, DATA_QUALITY_EMAIL_SUBJECT, DATA_QUALITY_EMAIL_TEXT, DATA_QUALITY_EMAIL_HTML,
)
TEMPLATE_NAMES: tuple[str, ...] = (
    WEBHOOK_JSON, SLACK, EMAIL_SUBJECT, EMAIL_TEXT, EMAIL_HTML, *DIGEST_NAMES, *DATA_QUALITY_NAMES,
)

# Slack Block Kit limits the renderer enforces after rendering (truncating or splitting),
# so an overridden template or a very long entity id can never produce a rejected message.
SLACK_LIMITS = {
    "blocks": 50,
    "header_text": 150,
    "section_text": 3000,
    "section_fields": 10,
    "field_text": 2000,
    "context_elements": 10,
    "context_text": 2000,
    "text": 4000,
}
SUBJECT_MAX = 200
# A Slack digest lists at most this many alerts, one section each, then "and K more": with
# the header, that context block, a divider and the footer it stays within the 50 blocks.
SLACK_DIGEST_MAX_ALERTS = SLACK_LIMITS["blocks"] - 4
PRIORITY_ORDER = ("low", "normal", "high", "critical")

DRIVERS_KEY = "features.top_drivers"


class TemplateError(ValueError):
    """A template failed to load or render; the message names the file and line."""


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


# --- filters -------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A context value as short text: lists joined, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value) or "none"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    if isinstance(value, datetime):
        return format_datetime(value)
    return str(value)


def format_score(score: float) -> str:
    """Up to three decimals, trailing zeros dropped: 0.91, 0.913, 1."""
    text = f"{score:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def format_datetime(value: datetime | str) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def slack_escape(value: Any) -> str:
    """Escape text for Slack mrkdwn: `&`, `<`, `>` (so `<!channel>` in data pings no one)."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_date(value: datetime) -> str:
    """A Slack date token: shown in each reader's own time zone, UTC text as fallback."""
    epoch = int(value.timestamp())
    return f"<!date^{epoch}^{{date_short_pretty}} {{time}}|{format_datetime(value)}>"


def context_label(key: str) -> str:
    """`context.renewal_date` -> `renewal_date`; other paths are kept whole."""
    return key.removeprefix("context.")


# --- template variables --------------------------------------------------------------


def _drivers(alert: Alert) -> list[str]:
    value = alert.context.get(DRIVERS_KEY)
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [format_value(v) for v in value]
    return [format_value(value)]


def _notes(alert: Alert) -> list[str]:
    notes = []
    if alert.escalation is not None:
        e = alert.escalation
        notes.append(
            f"Escalated (level {e.level}, missed {e.kind} deadline) from {e.from_owner}; "
            f"original owner {e.original_owner}: {e.reason}"
        )
    if alert.reassigned_from:
        notes.append(f"Reassigned from {alert.reassigned_from}")
    if alert.delegated_from:
        notes.append(f"Delegated from {alert.delegated_from} (away)")
    return notes


def template_variables(alert: Alert, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything a template sees. Documented in docs/delivery.md#templates."""
    entity = f"{alert.entity_type} {alert.entity_id}"
    score = format_score(alert.score)
    return {
        "alert": alert,
        "alert_json": alert.model_dump_json(),
        "entity": entity,
        "score": score,
        "facts": [
            ("Entity", entity),
            ("Score", f"{score} ({alert.model} {alert.model_version})"),
            ("Priority", alert.priority),
            ("Rule", alert.rule),
            ("Owner", alert.owner),
        ],
        "context_items": [(context_label(k), format_value(v)) for k, v in alert.context.items() if k != DRIVERS_KEY],
        "drivers": _drivers(alert),
        "missing": list(alert.missing_context),
        "notes": _notes(alert),
        "extra": dict(extra or {}),
    }


def _window_seconds(window_s: float | None) -> float | int | None:
    if window_s is None:
        return None
    return int(window_s) if float(window_s).is_integer() else float(window_s)


def digest_variables(
    alerts: Sequence[Alert],
    *,
    recipient: str | None = None,
    window_s: float | None = None,
    extra: Mapping[str, Any] | None = None,
    slack_max: int = SLACK_DIGEST_MAX_ALERTS,
) -> dict[str, Any]:
    """Everything a digest template sees. Documented in docs/delivery.md#digest-variables."""
    if not alerts:
        raise ValueError("a digest needs at least one alert")
    items = [template_variables(alert, extra) for alert in alerts]
    shown = items[: max(0, slack_max)]
    owner = recipient or digest_recipient(alerts[0])
    seconds = _window_seconds(window_s)
    ranked = [a.priority for a in alerts if a.priority in PRIORITY_ORDER]
    return {
        "alerts": list(alerts),
        "items": items,
        "count": len(alerts),
        "owner": owner,
        "window_s": seconds,
        "window": format_duration(timedelta(seconds=seconds)) if seconds else None,
        "alerts_json": [alert.model_dump_json() for alert in alerts],
        "shown": shown,
        "more": len(items) - len(shown),
        "priority": max(ranked, key=PRIORITY_ORDER.index) if ranked else alerts[0].priority,
        "first_created_at": min(a.created_at for a in alerts),
        "last_created_at": max(a.created_at for a in alerts),
        "extra": dict(extra or {}),
    }


def _is_rate(metric: str) -> bool:
    return metric.endswith("_rate")


def _figure(value: float | None, rate: bool) -> str:
    """A PSI with four decimals, a rate as a percentage, None as n/a."""
    if value is None:
        return "n/a"
    return f"{value:.2%}" if rate else f"{value:.4f}"


def _period(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "none"
    return f"{format_datetime(start)} – {format_datetime(end)}"


def data_quality_variables(alert: DataQualityAlert, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything a data-quality template sees. Documented in docs/delivery.md#data-quality-variables."""
    rate = _is_rate(alert.metric)
    w = alert.window
    version = "all versions" if alert.model_version == "*" else alert.model_version
    measure = "rate" if rate else "PSI"
    value = _figure(alert.value, rate)
    threshold = _figure(alert.threshold, rate)
    samples = f"{alert.n_reference} reference, {alert.n_recent} recent"
    reference = f"{w.reference_version}, {_period(w.reference_from, w.reference_to)}"
    recent = _period(w.recent_from, w.recent_to)
    window = f"reference {reference}; recent {recent}"
    value_text = f"{measure} {value}"
    if alert.reference_value is not None:
        value_text += f" (reference {_figure(alert.reference_value, rate)})"
    facts = [
        ("Model", f"{alert.model} {version}"),
        ("Metric", alert.metric),
        ("Value", value_text),
        ("Threshold", threshold),
        ("Samples", samples),
        ("Reference", reference),
        ("Recent", recent),
    ]
    if alert.p_value is not None:
        facts.append(("p-value", f"{alert.p_value:.2g}"))
    if alert.alpha is not None:
        facts.append(("False-alarm rate", f"{alert.alpha:.2g}"))
    return {
        "alert": alert,
        "alert_json": alert.model_dump_json(),
        "version": version,
        "measure": measure,
        "value": value,
        "value_text": value_text,
        "threshold": threshold,
        "samples": samples,
        "reference": reference,
        "recent": recent,
        "window": window,
        "owner": alert.owner or "unowned",
        "facts": facts,
        "extra": dict(extra or {}),
    }


def sample_data_quality_alerts() -> list[DataQualityAlert]:
    """Data-quality alerts used to test-render templates at load: a drifted score (PSI) and a
    rate jump with every optional figure, and a bare one (no figures, no reference, no owner)."""
    now = datetime(2026, 11, 25, 1, 0, tzinfo=UTC)
    window = DataQualityWindow(
        reference_version="2026.11", reference_from=now - timedelta(days=3), reference_to=now - timedelta(days=1),
        recent_from=now - timedelta(days=1), recent_to=now,
    )
    psi = DataQualityAlert(
        alert_id="dq-000000000000000000000000", model="churn", model_version="2026.11", metric="score",
        value=0.4123, threshold=0.0871, alpha=0.0033, n_reference=360, n_recent=120, window=window,
        owner="sample-owner", created_at=now,
        detail="PSI 0.4123 above its threshold 0.0871 (n = 360 reference, 120 recent; 10 bins; false-alarm rate 0.0033); "
        "mean 0.6 recent, 0.4 reference",
    )
    rate = psi.model_copy(update={
        "alert_id": "dq-000000000000000000000001", "model_version": "*", "metric": "rejection_rate", "value": 0.08,
        "threshold": 0.04, "reference_value": 0.01, "p_value": 0.0001, "alpha": 0.01,
        "detail": "jumped: 8 of 100 recent inputs (8.00%), 3 of 300 in the reference (1.00%)",
    })
    bare = psi.model_copy(update={
        "alert_id": "dq-000000000000000000000002", "value": None, "threshold": None, "alpha": None, "owner": None,
        "window": DataQualityWindow(reference_version="2026.10", recent_from=now - timedelta(days=1), recent_to=now),
        "detail": "",
    })
    return [psi, rate, bare]


def digest_recipient(alert: Alert) -> str:
    """Who a copy of the alert is for: the manager of an escalated copy, else the owner."""
    return alert.escalation.to_owner if alert.escalation is not None else alert.owner


def sample_alerts() -> list[Alert]:
    """Alerts used to test-render templates at load: one with every optional part, one bare."""
    now = datetime(2026, 11, 25, 15, 8, 6, tzinfo=UTC)
    full = Alert(
        alert_id="al-000000000000000000000000",
        prediction_id="p-sample",
        owner="sample-owner",
        owner_source="field",
        rule="sample-rule",
        priority="high",
        model="churn",
        model_version="2026.11",
        entity_type="account",
        entity_id="acct-sample",
        score=0.91,
        label="churn",
        context={"context.arr": 120000, "context.renewal_date": "2027-02-01", DRIVERS_KEY: ["usage_drop", "champion_left"]},
        missing_context=["context.region"],
        ack_by=now + timedelta(hours=2),
        act_by=now + timedelta(hours=24),
        rules_version="000000000000",
        predicted_at=now - timedelta(minutes=1),
        created_at=now,
        reassigned_from="previous-owner",
        delegated_from="away-owner",
        escalation=Escalation(
            level=1, kind="ack", reason="not acknowledged by the deadline", original_owner="away-owner", from_owner="previous-owner", to_owner="sample-owner"
        ),
    )
    bare = full.model_copy(
        update={
            "label": None,
            "context": {},
            "missing_context": [],
            "reassigned_from": None,
            "delegated_from": None,
            "escalation": None,
        }
    )
    return [full, bare]


# --- Slack limits --------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fit_slack_message(message: Any) -> dict[str, Any]:
    """Check the shape of a rendered Slack message and enforce Block Kit limits:
    truncate long texts, split sections with more than 10 fields, cap the block count."""
    if not isinstance(message, dict):
        raise ValueError("a Slack message must be a JSON object")
    blocks = message.get("blocks")
    text = message.get("text")
    if not isinstance(blocks, list) or not isinstance(text, str) or not text.strip():
        raise ValueError('a Slack message needs "blocks" (a list) and "text" (a non-empty fallback string)')
    L = SLACK_LIMITS
    fitted: list[Any] = []
    for block in blocks:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ValueError(f"every Slack block needs a type, got {block!r:.80}")
        kind = block["type"]
        if kind == "header":
            inner = dict(block.get("text") or {})
            inner["type"] = "plain_text"
            inner["text"] = _clip(str(inner.get("text", "")), L["header_text"]) or "Alert"
            fitted.append({**block, "text": inner})
        elif kind == "section":
            section = dict(block)
            if isinstance(section.get("text"), dict):
                section["text"] = {**section["text"], "text": _clip(str(section["text"].get("text", "")), L["section_text"])}
            fields = [{**f, "text": _clip(str(f.get("text", "")), L["field_text"])} for f in section.pop("fields", None) or []]
            if not fields:
                if "text" not in section:
                    continue  # an empty section is rejected by Slack; drop it
                fitted.append(section)
                continue
            step = L["section_fields"]
            for i in range(0, len(fields), step):
                part = dict(section) if i == 0 else {"type": "section"}
                part["fields"] = fields[i : i + step]
                fitted.append(part)
        elif kind == "context":
            elements = [
                {**e, "text": _clip(str(e.get("text", "")), L["context_text"])} if isinstance(e, dict) and "text" in e else e
                for e in block.get("elements") or []
            ][: L["context_elements"]]
            if elements:
                fitted.append({**block, "elements": elements})
        else:
            fitted.append(block)
    return {**message, "text": _clip(text, L["text"]), "blocks": fitted[: L["blocks"]]}


# --- the renderer --------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    """`|tojson` for template authors: datetimes as ISO text, a misspelt name as the
    undefined-variable error it is (not "StrictUndefined is not JSON serializable")."""
    if isinstance(value, jinja2.Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _variables(alert: AnyAlert, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(alert, DataQualityAlert):
        return data_quality_variables(alert, extra)
    return template_variables(alert, extra)


def _autoescape(name: str | None) -> bool:
    return name is not None and name.removesuffix(".j2").endswith((".html", ".htm", ".xml"))


def _frames(tb: TracebackType | None) -> Iterator[TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


class Renderer:
    """Renders alerts with the shipped templates, or overrides from `override_dir`.

    Raises `TemplateError` at construction when a template does not compile or does not
    render the sample alerts (`check=False` skips the test render).
    """

    def __init__(self, override_dir: Path | str | None = None, *, check: bool = True) -> None:
        try:
            default = jinja2.PackageLoader("decision_router", "templates")
        except ValueError as exc:  # the package was installed without its data files
            raise TemplateError(f"the shipped templates (decision_router/templates/*.j2) are not installed: {exc}") from None
        loaders: list[jinja2.BaseLoader] = []
        self.override_dir = Path(override_dir) if override_dir is not None else None
        self.overridden: tuple[str, ...] = ()
        if self.override_dir is not None:
            if not self.override_dir.is_dir():
                raise TemplateError(f"template directory {self.override_dir} does not exist")
            files = sorted(p.name for p in self.override_dir.glob("*.j2"))
            unknown = [f for f in files if f not in TEMPLATE_NAMES and not f.startswith("_")]
            if unknown:
                raise TemplateError(
                    f"{self.override_dir}: unknown template {', '.join(unknown)}; expected one of {', '.join(TEMPLATE_NAMES)} "
                    "(name partials for {% include %} with a leading _)"
                )
            self.overridden = tuple(f for f in files if f in TEMPLATE_NAMES)
            loaders.append(jinja2.FileSystemLoader(str(self.override_dir)))
        loaders += [jinja2.PrefixLoader({"default": default}), default]
        # Sandboxed: templates come from the rules directory, not from the code.
        self.env = SandboxedEnvironment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=_autoescape,
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.policies["json.dumps_function"] = json.dumps
        self.env.policies["json.dumps_kwargs"] = {"sort_keys": False, "ensure_ascii": False, "default": _json_default}
        self.env.filters.update(
            value=format_value,
            dt=format_datetime,
            score=format_score,
            mrkdwn=slack_escape,
            slack_date=slack_date,
        )
        self._templates: dict[str, jinja2.Template] = {}
        for name in TEMPLATE_NAMES:
            try:
                self._templates[name] = self.env.get_template(name)
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(f"template {self._origin(name, exc.filename)} line {exc.lineno}: {exc.message}") from None
            except jinja2.TemplateNotFound as exc:  # a partial an override includes
                raise TemplateError(f"template {self._origin(name)}: includes {exc.name!r}, which does not exist") from None
        if check:
            samples = sample_alerts()
            for alert in [*samples, *sample_data_quality_alerts()]:
                self.webhook_body(alert, "json")
                self.webhook_body(alert, "slack")
                self.email(alert)
            for group, window_s in ((samples, 900.0), (samples[1:], None)):
                self.webhook_digest_body(group, "json", window_s=window_s)
                self.webhook_digest_body(group, "slack", window_s=window_s)
                self.email_digest(group, window_s=window_s)

    def _origin(self, name: str, filename: str | None = None) -> str:
        if filename:
            return f"{name} ({filename})"
        template = self._templates.get(name)
        if template is not None and template.filename:
            return f"{name} ({template.filename})"
        return name

    def render(self, name: str, alert: AnyAlert, extra: Mapping[str, Any] | None = None) -> str:
        """One template by name, with the variables of `template_variables` (or of
        `data_quality_variables` for a `DataQualityAlert`)."""
        return self._render(name, _variables(alert, extra))

    def render_digest(
        self,
        name: str,
        alerts: Sequence[Alert],
        *,
        recipient: str | None = None,
        window_s: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """One digest template by name, with the variables of `digest_variables`."""
        return self._render(name, digest_variables(alerts, recipient=recipient, window_s=window_s, extra=extra))

    def _render(self, name: str, variables: dict[str, Any]) -> str:
        template = self._templates[name]
        try:
            return template.render(variables)
        except jinja2.TemplateError as exc:
            raise self._render_error(name, template, exc) from None
        except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as exc:
            raise self._render_error(name, template, exc) from None

    def _render_error(self, name: str, template: jinja2.Template, exc: BaseException) -> TemplateError:
        # Jinja rewrites tracebacks so template frames carry the template's file and line.
        files = {t.filename for t in self._templates.values() if t.filename}
        where = ""
        for frame in _frames(exc.__traceback__):
            if frame.tb_frame.f_code.co_filename in files:
                where = f" ({frame.tb_frame.f_code.co_filename}) line {frame.tb_lineno}"
        if not where and template.filename:
            where = f" ({template.filename})"
        message = getattr(exc, "message", None) or str(exc)
        return TemplateError(f"template {name}{where}: {type(exc).__name__}: {message}")

    def webhook_body(self, alert: AnyAlert, fmt: str = "json", extra: Mapping[str, Any] | None = None) -> str:
        """The request body for a webhook of `format` json or slack; always valid JSON."""
        if fmt not in ("json", "slack"):
            raise ValueError(f"unknown webhook format {fmt!r}")
        if isinstance(alert, DataQualityAlert):
            name = DATA_QUALITY_SLACK if fmt == "slack" else DATA_QUALITY_WEBHOOK_JSON
        else:
            name = SLACK if fmt == "slack" else WEBHOOK_JSON
        return self._json_body(name, fmt, self.render(name, alert, extra))

    def _json_body(self, name: str, fmt: str, text: str) -> str:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TemplateError(
                f"template {self._origin(name)} did not render valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); use |tojson for values"
            ) from None
        if fmt == "slack":
            try:
                document = fit_slack_message(document)
            except ValueError as exc:
                raise TemplateError(f"template {self._origin(name)}: {exc}") from None
            return json.dumps(document, ensure_ascii=False, separators=(",", ":"))
        if name not in self.overridden:
            return text  # the shipped template: the alert JSON exactly as it is in the inbox
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"))

    def slack_message(self, alert: AnyAlert, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return json.loads(self.webhook_body(alert, "slack", extra))

    def email(self, alert: AnyAlert, extra: Mapping[str, Any] | None = None) -> RenderedEmail:
        if isinstance(alert, DataQualityAlert):
            names = (DATA_QUALITY_EMAIL_SUBJECT, DATA_QUALITY_EMAIL_TEXT, DATA_QUALITY_EMAIL_HTML)
        else:
            names = (EMAIL_SUBJECT, EMAIL_TEXT, EMAIL_HTML)
        return self._email(*names, _variables(alert, extra))

    def _email(self, subject_name: str, text_name: str, html_name: str, variables: dict[str, Any]) -> RenderedEmail:
        subject = " ".join(self._render(subject_name, variables).split())
        if not subject:
            raise TemplateError(f"template {self._origin(subject_name)} rendered an empty subject")
        return RenderedEmail(
            subject=_clip(subject, SUBJECT_MAX),
            text=self._render(text_name, variables).rstrip() + "\n",
            html=self._render(html_name, variables),
        )

    # --- digests: several alerts for one recipient in one message -------------------

    def webhook_digest_body(
        self,
        alerts: Sequence[Alert],
        fmt: str = "json",
        *,
        recipient: str | None = None,
        window_s: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """The request body of a digest webhook (json: `{"digest": true, "count": n,
        "window_s": ..., "alerts": [...]}`; slack: one message listing the alerts)."""
        if fmt not in ("json", "slack"):
            raise ValueError(f"unknown webhook format {fmt!r}")
        name = DIGEST_SLACK if fmt == "slack" else DIGEST_WEBHOOK_JSON
        text = self.render_digest(name, alerts, recipient=recipient, window_s=window_s, extra=extra)
        return self._json_body(name, fmt, text)

    def slack_digest_message(
        self,
        alerts: Sequence[Alert],
        *,
        recipient: str | None = None,
        window_s: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return json.loads(self.webhook_digest_body(alerts, "slack", recipient=recipient, window_s=window_s, extra=extra))

    def email_digest(
        self,
        alerts: Sequence[Alert],
        *,
        recipient: str | None = None,
        window_s: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> RenderedEmail:
        variables = digest_variables(alerts, recipient=recipient, window_s=window_s, extra=extra)
        return self._email(DIGEST_EMAIL_SUBJECT, DIGEST_EMAIL_TEXT, DIGEST_EMAIL_HTML, variables)

