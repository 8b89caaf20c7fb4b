"""Stage 2 in the worker: Faust agents on the internal aggregates and fraud topics.

* ``soundcheck.detect`` reads the aggregates topic: per partition, a dict of
  :class:`~soundcheck.detectors.stage2.Stage2` (one per input stream) merges the partials of every
  input partition and detects on complete windows; anomalies go to the anomalies topic keyed by
  correlation scope, and event-time ticks (how far each stream's windows are complete) go to the
  anomalies partition of the same number, for the alerting agent's clock.
* ``soundcheck.fraud`` reads the fraud topic (behaviour rows keyed by pseudonymised user):
  a :class:`~soundcheck.detectors.stage2.FraudStage` per partition.
* a timer lets quiet input partitions stop holding windows back (wall time decides when to act
  on a quiet stream, never what a window holds).

The fraud stage scores a whole window of behaviour events at once when the window closes: about
a second of CPU at 15,000 events/s. On the event loop, that second held back every other agent
(faust-streaming's consumer hands an agent one message per turn of the loop), and with them every
region alert. So it runs in a child process (:mod:`agents.fraud_process`, ``worker.fraud_process``);
with that off, it runs on the event loop in steps of a few milliseconds (:func:`stepped`). Either
way each holder's :attr:`UnitHolder.lock` keeps its units to one user at a time: a message, the
idle timer, a snapshot, a rebalance. (A thread of its own was tried: the GIL made the event loop
slower, p50 2.9-4.4 s.)

Their state is per partition of their topic (:class:`UnitHolder`), and :class:`SnapshotKeeper`
makes it survive restarts and rebalances: every ``SNAPSHOT_INTERVAL_S`` (and when partitions are
revoked, and on a clean shutdown) it writes a versioned snapshot (:mod:`soundcheck.snapshots`) of
each partition whose state changed to the compacted topic ``<app_id>.snapshots``, keyed
``role:partition``; when partitions are assigned it reads the latest snapshot of each newly
assigned partition and loads it before that partition's messages are processed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Optional

import faust
import orjson

from soundcheck import snapshots
from soundcheck.ingest.contracts import Rejection
from soundcheck.detectors.history import SeriesHistory
from soundcheck.detectors.stage2 import STREAMS, FraudStage, Stage2, clock_ticks, rows_progress
from soundcheck.kafka.admin import SNAPSHOT_MAX_BYTES, read_latest, snapshot_topic
from soundcheck.pipeline import decode_internal, publish

from .fraud_process import FraudProcess, FraudProcessDied, RemoteFraudStage
from .ingest import count_when_sent, dead_letter

log = logging.getLogger(__name__)
SNAPSHOT_INTERVAL_S = 30.0  # write the snapshots of changed partitions this often (wall time)
SNAPSHOT_INTERVAL_ENV = "SOUNDCHECK_SNAPSHOT_INTERVAL_S"  # overrides it (tests)
MAX_CATCH_UP = 20_000  # records re-read per partition between a snapshot and the committed offset, at most
RESTORE_TIMEOUT_S = 60.0  # give up reading the snapshot topic after this long (the partitions start fresh)
SEND_TIMEOUT_S = 30.0  # give up writing one snapshot after this long (it is retried at the next interval)
ADVANCE_EVERY_S = 1.0


def snapshot_interval(environ: Optional[dict] = None) -> float:
    """``SNAPSHOT_INTERVAL_S``, or ``$SOUNDCHECK_SNAPSHOT_INTERVAL_S`` when set."""
    raw = (os.environ if environ is None else environ).get(SNAPSHOT_INTERVAL_ENV, "").strip()
    return float(raw) if raw else SNAPSHOT_INTERVAL_S


@dataclass
class UnitHolder:
    """The stage-2 units of one role (``aggregates`` or ``fraud``) by partition of its topic, with
    the last offset each unit's state holds and whether it changed since its last snapshot."""

    role: str
    factory: Callable[[], Any]
    partitions: dict[int, Any] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    _lock: Optional[asyncio.Lock] = field(default=None, repr=False)

    @property
    def lock(self) -> asyncio.Lock:
        """Held while a unit is changed or read whole (a message, the idle timer, a snapshot, a drop)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def new_processor(self) -> Any:
        return self.factory()

    def get(self, partition: int) -> Any:
        unit = self.partitions.get(partition)
        if unit is None:
            unit = self.partitions[partition] = self.factory()
        return unit

    def seen(self, partition: int, offset: int) -> bool:
        return offset <= self.offsets.get(partition, -1)

    def done(self, partition: int, offset: int) -> None:
        if offset > self.offsets.get(partition, -1):
            self.offsets[partition] = offset
        self.dirty.add(partition)

    def load(self, partition: int, unit: Any, last_offset: int) -> None:
        old = self.partitions.get(partition)
        if old is not None and old is not unit and isinstance(old, RemoteFraudStage):
            old.close()
        self.partitions[partition] = unit
        self.offsets[partition] = last_offset
        self.dirty.discard(partition)

    def drop(self, partition: int) -> None:
        unit = self.partitions.pop(partition, None)
        if isinstance(unit, RemoteFraudStage):
            unit.close()
        self.offsets.pop(partition, None)
        self.dirty.discard(partition)

    def last_event_time(self, partition: int) -> Optional[int]:
        unit = self.partitions.get(partition)
        if unit is None:
            return None
        stages = unit.values() if isinstance(unit, dict) else [unit]
        marks = [st.done_until for st in stages if st.done_until > -(2**61)]
        return min(marks) if marks else None

    def tracked(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for unit in self.partitions.values():
            if isinstance(unit, dict):
                for st in unit.values():
                    for name, n in st.tracked().items():
                        out[name] = out.get(name, 0) + n
            else:
                out["behavior.fraud"] = out.get("behavior.fraud", 0) + unit.n_users
        return out


async def stepped(steps: Generator[None, None, Any]) -> Any:
    """Run a generator of steps to its end, letting the event loop run between steps; its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        await asyncio.sleep(0)


FRAUD_BATCH = 256  # fraud messages handed to the fraud process in one round trip, at most
FRAUD_BATCH_WAIT_S = 0.005  # Faust's take_events interval: a batch is handed on at most this long after the last one


def fraud_process_died(name: str, exc: BaseException) -> None:
    """The fraud state is gone with its process: stop at once, as a ``kill -9`` would. The offsets
    of what was not finished are not committed; the worker taking the partitions over restores
    their last snapshots and reads the rest again (see :mod:`agents.fraud_process`)."""
    log.critical("%s: %s; the worker stops, its partitions go on from their last snapshots and committed offsets", name, exc)
    logging.shutdown()
    os._exit(70)


def set_tracked(m: Any, holder: UnitHolder) -> None:
    for name, n in holder.tracked().items():
        m.tracked_entities.labels(detector=name).set(n)


def register(app: faust.App, ctx: Any) -> None:
    settings, m = ctx.settings, ctx.metrics
    keeper: SnapshotKeeper = ctx.snapshots
    if ctx.history is None:  # the incident page's window values: per worker, empty after a restart
        ctx.history = SeriesHistory(step_s=settings.windows.aggregate_s)

    def new_unit() -> dict[str, Stage2]:
        unit = {s: Stage2(settings, s) for s in STREAMS}
        for st in unit.values():
            for det in st.detectors:
                det.history = ctx.history  # fed as each window is evaluated; never in a snapshot
        return unit

    for stream in STREAMS:  # exported at 0 from the start: a dashboard tells "none" from "not reported"
        m.late_partials.labels(stream=stream)
    m.late_events.labels(stream="fraud")
    agg = ctx.processors["aggregates"] = UnitHolder("aggregates", new_unit)
    if settings.worker.fraud_process:  # beside the event loop (see agents.fraud_process)
        proc = ctx.fraud_process = FraudProcess(settings)
        fraud = ctx.processors["fraud"] = UnitHolder("fraud", proc.stage)

        @app.task
        async def start_fraud_process() -> None:
            await proc.start()
    else:
        fraud = ctx.processors["fraud"] = UnitHolder("fraud", lambda: FraudStage(settings))
    anomalies_topic, dlq = ctx.topics["anomalies"], ctx.topics["dead_letter"]
    tick_ms = settings.windows.aggregate_s * 1000
    quiet_ms = (settings.windows.group_wait_s + settings.windows.aggregate_s) * 1000
    ticks: dict[tuple[int, str], int] = {}
    n_anomalies = settings.kafka.partitions

    async def emit(anomalies: list, partition: int, unit: Any) -> None:
        for a in anomalies:
            m.anomalies.labels(detector=a.detector).inc()
            await anomalies_topic.send(key=(a.scope or a.region).encode(), value=a.to_json())
        # event-time ticks for the alerting clock, once per window, to every anomalies partition and
        # after this partition's anomalies: an alerting agent whose clock is the slowest of all
        # stage-2 partitions and streams (the fraud stage is one) has every anomaly up to it,
        # whatever the interleaving. A tick is what a stream's detectors have evaluated (and sent
        # the anomalies of), not its progress watermark, which moves on wall time too (an input
        # partition idle for a while): a tick past windows not yet evaluated lets the alerting
        # clock overtake their anomalies (and a quiet stream's, see clock_ticks)
        stages = unit.items() if isinstance(unit, dict) else [("fraud", unit)]
        done = {stream: st.done_until for stream, st in stages}
        quiet = frozenset(stream for stream, st in stages if st.progress.all_quiet)
        for stream, t in clock_ticks(done, tick_ms, quiet_ms, quiet).items():
            if t > ticks.get((partition, stream), -(2**62)):
                ticks[(partition, stream)] = t
                value = orjson.dumps({"tick": stream, "source": partition, "event_time": t})
                for target in range(n_anomalies):
                    count_when_sent(await anomalies_topic.send(value=value, partition=target), m.internal_sent.labels(kind="ticks"))

    async def handle(holder: UnitHolder, part: int, offset: int, value: bytes) -> None:
        """One message of the aggregates or fraud topic into its partition's unit (skipped if the
        unit has it already); the anomalies and ticks it completes are sent."""
        async with holder.lock:
            if holder.seen(part, offset):
                return
            unit = holder.get(part)
            if holder.role == "fraud":
                late = unit.late_events
                if isinstance(unit, RemoteFraudStage):  # decoded and scored in the fraud process
                    found = await unit.message(value)
                else:
                    doc = decode_internal(value)
                    found = await stepped(unit.add_steps(doc["source"], doc.get("rows", []), rows_progress(doc),
                                                         of=doc.get("of"), quiet=bool(doc.get("quiet"))))
                if unit.late_events > late:
                    m.late_events.labels(stream="fraud").inc(unit.late_events - late)
            else:
                doc = decode_internal(value)
                st = unit[doc["stream"]]
                late = st.late_partials
                found = st.add(doc["source"], doc["partials"], doc.get("closed_until"), of=doc.get("of"), quiet=bool(doc.get("quiet")))
                if st.late_partials > late:  # an input partition taken for idle too soon, or a partial sent too late
                    m.late_partials.labels(stream=doc["stream"]).inc(st.late_partials - late)
                for a in found:
                    publish(a, settings)
            holder.done(part, offset)
            await emit(found, part, unit)

    async def handle_remote(holder: UnitHolder, events: list) -> list[tuple[Any, str]]:
        """The fraud messages of a batch (see ``make_agent``) in the fraud process, in one round trip:
        the same as :func:`handle` on each in turn, and one waits for the event loop once, not once
        a message (stage 1 sends each fraud partition a message about twice a second per input
        partition). Returns the (event, reason) of the messages that failed in the child."""
        async with holder.lock:
            todo, taken = [], set()
            for ev in events:  # each message once, even if a seek delivered it twice in one batch
                part, offset = ev.message.partition, ev.message.offset
                if not holder.seen(part, offset) and (part, offset) not in taken:
                    taken.add((part, offset))
                    todo.append((ev, part, offset, holder.get(part)))
            if not todo:
                return []
            units = {part: unit for _, part, _, unit in todo}
            for unit in units.values():
                await unit.sync()
            late = {part: unit.late_events for part, unit in units.items()}
            results = await proc.call_many([(unit.sid, "message", (ev.value,)) for ev, _, _, unit in todo])
            found: dict[int, list] = {part: [] for part in units}
            handled: dict[int, list] = {part: [] for part in units}
            failed = []
            for (ev, part, offset, unit), (ok, out, fields) in zip(todo, results):
                unit.mirror(fields)
                if ok:
                    found[part] += out
                    handled[part].append(ev)
                    holder.done(part, offset)
                else:
                    failed.append((ev, f"{out[0]}: {out[1]}"))
            for part, unit in units.items():
                if unit.late_events > late[part]:
                    m.late_events.labels(stream="fraud").inc(unit.late_events - late[part])
                try:
                    await emit(found[part], part, unit)
                except Exception as exc:  # as in handle(): the messages whose anomalies were not sent are dead-lettered
                    log.exception("agent soundcheck.fraud: sending the anomalies of partition %s failed", part)
                    failed += [(ev, f"sending its anomalies failed: {type(exc).__name__}: {exc}") for ev in handled[part]]
        return failed

    ctx.fraud_batch = (lambda events: handle_remote(fraud, events)) if settings.worker.fraud_process else None
    holders = {"aggregates": agg, "fraud": fraud}
    keeper.replay = lambda role, part, offset, value: handle(holders[role], part, offset, value)

    def make_agent(holder: UnitHolder, name: str) -> Callable:
        async def dead(event: Any, reason: str) -> None:  # never fatal: the message goes to the dead letters
            key, value = dead_letter(event, Rejection("processing_error", f"{name}: {reason}"), holder.role)
            await dlq.send(key=key, value=value)
            m.dead_letters.labels(topic=event.message.topic, reason="processing_error").inc()

        async def batches(stream: faust.StreamT) -> None:
            async for events in stream.take_events(FRAUD_BATCH, within=FRAUD_BATCH_WAIT_S):
                try:
                    for part in sorted({ev.message.partition for ev in events}):
                        await keeper.ready(holder.role, part)
                    failed = await handle_remote(holder, events)
                except FraudProcessDied as exc:
                    fraud_process_died(name, exc)
                except Exception as exc:
                    log.exception("agent %s: a batch of %d messages failed", name, len(events))
                    failed = [(ev, f"{type(exc).__name__}: {exc}") for ev in events
                              if not holder.seen(ev.message.partition, ev.message.offset)]
                for ev, reason in failed:
                    log.error("agent %s: message at offset %s of partition %s failed: %s", name, ev.message.offset, ev.message.partition, reason)
                    await dead(ev, reason)
                m.internal_read.labels(kind=holder.role).inc(len(events))

        async def agent(stream: faust.StreamT) -> None:
            if holder.role == "fraud" and settings.worker.fraud_process:
                await batches(stream)
                return
            async for event in stream.events():
                part, offset = event.message.partition, event.message.offset
                try:
                    await keeper.ready(holder.role, part)
                    await handle(holder, part, offset, event.value)
                except FraudProcessDied as exc:
                    fraud_process_died(name, exc)
                except Exception as exc:
                    log.exception("agent %s: message at offset %s of partition %s failed", name, offset, part)
                    await dead(event, f"{type(exc).__name__}: {exc}")
                m.internal_read.labels(kind=holder.role).inc()
            set_tracked(m, holder)

        return agent

    app.agent(ctx.topics["aggregates"], name="soundcheck.detect")(make_agent(agg, "soundcheck.detect"))
    app.agent(ctx.topics["fraud"], name="soundcheck.fraud")(make_agent(fraud, "soundcheck.fraud"))

    async def advance_idle() -> None:
        """Input partitions quiet for a while stop holding windows back."""
        try:
            await _advance_idle()
        except FraudProcessDied as exc:
            fraud_process_died("soundcheck.detect.idle", exc)

    async def _advance_idle() -> None:
        for holder in (agg, fraud):
            for part in list(holder.partitions):
                async with holder.lock:
                    unit = holder.partitions.get(part)
                    if unit is None or keeper.restoring.get((holder.role, part)) is not None:
                        continue
                    if isinstance(unit, dict):
                        found = [a for st in unit.values() for a in st.advance()]
                        for a in found:
                            publish(a, settings)
                    elif isinstance(unit, RemoteFraudStage):
                        found = await unit.advance()
                    else:
                        found = await stepped(unit.advance_steps())
                    if found:
                        holder.dirty.add(part)
                    await emit(found, part, unit)
            set_tracked(m, holder)

    app.timer(interval=ADVANCE_EVERY_S, name="soundcheck.detect.idle")(advance_idle)


class SnapshotKeeper:
    """Writes and restores the detector state snapshots of the stage-2 units (``aggregates`` and ``fraud``) of one app.

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
        self.owned: dict[str, set[int]] = {}  # role -> partitions assigned here (restored or being restored)
        self.restoring: dict[tuple[str, int], asyncio.Future] = {}
        self._logged: set[tuple[str, str]] = set()
        self._lock: Optional[asyncio.Lock] = None
        self._producer: Any = None
        #: (role, partition, offset, value) -> None: one message into its unit (set by :func:`register`)
        self.replay: Optional[Callable[[str, int, int, bytes], Any]] = None

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def streams_by_topic(self) -> dict[str, str]:
        t = self.settings.topics
        return {t.aggregates: "aggregates", t.fraud: "fraud"}

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
                **self.settings.kafka_client(),
            )
            await producer.start()
            self._producer = producer
        return self._producer

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    async def encode(self, stream: str, partition: int) -> Optional[bytes]:
        pp: UnitHolder = self.ctx.processors[stream]
        proc = pp.partitions.get(partition)
        if proc is None:
            return None
        started = time.perf_counter()
        if isinstance(proc, RemoteFraudStage):  # captured and encoded in the fraud process
            blob = await proc.encode(partition, pp.offsets.get(partition, -1), pp.last_event_time(partition))
        else:
            blob = snapshots.encode_snapshot(
                snapshots.capture_stage(proc), stream=stream, partition=partition, last_offset=pp.offsets.get(partition, -1),
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
                        async with pp.lock:  # not half-way through a message or the idle timer
                            blob = await self.encode(stream, part)  # the state and its offset agree
                            pp.dirty.discard(part)
                        if blob is None:
                            continue
                        # the anomalies and ticks of the records this state holds reach the broker
                        # first: a replacement skips the records a snapshot holds, so a snapshot
                        # ahead of them would lose them after a kill -9 (measured: lost notifications)
                        await asyncio.wait_for(self.app.producer.flush(), SEND_TIMEOUT_S)
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
        pp: UnitHolder = self.ctx.processors[stream]
        try:
            proc = pp.new_processor()
            remote = isinstance(proc, RemoteFraudStage)  # the fraud process decodes its snapshot itself
            header, state = snapshots.verify(blob) if remote else snapshots.decode_snapshot(blob, self.settings)
            if header.get("stream") != stream or header.get("partition") != partition:
                raise snapshots.SnapshotRejected("corrupt", f"key {stream}:{partition} holds {header.get('stream')}:{header.get('partition')}")
            if remote:
                proc.restore(blob)  # sent to the fraud process before the partition's first message
            else:
                snapshots.restore_stage(proc, state)
        except snapshots.SnapshotRejected as exc:
            self._reject(stream, exc)
            return False
        except Exception as exc:  # a state that unpickled but does not fit: start fresh too
            self._reject(stream, snapshots.SnapshotRejected("incompatible", f"{type(exc).__name__}: {exc}"))
            return False
        if header.get("config_digest") not in (None, snapshots.config_digest(self.settings)):
            log.info("%s partition %d: restored state was learned with other detection settings", stream, partition)
        pp.load(partition, proc, int(header.get("last_offset", -1)))
        return True  # counted in soundcheck_snapshots_restored by restore(), once the state is in use

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
            async with pp.lock:  # a unit is dropped between messages, not half-way through one
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
            found = await read_latest(
                self.settings.kafka.bootstrap_servers, self.topic, set(keys), timeout=RESTORE_TIMEOUT_S,
                client=self.settings.kafka_client(),
            )
        except Exception as exc:
            for s in {s for s, _ in wanted}:
                self.metrics.snapshot_failures.labels(stream=s).inc()
            log.error("could not read the snapshot topic %s, %d partitions start fresh: %s: %s",
                      self.topic, len(wanted), type(exc).__name__, exc)
            return
        restored: list[str] = []  # the stream of each partition whose state was taken
        for key, blob in found.items():
            stream, part = keys[key]
            if not self.load(stream, part, blob):
                continue
            unit = self.ctx.processors[stream].partitions.get(part)
            if isinstance(unit, RemoteFraudStage):
                try:
                    await unit.sync()
                except FraudProcessDied as exc:
                    fraud_process_died("soundcheck.snapshots", exc)
                except Exception as exc:  # a snapshot the fraud process refused: the partition starts fresh
                    self.ctx.processors[stream].drop(part)
                    self._reject(stream, exc if isinstance(exc, snapshots.SnapshotRejected)
                                 else snapshots.SnapshotRejected("incompatible", f"{type(exc).__name__}: {exc}"))
                    continue
            restored.append(stream)
        log.info("restored %d of %d assigned partitions from %s in %.2f s (%d had no snapshot)",
                 len(restored), len(wanted), self.topic, time.monotonic() - started, len(wanted) - len(found))
        try:
            await self.catch_up(wanted)
        except Exception as exc:  # the partitions go on from the committed offsets, as before
            log.error("could not re-read the records between the snapshots and the committed offsets: %s: %s",
                      type(exc).__name__, exc)
        for stream, pp in self.ctx.processors.items():
            set_tracked(self.metrics, pp)
        # counted last, so that a reader who sees the count also sees the restored state's gauges
        for stream in restored:
            self.metrics.snapshots_restored.labels(stream=stream).inc()

    async def catch_up(self, wanted: list[tuple[str, int]]) -> None:
        """Apply the records the group has committed but the loaded state does not hold: a snapshot
        is written every interval while Faust commits every second, so after a crash the committed
        offset is ahead of the snapshot's. Faust goes on from the committed offset; these records,
        read here with a consumer of our own, would otherwise be missing from the state. Their
        anomalies may be sent a second time; the alert engine recognises them as replays."""
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        if self.replay is None or not wanted:
            return
        k, client = self.settings.kafka, self.settings.kafka_client()
        names = {"aggregates": self.settings.topics.aggregates, "fraud": self.settings.topics.fraud}
        by_tp = {TopicPartition(names[role], part): (role, part) for role, part in wanted if role in names}
        admin = AIOKafkaAdminClient(bootstrap_servers=k.bootstrap_servers, **client)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(k.app_id, partitions=list(by_tp))
        finally:
            await admin.close()
        todo: dict[Any, tuple[int, int]] = {}  # tp -> (first offset to read, committed offset)
        for tp, (role, part) in by_tp.items():
            meta = committed.get(tp)
            first = self.ctx.processors[role].offsets.get(part, -1) + 1
            if meta is not None and meta.offset > first:
                # without a (usable) snapshot this could be the topic's whole retention: the last
                # MAX_CATCH_UP records at most, which is what a snapshot interval holds many times over
                todo[tp] = (max(first, meta.offset - MAX_CATCH_UP), meta.offset)
        if not todo:
            return
        started, replayed = time.monotonic(), 0
        consumer = AIOKafkaConsumer(bootstrap_servers=k.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", **client)
        await consumer.start()
        try:
            consumer.assign(list(todo))
            for tp, (first, _) in todo.items():
                consumer.seek(tp, first)
            pending = set(todo)
            deadline = time.monotonic() + RESTORE_TIMEOUT_S
            while pending and time.monotonic() < deadline:
                batch = await consumer.getmany(*pending, timeout_ms=500)
                for tp, records in batch.items():
                    role, part = by_tp[tp]
                    for r in records:
                        if r.offset >= todo[tp][1]:
                            break
                        await self.replay(role, part, r.offset, r.value)
                        replayed += 1
                for tp in list(pending):
                    if await consumer.position(tp) >= todo[tp][1]:
                        pending.discard(tp)
            if pending:
                log.error("re-reading up to the committed offsets timed out for %s", sorted(map(str, pending)))
        finally:
            await consumer.stop()
        log.info("re-read %d records between the snapshots and the committed offsets of %d partitions in %.2f s",
                 replayed, len(todo), time.monotonic() - started)

    async def on_shutdown(self, sender: Any, **kwargs: Any) -> None:
        try:
            await self.write(why="shutdown")
        except Exception:  # never block the shutdown
            log.exception("snapshots on shutdown failed")
        finally:
            await self.close()
            proc = getattr(self.ctx, "fraud_process", None)
            if proc is not None:  # after its snapshots are written
                proc.close()


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

