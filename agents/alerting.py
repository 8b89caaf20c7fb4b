"""The alerting agent (anomalies and event-time ticks -> notifications) and the control agent.

The lifecycle itself is :class:`soundcheck.alerting.engine.AlertEngine`; this module only wires it
to Faust. Its state lives in changelogged tables co-partitioned with the anomalies topic (keyed
by correlation scope), so a restarted or rebalanced worker neither forgets open alerts nor
notifies them again:

* ``soundcheck-dedup``, keyed by fingerprint: the lifecycle of each alert (first and last seen,
  last notification, severity, occurrences, firing/resolved, the last record sent). It expires
  on event time, swept while its scope's events are processed, so every tombstone goes to the
  right changelog partition. A Faust *windowed* table would not do: in faust-streaming 0.15
  windowed tables expire on the wall clock (``_del_old_keys`` compares with ``time.time()``),
  which wipes state whenever recorded traffic is replayed.
* ``soundcheck-incidents``, keyed by scope: open incidents, firing fingerprints, notification
  groups waiting to be sent, alerts held back by a silence or an inhibition.
* ``soundcheck-control``, a global table of silences, written by the control agent from the
  ``soundcheck.control`` topic and read by every worker.

Ticks: every ingest agent sends, to each anomalies partition, the event time its stream has
reached (once per aggregation window). On a tick the agent takes the slowest stream's time
(streams silent for a minute of wall time aside) and lets every scope of that partition resolve
what went quiet and send the groups that are due.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
import orjson
from aiokafka.partitioner import murmur2

from soundcheck.alerting import silences
from soundcheck.alerting.engine import AlertEngine
from soundcheck.ingest.contracts import Rejection
from soundcheck.detectors.base import Anomaly
from soundcheck.kafka.admin import TABLES

from .ingest import dead_letter

log = logging.getLogger(__name__)
STREAM_SILENT_S = 60.0  # a stream without ticks for this long (wall time) no longer holds the clock back


def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (as the ingest agents send it)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def register(app: faust.App, ctx: Any) -> None:
    settings, m = ctx.settings, ctx.metrics
    partitions = settings.kafka.partitions
    dedup_name, incidents_name, control_name = TABLES  # their changelogs are created with the topics
    dedup = app.Table(dedup_name, default=None, partitions=partitions)
    scopes = app.Table(incidents_name, default=None, partitions=partitions)
    control = app.GlobalTable(control_name, default=None, partitions=partitions)
    labels = silences.known_labels(settings)  # what a silence's matchers may name
    engine = AlertEngine(settings, ctx.graph, dedup, scopes, control)
    ctx.engine = engine
    alerts_topic, anomalies_topic, dlq = ctx.topics["alerts"], ctx.topics["anomalies"], ctx.topics["dead_letter"]
    decisions_topic = ctx.topics["decisions"]
    clocks: dict[int, dict[tuple[str, int], tuple[int, float]]] = {}  # partition -> (stream, source) -> (event time, wall time)
    first_tick: dict[int, float] = {}
    moved: dict[int, int] = {}  # partition -> the clock last acted on

    def stage2_partitions() -> int:
        ing = next(iter(ctx.ingest.values()), None) if getattr(ctx, "ingest", None) else None
        return ing.aggregates_partitions if ing is not None else partitions
    reported: dict[str, int] = {}

    async def send(notes: list[dict[str, Any]]) -> None:
        if notes:
            # the table changes behind these notifications (group sent, alert marked sent, clock
            # moved) sit in Faust's producer buffer (changelogs go by send_soon) while topic.send()
            # goes out at once: put them on the broker first, or a worker killed right after
            # sending restores the state from before and sends the same notifications again
            await app.producer.flush()
        for n in notes:
            m.alerts.labels(severity=n["severity"]).inc()
            await alerts_topic.send(key=n["fingerprint"].encode(), value=orjson.dumps(n))
        decided_at = int(time.time() * 1000)
        for d in engine.drain_decisions():  # the decision log (soundcheck why FINGERPRINT reads it)
            m.decisions.labels(decision=d["decision"]).inc()
            await decisions_topic.send(key=d["fingerprint"].encode(), value=orjson.dumps({**d, "decided_at": decided_at}))
        for outcome, count in engine.stats.items():
            if count > reported.get(outcome, 0):
                m.alert_outcomes.labels(outcome=outcome).inc(count - reported.get(outcome, 0))
                reported[outcome] = count

    def on_tick(partition: int, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """The clock of this anomalies partition: the slowest (stream, stage-2 partition) tick, once
        every stage-2 partition has ticked (each sends its anomalies before its ticks, so every
        anomaly up to the clock is here); a source silent for a minute of wall time stops counting."""
        wall = time.time()
        sources = clocks.setdefault(partition, {})
        sources[(str(doc["tick"]), int(doc.get("source", -1)))] = (int(doc["event_time"]), wall)
        n_sources = len({src for _, src in sources})
        if n_sources < stage2_partitions() and wall - first_tick.setdefault(partition, wall) < STREAM_SILENT_S:
            return []
        live = [t for t, seen in sources.values() if wall - seen < STREAM_SILENT_S]
        now = min(live) if live else int(doc["event_time"])
        if now <= moved.get(partition, -(2**62)):
            return []  # the slowest source has not moved: nothing is due
        moved[partition] = now
        notes: list[dict[str, Any]] = []
        for scope in [k for k in list(scopes.keys()) if partition_of(k, partitions) == partition]:
            notes += engine.on_tick(scope, now, int(wall * 1000))
        return notes

    async def alerting(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                doc = orjson.loads(event.value)
                if "tick" in doc:
                    notes = on_tick(event.message.partition, doc)
                else:
                    m.anomalies_handled.inc()
                    notes = engine.on_anomaly(Anomaly.from_json(doc), int(time.time() * 1000))
                await send(notes)
            except Exception as exc:  # never fatal: the record goes to the dead letters
                log.exception("agent soundcheck.alerting: record at offset %s failed", event.message.offset)
                key, value = dead_letter(event, Rejection("processing_error", f"soundcheck.alerting: {type(exc).__name__}: {exc}"), "anomalies")
                await dlq.send(key=key, value=value)
                m.dead_letters.labels(topic=settings.topics.anomalies, reason="processing_error").inc()

    app.agent(anomalies_topic, name="soundcheck.alerting")(alerting)

    async def control_agent(stream: faust.StreamT) -> None:
        """Silences at run time (``soundcheck silence add|expire`` writes these):
        ``{"action": "silence", "silence": {...}}`` adds or replaces one (``id``, ``matchers``,
        ``starts_at``, ``ends_at`` in epoch ms, ``author``, ``comment``; checked by
        :func:`soundcheck.alerting.silences.validate`); ``{"action": "expire", "id": "..."}`` ends
        one now (it stays in the table, expired). Anything else is dead-lettered with its reason."""
        async for event in stream.events():
            try:
                doc = orjson.loads(event.value)
                action = doc.get("action") if isinstance(doc, dict) else None
                if action == "silence":
                    s = silences.validate(doc.get("silence"), labels)
                    control[s["id"]] = s
                    m.control_messages.labels(action="silence").inc()
                elif action == "expire":
                    sid = str(doc.get("id"))
                    current = control.get(sid)
                    if not current:
                        raise ValueError(f"no silence {sid!r} to expire")
                    at = int(doc.get("at") or time.time() * 1000)  # kept, expired, so that `silence list` shows it
                    control[sid] = {**current, "ends_at": min(current["ends_at"], max(at, current["starts_at"] + 1)),
                                    "expired_at": at}
                    m.control_messages.labels(action="expire").inc()
                else:
                    raise ValueError(f"unknown control action {action!r}; expected 'silence' or 'expire'")
            except Exception as exc:
                key, value = dead_letter(event, Rejection("schema", f"soundcheck.control: {type(exc).__name__}: {exc}"), "control")
                await dlq.send(key=key, value=value)
                m.dead_letters.labels(topic=settings.topics.control, reason="schema").inc()

    app.agent(ctx.topics["control"], name="soundcheck.control")(control_agent)
