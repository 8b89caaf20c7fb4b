"""From anomalies to alerts: fingerprint, dedup, correlation into incidents, the alert record.

Every step is a pure function of ``(state, input) -> (state, output)``; the Faust agent keeps
the states in changelogged tables (dedup keyed by fingerprint, with event-time expiry;
incidents keyed by region), so this module never touches Kafka and is tested alone.

>>> fingerprint("service_degradation", "system.baseline", {"service": "cdn", "region": "BR"})
'9cff4035b19f614d8f9edae0'
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

from soundcheck.alerting.classify import SEVERITY_RANK, Classification, classify
from soundcheck.detectors.base import Anomaly
from soundcheck.settings import Settings

SCHEMA_VERSION = "1.0"
MAX_INCIDENT_MEMBERS = 32  # distinct fingerprints kept per incident; more are counted, not listed
MAX_OPEN_INCIDENTS = 16  # per region
SPECIFICITY = {"cdn_pop": 4, "user_id": 4, "device": 2, "service": 2, "region": 0}


def fingerprint(kind: str, detector: str, entity: Mapping[str, str]) -> str:
    """Stable id of "this problem on this entity": the dedup key and the alerts' Kafka key."""
    text = "|".join([kind, detector] + [f"{k}={entity[k]}" for k in sorted(entity)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def pseudonymize(user_id: str, key: bytes) -> str:
    """A keyed, stable pseudonym for a user id (keyed BLAKE2b, a MAC three times cheaper than
    HMAC-SHA256 here): joinable, not reversible without the key.

    >>> pseudonymize("user-42", b"k") == pseudonymize("user-42", b"k") != pseudonymize("user-42", b"other")
    True
    """
    return "u_" + hashlib.blake2b(user_id.encode(), key=key[:64], digest_size=10).hexdigest()


def public_entity(entity: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """The entity labels as they may leave the worker (user ids pseudonymised if configured)."""
    if "user_id" in entity and settings.privacy.get("pseudonymize_user_ids", True):
        return {**entity, "user_id": pseudonymize(entity["user_id"], settings.pseudonym_key)}
    return dict(entity)


# ---------------------------------------------------------------------------------------------
# Dedup


def dedup_step(
    state: Optional[dict[str, Any]], event_time: int, severity: str, repeat_ms: int
) -> tuple[dict[str, Any], Optional[str]]:
    """Count one more occurrence of a fingerprint and decide whether to notify.

    A fingerprint whose last episode resolved starts a new one. Returns the new state and
    ``"new"``, ``"repeat"`` (the repeat interval passed),
    ``"escalated"`` (severity rose) or ``None`` (suppressed).

    >>> s, d = dedup_step(None, 0, "high", 600_000); d
    'new'
    >>> s, d = dedup_step(s, 10_000, "high", 600_000); d, s["occurrences"]
    (None, 2)
    >>> s, d = dedup_step(s, 20_000, "critical", 600_000); d
    'escalated'
    >>> dedup_step(s, 700_000, "high", 600_000)[1]
    'repeat'
    """
    if state is None or state.get("status") == "resolved":  # a new episode
        return {
            "first_seen": event_time,
            "last_seen": event_time,
            "last_notified": event_time,
            "severity": severity,
            "occurrences": 1,
            "notifications": 1,
            "status": "firing",
            "sent": False,
        }, "new"
    state = dict(state)
    state["occurrences"] += 1
    state["last_seen"] = max(state["last_seen"], event_time)
    decision: Optional[str] = None
    if SEVERITY_RANK[severity] > SEVERITY_RANK[state["severity"]]:
        decision = "escalated"
    elif event_time - state["last_notified"] >= repeat_ms:
        decision = "repeat"
    if decision:
        state["last_notified"] = event_time
        state["severity"] = severity
        state["notifications"] += 1
    return state, decision


# ---------------------------------------------------------------------------------------------
# Correlation


class ServiceGraph:
    """The service dependency map: which node depends (transitively) on which.

    >>> g = ServiceGraph({"audio_streaming": {"dependencies": ["cdn"]}, "cdn": {"dependencies": []}})
    >>> g.depends_on("audio_streaming", "cdn"), g.on_path("cdn", "audio_streaming"), g.on_path("cdn", "search")
    (True, True, False)
    """

    def __init__(self, services: Mapping[str, Mapping[str, Any]]) -> None:
        self.deps = {name: tuple(spec.get("dependencies", ())) for name, spec in services.items()}
        self._reach: dict[str, frozenset[str]] = {}

    def upstream(self, node: str) -> frozenset[str]:
        """Everything ``node`` depends on, transitively."""
        if node not in self._reach:
            seen: set[str] = set()
            stack = list(self.deps.get(node, ()))
            while stack:
                n = stack.pop()
                if n not in seen:
                    seen.add(n)
                    stack.extend(self.deps.get(n, ()))
            self._reach[node] = frozenset(seen)
        return self._reach[node]

    def depends_on(self, a: str, b: str) -> bool:
        return b in self.upstream(a)

    def on_path(self, a: str, b: str) -> bool:
        return a == b or self.depends_on(a, b) or self.depends_on(b, a)


def _root_cause(members: Mapping[str, Mapping[str, Any]], graph: ServiceGraph) -> dict[str, Any]:
    nodes = {m["node"] for m in members.values()}
    # the most upstream anomalous nodes: no other anomalous node lies below them
    roots = [n for n in nodes if not any(graph.depends_on(n, o) for o in nodes if o != n)]

    def explains(root: str) -> int:
        return sum(1 for m in members.values() if m["node"] == root or graph.depends_on(m["node"], root))

    def first(node: str) -> int:
        return min(m["first_seen"] for m in members.values() if m["node"] == node)

    root = sorted(roots, key=lambda n: (-explains(n), first(n), n))[0]
    # name the root by its most specific member: a PoP says more than "the cdn service in BR"
    at_root = sorted(
        (m for m in members.values() if m["node"] == root),
        key=lambda m: (-sum(SPECIFICITY.get(k, 1) for k in m["entity"]), m["first_seen"]),
    )
    earliest = min(m["first_seen"] for m in members.values())
    confidence = explains(root) / len(members) * (1.0 if first(root) <= earliest else 0.8)
    if len(members) == 1:
        confidence = min(confidence, 0.5)  # a lone anomaly is its own best guess, no more
    evidence = sorted(members.items(), key=lambda kv: kv[1]["first_seen"])
    root_fp = next(fp for fp, m in members.items() if m is at_root[0])
    return {
        "node": root,
        "fingerprint": root_fp,
        "entity": at_root[0]["entity"],
        "confidence": round(confidence, 2),
        "evidence": [
            {"fingerprint": fp, "node": m["node"], "kind": m["kind"], "first_seen": m["first_seen"], "signals": m["signals"]}
            for fp, m in evidence[:10]
        ],
    }


def correlate_step(
    state: Optional[dict[str, Any]], fp: str, anomaly: Anomaly, entity: Mapping[str, str], graph: ServiceGraph, gap_ms: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Place an anomaly in its scope's open incidents: join the first one with a member on the
    same dependency path, and whose root cause is on that path too (within ``gap_ms`` of its last
    anomaly), or open a new one. Anomalies
    that carry ``details["links"]`` (streaming fraud: the artists, devices and countries of an
    account) join the incident they share a link with instead: a farm is one incident.

    Returns the region's new state and the incident the anomaly belongs to.
    """
    now = anomaly.event_time
    incidents = [i for i in (state or {}).get("incidents", []) if now - i["last_seen"] <= gap_ms]
    links = set(anomaly.details.get("links", ()))  # shared artists, devices, countries (fraud)
    target = None
    for inc in incidents:
        if fp in inc["members"]:
            target = inc
        elif links:  # accounts are one farm when they share an artist, a device or a country
            if links & set(inc.get("links", ())):
                target = inc
        elif not inc["members"][inc["root_cause"]["fingerprint"]].get("linked") and graph.on_path(
                anomaly.node, inc["root_cause"]["node"]):
            # on the path of the incident's root (one of its members): a node the root cannot
            # explain, nor explain it (a licensing fault beside a cdn one, both felt by audio
            # streaming), is another incident, however the symptoms overlap
            target = inc
        if target is not None:
            break
    if target is None:
        target = {
            "incident_id": "inc-" + fingerprint("incident", anomaly.scope or anomaly.region, {"fp": fp, "t": str(now)})[:16],
            "region": anomaly.region,
            "scope": anomaly.scope or anomaly.region,
            "started_at": now,
            "last_seen": now,
            "members": {},
            "dropped_members": 0,
        }
        incidents.append(target)
        incidents = incidents[-MAX_OPEN_INCIDENTS:]
    target["last_seen"] = max(target["last_seen"], now)
    if fp not in target["members"]:
        if len(target["members"]) < MAX_INCIDENT_MEMBERS:
            target["members"][fp] = {
                "node": anomaly.node,
                "kind": anomaly.kind,
                "entity": dict(entity),
                "first_seen": now,
                "signals": [s.metric for s in anomaly.signals][:4],
                **({"linked": True} if links else {}),
            }
        else:
            target["dropped_members"] += 1
    if links:
        target["links"] = sorted(set(target.get("links", ())) | links)[:MAX_INCIDENT_MEMBERS * 4]
    target["root_cause"] = _root_cause(target["members"], graph)
    return {**(state or {}), "incidents": incidents}, target


# ---------------------------------------------------------------------------------------------
# The alert record


def _summary(anomaly: Anomaly, entity: Mapping[str, str]) -> str:
    where = ", ".join(f"{k}={v}" for k, v in sorted(entity.items()))
    parts = []
    for s in anomaly.signals[:4]:
        verb = "rose to" if s.observed > s.expected else "fell to"
        limit = f", past the limit {s.limit:g}" if s.limit is not None else ""
        parts.append(f"{s.metric} {verb} {s.observed:.4g} (normal {s.expected:.4g}{limit})")
    return f"{anomaly.kind.replace('_', ' ')} on {where}: " + "; ".join(parts) + "."


def recommendations(runbooks: Mapping[str, Any], kind: str, root: Optional[Mapping[str, Any]]) -> list[str]:
    """Runbook entries for the alert's kind, then for its incident's root cause (``root:<node>``).

    >>> recommendations({"default": ["look"], "root:cdn": ["drain the PoP"]}, "audio_quality_degradation", {"node": "cdn"})
    ['look', 'drain the PoP']
    """
    out = list(runbooks.get(kind, runbooks["default"]))
    for line in runbooks.get(f"root:{(root or {}).get('node')}", ()):
        if line not in out:
            out.append(line)
    return out


def build_alert(
    anomaly: Anomaly,
    classification: Classification,
    settings: Settings,
    *,
    fp: str,
    entity: Mapping[str, str],
    dedup: Mapping[str, Any],
    decision: str,
    incident: Optional[Mapping[str, Any]],
    emitted_at: int,
) -> dict[str, Any]:
    """The alert as it goes to the ``alerts`` topic (see ``schemas/alert.schema.json``)."""
    runbooks = settings.runbooks
    related = sorted(f for f in (incident or {}).get("members", {}) if f != fp)
    root = (incident or {}).get("root_cause")
    title_where = ", ".join(str(v) for _, v in sorted(entity.items()))
    return {
        "alert_id": str(uuid.uuid4()),
        "fingerprint": fp,
        "status": "firing",
        "kind": anomaly.kind,
        "severity": classification.severity,
        "priority": classification.priority,
        "title": f"[{classification.priority}] {anomaly.kind.replace('_', ' ')}: {title_where}",
        "summary": _summary(anomaly, entity),
        "entity": dict(entity),
        "detector": anomaly.detector,
        "score": anomaly.score,
        "signals": [s.to_dict() for s in anomaly.signals],
        "business_impact": classification.business_impact,
        "recommendations": recommendations(runbooks, anomaly.kind, root),
        "root_cause": root,
        "incident_id": (incident or {}).get("incident_id"),
        "related": related,
        "notification": decision,
        "starts_at": dedup["first_seen"],
        "last_seen": dedup["last_seen"],
        "ends_at": None,
        "occurrences": dedup["occurrences"],
        "event_time": anomaly.event_time,
        "window_start": anomaly.window_start,
        "emitted_at": emitted_at,
        "source_topics": [anomaly.source_topic],
        "details": anomaly.details,
        "schema_version": SCHEMA_VERSION,
    }


class AlertStep(NamedTuple):
    fingerprint: str
    dedup_state: dict[str, Any]
    region_state: dict[str, Any]
    alert: Optional[dict[str, Any]]  # None when dedup folds the anomaly into an earlier notification
    severity: str


def alert_step(
    anomaly: Anomaly,
    dedup_lookup: Callable[[str], Optional[dict[str, Any]]],
    region_state: Optional[dict[str, Any]],
    settings: Settings,
    graph: ServiceGraph,
    emitted_at: int,
) -> AlertStep:
    """One anomaly through classification, correlation and dedup.

    The anomaly's entity must already be public (see :func:`public_entity`: detection output is).
    ``dedup_lookup(fingerprint)`` gives the fingerprint's dedup state (None if new).
    """
    entity = anomaly.entity
    fp = fingerprint(anomaly.kind, anomaly.detector, entity)
    c = classify(anomaly, settings)
    if c.severity == "info":  # context (a traffic change, headroom used): recorded, never part of an incident
        region_state, incident = dict(region_state or {}), None
    else:
        region_state, incident = correlate_step(region_state, fp, anomaly, entity, graph, settings.windows.correlation_s * 1000)
    dedup_state, decision = dedup_step(dedup_lookup(fp), anomaly.event_time, c.severity, settings.windows.dedup_repeat_s * 1000)
    dedup_state["region"] = anomaly.scope or anomaly.region
    if decision is None:
        return AlertStep(fp, dedup_state, region_state, None, c.severity)
    alert = build_alert(
        anomaly, c, settings, fp=fp, entity=entity, dedup=dedup_state, decision=decision, incident=incident, emitted_at=emitted_at
    )
    return AlertStep(fp, dedup_state, region_state, alert, c.severity)


def dedup_sweep_due(region_state: dict[str, Any], now: int, every_ms: int) -> bool:
    """Whether the region's expired dedup states should be swept now (at most once per ``every_ms``)."""
    if now - region_state.get("dedup_swept_at", now - every_ms) >= every_ms:
        region_state["dedup_swept_at"] = now
        return True
    return False


def expired(states: Iterable[tuple[str, Mapping[str, Any]]], region: str, now: int, ttl_ms: int) -> list[str]:
    """Fingerprints of ``region`` not seen for ``ttl_ms`` of event time: their dedup state can go.

    >>> expired([("a", {"region": "BR", "last_seen": 0}), ("b", {"region": "BR", "last_seen": 900}),
    ...          ("c", {"region": "US", "last_seen": 0})], "BR", 1000, 500)
    ['a']
    """
    return [fp for fp, st in states if st and st.get("region") == region and now - st["last_seen"] > ttl_ms]
