"""The Alertmanager and PagerDuty mappings (soundcheck/alerting/interop.py) against the published field lists.

The field lists below are copied from the vendors' documentation, not from our code:

* Alertmanager webhook payload: https://prometheus.io/docs/alerting/latest/configuration/#webhook_config
  (the JSON example there) and the Go types behind it: notify/webhook/webhook.go ``Message``
  (version, groupKey, truncatedAlerts + template.Data) and template/template.go ``Data``/``Alert``
  in github.com/prometheus/alertmanager.
* PagerDuty Events API v2, "Send an Alert Event":
  https://developer.pagerduty.com/docs/events-api-v2/trigger-events/
  (github.com/PagerDuty/developer-docs, docs/events-API-v2/02-Trigger-Events.md).
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime, timezone

import jsonschema
import pytest

from soundcheck.alerting.correlate import pseudonymize
from soundcheck.alerting.interop import (
    ALERTMANAGER_ZERO_TIME,
    PAGERDUTY_SEVERITY,
    group_by_incident,
    rfc3339,
    to_alertmanager_webhook,
    to_alertmanager_webhooks,
    to_pagerduty_event,
)
from soundcheck.evaluation.scenarios import START_MS, run_offline
from soundcheck.settings import load_settings
from soundcheck.evaluation.simulator import Simulator

# -- Alertmanager: webhook_config payload ("version": "4") ----------------------------------------
AM_PAYLOAD_KEYS = {
    "version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels", "commonLabels",
    "commonAnnotations", "externalURL", "alerts",
}
AM_ALERT_KEYS = {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
AM_STATUSES = {"firing", "resolved"}
AM_ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time.Time: endsAt of an alert with no end yet
PROM_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")  # Prometheus data model, label names

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
AM_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": sorted(AM_PAYLOAD_KEYS),
    "additionalProperties": False,
    "properties": {
        "version": {"const": "4"},
        "groupKey": {"type": "string"},
        "truncatedAlerts": {"type": "integer", "minimum": 0},
        "status": {"enum": sorted(AM_STATUSES)},
        "receiver": {"type": "string"},
        "groupLabels": _STR_MAP, "commonLabels": _STR_MAP, "commonAnnotations": _STR_MAP,
        "externalURL": {"type": "string"},
        "alerts": {"type": "array", "items": {
            "type": "object",
            "required": sorted(AM_ALERT_KEYS),
            "additionalProperties": False,
            "properties": {
                "status": {"enum": sorted(AM_STATUSES)},
                "labels": {**_STR_MAP, "required": ["alertname"], "propertyNames": {"pattern": PROM_LABEL_NAME.pattern}},
                "annotations": _STR_MAP,
                "startsAt": {"type": "string", "format": "date-time"},
                "endsAt": {"type": "string", "format": "date-time"},
                "generatorURL": {"type": "string"},
                "fingerprint": {"type": "string", "minLength": 1},
            },
        }},
    },
}

# -- PagerDuty Events API v2: alert events ------------------------------------------------------
PD_TOP_KEYS = {"routing_key", "event_action", "dedup_key", "payload", "images", "links", "client", "client_url"}
PD_EVENT_ACTIONS = {"trigger", "acknowledge", "resolve"}
PD_PAYLOAD_REQUIRED = {"summary", "source", "severity"}
PD_PAYLOAD_OPTIONAL = {"timestamp", "component", "group", "class", "custom_details"}
PD_SEVERITIES = {"critical", "error", "warning", "info"}
PD_SUMMARY_MAX = 1024
PD_DEDUP_KEY_MAX = 255
PD_RESOLVE_KEYS = {"routing_key", "dedup_key", "event_action"}  # the docs' Resolve example, exactly

PD_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["routing_key", "event_action"],
    "additionalProperties": False,
    "properties": {
        "routing_key": {"type": "string", "minLength": 1},
        "event_action": {"enum": sorted(PD_EVENT_ACTIONS)},
        "dedup_key": {"type": "string", "minLength": 1, "maxLength": PD_DEDUP_KEY_MAX},
        "payload": {
            "type": "object",
            "required": sorted(PD_PAYLOAD_REQUIRED),
            "additionalProperties": False,
            "properties": {
                "summary": {"type": "string", "minLength": 1, "maxLength": PD_SUMMARY_MAX},
                "source": {"type": "string", "minLength": 1},
                "severity": {"enum": sorted(PD_SEVERITIES)},
                "timestamp": {"type": "string", "format": "date-time"},
                "component": {"type": "string"},
                "group": {"type": "string"},
                "class": {"type": "string"},
                "custom_details": {"type": "object"},
            },
        },
        "images": {"type": "array", "items": {"type": "object", "required": ["src"]}},
        "links": {"type": "array", "items": {"type": "object", "required": ["href"]}},
        "client": {"type": "string"},
        "client_url": {"type": "string"},
    },
    # a trigger needs the payload; acknowledge/resolve need the dedup_key of what they close
    "if": {"properties": {"event_action": {"const": "trigger"}}},
    "then": {"required": ["payload"]},
    "else": {"required": ["dedup_key"]},
}

ROUTING_KEY = "R0UT1NGKEY0123456789abcdefABCDEF"  # 32 characters, like a real integration key
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
_FMT = jsonschema.FormatChecker()


def _validate(instance, schema):
    jsonschema.Draft202012Validator(schema, format_checker=_FMT).validate(instance)


def _parse(ts: str) -> datetime:
    assert RFC3339_Z.match(ts), ts
    return datetime.fromisoformat(ts)  # 3.11 reads the Z


def _ms(ts: str) -> int:
    return round(_parse(ts).timestamp() * 1000)


# -- alerts from the real code path ------------------------------------------------------------

PLAN = (("cdn_pop_degradation", 60, 180), ("fraud_farm", 60, 240), ("billing_error_spike", 100, 180))


@pytest.fixture(scope="module")
def run():
    settings = load_settings("development", environ={})
    sim = Simulator(seed=3, rate=80, duration_s=300, start_ms=START_MS, plan=PLAN)
    pipe = run_offline(settings, sim)
    assert pipe.alerts, "the offline pipeline produced no alerts"
    return settings, sim, pipe.alerts


@pytest.fixture(scope="module")
def alerts(run):
    """The firing notifications (the worker also sends resolved ones: see test_real_resolved_alerts_map_to_resolve),
    the latest per fingerprint (a fraud farm's updates share one, as Alertmanager would keep one)."""
    latest = {a["fingerprint"]: a for a in run[2] if a["status"] == "firing"}
    return list(latest.values())


def test_real_resolved_alerts_map_to_resolve(run):
    done = [a for a in run[2] if a["status"] == "resolved"]
    assert done, "the offline run resolves its incidents at the end"
    for a in done:
        ev = to_pagerduty_event(a, routing_key="R" * 32)
        assert ev == {"routing_key": "R" * 32, "event_action": "resolve", "dedup_key": a["fingerprint"]}
    payload = to_alertmanager_webhook(done)
    assert payload["status"] == "resolved" and all(x["endsAt"] != "0001-01-01T00:00:00Z" for x in payload["alerts"])


def resolved(alert: dict) -> dict:
    a = copy.deepcopy(alert)
    a.update(status="resolved", notification="resolved", ends_at=a["last_seen"])
    return a


def test_fixture_covers_the_cases(alerts):
    assert len({a["incident_id"] for a in alerts if a.get("incident_id")}) >= 2
    assert any("fraud_farm" in a["entity"] and a["details"]["accounts"] for a in alerts)  # a farm, listing its accounts
    assert any("service" in a["entity"] for a in alerts)
    assert all(a["status"] == "firing" for a in alerts)


# -- Alertmanager ------------------------------------------------------------------------------


def test_alertmanager_payload_matches_published_fields(alerts):
    for payload in to_alertmanager_webhooks(alerts, external_url="http://am.example:9093"):
        _validate(payload, AM_SCHEMA)
        assert set(payload) == AM_PAYLOAD_KEYS
        assert payload["version"] == "4" and payload["truncatedAlerts"] == 0
        assert payload["receiver"] == "soundcheck" and payload["externalURL"] == "http://am.example:9093"
        assert payload["status"] == "firing"
        for am in payload["alerts"]:
            assert set(am) == AM_ALERT_KEYS
            assert am["status"] in AM_STATUSES
            for m in (am["labels"], am["annotations"]):
                assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in m.items())
            assert all(PROM_LABEL_NAME.match(k) for k in am["labels"])
            _parse(am["startsAt"])
            assert am["endsAt"] == AM_ZERO_TIME == ALERTMANAGER_ZERO_TIME
        assert json.loads(json.dumps(payload)) == payload


def test_alertmanager_labels_and_annotations(alerts):
    by_fp = {a["fingerprint"]: a for a in alerts}
    payload = to_alertmanager_webhook(alerts)
    for am in payload["alerts"]:
        a = by_fp[am["fingerprint"]]
        assert am["labels"] == {
            "alertname": a["kind"], "severity": a["severity"], "priority": a["priority"],
            "detector": a["detector"], **a["entity"],
            **({"incident_id": a["incident_id"]} if a.get("incident_id") else {}),
        }
        ann = am["annotations"]
        assert ann["summary"] == a["summary"] and ann["description"] == a["title"]
        assert ann["runbook"] == "\n".join(a["recommendations"])
        if a["root_cause"]:
            assert ann["root_cause"].startswith(a["root_cause"]["node"])
        bi = a["business_impact"]
        assert float(ann["impact_score"]) == pytest.approx(bi["score"])
        assert float(ann["revenue_loss_per_hour"]) == pytest.approx(bi["revenue_loss_per_hour"])
        assert int(ann["affected_users"]) == bi["affected_users"]
        assert _ms(am["startsAt"]) == a["starts_at"]


def test_alertmanager_groups_by_incident(alerts):
    payloads = to_alertmanager_webhooks(alerts)
    incidents = {a["incident_id"] for a in alerts}
    assert len(payloads) == len(incidents)
    seen = []
    for p in payloads:
        inc = p["groupLabels"]["incident_id"]
        assert p["groupLabels"] == {"incident_id": inc}
        assert p["groupKey"] == '{}:{incident_id="%s"}' % inc
        assert p["commonLabels"]["incident_id"] == inc
        assert {am["labels"]["incident_id"] for am in p["alerts"]} == {inc}
        seen += [am["fingerprint"] for am in p["alerts"]]
    assert sorted(seen) == sorted(a["fingerprint"] for a in alerts)
    assert len({p["groupKey"] for p in payloads}) == len(payloads)
    # common labels/annotations: exactly what every alert of the group shares
    for p in payloads:
        for k, v in p["commonLabels"].items():
            assert all(am["labels"][k] == v for am in p["alerts"])
        shared = set.intersection(*(set(am["labels"].items()) for am in p["alerts"]))
        assert set(p["commonLabels"].items()) == shared


def test_alertmanager_without_incident_is_its_own_group(alerts):
    a, b = (dict(x, incident_id=None) for x in alerts[:2])
    assert [len(g) for g in group_by_incident([a, b])] == [1, 1]
    p = to_alertmanager_webhook([a])
    assert p["groupLabels"] == {} and "incident_id" not in p["alerts"][0]["labels"]
    assert a["fingerprint"] in p["groupKey"]
    assert to_alertmanager_webhook([a], group_key="mine")["groupKey"] == "mine"


def test_alertmanager_resolved(alerts):
    group = group_by_incident(alerts)[0]
    done = [resolved(a) for a in group]
    p = to_alertmanager_webhook(done)
    _validate(p, AM_SCHEMA)
    assert p["status"] == "resolved"
    for am, a in zip(p["alerts"], done):
        assert am["status"] == "resolved"
        assert am["endsAt"] != AM_ZERO_TIME and _ms(am["endsAt"]) == a["ends_at"]
        assert _parse(am["endsAt"]) >= _parse(am["startsAt"])
    # one still firing: the group is firing (resolved only when all are)
    mixed = to_alertmanager_webhook([resolved(alerts[0]), alerts[1]])
    assert mixed["status"] == "firing"
    assert [am["status"] for am in mixed["alerts"]] == ["resolved", "firing"]
    # without ends_at, last_seen ends it
    a = dict(resolved(alerts[0]), ends_at=None)
    assert _ms(to_alertmanager_webhook([a])["alerts"][0]["endsAt"]) == a["last_seen"]


def test_generator_url_template(alerts):
    a = alerts[0]
    p = to_alertmanager_webhook([a], generator_url="https://grafana.example/d/sc?var-fp={fingerprint}")
    assert p["alerts"][0]["generatorURL"].endswith("var-fp=" + a["fingerprint"])


# -- PagerDuty ---------------------------------------------------------------------------------


def test_pagerduty_trigger_matches_published_fields(alerts):
    for a in alerts:
        ev = to_pagerduty_event(a, routing_key=ROUTING_KEY)
        _validate(ev, PD_SCHEMA)
        assert set(ev) <= PD_TOP_KEYS
        assert set(ev) == {"routing_key", "event_action", "dedup_key", "payload", "client"}
        assert ev["event_action"] == "trigger" and ev["event_action"] in PD_EVENT_ACTIONS
        assert ev["routing_key"] == ROUTING_KEY and ev["client"] == "soundcheck"
        assert ev["dedup_key"] == a["fingerprint"] and len(ev["dedup_key"]) <= PD_DEDUP_KEY_MAX
        pl = ev["payload"]
        assert PD_PAYLOAD_REQUIRED <= set(pl) <= PD_PAYLOAD_REQUIRED | PD_PAYLOAD_OPTIONAL
        assert {"timestamp", "component", "class", "custom_details"} <= set(pl)
        assert all(isinstance(pl[k], str) and pl[k] for k in set(pl) - {"custom_details"})
        assert 0 < len(pl["summary"]) <= PD_SUMMARY_MAX
        assert pl["severity"] in PD_SEVERITIES and pl["severity"] == PAGERDUTY_SEVERITY[a["severity"]]
        assert _ms(pl["timestamp"]) == a["event_time"]
        assert pl["class"] == a["kind"]
        assert pl["source"] == ", ".join(f"{k}={a['entity'][k]}" for k in sorted(a["entity"]))
        assert pl["component"] in a["entity"].values()
        cd = pl["custom_details"]
        for k in ("priority", "signals", "business_impact", "root_cause", "recommendations", "related", "occurrences"):
            assert cd[k] == a[k], k
        assert json.loads(json.dumps(ev)) == ev


def test_pagerduty_component_and_group(alerts):
    for a in alerts:
        pl = to_pagerduty_event(a, routing_key=ROUTING_KEY)["payload"]
        e = a["entity"]
        if "service" in e:
            assert pl["component"] == e["service"]
        elif "cdn_pop" in e:
            assert pl["component"] == e["cdn_pop"]
        if "region" in e:
            assert pl["group"] == e["region"]
        else:
            assert pl.get("group") in ((a["root_cause"] or {}).get("entity", {}).get("region"), a["incident_id"])


def test_pagerduty_resolve_is_exactly_the_documented_fields(alerts):
    for a in alerts:
        ev = to_pagerduty_event(resolved(a), routing_key=ROUTING_KEY)
        _validate(ev, PD_SCHEMA)
        assert set(ev) == PD_RESOLVE_KEYS
        assert ev == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": a["fingerprint"]}
        # the resolve closes what the trigger opened
        assert ev["dedup_key"] == to_pagerduty_event(a, routing_key=ROUTING_KEY)["dedup_key"]


@pytest.mark.parametrize("ours,theirs", [("critical", "critical"), ("high", "error"), ("medium", "warning"),
                                         ("low", "warning"), ("info", "info")])
def test_pagerduty_severity_mapping(alerts, ours, theirs):
    assert set(PAGERDUTY_SEVERITY) == {"critical", "high", "medium", "low", "info"}
    ev = to_pagerduty_event(dict(alerts[0], severity=ours), routing_key=ROUTING_KEY)
    _validate(ev, PD_SCHEMA)
    assert ev["payload"]["severity"] == theirs in PD_SEVERITIES
    assert ev["payload"]["custom_details"]["severity"] == ours


def test_pagerduty_summary_is_clipped_to_1024(alerts):
    a = dict(alerts[0], summary="x" * 5000)
    pl = to_pagerduty_event(a, routing_key=ROUTING_KEY)["payload"]
    assert len(pl["summary"]) == PD_SUMMARY_MAX
    assert pl["custom_details"]["summary"] == a["summary"]  # the whole text is still there
    _validate(to_pagerduty_event(a, routing_key=ROUTING_KEY), PD_SCHEMA)


def test_pagerduty_schema_rejects_what_the_docs_forbid(alerts):
    ev = to_pagerduty_event(alerts[0], routing_key=ROUTING_KEY)
    for bad in (dict(ev, event_action="escalate"),
                dict(ev, payload=dict(ev["payload"], severity="high")),
                dict(ev, payload=dict(ev["payload"], summary="x" * 1025)),
                {k: v for k, v in ev.items() if k != "payload"},
                {"routing_key": ROUTING_KEY, "event_action": "resolve"}):
        with pytest.raises(jsonschema.ValidationError):
            _validate(bad, PD_SCHEMA)


# -- privacy -----------------------------------------------------------------------------------


def test_user_ids_stay_pseudonymised(run):
    settings, sim, alerts = run
    raw = [acc for inj in sim.scenarios if inj.name == "fraud_farm" for acc in inj.details["accounts"]]
    assert raw
    farms = [a for a in alerts if "fraud_farm" in a["entity"] and a["status"] == "firing"]
    assert farms
    known = {pseudonymize(r, settings.pseudonym_key) for r in raw}
    out = json.dumps([to_alertmanager_webhooks(alerts)] +
                     [to_pagerduty_event(a, routing_key=ROUTING_KEY) for a in alerts])
    assert not any(r in out for r in raw)
    for a in farms:  # the farm lists its accounts by their pseudonyms
        listed = [e["user_id"] for e in a["details"]["accounts"]]
        assert listed and set(listed) <= known


# -- input validation --------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["fingerprint", "status", "kind", "severity", "priority", "summary", "entity", "starts_at"])
def test_missing_fields_raise(alerts, field):
    a = {k: v for k, v in alerts[0].items() if k != field}
    with pytest.raises(ValueError, match=field):
        to_alertmanager_webhook([a])
    if field not in ("starts_at",):
        with pytest.raises(ValueError, match=field):
            to_pagerduty_event(a, routing_key=ROUTING_KEY)


def test_bad_inputs_raise(alerts):
    a = alerts[0]
    with pytest.raises(ValueError, match="non-empty list"):
        to_alertmanager_webhook([])
    with pytest.raises(ValueError, match="severity"):
        to_pagerduty_event(dict(a, severity="urgent"), routing_key=ROUTING_KEY)
    with pytest.raises(ValueError, match="status"):
        to_pagerduty_event(dict(a, status="open"), routing_key=ROUTING_KEY)
    with pytest.raises(ValueError, match="routing_key"):
        to_pagerduty_event(a, routing_key="")
    with pytest.raises(ValueError, match="ends_at"):
        to_alertmanager_webhook([dict(a, status="resolved", ends_at=None, last_seen=None)])
    with pytest.raises(ValueError, match="starts_at"):
        to_alertmanager_webhook([dict(a, starts_at="yesterday")])
    with pytest.raises(ValueError, match="label"):
        to_alertmanager_webhook([dict(a, entity={"cdn-pop": "x"})])
    with pytest.raises(ValueError, match="JSON object"):
        to_pagerduty_event("not an alert", routing_key=ROUTING_KEY)
    # a resolve needs only the fingerprint and the status
    assert to_pagerduty_event({"fingerprint": a["fingerprint"], "status": "resolved"}, routing_key=ROUTING_KEY)
    # the routing key never lands in an error message
    with pytest.raises(ValueError) as e:
        to_pagerduty_event(dict(a, kind=""), routing_key=ROUTING_KEY)
    assert ROUTING_KEY not in str(e.value)


def test_rfc3339():
    assert rfc3339(START_MS) == "2023-11-14T22:13:20Z"
    assert rfc3339(START_MS + 5) == "2023-11-14T22:13:20.005Z"
    assert _parse(rfc3339(START_MS + 5)) == datetime(2023, 11, 14, 22, 13, 20, 5000, tzinfo=timezone.utc)


# -- the example consumer (examples/pager_bridge.py), without a broker --------------------------


def test_pager_bridge_routing(alerts):
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "pager_bridge.py"
    spec = importlib.util.spec_from_file_location("pager_bridge", path)
    bridge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bridge)

    pd = argparse.Namespace(alertmanager_url=None, pagerduty_url="https://pd.example/v2/enqueue", dry_run=False,
                            group_id="pager-bridge")
    for a in alerts:
        url, body = bridge.outgoing(a, pd, ROUTING_KEY)
        if a["priority"] in ("P0", "P1"):
            assert url == pd.pagerduty_url and body["event_action"] == "trigger"
        else:
            assert (url, body) == (None, None)
        url, body = bridge.outgoing(resolved(a), pd, ROUTING_KEY)  # every resolve goes out
        assert body == {"routing_key": ROUTING_KEY, "event_action": "resolve", "dedup_key": a["fingerprint"]}
    am = argparse.Namespace(alertmanager_url="http://am.example/hook", pagerduty_url=None, dry_run=True,
                            group_id="pager-bridge")
    url, body = bridge.outgoing(alerts[0], am, "")
    assert url is None and set(body) == AM_PAYLOAD_KEYS
