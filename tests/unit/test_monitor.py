"""Drift and data-quality figures (monitor.assess_models) on an in-memory store with seeded
synthetic predictions; the monitor's alert bookkeeping without Redis; `stats drift`."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest
import structlog
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, create_engine
from structlog.testing import capture_logs

from decision_router import tables  # noqa: F401  (registers the tables)
from decision_router.drift import psi_threshold
from decision_router.monitor import (
    ALL_VERSIONS,
    DataQualityMonitor,
    ModelHealth,
    assess_models,
    data_quality_alert_id,
)
from decision_router.rules import DriftConfig, ModelConfig, Owner, RuleSet
from decision_router.tables import (
    AlertRecord,
    DataQualityAlertRecord,
    DeliveryRecord,
    PredictionRecord,
    RejectionRecord,
)

T0 = datetime(2026, 11, 2, tzinfo=UTC)
NOW = T0 + timedelta(days=4)  # reference: days 0-2 (the version's first 3), recent: day 3
DAY = timedelta(days=1)

Gen = Callable[[random.Random], float]


def normal(mean: float, sd: float) -> Gen:
    return lambda rng: rng.gauss(mean, sd)


@pytest.fixture
def engine() -> Iterator[Engine]:
    store = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    SQLModel.metadata.create_all(store)
    yield store
    store.dispose()


def add_predictions(
    engine: Engine, rng: random.Random, *, start: datetime, n: int, span: timedelta = DAY, model: str = "churn",
    version: str = "2026.11", score: Gen | None = None, features: dict[str, Gen] | None = None,
) -> None:
    """n predictions received evenly over [start, start + span); scores N(0.4, 0.1) by default."""
    score = normal(0.4, 0.1) if score is None else score
    features = {"tenure_months": normal(24, 6), "logins_7d": normal(10, 3)} if features is None else features
    rows = []
    for i in range(n):
        at = start + span * (i / n)
        pid = f"{model}-{version}-{at.isoformat()}-{i}"
        document = {
            "prediction_id": pid, "model": model, "model_version": version, "score": score(rng),
            "features": {
                **{name: gen(rng) for name, gen in features.items()},
                "top_drivers": ["usage_drop", "support_tickets"],  # not a number: never assessed
                "is_new": rng.random() < 0.5,  # a bool is not a number either
            },
        }
        rows.append({
            "prediction_id": pid, "stream_id": None, "model": model, "model_version": version, "entity_type": "account",
            "entity_id": f"acct-{i}", "score": document["score"], "predicted_at": at, "received_at": at,
            "rules_version": "test", "document": document,
        })
    with Session(engine) as session:
        session.execute(insert(PredictionRecord), rows)
        session.commit()


def add_days(engine: Engine, rng: random.Random, per_day: int, *, recent: dict[str, Any] | None = None, **kw: Any) -> None:
    """Three reference days, then the recent day (with `recent` overrides: a drift)."""
    add_predictions(engine, rng, start=T0, n=3 * per_day, span=3 * DAY, **kw)
    add_predictions(engine, rng, start=T0 + 3 * DAY, n=per_day, **{**kw, **(recent or {})})


def assess(engine: Engine, models: dict[str, ModelConfig] | None = None, **kw: Any) -> dict[tuple[str, str], ModelHealth]:
    with Session(engine) as session:
        return {(h.model_version, h.metric): h for h in assess_models(session, now=NOW, ruleset_models=models, **kw)}


def flagged(health: dict[tuple[str, str], ModelHealth]) -> set[str]:
    return {metric for (_, metric), h in health.items() if h.flagged}


# --- distributions --------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "per_day"), [(1, 250), (2, 250), (3, 2500)], ids=["small-1", "small-2", "large"])
def test_no_drift_flags_nothing_at_small_or_large_samples(engine: Engine, per_day: int, seed: int) -> None:
    add_days(engine, random.Random(seed), per_day)
    health = assess(engine)
    assert set(health) == {
        (ALL_VERSIONS, "rejection_rate"), ("2026.11", "score"), ("2026.11", "feature:logins_7d"),
        ("2026.11", "feature:tenure_months"), ("2026.11", "missing_context_rate"),
    }
    for key in [("2026.11", "score"), ("2026.11", "feature:logins_7d"), ("2026.11", "feature:tenure_months")]:
        h = health[key]
        assert h.flagged is False, h.detail  # judged, and found fine
        assert (h.n_reference, h.n_recent) == (3 * per_day, per_day)
        assert h.value is not None and h.threshold is not None and h.value <= h.threshold
    # The threshold follows the sample sizes (and alpha split over the 4 figures of the version):
    # about 0.13 at 250 a day, 0.013 at 2500, where a fixed cut-off would be one number.
    score = health[("2026.11", "score")]
    assert score.threshold == pytest.approx(psi_threshold(3 * per_day, per_day, 10, 0.01 / 4))
    assert health[(ALL_VERSIONS, "rejection_rate")].flagged is False  # nothing rejected in either window
    context = health[("2026.11", "missing_context_rate")]
    assert context.flagged is None  # no decisions stored here, and the note says what is counted
    assert context.note.startswith("0 reference and 0 recent predictions with a decision; at least 200")


def test_half_sd_score_shift_in_the_recent_day_is_flagged(engine: Engine) -> None:
    add_days(engine, random.Random(3), 300, recent={"score": normal(0.45, 0.1)})
    health = assess(engine)
    assert flagged(health) == {"score"}
    score = health[("2026.11", "score")]
    assert score.value > score.threshold
    assert (score.n_reference, score.n_recent) == (900, 300)
    assert score.window.reference_from == T0 and score.window.reference_to == NOW - DAY
    assert (score.window.recent_from, score.window.recent_to) == (NOW - DAY, NOW)
    assert re.search(r"^PSI 0\.\d+ above its threshold 0\.\d+ \(n = 900 reference, 300 recent; 10 bins; "
                     r"false-alarm rate 0\.0025\); mean 0\.4[5-7]\d* recent, 0\.(39|40|41)\d* reference$", score.detail)
    assert score.detail.endswith("; " + score.note) and score.note.startswith("mean 0.4")
    # alpha is split over the version's figures: score, two numeric features, missing context.
    assert score.alpha == pytest.approx(0.01 / 4)


def test_numeric_feature_shift_is_flagged_for_that_feature_only(engine: Engine) -> None:
    drifted = {"tenure_months": normal(24, 6), "logins_7d": normal(13, 3)}  # 1 sd fewer... more logins
    add_days(engine, random.Random(4), 300, recent={"features": drifted})
    health = assess(engine)
    assert flagged(health) == {"feature:logins_7d"}
    assert health[("2026.11", "score")].flagged is False
    assert health[("2026.11", "feature:tenure_months")].flagged is False
    assert not any("top_drivers" in metric or "is_new" in metric for _, metric in health)



def _sometimes(gen: Gen, present: float) -> Gen:
    """The feature's value in a share `present` of predictions, absent (None) in the others."""
    return lambda rng: gen(rng) if rng.random() < present else None


@pytest.mark.parametrize(
    ("recent_tenure", "missing"),
    [(None, "100.0%"), (lambda rng: "unknown", "100.0%"), (_sometimes(normal(24, 6), 0.1), "9")],
    ids=["gone", "no-longer-a-number", "mostly-gone"],
)
def test_a_feature_going_missing_is_flagged_not_called_too_little_data(
    engine: Engine, recent_tenure: Gen | None, missing: str
) -> None:
    # The producer stops sending tenure_months (or sends text, or sends it for 1 in 10): a data
    # problem the model owner must hear of, not "not enough data" because few values are left.
    recent = {"logins_7d": normal(10, 3)} | ({"tenure_months": recent_tenure} if recent_tenure else {})
    add_days(engine, random.Random(12), 300, recent={"features": recent})
    health = assess(engine)
    assert flagged(health) == {"feature:tenure_months"}
    tenure = health[("2026.11", "feature:tenure_months")]
    assert (tenure.n_reference, tenure.n_recent) == (900, 300)  # predictions, with or without the value
    assert tenure.value > tenure.threshold == pytest.approx(psi_threshold(900, 300, 11, 0.01 / 4))  # + "missing"
    assert f"missing from {missing}" in tenure.note and tenure.note.endswith("0.0% of reference")
    assert "; 11 bins;" in tenure.detail


def test_an_optional_feature_missing_as_often_as_before_is_fine(engine: Engine) -> None:
    optional = {"tenure_months": _sometimes(normal(24, 6), 0.5), "logins_7d": normal(10, 3)}
    add_days(engine, random.Random(13), 400, features=optional)
    tenure = assess(engine)[("2026.11", "feature:tenure_months")]
    assert tenure.flagged is False, tenure.detail
    assert (tenure.n_reference, tenure.n_recent) == (1200, 400)
    assert re.search(r"missing from [45]\d\.\d% of recent predictions, [45]\d\.\d% of reference$", tenure.note)


def test_a_feature_that_starts_to_arrive_within_a_version_is_flagged(engine: Engine) -> None:
    recent = {"tenure_months": normal(24, 6), "logins_7d": normal(10, 3), "seats": normal(50, 10)}
    add_days(engine, random.Random(15), 300, recent={"features": recent})
    seats = assess(engine)[("2026.11", "feature:seats")]
    assert seats.flagged is True and (seats.n_reference, seats.n_recent) == (900, 300)
    assert seats.note.endswith(" recent, n/a reference; missing from 0.0% of recent predictions, 100.0% of reference")


def test_a_feature_constant_in_the_reference_that_starts_to_vary_is_flagged(engine: Engine) -> None:
    # plan_tier was always 1 in the first days; now 1 prediction in 10 says 2 or 3. This read
    # "not enough data: every reference value is 1" with 900 and 300 values at hand.
    steady = {"plan_tier": lambda rng: 1, "seats": lambda rng: 5}
    varying = {"plan_tier": lambda rng: 1 if rng.random() < 0.9 else rng.choice([2, 3]), "seats": lambda rng: 5}
    add_days(engine, random.Random(16), 300, features=steady, recent={"features": varying})
    health = assess(engine)
    assert flagged(health) == {"feature:plan_tier"}
    tier = health[("2026.11", "feature:plan_tier")]
    assert (tier.n_reference, tier.n_recent) == (900, 300) and "; 3 bins;" in tier.detail
    assert tier.note.endswith(" recent, 1 reference")
    seats = health[("2026.11", "feature:seats")]  # still constant: judged, and fine
    assert seats.flagged is False and seats.status == "ok", seats.detail


def _segment(weights: list[float]) -> Gen:
    return lambda rng: rng.choices(["smb", "mid-market", "enterprise", "public-sector"], weights)[0]


def test_a_text_feature_is_watched_by_category(engine: Engine) -> None:
    # The segment mix moves from mostly SMB to mostly enterprise: the model now scores a
    # population it was not checked on. Text features used to be skipped altogether.
    before = {"tenure_months": normal(24, 6), "segment": _segment([6, 2, 1, 1])}
    after = {"tenure_months": normal(24, 6), "segment": _segment([2, 2, 5, 1])}
    add_days(engine, random.Random(17), 300, features=before, recent={"features": after})
    health = assess(engine)
    assert flagged(health) == {"feature:segment"}
    segment = health[("2026.11", "feature:segment")]
    assert (segment.n_reference, segment.n_recent) == (900, 300) and "; 5 bins;" in segment.detail  # 4 + "other"
    assert re.fullmatch(r"'enterprise' [45]\d\.\d% of recent values, (9|1\d)\.\d% of reference", segment.note), segment.note
    assert segment.alpha == pytest.approx(0.01 / 4)  # score, tenure, segment, missing context


@pytest.mark.parametrize("seed", range(20))
def test_a_stable_text_feature_is_not_flagged(engine: Engine, seed: int) -> None:
    # 20 seeded checks at alpha = 1% split over 4 figures: an alarm in any would be a 1-in-400 event
    # per figure; the false-alarm rate itself is measured in test_drift.
    features = {"tenure_months": normal(24, 6), "segment": _segment([6, 2, 1, 1]), "region": lambda rng: "emea"}
    add_days(engine, random.Random(100 + seed), 250, features=features)
    health = assess(engine)
    assert flagged(health) == set()
    assert health[("2026.11", "feature:segment")].flagged is False
    assert health[("2026.11", "feature:region")].flagged is False  # constant text: judged, fine


def test_huge_feature_values_have_a_finite_mean(engine: Engine) -> None:
    huge = {"exposure": lambda rng: rng.choice([1e308, 1.5e308, 1.7e308])}
    add_days(engine, random.Random(14), 300, features=huge)
    exposure = assess(engine)[("2026.11", "feature:exposure")]
    assert exposure.flagged is False and "inf" not in exposure.note and re.search(r"mean 1\.\d+e\+308 recent", exposure.note)


def test_too_few_samples_are_not_judged_and_say_so(engine: Engine) -> None:
    # A huge shift, but only 60 recent predictions: below min_samples (200), nothing is claimed.
    add_days(engine, random.Random(5), 60, recent={"score": normal(0.9, 0.05)})
    health = assess(engine)
    score = health[("2026.11", "score")]
    assert score.flagged is None and score.value is None and score.threshold is None
    assert score.detail.startswith("not enough data: 180 reference and 60 recent values; at least 200")
    assert score.note == score.detail.removeprefix("not enough data: ")  # the table shows the reason
    assert score.status == "not enough data"
    assert flagged(health) == set()
    # With the minimum lowered to what the data has, the same shift is flagged.
    lowered = {"churn": ModelConfig(owner="lead", drift=DriftConfig(min_samples=50))}
    assert assess(engine, lowered)[("2026.11", "score")].flagged is True


def test_a_version_first_seen_in_the_recent_window_has_no_reference_yet(engine: Engine) -> None:
    rng = random.Random(6)
    add_days(engine, rng, 300)
    add_predictions(engine, rng, start=NOW - timedelta(hours=12), n=300, span=timedelta(hours=12), version="2026.12",
                    score=normal(0.6, 0.1))
    new = assess(engine)[("2026.12", "score")]
    assert new.flagged is None
    assert "within the recent window, so it has no reference period yet" in new.detail
    assert new.window.reference_from is None


def test_pinned_baseline_version_is_the_reference(engine: Engine) -> None:
    rng = random.Random(7)
    add_days(engine, rng, 300)  # 2026.11, stable
    # 2026.12 went live a day after 2026.11 with scores shifted by 1 sd, and stayed there.
    add_predictions(engine, rng, start=T0 + DAY, n=900, span=3 * DAY, version="2026.12", score=normal(0.5, 0.1))
    own = assess(engine)
    assert own[("2026.12", "score")].flagged is False  # stable against its own first days
    pinned = {"churn": ModelConfig(owner="lead", drift=DriftConfig(baseline_version="2026.11"))}
    health = assess(engine, pinned)
    score = health[("2026.12", "score")]
    assert score.flagged is True and score.window.reference_version == "2026.11"
    assert score.n_reference == 900  # 2026.11's first 3 days
    missing = assess(engine, {"churn": ModelConfig(owner="lead", drift=DriftConfig(baseline_version="2025.01"))})
    assert missing[("2026.12", "score")].flagged is None
    assert "baseline version 2025.01 has no stored predictions" in missing[("2026.12", "score")].detail


def test_only_filters_models_and_an_idle_model_is_not_listed(engine: Engine) -> None:
    rng = random.Random(8)
    add_days(engine, rng, 250)
    add_predictions(engine, rng, start=T0, n=500, span=2 * DAY, model="payment-fraud")  # nothing recent
    with Session(engine) as session:
        assert {h.model for h in assess_models(session, now=NOW)} == {"churn"}
        assert assess_models(session, now=NOW, only={"payment-fraud"}) == []


# --- rates ---------------------------------------------------------------------------------


def add_rejections(engine: Engine, *, start: datetime, n: int, span: timedelta = DAY, reason: str = "schema") -> None:
    with Session(engine) as session:
        session.add_all(
            RejectionRecord(source_stream="predictions", source_id=f"{start.isoformat()}-{reason}-{i}", model="churn",
                            reason=reason, detail="bad", at=start + span * (i / n))
            for i in range(n)
        )
        session.commit()


@pytest.mark.parametrize(("recent_rejections", "jump"), [(3, False), (40, True)])
def test_rejection_rate_jump_is_flagged(engine: Engine, recent_rejections: int, jump: bool) -> None:
    add_days(engine, random.Random(9), 300)
    add_rejections(engine, start=T0, n=9, span=3 * DAY, reason="stale")  # 1% in the reference
    add_rejections(engine, start=T0 + 3 * DAY, n=recent_rejections)
    rate = assess(engine)[(ALL_VERSIONS, "rejection_rate")]
    assert rate.flagged is jump
    assert (rate.n_reference, rate.n_recent) == (909, 300 + recent_rejections)
    assert rate.value == pytest.approx(recent_rejections / (300 + recent_rejections))
    assert rate.reference_value == pytest.approx(9 / 909)
    # threshold is the lowest recent rate that is flagged: consistent with the flag.
    assert rate.threshold is not None and (rate.value >= rate.threshold) is jump
    assert f"schema {recent_rejections}" in rate.detail
    assert rate.alpha == 0.01 and (rate.p_value < 0.01) is jump


def add_decisions(engine: Engine, *, start: datetime, n: int, missing: int, span: timedelta = DAY) -> None:
    """n predictions' decisions (two each), `missing` of those predictions lacking a context field."""
    rows = []
    for i in range(n):
        at = start + span * (i / n)
        for rule in ("watch", "rest"):
            rows.append({
                "alert_id": f"al-{at.isoformat()}-{i}-{rule}", "prediction_id": f"p-{at.isoformat()}-{i}", "rule": rule,
                "owner": "desk", "original_owner": "desk", "owner_source": "static", "priority": "normal",
                "action": "alert", "model": "churn", "model_version": "2026.11", "entity_type": "account",
                "entity_id": f"acct-{i}", "score": 0.5, "context": {},
                "missing_context": ["context.arr"] if rule == "watch" and i < missing else [],
                "rules_version": "test", "predicted_at": at, "created_at": at, "ack_by": at, "act_by": at,
            })
    with Session(engine) as session:
        session.execute(insert(AlertRecord), rows)
        session.commit()


def test_missing_context_rate_jump_is_counted_per_prediction_and_flagged(engine: Engine) -> None:
    add_days(engine, random.Random(10), 300)
    add_decisions(engine, start=T0, n=900, missing=18, span=3 * DAY)  # 2%
    add_decisions(engine, start=T0 + 3 * DAY, n=300, missing=45)  # 15%
    rate = assess(engine)[("2026.11", "missing_context_rate")]
    assert (rate.n_reference, rate.n_recent) == (900, 300)  # predictions, not their 2 decisions each
    assert rate.value == pytest.approx(0.15) and rate.reference_value == pytest.approx(0.02)
    assert rate.flagged is True and "jumped" in rate.detail
    assert rate.note == "45 of 300 recent predictions with a decision (15.00%), 18 of 900 in the reference (2.00%)"


def test_health_rows_are_json_ready(engine: Engine) -> None:
    add_days(engine, random.Random(11), 250)
    document = json.loads(json.dumps([h.as_dict() for h in assess(engine).values()]))
    score = next(d for d in document if d["metric"] == "score")
    # UTC with a Z, as the API and the streams write times (`stats drift --format json` prints these rows).
    assert score["status"] == "ok" and score["window"]["recent_to"] == "2026-11-06T00:00:00Z"


# --- alerts ---------------------------------------------------------------------------------


def test_alert_id_is_per_model_version_metric_and_day() -> None:
    first = data_quality_alert_id("churn", "2026.11", "score", "2026-11-06")
    assert first == data_quality_alert_id("churn", "2026.11", "score", "2026-11-06")
    assert first.startswith("dq-")
    others = {
        data_quality_alert_id("churn", "2026.11", "score", "2026-11-07"),
        data_quality_alert_id("churn", "2026.11", "feature:x", "2026-11-06"),
        data_quality_alert_id("churn", "2026.12", "score", "2026-11-06"),
        data_quality_alert_id("fraud", "2026.11", "score", "2026-11-06"),
    }
    assert first not in others and len(others) == 4


def fake_pipeline(engine: Engine, model_owners: dict[str, str]) -> Any:
    owners = {
        "lead": Owner("lead", "Lead", None, None, None),
        "away": Owner("away", "Away", None, None, None, away_until=NOW + DAY, delegate="lead"),
    }
    ruleset = RuleSet(
        version="test", rules=(), owners=MappingProxyType(owners), source_dir=Path("."),
        model_owners=MappingProxyType(model_owners),
        models=MappingProxyType({m: ModelConfig(owner=o) for m, o in model_owners.items()}),
    )
    # No Redis: check_once only writes to Redis when an alert has an owner to deliver to.
    return SimpleNamespace(clock=lambda: NOW, ruleset=ruleset, engine=engine, redis=None, keys=None, settings=None, channels=None)


def test_unowned_model_alert_is_stored_not_delivered_and_warned_once(engine: Engine) -> None:
    add_days(engine, random.Random(3), 300, recent={"score": normal(0.45, 0.1)})
    monitor = DataQualityMonitor(fake_pipeline(engine, {}))
    with capture_logs() as logs:
        for _ in range(2):
            health = asyncio.run(monitor.check_once())
            assert [h.metric for h in health if h.flagged] == ["score"]
    with Session(engine) as session:
        (record,) = session.scalars(select(DataQualityAlertRecord)).all()
    assert (record.model, record.metric, record.owner, record.delivered_at) == ("churn", "score", None, None)
    assert record.alert_id == data_quality_alert_id("churn", "2026.11", "score", NOW.date().isoformat())
    assert record.n_reference == 900 and record.window["reference_version"] == "2026.11"
    warnings = [e for e in logs if e["log_level"] == "warning" and e["event"].startswith("model has no owner")]
    assert [w["model"] for w in warnings] == ["churn"]
    assert sum(1 for e in logs if e["event"] == "data-quality alert") == 1  # stored once, over two checks


def test_away_model_owner_hands_alerts_to_their_delegate(engine: Engine) -> None:
    add_days(engine, random.Random(3), 300, recent={"score": normal(0.45, 0.1)})
    monitor = DataQualityMonitor(fake_pipeline(engine, {"churn": "away"}))
    with Session(engine) as session:
        health = assess_models(session, now=NOW, ruleset_models=monitor.pipeline.ruleset.models)
    (new,) = monitor._store([h for h in health if h.flagged], monitor.pipeline.ruleset, NOW)
    assert new.owner == "lead"


def test_an_owner_added_later_the_same_day_gets_the_alert_still_flagged_once(engine: Engine) -> None:
    add_days(engine, random.Random(3), 300, recent={"score": normal(0.45, 0.1)})
    unowned = DataQualityMonitor(fake_pipeline(engine, {}))
    unowned._store([h for h in assess(engine).values() if h.flagged], unowned.pipeline.ruleset, NOW - DAY)  # yesterday's
    unowned._check()
    assert unowned._pending() == []
    # The owner is added to `models:` later the same day; both workers reload and check again.
    owned = fake_pipeline(engine, {"churn": "lead"})
    owned.channels = SimpleNamespace(channels_for=lambda owner: ("webhook", "email"))
    first, second = DataQualityMonitor(owned), DataQualityMonitor(owned)
    with capture_logs() as logs:
        for monitor in (first, second, first):
            assert [h.metric for h in monitor._check() if h.flagged] == ["score"]
    today = data_quality_alert_id("churn", "2026.11", "score", NOW.date().isoformat())
    (pending,) = first._pending()  # yesterday's stays unowned: stale, not delivered a day late
    assert (pending.alert_id, pending.owner, pending.created_at) == (today, "lead", NOW)
    with Session(engine) as session:
        deliveries = session.execute(select(DeliveryRecord.alert_id, DeliveryRecord.recipient, DeliveryRecord.channel)).all()
    assert sorted(deliveries) == [(today, "lead", "email"), (today, "lead", "webhook")]
    # One worker gave it its owner, and only that one reports (and queued) it.
    assert [(e["alert_id"], e["owner"]) for e in logs if e["event"] == "data-quality alert"] == [(today, "lead")]


# --- `decision-router stats drift` ------------------------------------------------------------


@pytest.fixture
def _restore_logging() -> Iterator[None]:
    # The command configures structlog to print to CliRunner's stream, which closes after.
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("_restore_logging")
def test_stats_drift_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from decision_router import cli, cli_drift  # noqa: F401  (cli_drift adds `drift` to the stats group)
    from decision_router.store import make_engine

    store = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    SQLModel.metadata.create_all(store)
    now = datetime.now(UTC)
    rng = random.Random(3)
    add_predictions(store, rng, start=now - 4 * DAY, n=900, span=3 * DAY)
    add_predictions(store, rng, start=now - DAY + timedelta(minutes=1), n=300, score=normal(0.6, 0.1))
    add_predictions(store, rng, start=now - DAY + timedelta(minutes=1), n=20, model="payment-fraud")
    add_predictions(store, rng, start=now - 5 * DAY, n=20, model="lead-scoring")  # known, idle lately
    store.dispose()
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(Path(__file__).resolve().parents[2] / "rules"))
    runner = CliRunner()

    result = runner.invoke(cli.app, ["stats", "drift", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {(r["model"], r["model_version"], r["metric"]): r for r in json.loads(result.stdout)}
    assert rows[("churn", "2026.11", "score")]["flagged"] is True
    assert rows[("churn", "2026.11", "feature:logins_7d")]["flagged"] is False
    assert rows[("payment-fraud", "2026.11", "score")]["status"] == "not enough data"

    table = runner.invoke(cli.app, ["stats", "drift", "--model", "payment-fraud"])
    assert table.exit_code == 0, table.output
    assert "not enough data" in table.stdout and "churn" not in table.stdout
    idle = runner.invoke(cli.app, ["stats", "drift", "--model", "lead-scoring"])
    assert idle.exit_code == 0, idle.output
    assert idle.stdout.strip() == "no predictions or rejections in lead-scoring's recent window"  # no empty table
    assert "any model" not in idle.stdout  # the filter was applied, not ignored
    bad = runner.invoke(cli.app, ["stats", "drift", "--format", "csv"])
    assert bad.exit_code == 2
