"""Ingest agents: ``take_events`` batches from an input topic through a PartitionedProcessor.

Per batch (never per event): decode every message (a JSON object or an array of them), send
each rejected record to the dead-letter topic with the original bytes, source topic,
partition, offset and reason, run the stream's detectors, and send each anomaly to the
internal anomalies topic keyed by region. Counted in metrics; nothing logged per event.

Detector state is per (stream, input partition) (:class:`PartitionedProcessor`), and
:class:`SnapshotKeeper` makes it survive restarts and rebalances: every
``SNAPSHOT_INTERVAL_S`` (and when partitions are revoked, and on a clean shutdown) it writes a
versioned snapshot (:mod:`soundcheck.snapshots`) of each partition whose state changed to the
compacted topic ``<app_id>.snapshots``, keyed ``stream:partition``; when partitions are
assigned (Faust's ``app.on_partitions_assigned`` signal) it reads the latest snapshot of each
newly assigned input partition and loads it before that partition's records are processed.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from typing import Any, Iterable, Optional, Sequence

import faust
import orjson

from soundcheck import snapshots
from soundcheck.contracts import Rejection
from soundcheck.kafka_admin import SNAPSHOT_MAX_BYTES, read_latest, snapshot_topic
from soundcheck.pipeline import PartitionedProcessor

log = logging.getLogger(__name__)
IDLE_FLUSH_S = 5.0  # close open windows when a stream has been quiet this long (wall time)
SNAPSHOT_INTERVAL_S = 30.0  # write the snapshots of changed partitions this often (wall time)
SNAPSHOT_INTERVAL_ENV = "SOUNDCHECK_SNAPSHOT_INTERVAL_S"  # overrides it (tests)
RESTORE_TIMEOUT_S = 60.0  # give up reading the snapshot topic after this long (the partitions start fresh)
SEND_TIMEOUT_S = 30.0  # give up writing one snapshot after this long (it is retried at the next interval)
TEXT_COPY_LIMIT = 64 * 1024  # the original value is also given as text when it is UTF-8 and this small


def dead_letter(event: Any, rejection: Rejection, stream: str) -> tuple[bytes | None, bytes]:
    """The dead-letter record for one rejected record of ``event`` (see schemas/dead_letter.schema.json)."""
    msg = event.message
    value: bytes = msg.value if msg.value is not None else b""
    text: str | None = None
    if len(value) <= TEXT_COPY_LIMIT:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    record = {
        "source_topic": msg.topic,
        "partition": msg.partition,
        "offset": msg.offset,
        "timestamp": int(msg.timestamp * 1000) if msg.timestamp else None,
        "key": msg.key.decode("utf-8", "replace") if msg.key else None,
        "stream": stream,
        "error_kind": rejection.kind,
        "reason": rejection.reason,
        "index": rejection.index,
        "record": rejection.item if rejection.index is not None else None,
        "original_value_b64": base64.b64encode(value).decode(),
        "original_value": text,
        "dead_lettered_at": int(time.time() * 1000),
        "schema_version": "1.0",
    }
    return msg.key, orjson.dumps(record, default=str)


def snapshot_interval(environ: Optional[dict] = None) -> float:
    """``SNAPSHOT_INTERVAL_S``, or ``$SOUNDCHECK_SNAPSHOT_INTERVAL_S`` when set."""
    raw = (os.environ if environ is None else environ).get(SNAPSHOT_INTERVAL_ENV, "").strip()
    return float(raw) if raw else SNAPSHOT_INTERVAL_S


def set_tracked(m: Any, pp: PartitionedProcessor) -> None:
    for name, n in pp.tracked().items():
        m.tracked_entities.labels(detector=name).set(n)


def register(app: faust.App, ctx: Any, stream: str) -> None:
    settings, m = ctx.settings, ctx.metrics
    topic = ctx.topics[stream]
    topic_name = settings.topics.inputs()[stream]
    pp = PartitionedProcessor.create(settings, stream, ctx.contracts)
    ctx.processors[stream] = pp
    keeper: SnapshotKeeper = ctx.snapshots
    anomalies_topic, dlq = ctx.topics["anomalies"], ctx.topics["dead_letter"]
    state = {"last_event_wall": 0.0, "pending": False, "late": 0, "tick": 0}

    n_anomaly_partitions = settings.kafka.partitions
    tick_ms = settings.windows.aggregate_s * 1000

    async def emit(anomalies: Sequence[Any], quiet_ms: int = 0) -> None:
        for a in anomalies:
            m.anomalies.labels(detector=a.detector).inc()
            await anomalies_topic.send(key=(a.scope or a.region).encode(), value=a.to_json())
        # event-time ticks: the alerting agent resolves and sends grouped notifications on them,
        # also when nothing is anomalous (one per window of event time, to every partition)
        t = pp.event_time(idle_s=float("inf") if quiet_ms else 60.0)
        if t is not None:
            t += quiet_ms
            if t - t % tick_ms > state["tick"]:
                state["tick"] = t - t % tick_ms
                tick = orjson.dumps({"tick": stream, "event_time": state["tick"]})
                for part in range(n_anomaly_partitions):
                    await anomalies_topic.send(value=tick, partition=part)

    async def process(events: Sequence[Any]) -> None:
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        # per partition: records, highest event time, highest offset
        parts: dict[int, list] = {}
        n_records = 0
        for event in events:
            msg = event.message
            part = msg.partition
            if part not in parts:
                await keeper.ready(stream, part)  # a partition being restored waits for its snapshot
                parts[part] = [[], -1, -1]
            if pp.seen(part, msg.offset):  # already in the restored state (read again after a restart)
                continue
            entry = parts[part]
            entry[2] = max(entry[2], msg.offset)
            recs, bad = pp.decode(msg.value, now_ms)
            if recs:
                entry[0].extend(recs)
                n_records += len(recs)
                top = max(r.ts for r in recs)
                if top > entry[1]:
                    entry[1] = top
            for r in bad:
                key, value = dead_letter(event, r, stream)
                await dlq.send(key=key, value=value)
                m.dead_letters.labels(topic=topic_name, reason=r.kind).inc()
        m.messages_in.labels(topic=topic_name).inc(len(events))
        m.events_in.labels(topic=topic_name).inc(n_records)
        for part, (records, top, offset) in parts.items():
            if offset < 0:
                continue  # every message of this partition was already in its state
            await emit(pp.detect(part, records, top if records else None, offset))
        m.late_events.labels(stream=stream).inc(pp.late_events - state["late"])
        state["late"] = pp.late_events
        m.open_windows.labels(stream=stream).set(pp.open_windows)
        set_tracked(m, pp)
        done = time.time()
        m.batch_seconds.labels(stream=stream).observe(time.perf_counter() - started)
        oldest = min((e.message.timestamp for e in events if e.message.timestamp), default=None)
        if oldest:
            m.processing_latency.labels(stream=stream).observe(max(0.0, done - oldest))
        state["last_event_wall"], state["pending"] = done, True

    async def ingest(events_stream: faust.StreamT) -> None:
        w = settings.worker
        async for events in events_stream.take_events(w.batch_size, within=w.batch_within_s):
            try:
                await process(events)
            except Exception as exc:  # never fatal, never lost: the batch goes to the dead letters
                log.exception("agent soundcheck.ingest.%s: a batch of %d messages failed", stream, len(events))
                failure = Rejection("processing_error", f"soundcheck.ingest.{stream}: {type(exc).__name__}: {exc}")
                for event in events:
                    key, value = dead_letter(event, failure, stream)
                    try:
                        await dlq.send(key=key, value=value)
                        m.dead_letters.labels(topic=topic_name, reason=failure.kind).inc()
                    except Exception:
                        m.dead_letter_failures.labels(topic=topic_name).inc()
                        log.error("agent soundcheck.ingest.%s: could not dead-letter offset %s of partition %s",
                                  stream, event.message.offset, event.message.partition)

    app.agent(topic, name=f"soundcheck.ingest.{stream}")(ingest)

    async def flush_idle() -> None:
        """Close the open windows of a quiet stream, so the last anomalies are not held back."""
        if state["pending"] and time.time() - state["last_event_wall"] >= IDLE_FLUSH_S:
            state["pending"] = False
            # the stream went quiet: its open windows close, and its event time is taken to have
            # moved on by one notification group wait, so notifications waiting on it go out
            await emit(pp.flush(), quiet_ms=(settings.windows.group_wait_s + settings.windows.aggregate_s) * 1000)
            m.open_windows.labels(stream=stream).set(pp.open_windows)

    app.timer(interval=IDLE_FLUSH_S, name=f"soundcheck.flush.{stream}")(flush_idle)


class SnapshotKeeper:
    """Writes and restores the detector state snapshots of every ingest stream of one app.

    * every ``interval`` s (a Faust timer), and for the revoked partitions when a rebalance
      starts (``app.on_partitions_revoked``), and on a clean shutdown
      (``app.on_before_shutdown``, sent after the agents drained and before the producer
      flushes): one snapshot per partition whose state changed since its last one;
    * on ``app.on_partitions_assigned`` (sent at the end of every rebalance with the whole new
      assignment): drop the state of input partitions no longer assigned, read the snapshot
      topic for the newly assigned ones and load them. The partitions' records wait meanwhile
      (:meth:`ready`): Faust resumes the partitions when its table recovery ends, which may be
      before the snapshot topic is read.
    """

    def __init__(self, app: faust.App, ctx: Any) -> None:
        self.app, self.ctx = app, ctx
        self.settings, self.metrics = ctx.settings, ctx.metrics
        self.topic = snapshot_topic(ctx.settings)
        self.owned: dict[str, set[int]] = {}  # stream -> input partitions assigned here (restored or being restored)
        self.restoring: dict[tuple[str, int], asyncio.Future] = {}
        self._logged: set[tuple[str, str]] = set()
        self._lock: Optional[asyncio.Lock] = None
        self._producer: Any = None

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def streams_by_topic(self) -> dict[str, str]:
        return {name: stream for stream, name in self.settings.topics.inputs().items() if stream in self.ctx.processors}

    async def ready(self, stream: str, partition: int) -> None:
        fut = self.restoring.get((stream, partition))
        if fut is not None and not fut.done():
            await asyncio.shield(fut)

    # -- writing --------------------------------------------------------------------------

    async def producer(self) -> Any:
        """A producer of our own: snapshots (up to 16 MB) never sit in Faust's producer, whose
        flush every offset commit waits for, and a slow snapshot write cannot hold commits back."""
        if self._producer is None:
            from aiokafka import AIOKafkaProducer

            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.kafka.bootstrap_servers, client_id=f"{self.settings.kafka.app_id}-snapshots",
                acks="all", max_request_size=SNAPSHOT_MAX_BYTES + 1024 * 1024, request_timeout_ms=int(SEND_TIMEOUT_S * 1000),
            )
            await producer.start()
            self._producer = producer
        return self._producer

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def encode(self, stream: str, partition: int) -> Optional[bytes]:
        pp: PartitionedProcessor = self.ctx.processors[stream]
        proc = pp.partitions.get(partition)
        if proc is None:
            return None
        started = time.perf_counter()
        blob = snapshots.encode_snapshot(
            snapshots.capture(proc), stream=stream, partition=partition, last_offset=pp.offsets.get(partition, -1),
            last_event_time=pp.last_event_time(partition), settings=self.settings,
        )
        self.metrics.snapshot_seconds.labels(stream=stream).observe(time.perf_counter() - started)
        return blob

    async def write(self, only: Optional[Iterable[tuple[str, int]]] = None, why: str = "interval") -> int:
        """Snapshot the changed partitions (of ``only``, if given); returns how many were written."""
        written = 0
        wanted = set(only) if only is not None else None
        async with self.lock:
            for stream, pp in self.ctx.processors.items():
                for part in sorted(pp.dirty):
                    if wanted is not None and (stream, part) not in wanted:
                        continue
                    try:
                        blob = self.encode(stream, part)  # synchronous: the state and its offset agree
                        pp.dirty.discard(part)
                        if blob is None:
                            continue
                        if len(blob) > SNAPSHOT_MAX_BYTES:
                            raise ValueError(f"{len(blob)} bytes is over the limit of {SNAPSHOT_MAX_BYTES}")
                        producer = await self.producer()
                        await asyncio.wait_for(producer.send_and_wait(self.topic, blob, key=f"{stream}:{part}".encode()),
                                               SEND_TIMEOUT_S)
                    except Exception as exc:
                        pp.dirty.add(part)
                        self.metrics.snapshot_failures.labels(stream=stream).inc()
                        log.error("snapshot of %s partition %d (%s) failed: %s: %s", stream, part, why, type(exc).__name__, exc)
                        continue
                    written += 1
                    self.metrics.snapshots_written.labels(stream=stream).inc()
                    self.metrics.snapshot_bytes.labels(stream=stream).observe(len(blob))
        if written and why != "interval":
            log.info("wrote %d detector state snapshots (%s)", written, why)
        return written

    # -- restoring ------------------------------------------------------------------------

    def _reject(self, stream: str, exc: snapshots.SnapshotRejected) -> None:
        self.metrics.snapshots_rejected.labels(stream=stream).inc()
        if (stream, exc.reason) not in self._logged:  # once per stream and reason
            self._logged.add((stream, exc.reason))
            log.warning("a %s detector state snapshot was not restored, the partition starts fresh: %s", stream, exc)

    def load(self, stream: str, partition: int, blob: bytes) -> bool:
        pp: PartitionedProcessor = self.ctx.processors[stream]
        try:
            header, state = snapshots.decode_snapshot(blob, self.settings)
            if header.get("stream") != stream or header.get("partition") != partition:
                raise snapshots.SnapshotRejected("corrupt", f"key {stream}:{partition} holds {header.get('stream')}:{header.get('partition')}")
            proc = pp.new_processor()
            snapshots.restore(proc, state)
        except snapshots.SnapshotRejected as exc:
            self._reject(stream, exc)
            return False
        except Exception as exc:  # a state that unpickled but does not fit: start fresh too
            self._reject(stream, snapshots.SnapshotRejected("incompatible", f"{type(exc).__name__}: {exc}"))
            return False
        if header.get("config_digest") not in (None, snapshots.config_digest(self.settings)):
            log.info("%s partition %d: restored state was learned with other detection settings", stream, partition)
        pp.load(partition, proc, int(header.get("last_offset", -1)))
        self.metrics.snapshots_restored.labels(stream=stream).inc()
        return True

    async def on_revoked(self, sender: Any, revoked: set, **kwargs: Any) -> None:
        by_topic = self.streams_by_topic()
        await self.write([(by_topic[tp.topic], tp.partition) for tp in revoked if tp.topic in by_topic], why="revoked")

    async def on_assigned(self, sender: Any, assigned: set, **kwargs: Any) -> None:
        by_topic = self.streams_by_topic()
        now: dict[str, set[int]] = {s: set() for s in self.ctx.processors}
        for tp in assigned:
            if tp.topic in by_topic:
                now[by_topic[tp.topic]].add(tp.partition)
        new: list[tuple[str, int]] = []
        for stream, pp in self.ctx.processors.items():
            had = self.owned.get(stream, set()) | set(pp.partitions)
            for part in had - now[stream]:
                pp.drop(part)
            new.extend((stream, p) for p in sorted(now[stream] - self.owned.get(stream, set())))
            self.owned[stream] = now[stream]
        if not new:
            return
        loop = asyncio.get_running_loop()
        futs = {key: loop.create_future() for key in new}
        self.restoring.update(futs)  # before any await: the agents wait for these partitions
        try:
            await self.restore(new)
        finally:
            for key, fut in futs.items():
                if not fut.done():
                    fut.set_result(None)
                if self.restoring.get(key) is fut:
                    del self.restoring[key]

    async def restore(self, wanted: list[tuple[str, int]]) -> None:
        keys = {f"{s}:{p}".encode(): (s, p) for s, p in wanted}
        started = time.monotonic()
        try:
            found = await read_latest(self.settings.kafka.bootstrap_servers, self.topic, set(keys), timeout=RESTORE_TIMEOUT_S)
        except Exception as exc:
            for s in {s for s, _ in wanted}:
                self.metrics.snapshot_failures.labels(stream=s).inc()
            log.error("could not read the snapshot topic %s, %d partitions start fresh: %s: %s",
                      self.topic, len(wanted), type(exc).__name__, exc)
            return
        restored = 0
        for key, blob in found.items():
            stream, part = keys[key]
            restored += self.load(stream, part, blob)
        for stream, pp in self.ctx.processors.items():
            set_tracked(self.metrics, pp)
        log.info("restored %d of %d assigned partitions from %s in %.2f s (%d had no snapshot)",
                 restored, len(wanted), self.topic, time.monotonic() - started, len(wanted) - len(found))

    async def on_shutdown(self, sender: Any, **kwargs: Any) -> None:
        try:
            await self.write(why="shutdown")
        except Exception:  # never block the shutdown
            log.exception("snapshots on shutdown failed")
        finally:
            await self.close()


def register_snapshots(app: faust.App, ctx: Any) -> SnapshotKeeper:
    """The app's :class:`SnapshotKeeper` (``ctx.snapshots``); call before :func:`register`."""
    keeper = ctx.snapshots = SnapshotKeeper(app, ctx)
    app.on_partitions_assigned.connect(keeper.on_assigned)
    app.on_partitions_revoked.connect(keeper.on_revoked)
    app.on_before_shutdown.connect(keeper.on_shutdown)

    async def snapshot_changed() -> None:
        await keeper.write()

    app.timer(interval=snapshot_interval(), name="soundcheck.snapshots")(snapshot_changed)
    return keeper

