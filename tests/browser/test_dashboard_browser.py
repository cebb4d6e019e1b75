"""The dashboard in a real headless Chromium against a running service (real Redis and
PostgreSQL, a store seeded through the pipeline): the pages load with no console or page
error and no request leaving the service, the charts carry the store's numbers, and an
owner acknowledges an alert by clicking, which shows in the stats."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import select
from sqlmodel import Session

from decision_router import insights
from decision_router.stats import compute_quality, compute_stats
from decision_router.tables import AlertRecord, AuditEvent
from tests.browser.conftest import Site
from tests.browser.seed import MID, RISK, WATCH

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.postgres]


@contextmanager
def logged_in(browser, site: Site, token: str, view: str, *, allow: tuple[str, ...] = ()) -> Iterator[object]:
    """A fresh tab (own sessionStorage) logged in with `token`; fails on any console or
    page error but those containing one of `allow`, and on any request to somewhere other than the service."""
    context = browser.new_context()
    context.set_default_timeout(10_000)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: None if r.url.startswith((site.url, "data:")) else problems.append(f"external: {r.url}"))
    try:
        page.goto(site.url)
        page.fill("#token", token)
        page.click("#login-form button[type=submit]")
        page.wait_for_selector(f"body[data-loaded={view}]")
        yield page
        assert [p for p in problems if not any(allowed in p for allowed in allow)] == []
    finally:
        context.close()


def act(page, action: str, alert_id: str, result: str | None = None) -> None:
    """Click an alert's button and wait until the page says the action was recorded (and reloaded the list)."""
    extra = f"[data-result={result}]" if result else ""
    page.click(f'button[data-action={action}]{extra}[data-alert="{alert_id}"]')
    page.wait_for_function(
        "([action, id]) => document.body.dataset.loaded === 'owner'"
        " && document.getElementById('owner-status').textContent.includes(`Recorded: ${action}`)"
        " && document.getElementById('owner-status').textContent.includes(id)",
        arg=[action, alert_id],
    )


def holdouts(site: Site) -> dict[str, float]:
    return {rule.name: rule.holdout for rule in site.ruleset.rules}


def rule_stats(site: Site) -> dict[str, object]:
    with Session(site.engine) as session:
        return {row.key: row for row in compute_stats(session, holdouts=holdouts(site))}


def funnel_on(page) -> dict[tuple[str, str], int]:
    marks = page.eval_on_selector_all(
        "#funnel rect[data-step]", "els => els.map(e => [e.dataset.rule, e.dataset.step, e.dataset.value])"
    )
    return {(rule, step): int(value) for rule, step, value in marks}


def test_ops_view_draws_the_numbers_of_the_store(browser, site: Site) -> None:
    with logged_in(browser, site, site.tokens["ops"], "ops") as page:
        stats = rule_stats(site)
        with Session(site.engine) as session:
            histogram = insights.time_to_act_histogram(session)
            sla = insights.owner_sla(session, now=datetime.now(UTC))
            quality = compute_quality(session)

        # Funnel: every alerting rule, four steps, the counts of compute_stats.
        funnel = funnel_on(page)
        assert {rule for rule, _ in funnel} == {WATCH, RISK, MID}
        for rule in (WATCH, RISK, MID):
            row = stats[rule]
            assert [funnel[(rule, step)] for step in ("routed", "acknowledged", "intervened", "success")] == [
                row.routed, row.acknowledged, row.intervened, row.successes]
        assert funnel[(WATCH, "intervened")] > 0 and funnel[(RISK, "acknowledged")] > 0

        # Uplift: a bar with its 95% interval where there is enough data, words where not.
        marks = page.eval_on_selector_all("#uplift g[data-rule]", """els => els.map(e => ({
            rule: e.dataset.rule, uplift: e.dataset.uplift, low: e.dataset.ciLow, high: e.dataset.ciHigh,
            bar: e.querySelector("rect") !== null, whiskers: e.querySelectorAll("line.ci").length,
            text: e.textContent}))""")
        uplift = {m["rule"]: m for m in marks}
        watch = stats[WATCH]
        assert watch.uplift is not None
        assert float(uplift[WATCH]["uplift"]) == pytest.approx(watch.uplift, rel=1e-12)
        assert float(uplift[WATCH]["low"]) == pytest.approx(watch.uplift_ci_low, rel=1e-12)
        assert float(uplift[WATCH]["high"]) == pytest.approx(watch.uplift_ci_high, rel=1e-12)
        assert uplift[WATCH]["bar"] and uplift[WATCH]["whiskers"] == 3
        assert stats[MID].uplift is None and uplift[MID]["uplift"] == "" and not uplift[MID]["bar"]
        assert "not enough data" in uplift[MID]["text"]
        assert "no control group" in uplift[RISK]["text"]

        # Time to act: one bar per bucket, the counts from the store; all interventions counted.
        bars = page.eval_on_selector_all(
            "#time-to-act rect[data-bucket]", "els => els.map(e => [e.dataset.bucket, Number(e.dataset.count)])"
        )
        assert bars == [[b.label, b.count] for b in histogram.buckets]
        assert sum(n for _, n in bars) == sum(row.intervened for row in stats.values()) > 0
        assert sum(1 for _, n in bars if n) >= 3  # the seed spans several buckets

        # Owners' SLA table.
        rows = page.eval_on_selector_all(
            "#sla tbody tr[data-owner]", "els => els.map(e => Array.from(e.cells, c => c.textContent))"
        )
        assert rows == [[r.owner, str(r.open), str(r.overdue), str(r.escalated), str(r.breached)] for r in sla]
        assert any(int(escalated) > 0 for *_, escalated, _ in rows)

        # Rejections per day, by reason: the totals of compute_quality.
        rects = page.eval_on_selector_all(
            "#rejections rect[data-reason]", "els => els.map(e => [e.dataset.reason, Number(e.dataset.count)])"
        )
        drawn = Counter()
        for reason, n in rects:
            drawn[reason] += n
        expected = Counter({r.reason: 0 for r in quality.rejections})
        for r in quality.rejections:
            expected[r.reason] += r.count
        for reason, n in quality.outcome_rejections:
            expected[reason] += n
        assert drawn == expected and sum(drawn.values()) == 5

        # Filters: one rule, then a model with no alerts.
        page.select_option("#f-rule", RISK)
        page.click("#filters button[type=submit]")
        page.wait_for_selector("body[data-loaded=ops]")
        assert {rule for rule, _ in funnel_on(page)} == {RISK}
        page.select_option("#f-rule", "")
        page.select_option("#f-model", "churn")
        page.click("#filters button[type=submit]")
        page.wait_for_selector("body[data-loaded=ops]")
        assert {rule for rule, _ in funnel_on(page)} == {WATCH, RISK, MID}


def test_a_long_rule_name_in_the_uplift_chart_stays_clear_of_its_text_and_bar(browser, site: Site) -> None:
    """`key-account-churn-visibility` (a shipped rule) ran into its "no control group": a name
    longer than its column is cut with an ellipsis, the whole name in its tooltip."""
    long_name = "key-account-churn-visibility"
    rows = [
        {"rule": long_name, "uplift": None, "has_control": False, "treated_n": 40, "control_n": 0,
         "ci_low": None, "ci_high": None},
        {"rule": f"{long_name}-with-a-holdout", "uplift": -0.2, "ci_low": -0.3, "ci_high": -0.1,
         "has_control": True, "treated_n": 400, "control_n": 400},
        {"rule": "smb", "uplift": None, "has_control": True, "treated_n": 3, "control_n": 2,
         "ci_low": None, "ci_high": None},
    ]
    with logged_in(browser, site, site.tokens["ops"], "ops") as page:
        drawn = page.evaluate("""async (rows) => {
            const charts = await import("/assets/charts.js");
            charts.uplift(document.getElementById("uplift"), rows, 30);
            return [...document.querySelectorAll("#uplift g[data-rule]")].map((g) => {
                const label = g.querySelector("text.label");
                const title = label.querySelector("title");
                const next = g.querySelector("text.nodata, rect, line.ci").getBoundingClientRect();
                const box = label.getBoundingClientRect();
                const value = g.querySelector("text.value");
                return {rule: g.dataset.rule, shown: label.firstChild.textContent, title: title && title.textContent,
                        right: box.right, width: box.width, next: next.left,
                        value_right: value && value.getBoundingClientRect().right,
                        chart_right: g.ownerSVGElement.getBoundingClientRect().right};
            });
        }""", rows)
    by_rule = {d["rule"]: d for d in drawn}
    for row in rows:
        label = by_rule[row["rule"]]
        assert label["width"] > 0 and label["right"] <= label["next"], label  # no overlap
    # The widest value text (an uplift and both bounds negative) is not cut at the chart's right edge.
    holdout = by_rule[f"{long_name}-with-a-holdout"]
    assert holdout["value_right"] <= holdout["chart_right"], holdout
    for rule in (long_name, f"{long_name}-with-a-holdout"):
        assert by_rule[rule]["shown"].endswith("…") and by_rule[rule]["title"] == rule
    assert (by_rule["smb"]["shown"], by_rule["smb"]["title"]) == ("smb", None)  # short: as it is, no tooltip


def test_owner_acknowledges_by_clicking_and_the_stats_show_it(browser, site: Site) -> None:
    with logged_in(browser, site, site.tokens["owner"], "owner") as page:
        listed = page.eval_on_selector_all("#alerts li[data-alert]", "els => els.map(e => e.dataset.alert)")
        with Session(site.engine) as session:
            still_open = {a.alert_id for a in insights.open_alerts(session, owner="alice-moreau")}
        assert set(listed) == still_open and still_open <= set(site.seeded["owner_open"])
        # Context and deadlines are on the card.
        first = page.inner_text(f'li[data-alert="{listed[0]}"]')
        assert "renewal_date" in first and "2027-02-01" in first and "acknowledge" in first

        target = page.eval_on_selector_all(
            "#alerts button[data-action=ack]:not([disabled])", "els => els.map(e => e.dataset.alert)"
        )[0]
        before = rule_stats(site)[RISK]
        with logged_in(browser, site, site.tokens["ops"], "ops") as ops:
            shown_before = funnel_on(ops)[(RISK, "acknowledged")]
            act(page, "ack", target)
            assert page.is_disabled(f'button[data-action=ack][data-alert="{target}"]')
            after = rule_stats(site)[RISK]
            assert after.acknowledged == before.acknowledged + 1 == shown_before + 1
            assert after.acknowledged_rate > before.acknowledged_rate
            ops.click("#filters button[type=submit]")
            ops.wait_for_selector("body[data-loaded=ops]")
            assert funnel_on(ops)[(RISK, "acknowledged")] == shown_before + 1
        response = httpx.get(f"{site.url}/v1/stats", params={"rule": RISK},
                             headers={"Authorization": f"Bearer {site.tokens['ops']}"})
        assert response.status_code == 200 and response.json()["rows"][0]["acknowledged"] == after.acknowledged

        # The intervention with its note, then the outcome: the alert leaves the open list.
        page.fill(f'input[data-note="{target}"]', "exec call")
        act(page, "intervene", target)
        assert page.is_disabled(f'button[data-action=intervene][data-alert="{target}"]')
        act(page, "outcome", target, "success")
        assert page.query_selector(f'li[data-alert="{target}"]') is None
        with Session(site.engine) as session:
            record = session.get(AlertRecord, target)
            assert (record.intervention, record.outcome, record.status) == ("exec call", "success", "closed")


def test_an_action_whose_answer_was_lost_applies_once_when_clicked_again(browser, site: Site) -> None:
    """The first ack reaches the server but its answer never reaches the page; the owner clicks
    again. The button's Idempotency-Key makes the second request a replay: one acknowledgement."""
    with logged_in(browser, site, site.tokens["owner"], "owner", allow=("ERR_CONNECTION_RESET",)) as page:
        target = page.eval_on_selector_all(
            "#alerts button[data-action=ack]:not([disabled])", "els => els.map(e => e.dataset.alert)"
        )[-1]
        keys: list[str | None] = []

        def lose_the_first_answer(route) -> None:
            keys.append(route.request.headers.get("idempotency-key"))
            if len(keys) == 1:
                route.fetch()  # the server applies it...
                route.abort("connectionreset")  # ...and the page never hears back
            else:
                route.continue_()

        page.route(f"**/v1/alerts/{target}/ack", lose_the_first_answer)
        page.click(f'button[data-action=ack][data-alert="{target}"]')
        page.wait_for_selector(f'button[data-action=ack][data-alert="{target}"]:not([disabled])')
        act(page, "ack", target)
        assert len(keys) == 2 and keys[0] == keys[1] and keys[0] and len(keys[0]) == 32, keys
        with Session(site.engine) as session:
            acks = session.scalars(
                select(AuditEvent).where(AuditEvent.alert_id == target, AuditEvent.type == "acknowledged")
            ).all()
        assert len(acks) == 1


def test_a_manager_sees_the_alerts_escalated_to_them_marked_as_someone_elses(browser, site: Site) -> None:
    with logged_in(browser, site, site.tokens["manager"], "owner") as page:
        cards = page.eval_on_selector_all(
            "#alerts li[data-alert]",
            """els => els.map(e => [e.dataset.alert, e.classList.contains("escalated-to-me"),
                                   e.querySelector(".escalated-note")?.textContent ?? null])""",
        )
        with Session(site.engine) as session:
            escalated = {a.alert_id for a in insights.open_alerts(session, owner="lead-strategic")}
        # The seed escalated alice's unacknowledged alerts to her manager, once; the manager owns none.
        assert escalated and {alert_id for alert_id, *_ in cards} == escalated
        assert all(marked and note == "escalated to you from alice-moreau, level 1" for _, marked, note in cards)
        assert "escalated to you" in page.inner_text("#owner-status")


def test_other_tokens_get_their_own_view_or_none(browser, site: Site) -> None:
    # Another owner sees only their own alerts.
    with logged_in(browser, site, site.tokens["other-owner"], "owner") as page:
        listed = set(page.eval_on_selector_all("#alerts li[data-alert]", "els => els.map(e => e.dataset.alert)"))
        with Session(site.engine) as session:
            assert listed == {a.alert_id for a in insights.open_alerts(session, owner="elena-petrova")}
        assert listed and not listed & set(site.seeded["owner_open"])
    # A publisher token is turned away at the login form, with the reason.
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(site.url)
        page.fill("#token", site.tokens["publisher"])
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#message:not([hidden])")
        assert "cannot use the dashboard" in page.inner_text("#message")
        assert page.is_visible("#login") and not page.is_visible("#ops")
    finally:
        context.close()
