"""The committed AsyncAPI document is what the code generates, so it never goes stale."""

from __future__ import annotations

from pathlib import Path

import yaml

from decision_router.asyncapi import asyncapi_document, asyncapi_text

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"


def test_committed_asyncapi_matches_the_generated_document() -> None:
    committed = yaml.safe_load(COMMITTED.read_text(encoding="utf-8"))
    assert committed == yaml.safe_load(asyncapi_text("yaml")), (
        "docs/asyncapi.yaml is stale: run `decision-router asyncapi --out docs/asyncapi.yaml`"
    )


def test_asyncapi_describes_the_streams_with_the_contracts_as_schemas() -> None:
    document = asyncapi_document()
    channels = {c["address"] for c in document["channels"].values()}
    assert channels == {"predictions", "outcomes", "predictions:dlq", "outcomes:dlq", "alerts:{owner}"}
    actions = {name: op["action"] for name, op in document["operations"].items()}
    assert actions["predictions"] == actions["outcomes"] == "receive"
    assert actions["predictions:dlq"] == actions["alerts:{owner}"] == "send"
    schemas = document["components"]["schemas"]
    prediction = schemas["Prediction"]
    assert set(prediction["required"]) >= {"prediction_id", "model", "entity_id", "score", "predicted_at"}
    assert "reason" in schemas["Rejection"]["properties"] and "type" in schemas["OutcomeEvent"]["properties"]
    assert {"Alert", "DataQualityAlert"} <= set(schemas)
