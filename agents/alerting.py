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
* ``soundcheck-outbox``, keyed by anomalies partition: the notifications being sent.
* ``soundcheck-clock``, keyed by anomalies partition: its event-time clock (each source's last
  tick, the time last acted on), so that a worker taking the partition on goes on where its last
  owner was instead of waiting for every source to tick again.

Sending, so that a crash neither loses nor repeats a notification: the table changes behind a
batch of notifications and the batch itself (in the outbox) are put on the broker first; then the
notifications are sent and acknowledged; then the outbox is emptied. A notification's
``alert_id`` names its decision (:func:`soundcheck.alerting.engine.notification_id`), so the same
decision taken again has the same id. When a worker takes an anomalies partition on whose outbox
holds something (its last owner died, or a send failed, before the broker acknowledged it), it
reads the ids on the alerts topic since the outbox's oldest notification (less a margin) and
sends only what the topic lacks. Records read again find their decisions already in the tables.

Ticks: every ingest agent sends, to each anomalies partition, the event time its stream has
reached (once per aggregation window). On a tick the agent takes the slowest stream's time
(streams silent for a minute of wall time aside) and lets every scope of that partition resolve
what went quiet and send the groups that are due.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Mapping

import faust
import orjson
from aiokafka.partitioner import murmur2

from soundcheck.alerting import silences
from soundcheck.alerting.engine import AlertEngine
from soundcheck.ingest.contracts import Rejection
from soundcheck.detectors.base import Anomaly
from soundcheck.detectors.behavior import FRAUD_SCOPE
from soundcheck.ingest.deadletters import dead_letters
from soundcheck.kafka.admin import TABLES, read_since

from .ingest import dead_letter

log = logging.getLogger(__name__)
STREAM_SILENT_S = 60.0  # a stream without ticks for this long (wall time) no longer holds the clock back
LOOKBACK_MS = 5 * 60_000  # a partition taken on: alerts read from its first record's timestamp less this (clock skew)
MAX_SEND_FAILURES = 3  # a batch of notifications that failed to send this often in a row goes to the dead letters


def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (as the ingest agents send it)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def register(app: faust.App, ctx: Any) -> None:
    settings, m = ctx.settings, ctx.metrics
    partitions = settings.kafka.partitions
    dedup_name, incidents_name, control_name, outbox_name, clock_name = TABLES  # their changelogs are created with the topics
    dedup = app.Table(dedup_name, default=None, partitions=partitions)
    clock_table = app.Table(clock_name, default=None, partitions=partitions)  # str(anomalies partition) -> its clock (on_tick)
    outbox = app.Table(outbox_name, default=None, partitions=partitions)  # str(anomalies partition) -> notifications being sent
    scopes = app.Table(incidents_name, default=None, partitions=partitions)
    control = app.GlobalTable(control_name, default=None, partitions=partitions)
    labels = silences.known_labels(settings)  # what a silence's matchers may name
    engine = AlertEngine(settings, ctx.graph, dedup, scopes, control)
    ctx.engine = engine
    alerts_topic, anomalies_topic, dlq = ctx.topics["alerts"], ctx.topics["anomalies"], ctx.topics["dead_letter"]
    decisions_topic = ctx.topics["decisions"]
    # the clock of each anomalies partition, kept in clock_table so that a worker taking a partition
    # on goes on with the clock its last owner had (else it would wait for every source to tick
    # again, and anomalies taken late the first time would be taken in time, or the other way round)
    clocks: dict[int, dict[tuple[str, int], tuple[int, float]]] = {}  # partition -> (stream, source) -> (event time, wall time)
    first_tick: dict[int, float] = {}
    moved: dict[int, int] = {}  # partition -> the fraud scope's clock last acted on (every source's slowest tick)
    moved_streams: dict[int, int] = {}  # partition -> the other scopes' clock last acted on (the aggregates' slowest)

    def load_clock(partition: int) -> dict[tuple[str, int], tuple[int, float]]:
        """This partition's clock, from the table the first time this worker sees it; its sources
        count as heard from now (each ticks again soon)."""
        if partition not in clocks:
            saved = clock_table.get(str(partition)) or {}
            wall = time.time()
            clocks[partition] = {(k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1])): (int(t), wall)
                                 for k, t in (saved.get("sources") or {}).items()}
            if saved.get("moved") is not None:
                moved[partition] = int(saved["moved"])
            if saved.get("moved_streams") is not None:
                moved_streams[partition] = int(saved["moved_streams"])
            elif partition in moved:  # a clock saved before the scopes had two
                moved_streams[partition] = moved[partition]
            if clocks[partition]:
                first_tick[partition] = wall
        return clocks[partition]

    def save_clock(partition: int) -> None:
        clock_table[str(partition)] = {"sources": {f"{stream}:{src}": t for (stream, src), (t, _) in clocks[partition].items()},
                                       "moved": moved.get(partition), "moved_streams": moved_streams.get(partition)}

    def stage2_partitions() -> tuple[int, int]:
        """The partition counts of the aggregates and fraud topics."""
        ing = next(iter(ctx.ingest.values()), None) if getattr(ctx, "ingest", None) else None
        return (ing.aggregates_partitions, ing.fraud_partitions) if ing is not None else (partitions, partitions)

    def all_ticked(sources: Mapping[tuple[str, int], Any]) -> bool:
        """Every aggregates partition has ticked, and every fraud partition too once the behaviour
        stream has (the fraud stage follows it)."""
        n_agg, n_fraud = stage2_partitions()
        agg = {src for stream, src in sources if stream != "fraud"}
        fraud = {src for stream, src in sources if stream == "fraud"}
        behaviour = any(stream == "behavior" for stream, _ in sources)
        return len(agg) >= n_agg and (not behaviour or len(fraud) >= n_fraud)
    reported: dict[str, int] = {}

    failures: dict[int, int] = {}  # anomalies partition -> sends failed in a row
    sent_ids: dict[int, set[str]] = {}  # anomalies partition taken on -> ids its outbox held that the alerts topic had

    async def take_on(partition: int, event: Any) -> None:
        """The first record of an anomalies partition in this worker (or the first after a failed
        send): what its outbox holds that the alerts topic lacks is sent. An empty outbox needs no
        check: state and outbox reach the broker before a notification is sent, so a record read
        again either finds its decision already in the tables or was never notified."""
        pending = list(outbox.get(str(partition)) or [])
        if not pending:
            sent_ids[partition] = set()
            return
        first = int((event.message.timestamp or time.time()) * 1000)
        since = min([first] + [int(n.get("emitted_at") or first) for n in pending]) - LOOKBACK_MS
        ids: set[str] = set()
        try:
            for r in await read_since(settings.kafka.bootstrap_servers, settings.topics.alerts, since, timeout=60.0,
                                      client=settings.kafka_client()):
                try:
                    ids.add(str(orjson.loads(r.value)["alert_id"]))
                except Exception:
                    continue  # not one of ours
        except Exception as exc:  # sending twice is better than not at all
            log.error("soundcheck.alerting: could not read what %s holds (%s: %s); partition %s may repeat a notification",
                      settings.topics.alerts, type(exc).__name__, exc, partition)
        sent_ids[partition] = ids
        unsent = [n for n in pending if n.get("alert_id") not in ids]
        log.warning("soundcheck.alerting: partition %s: %d notifications were being sent when its last owner stopped; "
                    "%d had reached %s, sending the other %d", partition, len(pending), len(pending) - len(unsent),
                    settings.topics.alerts, len(unsent))
        await send(partition, [])

    async def on_revoked(sender: Any, revoked: set, **kwargs: Any) -> None:
        for tp in revoked:
            if tp.topic == settings.topics.anomalies:
                sent_ids.pop(tp.partition, None)  # taken on again, should it come back
                for local in (clocks, first_tick, moved):  # read again from clock_table then
                    local.pop(tp.partition, None)

    app.on_partitions_revoked.connect(on_revoked)

    async def drain(timeout: float = 60.0) -> None:
        """Everything produced so far on the broker (the tables' changelog writes included: the
        app's producer flush waits for Faust's send buffer, :class:`streams.app._Producer`)."""
        await asyncio.wait_for(app.producer.flush(), timeout)

    async def send(partition: int, notes: list[dict[str, Any]]) -> None:
        sent = sent_ids.setdefault(partition, set())
        batch: dict[str, dict[str, Any]] = {}
        for n in list(outbox.get(str(partition)) or []) + notes:  # what a failed send left first: never overwritten
            if n["alert_id"] not in sent:
                batch.setdefault(n["alert_id"], n)
        notes = list(batch.values())
        if notes:
            # the table changes behind these notifications (group sent, alert marked sent, clock
            # moved) and the notifications themselves (the outbox) go to the broker first; Faust
            # sends changelogs with send_soon, topic.send() goes out at once
            outbox[str(partition)] = notes
            try:
                await drain()
                for n in notes:
                    await alerts_topic.send(key=n["fingerprint"].encode(), value=orjson.dumps(n))
                await drain()  # acknowledged
            except Exception as exc:
                # the outbox keeps them; the next record of this partition takes it on again,
                # checking the alerts topic for what did go out
                sent_ids.pop(partition, None)
                failures[partition] = failures.get(partition, 0) + 1
                if failures[partition] >= MAX_SEND_FAILURES:  # never sendable (too large?): dead letters, not a stuck partition
                    failures.pop(partition)
                    outbox[str(partition)] = None
                    log.error("soundcheck.alerting: %d notifications of partition %s failed to send %d times (%s: %s); "
                              "they go to the dead letters", len(notes), partition, MAX_SEND_FAILURES, type(exc).__name__, exc)
                    for n in notes:
                        value = dead_letters(topic=settings.topics.alerts, partition=-1, offset=-1, timestamp_ms=None,
                                             key=n["fingerprint"].encode(), value=orjson.dumps(n),
                                             rejections=[Rejection("processing_error", f"notification not sent: {type(exc).__name__}: {exc}")],
                                             stream="alerts", now_ms=int(time.time() * 1000))[0]
                        await dlq.send(key=n["fingerprint"].encode(), value=value)
                raise
            failures.pop(partition, None)
            for n in notes:
                m.alerts.labels(severity=n["severity"]).inc()
            outbox[str(partition)] = None
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
        every stage-2 partition has ticked (:func:`all_ticked`) (each sends its anomalies before its ticks, so every
        anomaly up to the clock is here); a source silent for a minute of wall time stops counting."""
        wall = time.time()
        sources = load_clock(partition)
        key = (str(doc["tick"]), int(doc.get("source", -1)))
        if int(doc["event_time"]) < sources.get(key, (-(2**62), 0.0))[0]:
            return []  # read again after a restart: this source's clock is past it
        sources[key] = (int(doc["event_time"]), wall)
        save_clock(partition)
        if not all_ticked(sources) and wall - first_tick.setdefault(partition, wall) < STREAM_SILENT_S:
            return []
        live = {key: t for key, (t, seen) in sources.items() if wall - seen < STREAM_SILENT_S}
        streams = [t for (stream, _), t in live.items() if stream != "fraud"]
        fraud = [t for (stream, _), t in live.items() if stream == "fraud"]
        # two clocks. The fraud scope's is the slowest of every source: a lagging fraud stage holds
        # it back (so that no fraud alert resolves while its next anomaly is still coming, whatever
        # the speed of a replay). Every other scope takes anomalies of the aggregates' detectors
        # only, so its clock is the slowest aggregates tick: the fraud stage, which scores a whole
        # window of behaviour events at once when the window closes, does not hold region alerts
        # back. A source that stops ticking stops counting after STREAM_SILENT_S of wall time.
        now = min(streams + fraud) if streams or fraud else int(doc["event_time"])
        now_streams = min(streams) if streams else now
        if now <= moved.get(partition, -(2**62)) and now_streams <= moved_streams.get(partition, -(2**62)):
            return []  # the slowest sources have not moved: nothing is due
        moved[partition], moved_streams[partition] = max(now, moved.get(partition, now)), max(now_streams, moved_streams.get(partition, now_streams))
        save_clock(partition)
        notes: list[dict[str, Any]] = []
        for scope in [k for k in list(scopes.keys()) if partition_of(k, partitions) == partition]:
            notes += engine.on_tick(scope, now if scope == FRAUD_SCOPE else now_streams, int(wall * 1000))
        return notes

    async def alerting(stream: faust.StreamT) -> None:
        async for event in stream.events():
            partition = event.message.partition
            if partition not in sent_ids:
                try:
                    await take_on(partition, event)
                except Exception:  # its outbox stays for the next owner; this record is still handled
                    log.exception("soundcheck.alerting: taking partition %s on failed", partition)
            try:
                doc = orjson.loads(event.value)
                if "tick" in doc:
                    m.internal_read.labels(kind="ticks").inc()
                    notes = on_tick(partition, doc)
                else:
                    m.anomalies_handled.inc()
                    notes = engine.on_anomaly(Anomaly.from_json(doc), int(time.time() * 1000))
                await send(partition, notes)
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
