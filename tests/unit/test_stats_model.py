"""`compute_model_precision`: precision by score band from untouched control predictions.

Convention: models predict the bad outcome, so a control record with `outcome == "failure"`
is a positive. Figures are counted by hand from `control_records()`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router.contracts import OutcomeEvent, OutcomeType
from decision_router.stats import compute_model_precision, parse_band_edges
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord
from decision_router.tracker import apply_outcome, find_alerts
from tests.unit.test_stats import alert

M0 = datetime(2026, 11, 16, 10, 0, tzinfo=UTC)


def control(n: int, score: float, outcome: str | None, *, rule: str = "att-watch", version: str = "1",
            model: str = "attrition", pid: str | None = None, created: datetime = M0,
            act_after_s: int | None = None, ack: bool = False) -> AlertRecord:
    return alert(n, rule=rule, owner="ann", model=model, version=version, score=score, outcome=outcome, held_out=True,
                 prediction_id=pid or f"m-{model}-{version}-{n}", created=created, act_after_s=act_after_s, ack=ack)


def control_records() -> list[AlertRecord]:
    """Model "attrition" (other fixtures use other model names).

    v1, band 0.8-0.9: 10 controls at 0.85 (7 failure, 2 success, 1 no outcome yet), plus
      x-dup (control of two rules: one unit, failure) and x-rec (control, and tracked by a
      record rule: still untouched, success) -> held 12, with outcome 11, positives 8.
      Not counted: x-both (control of one rule, alerted by another), x-supp (suppressed
      control), x-treated (routed only), and the controls someone intervened on: x-act
      (failure), x-act-open (no outcome yet), x-rec-act (its record-rule decision intervened on).
    v1, band 0.9-1.0: 0.95 x3 and 1.0 x1 (failure), 0.9 x1 (success) -> 5, 5, 4.
    v1, band 0.3-0.4: 0.3 x3 (success) -> 3, 3, 0; and 40 days earlier 0.35 (failure).
    v2, band 0.8-0.9: 0.85 x2 (1 failure, 1 success) -> 2, 2, 1.
    v2, band 0.9-1.0: x-ack 0.95, acknowledged but not intervened on (failure): counted -> 1, 1, 1.
    model "other" a, band 0.5-0.6: 0.5 (failure).
    """
    rows = [control(n, 0.85, "failure" if n < 7 else "success" if n < 9 else None) for n in range(10)]
    rows += [control(10 + n, score, "failure") for n, score in enumerate((0.95, 0.95, 0.95, 1.0))]
    rows += [control(20, 0.9, "success")]
    rows += [control(30 + n, 0.3, "success") for n in range(3)]
    rows += [control(40, 0.35, "failure", created=M0 - timedelta(days=40))]
    rows += [control(50 + n, 0.85, "failure" if n == 0 else "success", version="2") for n in range(2)]
    rows += [control(60, 0.5, "failure", model="other", version="a")]
    # one prediction, two rules with a holdout: one unit
    rows += [control(70, 0.85, "failure", pid="x-dup"), control(70, 0.85, "failure", rule="att-other", pid="x-dup")]
    # control of one rule, tracked (not delivered) by a record rule: untouched
    rows += [control(71, 0.85, "success", pid="x-rec"),
             alert(71, rule="att-catch-all", owner="desk", action="record", model="attrition", score=0.85,
                   prediction_id="x-rec", outcome="success", created=M0)]
    # control of one rule, alerted by another: someone may have acted, so not a clean control
    rows += [control(72, 0.85, "failure", pid="x-both"),
             alert(72, rule="att-vis", owner="dir", model="attrition", score=0.85, prediction_id="x-both",
                   outcome="failure", created=M0)]
    suppressed = control(73, 0.85, "failure", pid="x-supp")
    suppressed.suppressed_by = "al-att-watch-0"
    rows += [suppressed]
    rows += [alert(74, rule="att-watch", owner="ann", model="attrition", score=0.85, prediction_id="x-treated",
                   outcome="failure", created=M0)]
    # controls someone intervened on (an `intervened` event by entity or prediction_id): not left alone
    rows += [control(75, 0.85, "failure", pid="x-act", act_after_s=3600),
             control(76, 0.85, None, pid="x-act-open", act_after_s=3600)]
    # control of one rule; the intervention was recorded on the prediction's record-rule decision
    rows += [control(77, 0.85, "success", pid="x-rec-act"),
             alert(77, rule="att-catch-all", owner="desk", action="record", model="attrition", score=0.85,
                   prediction_id="x-rec-act", outcome="success", created=M0, act_after_s=600)]
    # control acknowledged (by entity) but not intervened on: seeing is not acting, still left alone
    rows += [control(78, 0.95, "failure", version="2", pid="x-ack", ack=True)]
    return rows


@pytest.fixture
def session():
    engine = make_engine("sqlite:///:memory:")
    create_schema(engine)
    with Session(engine) as s:
        s.add_all(control_records())
        s.commit()
        yield s
    engine.dispose()


def bands(rows, model: str = "attrition", version: str = "1") -> dict[tuple[float, float], tuple]:
    return {(r.band_low, r.band_high): (r.held_out, r.n, r.positives, r.precision)
            for r in rows if (r.model, r.model_version) == (model, version)}


def test_precision_by_decile_band(session) -> None:
    rows = compute_model_precision(session, model="attrition", since=M0 - timedelta(days=1))
    v1 = bands(rows)
    assert len(v1) == 10
    assert v1[(0.8, 0.9)] == (12, 11, 8, pytest.approx(8 / 11))
    assert v1[(0.9, 1.0)] == (5, 5, 4, pytest.approx(0.8))  # 0.9 and 1.0 belong to the top band
    assert v1[(0.3, 0.4)] == (3, 3, 0, 0.0)
    assert v1[(0.0, 0.1)] == (0, 0, 0, None)  # empty band: no precision
    assert bands(rows, version="2")[(0.8, 0.9)] == (2, 2, 1, 0.5)
    assert bands(rows, version="2")[(0.9, 1.0)] == (1, 1, 1, 1.0)  # acknowledged only: still left alone
    (top,) = [r for r in rows if r.model_version == "1" and r.band_low == 0.8]
    assert (top.ci_low, top.ci_high) == pytest.approx((0.4344, 0.9025), abs=5e-5)  # Wilson 95% of 8/11
    (empty,) = [r for r in rows if r.model_version == "1" and r.band_low == 0.0]
    assert (empty.ci_low, empty.ci_high) == (None, None)


def test_custom_bands_and_order(session) -> None:
    rows = compute_model_precision(session, since=M0 - timedelta(days=1), edges=parse_band_edges("0,0.5,0.8,0.9,1.0"))
    assert [(r.model, r.model_version, r.band_low) for r in rows] == [
        (m, v, low) for m, v in (("attrition", "1"), ("attrition", "2"), ("other", "a")) for low in (0.0, 0.5, 0.8, 0.9)
    ]
    v1 = bands(rows)
    assert v1 == {(0.0, 0.5): (3, 3, 0, 0.0), (0.5, 0.8): (0, 0, 0, None),
                  (0.8, 0.9): (12, 11, 8, pytest.approx(8 / 11)), (0.9, 1.0): (5, 5, 4, 0.8)}
    assert bands(rows, "other", "a")[(0.5, 0.8)] == (1, 1, 1, 1.0)


def test_window_and_model_filter(session) -> None:
    everything = bands(compute_model_precision(session, model="attrition"))
    assert everything[(0.3, 0.4)] == (4, 4, 1, 0.25)  # the control from 40 days earlier is back
    assert {r.model for r in compute_model_precision(session, model="other")} == {"other"}
    assert compute_model_precision(session, model="nobody") == []
    assert compute_model_precision(session, until=M0 - timedelta(days=39), model="attrition")[3].n == 1


def test_json_row(session) -> None:
    row = compute_model_precision(session, model="other")[5].as_dict()
    assert row == {"model": "other", "model_version": "a", "band_low": 0.5, "band_high": 0.6, "held_out": 1, "n": 1,
                   "positives": 1, "precision": 1.0, "ci_low": pytest.approx(0.2065, abs=5e-5), "ci_high": 1.0}


def send(session: Session, **event: object) -> None:
    """An outcome event through the tracker, as the router applies it (30-day window)."""
    outcome = OutcomeEvent(actor="ann", at=M0 + timedelta(hours=2), **event)
    found = find_alerts(session, outcome, now=M0 + timedelta(hours=3), outcome_window=timedelta(days=30))
    assert found, event
    apply_outcome(session, event=outcome, alerts=found, source_id=None, now=M0 + timedelta(hours=3))
    session.commit()


def precision_after_interventions(engine: Engine) -> dict[tuple[float, float], tuple]:
    """Four controls of model "tracked" at 0.85, all with a bad outcome: a0 intervened on by entity,
    a1 by prediction_id, a2 acknowledged by entity only, a3 untouched. Also run on PostgreSQL."""
    with Session(engine) as session:
        records = [control(n, 0.85, None, model="tracked") for n in range(4)]
        session.add_all(records)
        session.commit()
        send(session, type=OutcomeType.INTERVENED, entity_type="account", entity_id="a0", action="exec-call")
        send(session, type=OutcomeType.INTERVENED, prediction_id=records[1].prediction_id)
        send(session, type=OutcomeType.ACKNOWLEDGED, entity_type="account", entity_id="a2")
        for record in records:
            send(session, type=OutcomeType.OUTCOME, result="failure", prediction_id=record.prediction_id)
        assert [r.intervened_at is not None for r in records] == [True, True, False, False]
        assert records[2].acknowledged_at is not None
        return bands(compute_model_precision(session, model="tracked"), model="tracked")


def test_a_control_someone_intervened_on_is_not_left_alone() -> None:
    """`intervened` by entity or by prediction_id reaches control records (README, Outcome events);
    such a prediction leaves held_out, n and positives. An acknowledgement alone does not."""
    engine = make_engine("sqlite:///:memory:")
    create_schema(engine)
    try:
        assert precision_after_interventions(engine)[(0.8, 0.9)] == (2, 2, 2, 1.0)  # a2 (acknowledged) and a3
    finally:
        engine.dispose()


@pytest.mark.parametrize("text", ["", "0", "0,0", "1,0.5", "0,a,1", "0,nan,1", "0;1", "0,inf", "-inf,1", "0,1e999"])
def test_bad_band_edges(text: str) -> None:
    with pytest.raises(ValueError):
        parse_band_edges(text)


def test_band_edges() -> None:
    assert parse_band_edges("0, 0.5,1") == (0.0, 0.5, 1.0)
