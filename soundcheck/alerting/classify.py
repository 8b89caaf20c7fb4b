"""Business impact, severity and priority of an anomaly, from the model in config (no I/O).

The impact has three components, each in [0, 1], weighted by ``classification.weights``
(revenue 0.4, user experience 0.35, compliance 0.25 by default):

* revenue: estimated loss per hour against the P0 threshold (50,000 per hour by default);
* user experience: affected users against the P1 threshold (100,000 by default), times how
  degraded they are;
* compliance: the risk the kind of problem carries (payments, fraud, personal data).

Affected users come from the events (distinct sampled users times ``population_scale``) or,
for service metrics, from the region's active users times the share of them that use the
service. Priority follows the money first: P0 when the loss is above the P0 threshold, P1 when it
is above the P1 revenue threshold (10,000 per hour: 45% of payments failing in a mid-sized market
of 500,000 active users) or the affected users are above the P1 threshold, P2 for anything medium
or worse, else P3. Kinds in ``info_kinds`` never page.

>>> from soundcheck.settings import load_settings
>>> from soundcheck.detectors.base import Anomaly
>>> from soundcheck.detectors.baseline import Signal
>>> s = load_settings(environ={})
>>> a = Anomaly("service_degradation", "system.baseline", {"service": "payment_gateway", "region": "US"}, "US",
...             "payment_gateway", [Signal("error_rate", 0.3, 0.002, 40.0, 0.01)], 1.0, 0, 0, "system_performance_metrics")
>>> c = classify(a, s)
>>> c.priority, c.severity, c.business_impact["revenue_loss_per_hour"] > 50_000
('P0', 'critical', True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from soundcheck.detectors.base import Anomaly
from soundcheck.settings import Settings

SEVERITIES = ("info", "low", "medium", "high", "critical")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}
PRIORITIES = ("P0", "P1", "P2", "P3")


@dataclass(frozen=True)
class Classification:
    severity: str
    priority: str
    business_impact: dict[str, Any]


def degradation(anomaly: Anomaly, settings: Settings) -> float:
    """How much worse users have it, in [0, 1], from the user-facing signals.

    For a share metric (error rate, buffering, payment failures) it is the rise of the share
    itself: 30% of payments failing is 0.3. For other metrics it is the relative change in the
    bad direction, halved and squared (a doubling of latency is 0.25, +20% is 0.01): mild
    slowdowns barely matter, large ones do. Each is weighted by the metric's ``user_facing``.
    """
    worst = 0.0
    for s in anomaly.signals:
        spec = settings.metric_spec(s.metric)
        felt = float(spec.get("user_facing", 0.0))
        if felt <= 0:
            continue
        excess = s.observed - s.expected
        if spec.get("direction") == "down":
            excess = -excess
        elif spec.get("direction") != "up":
            excess = abs(excess)
        if excess <= 0:
            continue
        if spec.get("share"):
            d = excess
        else:
            d = min(excess / max(abs(s.expected), 1e-9) / 2, 1.0) ** 2
        worst = max(worst, min(1.0, d) * felt)
    return round(worst, 4)


def classify(anomaly: Anomaly, settings: Settings) -> Classification:
    cfg = settings.classification
    weights = cfg["weights"]
    esc = cfg["escalation"]
    service = settings.services.get(anomaly.node, {})
    d = degradation(anomaly, settings)
    if anomaly.kind == "streaming_fraud":
        affected = anomaly.sampled_users  # the accounts themselves; listeners are not harmed
        d = 0.0
    elif anomaly.sampled_users:
        affected = int(anomaly.sampled_users * cfg["population_scale"] * min(1.0, d * 4))
    else:
        active = cfg["regions"].get(anomaly.region, cfg["default_active_users"])
        affected = int(active * float(service.get("user_share", 0.0)) * d)
    segments = cfg["segments"]
    arpu_month = sum(segments[s] * share for s, share in cfg["segment_mix"].items())
    direct = float(service.get("revenue_per_affected_user_hour", 0.0))
    if direct:
        loss = affected * direct
    else:
        # degraded users churn: a share per hour of degradation, each worth a year of revenue
        loss = affected * float(cfg["churn_risk_per_hour"]) * arpu_month * 12
    components = {
        "revenue": round(min(1.0, loss / esc["p0_revenue_loss_per_hour"]), 3),
        "user_experience": round(min(1.0, affected / esc["p1_affected_users"]) * (d if d else 0.0) ** 0.5, 3),
        "compliance": float(cfg["compliance_risk"].get(anomaly.kind, cfg["compliance_risk"]["default"])),
    }
    score = round(sum(weights[k] * v for k, v in components.items()), 3)
    drivers = [k for k, v in sorted(components.items(), key=lambda kv: -weights[kv[0]] * kv[1]) if v > 0]
    breach = any(s.limit is not None for s in anomaly.signals)

    if anomaly.kind in cfg["info_kinds"] or (anomaly.kind in cfg.get("info_unless_breach", ()) and not breach):
        severity, priority = "info", "P3"
    else:
        if loss > esc["p0_revenue_loss_per_hour"]:
            priority = "P0"
        elif affected > esc["p1_affected_users"] or loss > esc.get("p1_revenue_loss_per_hour", float("inf")):
            priority = "P1"
        else:
            priority = "P3"
        if priority == "P0" or score >= 0.75:
            severity = "critical"
        elif priority == "P1" or score >= 0.5:
            severity = "high"
        elif score >= 0.2 or breach:
            severity = "medium"
        else:
            severity = "low"
        floor = cfg.get("min_severity", {}).get(anomaly.kind)
        if floor and SEVERITY_RANK[severity] < SEVERITY_RANK[floor]:
            severity = floor
        if priority == "P3" and SEVERITY_RANK[severity] >= SEVERITY_RANK["medium"]:
            priority = "P2"
    impact = {
        "score": score,
        "revenue_loss_per_hour": round(loss, 2),
        "affected_users": affected,
        "degradation": d,
        "components": components,
        "weights": dict(weights),
        "drivers": drivers,
    }
    return Classification(severity, priority, impact)
