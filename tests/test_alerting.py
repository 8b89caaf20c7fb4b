import pytest

from soundcheck.alerting.correlate import (
    ServiceGraph,
    alert_step,
    correlate_step,
    dedup_step,
    fingerprint,
    public_entity,
    pseudonymize,
)
from soundcheck.alerting.classify import classify, degradation
from soundcheck.detectors.base import Anomaly
from soundcheck.detectors.baseline import Signal


def anomaly(kind="service_degradation", entity=None, node="cdn", region="BR", t=0, signals=None, users=0, detector="system.baseline"):
    entity = entity or {"service": node, "region": region}
    signals = signals or [Signal("error_rate", 0.08, 0.001, 40.0, 0.01, t)]
    return Anomaly(kind, detector, entity, region, node, signals, 0.9, t, t - 10_000, "system_performance_metrics", users)


def test_fingerprint_is_stable_and_order_free():
    a = fingerprint("k", "d", {"region": "BR", "cdn_pop": "p1"})
    assert a == fingerprint("k", "d", {"cdn_pop": "p1", "region": "BR"})
    assert a != fingerprint("k", "d", {"cdn_pop": "p2", "region": "BR"})


def test_user_ids_are_pseudonymised_with_the_configured_key(settings):
    e = public_entity({"user_id": "alice", "region": "US"}, settings)
    assert e["user_id"] != "alice" and e["user_id"] == pseudonymize("alice", settings.pseudonym_key)
    off = settings.replace(privacy={"pseudonymize_user_ids": False})
    assert public_entity({"user_id": "alice"}, off)["user_id"] == "alice"


def test_dedup_suppresses_repeats_escalates_and_repeats_after_the_interval():
    s, d = dedup_step(None, 0, "medium", 600_000)
    decisions = [d]
    for t, sev in [(10_000, "medium"), (20_000, "low"), (30_000, "high"), (40_000, "high"), (640_000, "high")]:
        s, d = dedup_step(s, t, sev, 600_000)
        decisions.append(d)
    assert decisions == ["new", None, None, "escalated", None, "repeat"]
    assert s["occurrences"] == 6 and s["notifications"] == 3


def test_graph_paths(settings):
    g = ServiceGraph(settings.services)
    assert g.depends_on("client_experience", "cdn")  # through audio_streaming
    assert g.on_path("premium_billing", "payment_gateway")
    assert not g.on_path("search", "payment_gateway")


def test_correlation_groups_one_dependency_path_and_names_the_most_upstream_root(settings):
    g = ServiceGraph(settings.services)
    state = None
    steps = [
        anomaly("behavior_rate_anomaly", {"region": "BR", "service": "client_experience"}, "client_experience", t=20_000),
        anomaly("audio_quality_degradation", {"region": "BR"}, "audio_streaming", t=10_000),
        anomaly("service_degradation", {"service": "cdn", "region": "BR"}, "cdn", t=10_000),
        anomaly("audio_quality_degradation", {"region": "BR", "cdn_pop": "gru1"}, "cdn", t=12_000),
        anomaly("service_degradation", {"service": "search", "region": "BR"}, "search", t=15_000),
    ]
    incidents = []
    for a in steps:
        e = public_entity(a.entity, settings)
        state, inc = correlate_step(state, fingerprint(a.kind, a.detector, e), a, e, g, 300_000)
        incidents.append(inc["incident_id"])
    assert len(set(incidents[:4])) == 1  # one incident for the cdn path
    # client_experience depends on search too, but the incident's root (cdn) neither explains a
    # search fault nor is explained by it: two faults, two incidents
    assert incidents[4] != incidents[0]
    assert state["incidents"][1]["root_cause"]["node"] == "search"
    root = state["incidents"][0]["root_cause"]
    assert root["node"] == "cdn" and root["entity"]["cdn_pop"] == "gru1" and root["confidence"] >= 0.5


def test_an_old_incident_is_not_joined_after_the_gap(settings):
    g = ServiceGraph(settings.services)
    a1, a2 = anomaly(t=0), anomaly(t=400_000)
    e = public_entity(a1.entity, settings)
    s, i1 = correlate_step(None, "fp", a1, e, g, 300_000)
    s, i2 = correlate_step(s, "fp", a2, e, g, 300_000)
    assert i1["incident_id"] != i2["incident_id"] and len(s["incidents"]) == 1


def test_classification_follows_the_business_model_in_config(settings):
    billing = anomaly(node="payment_gateway", region="US", signals=[Signal("error_rate", 0.3, 0.002, 50.0, 0.01)])
    c = classify(billing, settings)
    assert c.priority == "P0" and c.severity == "critical"
    assert c.business_impact["revenue_loss_per_hour"] >= settings.classification["escalation"]["p0_revenue_loss_per_hour"]
    assert set(c.business_impact["components"]) == {"revenue", "user_experience", "compliance"}
    cpu = anomaly("resource_saturation", node="search", signals=[Signal("cpu_percent", 60, 38, 9.0)])
    assert classify(cpu, settings).priority == "P3"
    surge = anomaly("traffic_change", node="cdn", signals=[Signal("requests_per_s", 9000, 3000, 30.0)])
    assert (classify(surge, settings).severity, classify(surge, settings).priority) == ("info", "P3")
    lower = settings.replace(classification={"escalation": {"p0_revenue_loss_per_hour": 10**12, "p1_affected_users": 10**12}})
    assert classify(billing, lower).priority != "P0"


def test_degradation_only_counts_the_bad_direction(settings):
    better = anomaly(signals=[Signal("error_rate", 0.0, 0.01, 3.0)])
    assert degradation(better, settings) == 0.0
    worse = anomaly(signals=[Signal("error_rate", 0.21, 0.01, 30.0)])
    assert degradation(worse, settings) == pytest.approx(0.2)


def test_alert_step_builds_a_complete_alert_and_dedups(settings):
    g = ServiceGraph(settings.services)
    dedup: dict = {}
    a = anomaly(entity=public_entity({"user_id": "bob"}, settings), kind="streaming_fraud", node="streaming_fraud", region="US",
                detector="behavior.fraud", signals=[Signal("streams_per_hour", 300, 100, 6.0)], users=1)
    fp, d, r, alert, severity = alert_step(a, dedup.get, None, settings, g, 123)
    dedup[fp] = d
    assert alert["fingerprint"] == fp and alert["entity"]["user_id"].startswith("u_") and "bob" not in str(alert)
    assert alert["priority"] in ("P0", "P1", "P2", "P3") and alert["recommendations"] and alert["summary"]
    assert severity == alert["severity"]
    again = alert_step(a, dedup.get, r, settings, g, 124)
    assert again.fingerprint == fp and again.alert is None and again.dedup_state["occurrences"] == 2


@pytest.mark.parametrize("region, active, expected", [
    ("LU", 50_000, {"P2", "P3"}),  # a small market: a few hundred failed payments an hour
    ("NL", 500_000, {"P1"}),  # mid-sized: about 25,000 an hour of revenue lost
    ("US", 3_000_000, {"P0"}),  # large: past the P0 threshold
])
def test_failing_payments_are_priced_from_the_market_they_fail_in(settings, region, active, expected):
    """45% of payments failing, in markets of three sizes: the priority follows the money lost
    there, not a fixed rank for the kind of incident."""
    s = settings.replace(classification={"regions": {**settings.classification["regions"], region: active}})
    failing = anomaly(node="payment_gateway", region=region, signals=[Signal("error_rate", 0.45, 0.003, 60.0, 0.01)])
    c = classify(failing, s)
    assert c.priority in expected, (c.priority, c.business_impact)
    loss = c.business_impact["revenue_loss_per_hour"]
    assert loss == pytest.approx(active * s.services["payment_gateway"]["user_share"] * 0.447 * 10.99, rel=0.01)


def test_a_market_the_configuration_does_not_know_is_priced_as_a_mid_sized_one(settings):
    failing = anomaly(node="payment_gateway", region="ZZ", signals=[Signal("error_rate", 0.45, 0.003, 60.0, 0.01)])
    assert "ZZ" not in settings.classification["regions"]
    assert classify(failing, settings).priority == "P1"
