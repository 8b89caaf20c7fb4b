"""Our alert record (``schemas/alert.schema.json``) in the shapes other alerting tools take.

Pure functions, no I/O: a bridge reads the ``alerts`` topic and sends what these return.

* :func:`to_alertmanager_webhook`: the JSON body Prometheus Alertmanager POSTs to a
  ``webhook_config`` receiver (payload ``version`` "4"), so any Alertmanager webhook consumer
  can take our alerts. :func:`to_alertmanager_webhooks` splits alerts into one payload per
  incident first.
* :func:`to_pagerduty_event`: a PagerDuty Events API v2 alert event (``trigger`` for a firing
  alert, ``resolve`` for a resolved one), deduplicated on our fingerprint.

Malformed input raises :class:`ValueError` naming the alert and the field.

>>> rfc3339(1_700_000_210_000), rfc3339(1_700_000_210_250)
('2023-11-14T22:16:50Z', '2023-11-14T22:16:50.250Z')
>>> [PAGERDUTY_SEVERITY[s] for s in ("critical", "high", "medium", "low", "info")]
['critical', 'error', 'warning', 'warning', 'info']
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional

from soundcheck.alerting.correlate import SPECIFICITY
from soundcheck.alerting.classify import SEVERITIES

ALERTMANAGER_WEBHOOK_VERSION = "4"
ALERTMANAGER_ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time.Time: Alertmanager's "no end yet"
PAGERDUTY_SUMMARY_MAX = 1024
PAGERDUTY_DEDUP_KEY_MAX = 255
CLIENT = "soundcheck"

# PagerDuty accepts only critical, error, warning and info. `high` is "error" (still high
# urgency under severity-based urgency rules); `low` stays a real, if minor, problem ("warning")
# rather than joining `info`, which we use only for non-problems (traffic changes). Our own
# severity and priority travel unchanged in custom_details.
PAGERDUTY_SEVERITY = {"critical": "critical", "high": "error", "medium": "warning", "low": "warning", "info": "info"}

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")  # Prometheus label names
_RESERVED_LABELS = ("alertname", "severity", "priority", "detector", "incident_id")
_COMPONENT_FIRST = ("service", "cdn_pop")


# -- helpers -----------------------------------------------------------------------------------


def rfc3339(epoch_ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC with a ``Z`` (milliseconds only when not zero, as Go does)."""
    dt = datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)
    ms = epoch_ms % 1000
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{ms:03d}Z" if ms else "Z")


def _name(alert: Mapping[str, Any]) -> str:
    fp = alert.get("fingerprint") if isinstance(alert, Mapping) else None
    return f"alert {fp}" if isinstance(fp, str) and fp else "alert (no fingerprint)"


def _fail(alert: Mapping[str, Any], msg: str) -> ValueError:
    return ValueError(f"{_name(alert)}: {msg}")


def _need_str(alert: Mapping[str, Any], field: str) -> str:
    v = alert.get(field)
    if not isinstance(v, str) or not v:
        raise _fail(alert, f"required field {field!r} must be a non-empty string, got {type(v).__name__}")
    return v


def _need_ms(alert: Mapping[str, Any], field: str) -> int:
    v = alert.get(field)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _fail(alert, f"required field {field!r} must be epoch milliseconds (a non-negative int), got {v!r}")
    return v


def _validate(alert: Any, *, full: bool = True) -> None:
    if not isinstance(alert, Mapping):
        raise ValueError(f"an alert must be a JSON object (dict), got {type(alert).__name__}")
    _need_str(alert, "fingerprint")
    if alert.get("status") not in ("firing", "resolved"):
        raise _fail(alert, f"'status' must be 'firing' or 'resolved', got {alert.get('status')!r}")
    if not full:
        return
    for f in ("kind", "priority", "title", "summary", "detector"):
        _need_str(alert, f)
    if alert.get("severity") not in SEVERITIES:
        raise _fail(alert, f"'severity' must be one of {', '.join(SEVERITIES)}, got {alert.get('severity')!r}")
    entity = alert.get("entity")
    if not isinstance(entity, Mapping) or not entity:
        raise _fail(alert, "required field 'entity' must be a non-empty object of labels")
    for k, v in entity.items():
        if not isinstance(k, str) or not _LABEL_NAME.match(k) or k in _RESERVED_LABELS:
            raise _fail(alert, f"entity label name {k!r} is not a usable label name")
        if not isinstance(v, str) or not v:
            raise _fail(alert, f"entity label {k!r} must be a non-empty string")
    _need_ms(alert, "starts_at")


def _end_ms(alert: Mapping[str, Any]) -> int:
    """When a resolved alert ended: ``ends_at``, else ``last_seen``."""
    if alert.get("ends_at") is not None:
        return _need_ms(alert, "ends_at")
    if alert.get("last_seen") is not None:
        return _need_ms(alert, "last_seen")
    raise _fail(alert, "a resolved alert needs 'ends_at' (or 'last_seen')")


def _labels_text(labels: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={labels[k]}" for k in sorted(labels))


def _root_cause_text(root: Any) -> Optional[str]:
    if not isinstance(root, Mapping) or not root.get("node"):
        return None
    text = str(root["node"])
    if root.get("entity"):
        text += f" ({_labels_text(root['entity'])})"
    if root.get("confidence") is not None:
        text += f", confidence {float(root['confidence']):.2f}"
    return text


def _num(x: Any) -> str:
    return repr(x) if isinstance(x, float) else str(x)  # repr: shortest exact float text


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# -- Alertmanager ------------------------------------------------------------------------------


def _am_labels(alert: Mapping[str, Any]) -> dict[str, str]:
    labels = {
        "alertname": alert["kind"],
        "severity": alert["severity"],
        "priority": alert["priority"],
        "detector": alert["detector"],
        **{k: v for k, v in alert["entity"].items()},
    }
    if alert.get("incident_id"):
        labels["incident_id"] = str(alert["incident_id"])
    return labels


def _am_annotations(alert: Mapping[str, Any]) -> dict[str, str]:
    ann = {"summary": alert["summary"], "description": alert["title"]}
    recs = alert.get("recommendations") or []
    if recs:
        ann["runbook"] = "\n".join(str(r) for r in recs)
    root = _root_cause_text(alert.get("root_cause"))
    if root:
        ann["root_cause"] = root
    impact = alert.get("business_impact") or {}
    for src, dst in (("score", "impact_score"), ("revenue_loss_per_hour", "revenue_loss_per_hour"),
                     ("affected_users", "affected_users")):
        if impact.get(src) is not None:
            ann[dst] = _num(impact[src])
    if impact.get("drivers"):
        ann["impact_drivers"] = ", ".join(impact["drivers"])
    for f in ("alert_id", "notification", "occurrences"):
        if alert.get(f) is not None:
            ann[f] = str(alert[f])
    return ann


def _am_alert(alert: Mapping[str, Any], generator_url: str) -> dict[str, Any]:
    resolved = alert["status"] == "resolved"
    return {
        "status": alert["status"],
        "labels": _am_labels(alert),
        "annotations": _am_annotations(alert),
        "startsAt": rfc3339(alert["starts_at"]),
        "endsAt": rfc3339(_end_ms(alert)) if resolved else ALERTMANAGER_ZERO_TIME,
        "generatorURL": generator_url.format(fingerprint=alert["fingerprint"]) if generator_url else "",
        "fingerprint": alert["fingerprint"],
    }


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    return {k: v for k, v in maps[0].items() if all(m.get(k) == v for m in maps[1:])}


def to_alertmanager_webhook(
    alerts: list[dict],
    *,
    receiver: str = "soundcheck",
    external_url: str = "",
    group_key: Optional[str] = None,
    generator_url: str = "",
) -> dict[str, Any]:
    """One Alertmanager webhook payload (version "4") carrying ``alerts`` as one group.

    The group is the alerts' incident: when they all share an ``incident_id``, ``groupLabels`` is
    ``{"incident_id": ...}`` and the default ``groupKey`` is ``{}:{incident_id="..."}`` (the form
    Alertmanager uses); otherwise ``groupLabels`` is empty and the key names the fingerprints.
    ``status`` is "resolved" only when every alert is resolved. ``generator_url`` may contain
    ``{fingerprint}``; it is "" by default. Use :func:`to_alertmanager_webhooks` to split a
    mixed batch by incident.
    """
    if not isinstance(alerts, (list, tuple)) or not alerts:
        raise ValueError("to_alertmanager_webhook needs a non-empty list of alerts")
    for a in alerts:
        _validate(a)
        if a["status"] == "resolved":
            _end_ms(a)
    am_alerts = [_am_alert(a, generator_url) for a in alerts]
    incidents = {a.get("incident_id") for a in alerts}
    group_labels: dict[str, str] = {}
    if len(incidents) == 1 and next(iter(incidents)):
        group_labels = {"incident_id": str(next(iter(incidents)))}
    if group_key is None:
        if group_labels:
            group_key = "{}:{" + ", ".join(f'{k}="{v}"' for k, v in sorted(group_labels.items())) + "}"
        else:
            group_key = '{}:{fingerprint="' + ",".join(sorted({a["fingerprint"] for a in alerts})) + '"}'
    return {
        "version": ALERTMANAGER_WEBHOOK_VERSION,
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": "resolved" if all(a["status"] == "resolved" for a in alerts) else "firing",
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": _common([a["labels"] for a in am_alerts]),
        "commonAnnotations": _common([a["annotations"] for a in am_alerts]),
        "externalURL": external_url,
        "alerts": am_alerts,
    }


def group_by_incident(alerts: Iterable[dict]) -> list[list[dict]]:
    """Alerts grouped by ``incident_id`` in first-seen order; an alert without one is its own group."""
    groups: dict[Any, list[dict]] = {}
    for i, a in enumerate(alerts):
        inc = a.get("incident_id") if isinstance(a, Mapping) else None
        groups.setdefault(("incident", inc) if inc else ("alone", i), []).append(a)
    return list(groups.values())


def to_alertmanager_webhooks(alerts: Iterable[dict], **kwargs: Any) -> list[dict[str, Any]]:
    """One :func:`to_alertmanager_webhook` payload per incident (see :func:`group_by_incident`)."""
    return [to_alertmanager_webhook(g, **kwargs) for g in group_by_incident(alerts)]


# -- PagerDuty ---------------------------------------------------------------------------------


def _component(entity: Mapping[str, str]) -> str:
    for k in _COMPONENT_FIRST:
        if k in entity:
            return entity[k]
    k = max(sorted(entity), key=lambda k: SPECIFICITY.get(k, 1))  # most specific; ties by name
    return entity[k]


def _group(alert: Mapping[str, Any]) -> Optional[str]:
    root = alert.get("root_cause") or {}
    region = alert["entity"].get("region") or (root.get("entity") or {}).get("region")
    return region or alert.get("incident_id") or None


def to_pagerduty_event(alert: dict, *, routing_key: str) -> dict[str, Any]:
    """A PagerDuty Events API v2 alert event for ``alert``.

    A firing alert is a ``trigger`` with the full payload; a resolved one is a ``resolve``
    carrying only ``routing_key``, ``event_action`` and ``dedup_key``, which is all PagerDuty
    reads. ``dedup_key`` is the fingerprint, so repeats and escalations update one PagerDuty
    alert and the resolve closes it.
    """
    if not isinstance(routing_key, str) or not routing_key.strip():
        raise ValueError("routing_key must be a non-empty string (the Events API v2 integration key)")
    _validate(alert, full=False)
    fp = alert["fingerprint"]
    if len(fp) > PAGERDUTY_DEDUP_KEY_MAX:
        raise _fail(alert, f"fingerprint longer than PagerDuty's {PAGERDUTY_DEDUP_KEY_MAX}-character dedup_key")
    if alert["status"] == "resolved":
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": fp}
    _validate(alert)
    when = _need_ms(alert, "event_time")
    details: dict[str, Any] = {
        "priority": alert["priority"],
        "severity": alert["severity"],
        "summary": alert["summary"],
        "entity": dict(alert["entity"]),
        "detector": alert["detector"],
        "signals": alert.get("signals") or [],
        "business_impact": alert.get("business_impact") or {},
        "root_cause": alert.get("root_cause"),
        "recommendations": alert.get("recommendations") or [],
        "incident_id": alert.get("incident_id"),
        "related": alert.get("related") or [],
        "occurrences": alert.get("occurrences"),
        "notification": alert.get("notification"),
        "starts_at": rfc3339(alert["starts_at"]),
        "alert_id": alert.get("alert_id"),
    }
    payload: dict[str, Any] = {
        "summary": _clip(f"[{alert['priority']}] {alert['summary']}", PAGERDUTY_SUMMARY_MAX),
        "source": _labels_text(alert["entity"]),
        "severity": PAGERDUTY_SEVERITY[alert["severity"]],
        "timestamp": rfc3339(when),
        "component": _component(alert["entity"]),
        "class": alert["kind"],
        "custom_details": details,
    }
    group = _group(alert)
    if group:
        payload["group"] = str(group)
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": fp,
        "payload": payload,
        "client": CLIENT,
    }
