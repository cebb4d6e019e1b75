"""An alert handed back to an owner who had it before (reassigned A -> B -> A) is a delivery of its own:
its inbox dedupe key, webhook delivery header, email Message-ID and digest id differ from the first
hand-off's, which stay as they always were. The hand-off is not part of the alert JSON."""

from __future__ import annotations

from decision_router.channels import Digest, EmailReceiver, Renderer, SmtpSettings, WebhookReceiver, WebhookSender
from decision_router.channels.send import DELIVERY_HEADER, build_email
from decision_router.contracts import handoff_suffix
from decision_router.delivery import inbox_writes
from decision_router.keys import Keys
from tests.unit.test_channels_render import make_alert


def test_a_hand_back_is_the_same_alert_json() -> None:
    first = make_alert()
    again = first.handed_off(2)
    assert (first.handoff, again.handoff) == (1, 2)
    assert again.model_dump_json() == first.model_dump_json()
    assert "handoff" not in again.model_dump()
    assert handoff_suffix(first) == "" and handoff_suffix(again) == ":2" and handoff_suffix(again, ".") == ".2"


def test_a_hand_back_has_its_own_inbox_dedupe_key() -> None:
    keys = Keys("t:")
    first, again = make_alert(), make_alert().handed_off(2)
    (one,), (two,) = inbox_writes([first], keys), inbox_writes([again], keys)
    assert one.dedupe_key == keys.dedupe(f"alert:{first.alert_id}:alice-moreau")  # as before
    assert two.dedupe_key == keys.dedupe(f"alert:{first.alert_id}:alice-moreau:2")
    assert inbox_writes([make_alert().handed_off(2)], keys)[0].dedupe_key == two.dedupe_key  # stable


async def test_a_hand_back_has_its_own_delivery_header_and_message_id() -> None:
    sender = WebhookSender("alice-moreau:webhook", WebhookReceiver(url="http://127.0.0.1:9/"), Renderer())
    try:
        first, again = make_alert(), make_alert().handed_off(3)
        assert sender.headers(first, b"{}", 1)[DELIVERY_HEADER] == f"{first.alert_id}:alice-moreau"
        assert sender.headers(again, b"{}", 1)[DELIVERY_HEADER] == f"{first.alert_id}:alice-moreau:3"
    finally:
        await sender.aclose()
    smtp = SmtpSettings(host="127.0.0.1", sender="alerts@router.example.com")
    mail = EmailReceiver(to=["alice@example.com"])
    ids = [build_email(alert, Renderer(), mail, smtp)["Message-ID"] for alert in (first, again, again)]
    assert ids[0] == f"<{first.alert_id}.alice-moreau@router.example.com>"
    assert ids[1] == ids[2] == f"<{first.alert_id}.alice-moreau.3@router.example.com>"


def test_a_digest_holding_a_hand_back_has_its_own_id() -> None:
    others = [make_alert(alert_id="al-other")]
    first = Digest.of([make_alert(), *others], recipient="alice-moreau")
    again = Digest.of([make_alert().handed_off(2), *others], recipient="alice-moreau")
    assert first.digest_id != again.digest_id
    assert again.digest_id == Digest.of([make_alert().handed_off(2), *others], recipient="alice-moreau").digest_id
