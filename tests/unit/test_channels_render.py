"""Rendering alerts for webhooks (JSON, Slack) and email, with shipped and overridden templates.

`make_alert` and `validate_slack_message` are imported by the other channel tests.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from decision_router.channels.render import (
    EMAIL_HTML,
    SLACK,
    SLACK_LIMITS,
    TEMPLATE_NAMES,
    Renderer,
    TemplateError,
    fit_slack_message,
    format_score,
    format_value,
)
from decision_router.contracts import Alert, DataQualityAlert, DataQualityWindow, Escalation

NOW = datetime(2026, 11, 25, 15, 8, 6, 990711, tzinfo=UTC)


def make_alert(**overrides: Any) -> Alert:
    """The README's example alert; keyword arguments replace fields."""
    data: dict[str, Any] = {
        "alert_id": "al-e4edc45bc6ce00391e1d9437",
        "prediction_id": "p-1001",
        "owner": "alice-moreau",
        "owner_source": "field",
        "rule": "enterprise-churn-risk",
        "priority": "high",
        "model": "churn",
        "model_version": "2026.11",
        "entity_type": "account",
        "entity_id": "acct-17",
        "score": 0.91,
        "context": {
            "context.arr": 120000,
            "context.renewal_date": "2027-02-01",
            "context.region": "emea",
            "features.top_drivers": ["usage_drop", "champion_left"],
        },
        "missing_context": [],
        "ack_by": NOW + timedelta(hours=2),
        "act_by": NOW + timedelta(hours=24),
        "rules_version": "55b4bc01b033",
        "predicted_at": NOW - timedelta(seconds=1),
        "created_at": NOW,
    }
    data.update(overrides)
    return Alert.model_validate(data)


BLOCK_TYPES = {"header", "section", "context", "divider"}


def validate_slack_message(message: Any) -> list[str]:
    """Problems with a Slack Block Kit message, as Slack would reject it (a subset of its
    rules: the parts our template uses). An empty list means valid."""
    problems: list[str] = []
    if not isinstance(message, dict):
        return ["message is not an object"]
    if not isinstance(message.get("text"), str) or not message["text"].strip():
        problems.append("text fallback missing or empty")
    blocks = message.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        return problems + ["blocks is not a non-empty list"]
    if len(blocks) > 50:
        problems.append(f"{len(blocks)} blocks > 50")
    for i, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in BLOCK_TYPES:
            problems.append(f"block {i}: unknown type {kind!r}")
            continue
        if kind == "header":
            text = block.get("text", {})
            if text.get("type") != "plain_text":
                problems.append(f"block {i}: header text must be plain_text")
            if not isinstance(text.get("text"), str) or not 0 < len(text["text"]) <= 150:
                problems.append(f"block {i}: header text must be 1..150 chars")
        elif kind == "section":
            fields = block.get("fields")
            text = block.get("text")
            if fields is None and text is None:
                problems.append(f"block {i}: section needs text or fields")
            if fields is not None:
                if not isinstance(fields, list) or not 0 < len(fields) <= 10:
                    problems.append(f"block {i}: section fields must be 1..10 items")
                for j, field in enumerate(fields or []):
                    if field.get("type") not in ("mrkdwn", "plain_text"):
                        problems.append(f"block {i} field {j}: bad type {field.get('type')!r}")
                    if not isinstance(field.get("text"), str) or not 0 < len(field["text"]) <= 2000:
                        problems.append(f"block {i} field {j}: text must be 1..2000 chars")
            if text is not None and (not isinstance(text.get("text"), str) or not 0 < len(text["text"]) <= 3000):
                problems.append(f"block {i}: section text must be 1..3000 chars")
        elif kind == "context":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 0 < len(elements) <= 10:
                problems.append(f"block {i}: context needs 1..10 elements")
        elif kind == "divider" and set(block) - {"type", "block_id"}:
            problems.append(f"block {i}: divider takes no content")
    return problems


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


def all_text(message: dict[str, Any]) -> str:
    return json.dumps(message, ensure_ascii=False)


# --- shipped templates ---------------------------------------------------------------


def test_webhook_json_body_is_the_alert_json(renderer: Renderer) -> None:
    alert = make_alert()
    body = renderer.webhook_body(alert, "json")
    assert body == alert.model_dump_json()
    assert Alert.model_validate_json(body) == alert


def test_slack_message_has_the_block_structure(renderer: Renderer) -> None:
    alert = make_alert(missing_context=["context.segment"])
    message = renderer.slack_message(alert)
    assert validate_slack_message(message) == []
    types = [b["type"] for b in message["blocks"]]
    assert types[0] == "header" and types[1] == "section"
    facts = " ".join(f["text"] for f in message["blocks"][1]["fields"])
    for expected in ("account acct-17", "0.91", "high", "enterprise-churn-risk", "alice-moreau", "*Ack by*", "*Act by*"):
        assert expected in facts
    # deadlines: Slack date tokens with the UTC time as fallback
    assert "|2026-11-25 17:08 UTC>" in facts and "|2026-11-26 15:08 UTC>" in facts
    text = all_text(message)
    assert "*arr*\\n120000" in text and "*renewal_date*\\n2027-02-01" in text and "*region*\\nemea" in text
    assert "• usage_drop\\n• champion_left" in text
    assert "Missing context: context.segment" in text
    assert "al-e4edc45bc6ce00391e1d9437" in text
    assert "acct-17" in message["text"] and "0.91" in message["text"]


def test_slack_escapes_mrkdwn_control_characters(renderer: Renderer) -> None:
    alert = make_alert(entity_id="<!channel> & <https://evil.example|click>")
    message = renderer.slack_message(alert)
    fields_text = " ".join(f["text"] for f in message["blocks"][1]["fields"])
    assert "<!channel>" not in fields_text and "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;" in fields_text
    assert "<!channel>" not in message["text"]
    # plain_text headers are not mrkdwn: shown literally, unescaped
    assert "<!channel>" in message["blocks"][0]["text"]["text"]


def test_slack_limits_are_enforced_for_long_values(renderer: Renderer) -> None:
    context = {f"context.field_{i:02d}": "x" * 2500 for i in range(23)}
    alert = make_alert(entity_id="e" * 200, context=context)
    message = renderer.slack_message(alert)
    assert validate_slack_message(message) == []
    assert len(message["blocks"][0]["text"]["text"]) == SLACK_LIMITS["header_text"]
    context_sections = [b for b in message["blocks"] if b["type"] == "section" and any("field_" in f["text"] for f in b.get("fields", []))]
    assert [len(b["fields"]) for b in context_sections] == [10, 10, 3]


def test_slack_optional_parts_are_left_out_when_empty(renderer: Renderer) -> None:
    message = renderer.slack_message(make_alert(context={}, missing_context=[]))
    assert validate_slack_message(message) == []
    text = all_text(message)
    assert "Top drivers" not in text and "Missing context" not in text


def test_slack_notes_for_escalation_reassignment_and_delegation(renderer: Renderer) -> None:
    alert = make_alert(
        reassigned_from="benoit-garnier",
        delegated_from="hugo-lambert",
        escalation=Escalation(level=1, kind="ack", reason="ack deadline missed", original_owner="hugo-lambert", from_owner="felix-wagner", to_owner="alice-moreau"),
    )
    text = all_text(renderer.slack_message(alert))
    assert "Reassigned from benoit-garnier" in text and "Delegated from hugo-lambert" in text and "Escalated (level 1" in text


def test_email_subject_text_and_html(renderer: Renderer) -> None:
    email = renderer.email(make_alert())
    assert email.subject == "[HIGH] enterprise-churn-risk: account acct-17 scored 0.91"
    for part in (email.text, email.html):
        assert "acct-17" in part and "0.91" in part and "alice-moreau" in part
        assert "2026-11-26 15:08 UTC" in part and "usage_drop" in part and "120000" in part
    assert email.html.lstrip().startswith("<!DOCTYPE html>")


def test_email_html_is_escaped_and_text_is_not(renderer: Renderer) -> None:
    alert = make_alert(entity_id="<script>alert(1)</script>", context={"context.note": "a & b <b>"})
    email = renderer.email(alert)
    assert "<script>" not in email.html and "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert "a &amp; b &lt;b&gt;" in email.html
    assert "<script>alert(1)</script>" in email.text


def test_email_subject_is_one_line(renderer: Renderer) -> None:
    email = renderer.email(make_alert(entity_id="acct\n17\r\nBcc: x@evil.example"))
    assert "\n" not in email.subject and "\r" not in email.subject


def test_value_and_score_formatting() -> None:
    assert format_score(0.91) == "0.91" and format_score(0.9134) == "0.913" and format_score(1.0) == "1" and format_score(0.0) == "0"
    assert format_value(120000.0) == "120000" and format_value(["a", 2]) == "a, 2" and format_value(None) == "n/a"
    assert format_value({"b": 1, "a": 2}) == '{"a": 2, "b": 1}' and format_value(True) == "true"


def test_fit_slack_rejects_shapeless_messages() -> None:
    with pytest.raises(ValueError, match="blocks"):
        fit_slack_message({"text": "x"})
    with pytest.raises(ValueError, match="text"):
        fit_slack_message({"blocks": []})
    with pytest.raises(ValueError, match="type"):
        fit_slack_message({"text": "x", "blocks": [{"no": "type"}]})


# --- data-quality alerts -------------------------------------------------------------


def make_data_quality_alert(**overrides: Any) -> DataQualityAlert:
    """A drifted score, as the monitor stores it; keyword arguments replace fields."""
    data: dict[str, Any] = {
        "alert_id": "dq-5b1f0c7e9a2d4e6f8a0b1c2d",
        "model": "churn",
        "model_version": "2026.11",
        "metric": "score",
        "value": 0.4123,
        "threshold": 0.0871,
        "alpha": 0.0033,
        "n_reference": 360,
        "n_recent": 120,
        "window": DataQualityWindow(
            reference_version="2026.11", reference_from=NOW - timedelta(days=4), reference_to=NOW - timedelta(days=2),
            recent_from=NOW - timedelta(days=1), recent_to=NOW,
        ),
        "owner": "alice-moreau",
        "created_at": NOW,
        "detail": "PSI 0.4123 above its threshold 0.0871 (n = 360 reference, 120 recent); mean 0.6 recent, 0.4 reference",
    }
    data.update(overrides)
    return DataQualityAlert.model_validate(data)


def test_data_quality_slack_message_has_the_figures(renderer: Renderer) -> None:
    message = renderer.slack_message(make_data_quality_alert())
    assert validate_slack_message(message) == []
    header, section = message["blocks"][:2]
    assert header == {"type": "header", "text": {"type": "plain_text", "text": "Data quality: churn 2026.11 score"}}
    assert section["type"] == "section" and section["text"]["text"].startswith("PSI 0.4123 above its threshold")
    fields = [f["text"] for f in section["fields"]]
    assert fields[:3] == ["*Value*\nPSI 0.4123", "*Threshold*\n0.0871", "*Samples*\n360 reference, 120 recent"]
    assert fields[3] == "*Window*\nreference 2026.11, 2026-11-21 15:08 UTC – 2026-11-23 15:08 UTC\nrecent 2026-11-24 15:08 UTC – 2026-11-25 15:08 UTC"
    assert [b["type"] for b in message["blocks"][2:]] == ["divider", "context"]
    assert "dq-5b1f0c7e9a2d4e6f8a0b1c2d" in all_text(message)
    assert "churn 2026.11 score" in message["text"] and "0.4123" in message["text"]


def test_data_quality_slack_rate_escaped_and_bare(renderer: Renderer) -> None:
    rate = make_data_quality_alert(
        model_version="*", metric="rejection_rate", value=0.08, threshold=0.04, reference_value=0.01, p_value=1e-4,
        detail="jumped: <!channel> 8 of 100",
    )
    message = renderer.slack_message(rate)
    assert validate_slack_message(message) == []
    assert message["blocks"][0]["text"]["text"] == "Data quality: churn all versions rejection_rate"
    section = message["blocks"][1]
    assert section["fields"][0]["text"] == "*Value*\nrate 8.00% (reference 1.00%)"
    assert "<!channel>" not in section["text"]["text"]
    # No figures, no reference, no detail: still a valid message (no empty section text).
    bare = make_data_quality_alert(
        value=None, threshold=None, detail="", window=DataQualityWindow(reference_version="1", recent_from=NOW, recent_to=NOW)
    )
    message = renderer.slack_message(bare)
    assert validate_slack_message(message) == [] and "text" not in message["blocks"][1]


def test_data_quality_webhook_json_and_email(renderer: Renderer) -> None:
    alert = make_data_quality_alert()
    body = renderer.webhook_body(alert, "json")
    assert body == alert.model_dump_json() and json.loads(body)["kind"] == "data_quality"
    email = renderer.email(alert)
    assert email.subject == "[DATA QUALITY] churn 2026.11 score: PSI 0.4123 (threshold 0.0871)"
    for part in (email.text, email.html):
        assert "0.4123" in part and "0.0871" in part and "360 reference, 120 recent" in part and alert.alert_id in part


def test_data_quality_templates_are_overridable(tmp_path: Path) -> None:
    templates = write(tmp_path, "email_data_quality_subject.txt.j2", "DQ {{ alert.model }} {{ alert.metric }} {{ value }}")
    renderer = Renderer(templates)
    assert renderer.email(make_data_quality_alert()).subject == "DQ churn score 0.4123"
    assert renderer.email(make_alert()).subject.startswith("[HIGH]")  # routed alerts keep theirs


# --- overrides -----------------------------------------------------------------------


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text, encoding="utf-8")
    return directory


def test_override_replaces_only_the_named_template(tmp_path: Path) -> None:
    templates = write(tmp_path / "templates", "email_subject.txt.j2", "ALERT {{ alert.entity_id }} for {{ alert.owner }}")
    renderer = Renderer(templates)
    assert renderer.overridden == ("email_subject.txt.j2",)
    alert = make_alert()
    assert renderer.email(alert).subject == "ALERT acct-17 for alice-moreau"
    assert renderer.webhook_body(alert) == alert.model_dump_json()  # the others are the defaults


def test_override_json_webhook_body(tmp_path: Path) -> None:
    templates = write(tmp_path, "webhook.json.j2", '{"id": {{ alert.alert_id|tojson }}, "entity": {{ entity|tojson }}, "score": {{ alert.score }}}')
    body = json.loads(Renderer(templates).webhook_body(make_alert(entity_id='quo"te')))
    assert body == {"id": "al-e4edc45bc6ce00391e1d9437", "entity": 'account quo"te', "score": 0.91}


def test_override_html_is_autoescaped(tmp_path: Path) -> None:
    templates = write(tmp_path, EMAIL_HTML, "<p>{{ alert.entity_id }}</p>")
    assert Renderer(templates).email(make_alert(entity_id="<b>x</b>")).html == "<p>&lt;b&gt;x&lt;/b&gt;</p>"


def test_override_can_extend_the_default_and_include_partials(tmp_path: Path) -> None:
    write(tmp_path, "_footer.txt.j2", "-- sent by {{ extra.get('sender', 'decision-router') }}")
    write(tmp_path, "email_body.txt.j2", '{% include "default/email_body.txt.j2" %}\n{% include "_footer.txt.j2" %}')
    text = Renderer(tmp_path).email(make_alert()).text
    assert "Entity:   account acct-17" in text and text.rstrip().endswith("-- sent by decision-router")


def test_misspelt_variable_fails_at_load_with_file_and_line(tmp_path: Path) -> None:
    templates = write(tmp_path, SLACK, '{"text": "x",\n "blocks": [\n {"type": "divider"}], "s": {{ alert.scroe|tojson }}}')
    with pytest.raises(TemplateError) as caught:
        Renderer(templates)
    message = str(caught.value)
    assert SLACK in message and str(templates / SLACK) in message and "line 3" in message and "scroe" in message


def test_undefined_top_level_variable_fails_at_load(tmp_path: Path) -> None:
    templates = write(tmp_path, "email_subject.txt.j2", "{{ entiy }}")
    with pytest.raises(TemplateError, match=r"email_subject\.txt\.j2.*'entiy' is undefined"):
        Renderer(templates)


def test_syntax_error_fails_at_load_with_line(tmp_path: Path) -> None:
    templates = write(tmp_path, "email_body.txt.j2", "ok\n{% if alert.score %}\nno endif")
    with pytest.raises(TemplateError, match=r"email_body\.txt\.j2.*line \d+"):
        Renderer(templates)


def test_unknown_template_file_is_an_error(tmp_path: Path) -> None:
    templates = write(tmp_path, "slak.json.j2", "{}")
    with pytest.raises(TemplateError, match="unknown template slak.json.j2"):
        Renderer(templates)


def test_missing_override_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="does not exist"):
        Renderer(tmp_path / "nope")


def test_override_rendering_invalid_json_is_an_error(tmp_path: Path) -> None:
    templates = write(tmp_path, "webhook.json.j2", '{"entity": {{ alert.entity_id }}}')
    with pytest.raises(TemplateError, match="valid JSON.*tojson"):
        Renderer(templates)


def test_slack_override_without_blocks_is_an_error(tmp_path: Path) -> None:
    templates = write(tmp_path, SLACK, '{"text": {{ entity|tojson }}}')
    with pytest.raises(TemplateError, match="blocks"):
        Renderer(templates)


def test_template_assuming_a_context_field_fails_at_load(tmp_path: Path) -> None:
    # The load check renders a sample alert with an empty context too.
    templates = write(tmp_path, "email_subject.txt.j2", "{{ alert.context['context.renewal_date'] }}")
    with pytest.raises(TemplateError, match=r"email_subject\.txt\.j2 .* line 1: UndefinedError"):
        Renderer(templates)


def test_render_time_error_names_the_template(tmp_path: Path) -> None:
    templates = write(tmp_path, "email_subject.txt.j2", "{{ alert.context['context.renewal_date'] }}")
    renderer = Renderer(templates, check=False)
    assert renderer.email(make_alert()).subject == "2027-02-01"
    with pytest.raises(TemplateError, match=r"email_subject\.txt\.j2"):
        renderer.email(make_alert(context={}))


def test_tojson_serialises_datetimes_in_overrides(tmp_path: Path) -> None:
    templates = write(tmp_path, "webhook.json.j2", '{"act_by": {{ alert.act_by|tojson }}, "esc": {{ alert.escalation|tojson }}}')
    assert json.loads(Renderer(templates).webhook_body(make_alert())) == {"act_by": "2026-11-26T15:08:06.990711Z", "esc": None}


def test_shipped_templates_are_all_present() -> None:
    shipped = Path(__file__).resolve().parents[2] / "decision_router" / "templates"
    assert sorted(p.name for p in shipped.glob("*.j2")) == sorted(TEMPLATE_NAMES)
