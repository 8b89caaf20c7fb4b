"""The internal topics' records (aggregates, fraud rows, anomalies, ticks) match their schema files."""

from __future__ import annotations

import json

import jsonschema
import orjson
import pytest

from soundcheck.ingest.contracts import SCHEMA_DIR
from soundcheck.pipeline import run_simulation
from soundcheck.evaluation.simulator import Simulator

T0 = 1_700_000_000_000


def _schema(name: str) -> dict:
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


@pytest.fixture(scope="module")
def run(request):
    from soundcheck.settings import load_settings

    settings = load_settings("development", environ={})
    sent = []
    from soundcheck import pipeline

    original = pipeline.OfflinePipeline.deliver

    def spy(self, msgs, now=None):
        sent.extend(msgs)
        return original(self, msgs, now)

    pipeline.OfflinePipeline.deliver = spy
    try:
        pipe = run_simulation(settings, Simulator(seed=2, rate=60, duration_s=240, start_ms=T0,
                                                  plan=(("fraud_farm", 30, 200), ("latency_regression", 150, 80))),
                              partitions=2, keying="user")
    finally:
        pipeline.OfflinePipeline.deliver = original
    return pipe, sent


def test_every_aggregates_and_fraud_message_matches_its_schema(run):
    pipe, sent = run
    validator = jsonschema.Draft202012Validator(_schema("aggregates"))
    topics = {m.topic for m in sent}
    assert topics == {"aggregates", "fraud"}
    assert any(orjson.loads(m.value).get("partials") for m in sent) and any(orjson.loads(m.value).get("rows") for m in sent)
    for m in sent:
        validator.validate(orjson.loads(m.value))


def test_every_anomaly_and_tick_matches_its_schema(run):
    pipe, _ = run
    validator = jsonschema.Draft202012Validator(_schema("anomaly"))
    assert {a.detector for a in pipe.anomalies} >= {"behavior.fraud", "system.baseline"}
    for a in pipe.anomalies:
        validator.validate(orjson.loads(a.to_json()))
    validator.validate({"tick": "audio", "event_time": T0})
    validator.validate({"tick": "fraud", "source": 2, "event_time": T0})  # the fraud stage ticks too
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"tick": "audio"})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({"tick": "payments", "event_time": T0})
