"""Score alerts against a simulator's ground truth: which injected incidents were found, how
fast, with which priority; which alerts matched nothing; pages during the benign surge.

An alert matches an injected incident when it fired inside the incident (from its start to
``grace_s`` after its end) and its entity holds every label of one of the incident's expected
entities (user ids pseudonymised the way the worker does).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from soundcheck.alerting.correlate import public_entity
from soundcheck.settings import Settings

PAGING = ("P0", "P1")


def _matches(alert: Mapping[str, Any], sc: Mapping[str, Any], expected: list[dict[str, str]], grace_ms: int) -> bool:
    """An alert (not an info record) on one of the incident's entities, while it lasts (plus grace)."""
    if alert.get("severity") == "info" or not (sc["start_ms"] <= alert["event_time"] <= sc["end_ms"] + grace_ms):
        return False
    entities = [alert["entity"]] + list((alert.get("details") or {}).get("accounts") or ())  # a fraud farm lists its accounts
    return any(all(entity.get(k) == v for k, v in exp.items()) for exp in expected for entity in entities)


def evaluate(alerts: Iterable[Mapping[str, Any]], truth: Mapping[str, Any], settings: Settings, grace_s: int = 120) -> dict[str, Any]:
    alerts = [a for a in alerts if a.get("status", "firing") == "firing"]
    grace = grace_s * 1000
    scenarios = []
    matched_ids: set[str] = set()
    for sc in truth["scenarios"]:
        if sc["name"] == "malformed_slice":
            continue
        expected = [public_entity(e, settings) for e in sc["expect"]]
        row: dict[str, Any] = {"name": sc["name"], "region": sc["region"], "expected_priority": sc.get("expected_priority")}
        if sc.get("must_not_page"):
            pages = [
                a for a in alerts
                if sc["start_ms"] <= a["event_time"] <= sc["end_ms"] and a["priority"] in PAGING
                and a["entity"].get("region") == sc["region"]
            ]
            row.update({"must_not_page": True, "pages": len(pages), "ok": not pages})
        else:
            hits = sorted((a for a in alerts if _matches(a, sc, expected, grace)), key=lambda a: a["event_time"])
            matched_ids.update(a["alert_id"] for a in hits)
            first = hits[0] if hits else None
            row.update({
                "found": bool(hits),
                "notifications": len(hits),
                "delay_s": round((first["event_time"] - sc["start_ms"]) / 1000, 1) if first else None,
                "priority": min(a["priority"] for a in hits) if hits else None,  # the highest, P0 first
                "severity": max((a["severity"] for a in hits), key=_sev_rank) if hits else None,
                "ok": bool(hits),
            })
            crossing = sc.get("details", {}).get("crosses_at_ms")
            if crossing and first:  # a predictive warning: how long before the limit was crossed
                row["lead_time_s"] = round((crossing - first["event_time"]) / 1000, 1)
                row["first_kind"] = first["kind"]
        scenarios.append(row)
    injected = [r for r in scenarios if not r.get("must_not_page")]
    # alerts in the same region and window as an incident count as its symptoms, not as noise
    related = {
        a["alert_id"] for a in alerts for sc in truth["scenarios"]
        if sc["region"] and sc["start_ms"] <= a["event_time"] <= sc["end_ms"] + grace
        and sc["region"] in (a["entity"].get("region"), a["entity"].get("country"), (a.get("root_cause") or {}).get("entity", {}).get("region"))
    }
    unmatched = [a for a in alerts if a["alert_id"] not in matched_ids and a["alert_id"] not in related and a["severity"] != "info"]
    return {
        "injected": len(injected),
        "found": sum(1 for r in injected if r["found"]),
        "alerts": len(alerts),
        "unmatched_alerts": len(unmatched),
        "unmatched_examples": [
            {"event_time": a["event_time"], "kind": a["kind"], "entity": a["entity"], "severity": a["severity"],
             "signals": [x["metric"] for x in a["signals"]]}
            for a in unmatched[:20]
        ],
        "benign_pages": sum(r["pages"] for r in scenarios if r.get("must_not_page")),
        "scenarios": scenarios,
    }


def _sev_rank(s: str) -> int:
    return ("info", "low", "medium", "high", "critical").index(s)


def alerting_quality(
    notifications: list[Mapping[str, Any]], anomalies: int, truth: Mapping[str, Any], settings: Settings, grace_s: int = 120
) -> dict[str, Any]:
    """How few, how right the notifications are (the alerting issue's measures).

    * notifications per injected incident (firing notifications on its entities or symptoms);
    * compression: 1 - notifications (every message on the alerts topic) / raw anomalies;
    * grouping purity: over firing notifications with an incident id, the share that belongs to
      the injected incident most of its incident's notifications belong to;
    * root-cause accuracy: injected incidents with a known root whose incident names that root;
    * priority match: injected incidents whose highest notified priority is the expected one.
    """
    grace = grace_s * 1000
    firing = [a for a in notifications if a.get("status", "firing") == "firing"]
    scenarios = [sc for sc in truth["scenarios"] if sc["name"] != "malformed_slice" and not sc.get("must_not_page")]

    def owner(a: Mapping[str, Any]) -> str:
        for sc in scenarios:
            expected = [public_entity(e, settings) for e in sc["expect"]]
            if _matches(a, sc, expected, grace):
                return sc["name"]
        for sc in scenarios:
            if sc["region"] and sc["start_ms"] <= a["event_time"] <= sc["end_ms"] + grace and sc["region"] in (
                    a["entity"].get("region"), a["entity"].get("country")):
                return sc["name"]
        return "noise"

    owners = {a["alert_id"]: owner(a) for a in firing}
    groups: dict[str, list[str]] = {}
    for a in firing:
        if a.get("incident_id"):
            groups.setdefault(a["incident_id"], []).append(owners[a["alert_id"]])
    grouped = sum(len(v) for v in groups.values())
    purity = sum(max(v.count(o) for o in set(v)) for v in groups.values()) / grouped if grouped else 1.0
    per_incident, rca, prio = {}, [], []
    for sc in scenarios:
        mine = [a for a in firing if owners[a["alert_id"]] == sc["name"]]
        per_incident[sc["name"]] = len(mine)
        direct = [a for a in mine if _matches(a, sc, [public_entity(e, settings) for e in sc["expect"]], grace)]
        if sc.get("root_cause") and direct:
            last = max(direct, key=lambda a: a["emitted_at"])
            rca.append((last.get("root_cause") or {}).get("node") == sc["root_cause"])
        if sc.get("expected_priority") and direct:
            prio.append(min(a["priority"] for a in direct) == sc["expected_priority"])
    return {
        "notifications": len(notifications),
        "anomalies": anomalies,
        "compression": 1 - len(notifications) / anomalies if anomalies else 0.0,
        "notifications_per_incident": per_incident,
        "mean_notifications_per_incident": sum(per_incident.values()) / len(per_incident) if per_incident else 0.0,
        "grouping_purity": purity,
        "root_cause_accuracy": sum(rca) / len(rca) if rca else None,
        "priority_match": sum(prio) / len(prio) if prio else None,
    }
