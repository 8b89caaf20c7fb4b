"""Stage 1 in the worker: the input topics read in raw batches, partial aggregates sent on.

Faust's per-event stream costs 23-45 µs a message whatever the agent does, which caps a worker
near 25,000-40,000 single-record messages/s. The input topics are therefore read by
:class:`IngestService`, a ``mode.Service`` started with the Faust app that runs its own aiokafka
consumer (group ``<app_id>.ingest``) and reads ``getmany`` batches: per batch, each message is
decoded (:mod:`soundcheck.ingest.contracts`), each rejected record goes to the dead-letter topic, and the
good records of each partition become partial aggregates (:class:`soundcheck.pipeline.IngestStage`).
When a partition's watermark closes a window, its partials go to the internal aggregates topic
(keyed by entity) and its behaviour rows to the fraud topic (keyed by pseudonymised user), each
with the partition's progress; stage 2 (:mod:`agents.detect`) runs on those as Faust agents.

Offsets (at least once): a partition's offset is committed only after everything its records
produced (partials, rows, dead letters) was acknowledged by the broker, and never past the first
record still in an open window; the commit's metadata holds the partition's progress
(``closed_until``), so a new owner of the partition re-reads exactly the open windows' records
and drops, as already sent, records of windows that were closed. Stage 1 keeps no other state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

import faust
import mode
import numpy as np
import orjson

from soundcheck.ingest.contracts import Rejection
from soundcheck.ingest.deadletters import dead_letters
from soundcheck.metrics import consumer_lags
from soundcheck.pipeline import STREAMS, AggregatesMessage, IngestStage

log = logging.getLogger(__name__)
IDLE_FLUSH_S = 5.0  # close open windows when a stream has been quiet this long (wall time)
# an input partition with nothing to read counts as idle only after this long (wall time). At 1 s a
# sparse stream (service samples every few seconds) closes its windows 1.4-2.1 s after the dense
# ones and holds every alert back that long (measured at 15,000 records/s, 3 partitions); 0.25 s
# made that 0.04-0.06 s but changed the notifications of a replay whose producer paused between
# two halves (tests/test_crash_recovery.py failed in CI), so it stays at 1 s for now
IDLE_GRACE_S = 1.0
COMMIT_EVERY_S = 1.0  # commit input offsets at most this often (and on revoke and stop)
MAX_RECORDS = 20_000  # messages per getmany (2,000, with the yield below: single-record throughput 64,000 -> 25,000 events/s)
# a batch lets the event loop run between its input partitions once it has held the loop this long:
# the agents on the internal topics, the producer and the heartbeats wait out every stall.
# Measured at 15,000 records/s (bench latency run, soundcheck_event_loop_lag_seconds): p99 42-47 ms
# with it against 65-94 ms without; throughput unchanged within the machine's noise (ARCHITECTURE.md)
YIELD_AFTER_S = 0.01
LAG_EVERY_S = 1.0  # report the input consumer's lag (soundcheck_consumer_lag) at most this often
LAG_POSITION_TIMEOUT_S = 0.05  # a position being reset (after a seek to the beginning) is not waited for


def dead_letter(event: Any, rejection: Rejection, stream: str) -> tuple[bytes | None, bytes]:
    """The dead letter of a Faust event (the agents on internal topics): (key, value)."""
    msg = event.message
    return msg.key, dead_letters(
        topic=msg.topic, partition=msg.partition, offset=msg.offset,
        timestamp_ms=int(msg.timestamp * 1000) if msg.timestamp else None, key=msg.key, value=msg.value,
        rejections=[rejection], stream=stream, now_ms=int(time.time() * 1000))[0]


def _metadata(closed_until: int) -> str:
    return orjson.dumps({"v": 1, "closed_until": closed_until}).decode()


def _closed_until(metadata: Optional[str]) -> int:
    try:
        return int(orjson.loads(metadata or "{}").get("closed_until", -(2**62)))
    except (ValueError, TypeError, AttributeError):
        return -(2**62)


async def input_lags(consumer: Any, next_offset: dict[Any, int]) -> dict[Any, int]:
    """Records behind on each assigned partition of ``consumer`` (aiokafka) with a known highwater: the
    position is ``next_offset`` (after the last record handed out) where known, else the consumer's
    own (no I/O once valid; a partition whose position is still being reset is left out)."""
    highwaters = {tp: consumer.highwater(tp) for tp in consumer.assignment()}
    positions: dict[Any, Optional[int]] = {}
    for tp, hw in highwaters.items():
        if hw is None:
            continue
        pos = next_offset.get(tp)
        if pos is None:
            try:
                pos = await asyncio.wait_for(consumer.position(tp), LAG_POSITION_TIMEOUT_S)
            except Exception:  # being reset, or no longer assigned: the next report
                continue
        positions[tp] = pos
    return consumer_lags(highwaters, positions)


def count_when_sent(fut: Any, counter: Any) -> None:
    """Count a message the broker acknowledged (``fut``: the producer's future for it); one that
    failed or was cancelled is not counted (it is sent again, or its batch is read again)."""
    if not hasattr(fut, "add_done_callback"):  # already sent
        counter.inc()
        return
    fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or counter.inc())


def register(app: faust.App, ctx: Any) -> None:
    """Start an :class:`IngestService` with the app (``ctx.ingest``: the stages by stream)."""
    settings, m = ctx.settings, ctx.metrics
    k, w = settings.kafka, settings.worker
    inputs = settings.topics.inputs()
    by_topic = {name: stream for stream, name in inputs.items()}
    internal = {"aggregates": settings.topics.aggregates, "fraud": settings.topics.fraud}
    ctx.ingest = {s: IngestStage(settings, s, ctx.contracts[s], k.partitions, k.partitions) for s in STREAMS}
    keep_original = bool(settings.privacy.get("dead_letter_original", True))

    class IngestService(mode.Service):
        """The input topics' consumer (see the module doc)."""

        consumer: Any = None
        producer: Any = None

        def __post_init__(self) -> None:
            ctx.ingest_service = self
            self.lock = asyncio.Lock()
            self.next_offset: dict[Any, int] = {}
            self.start_offset: dict[Any, int] = {}  # where reading began after the assignment (the commit)
            self.caught_since: dict[Any, float] = {}  # input partition -> wall time it was first seen with nothing to read
            self.last_commit = 0.0
            self.last_records = time.time()
            self.pending_flush = False
            self.late_reported: dict[str, int] = {}
            self.last_lag = -float("inf")  # time.monotonic() of the last lag report

        async def on_start(self) -> None:
            from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
            from aiokafka.abc import ConsumerRebalanceListener

            service = self

            class Listener(ConsumerRebalanceListener):
                async def on_partitions_revoked(self, revoked: Any) -> None:
                    await service.on_revoked(revoked)

                async def on_partitions_assigned(self, assigned: Any) -> None:
                    await service.on_assigned(assigned)

            self.producer = AIOKafkaProducer(
                bootstrap_servers=k.bootstrap_servers, client_id=f"{k.app_id}-ingest", acks="all", enable_idempotence=True,
                linger_ms=5, max_request_size=8 * 1024 * 1024, **settings.kafka_client(),
            )
            await self.producer.start()
            # the internal topics' real partition counts (created by this or another worker) decide the routing
            counts = {}
            for role, name in internal.items():
                parts = await self.producer.partitions_for(name)
                counts[role] = len(parts) if parts else k.partitions
            for stream, ing in ctx.ingest.items():
                ing.aggregates_partitions, ing.fraud_partitions = counts["aggregates"], counts["fraud"]
                parts = await self.producer.partitions_for(inputs[stream])
                ing.input_partitions = len(parts) if parts else 0  # stage 2 waits for all of them
            self.consumer = AIOKafkaConsumer(
                bootstrap_servers=k.bootstrap_servers, group_id=f"{k.app_id}.ingest", client_id=f"{k.app_id}-ingest",
                enable_auto_commit=False, auto_offset_reset=k.auto_offset_reset, max_partition_fetch_bytes=8 * 1024 * 1024,
                fetch_max_bytes=64 * 1024 * 1024, session_timeout_ms=int(w.session_timeout_s * 1000),
                heartbeat_interval_ms=int(max(1.0, w.session_timeout_s / 3) * 1000),
                group_instance_id=f"{w.instance_id}.ingest" if w.instance_id else None, **settings.kafka_client(),
            )
            await self.consumer.start()
            self.consumer.subscribe(list(inputs.values()), listener=Listener())

        async def on_stop(self) -> None:
            try:
                if self.consumer is not None:
                    async with self.lock:
                        await self.commit(force=True)
            except Exception:  # never block the shutdown
                log.exception("soundcheck.ingest: the last commit failed")
            finally:
                if self.consumer is not None:
                    await self.consumer.stop()
                if self.producer is not None:
                    await self.producer.stop()

        # -- rebalancing ----------------------------------------------------------------------

        async def on_revoked(self, revoked: Any) -> None:
            async with self.lock:
                try:
                    await self.commit(force=True, only=set(revoked))
                except Exception as exc:
                    log.warning("soundcheck.ingest: commit on revoke failed (the records are read again): %s", exc)
                for tp in revoked:
                    ctx.ingest[by_topic[tp.topic]].drop(tp.partition)
                    self.next_offset.pop(tp, None)
                    self.start_offset.pop(tp, None)
                    self.caught_since.pop(tp, None)
                    m.remove_consumer_lag(tp.topic, tp.partition)

        async def on_assigned(self, assigned: Any) -> None:
            async with self.lock:
                committed = await self.consumer._coordinator.fetch_committed_offsets(list(assigned)) if assigned else {}
                for tp in assigned:
                    ing = ctx.ingest[by_topic[tp.topic]]
                    ing.drop(tp.partition)
                    meta = committed.get(tp)
                    closed = _closed_until(getattr(meta, "metadata", None)) if meta is not None and meta.offset >= 0 else -(2**62)
                    ing.get(tp.partition, closed)
                    ing.sent_progress[tp.partition] = closed
                    self.start_offset[tp] = meta.offset if meta is not None and meta.offset >= 0 else 0
                log.info("soundcheck.ingest: assigned %d input partitions", len(assigned))

        # -- the loop -------------------------------------------------------------------------

        @mode.Service.task
        async def _run(self) -> None:
            while not self.should_stop:
                try:
                    batch = await self.consumer.getmany(timeout_ms=200, max_records=MAX_RECORDS)
                except Exception as exc:
                    log.warning("soundcheck.ingest: fetch failed: %s: %s", type(exc).__name__, exc)
                    await asyncio.sleep(1.0)
                    continue
                async with self.lock:
                    try:
                        await self.process(batch)
                    except Exception:
                        log.exception("soundcheck.ingest: a batch could not be sent; reading again from the last commit")
                        while not self.should_stop:
                            try:
                                await self.rewind()
                                break
                            except Exception as exc:  # the broker is away: try again, never give up the loop
                                log.warning("soundcheck.ingest: rewinding failed (%s: %s); retrying", type(exc).__name__, exc)
                                await asyncio.sleep(2.0)
                await self.report_lag()  # (outside the lock: it may wait a moment for a position)

        async def report_lag(self) -> None:
            """``soundcheck_consumer_lag`` of the assigned input partitions, at most every LAG_EVERY_S."""
            now = time.monotonic()
            if now - self.last_lag < LAG_EVERY_S:
                return
            self.last_lag = now
            try:
                m.set_consumer_lag(await input_lags(self.consumer, self.next_offset))
            except Exception as exc:  # a metric never stops the loop
                log.debug("soundcheck.ingest: consumer lag not reported: %s: %s", type(exc).__name__, exc)

        async def process(self, batch: dict) -> None:
            started = time.perf_counter()
            now = time.time()
            now_ms = int(now * 1000)
            futures: list[asyncio.Future] = []
            counts: list[tuple[str, int, int, dict[str, int]]] = []  # counted once the broker has everything
            oldest: Optional[int] = None
            since = started
            for tp, msgs in batch.items():
                if time.perf_counter() - since > YIELD_AFTER_S:
                    await asyncio.sleep(0)
                    since = time.perf_counter()
                stream = by_topic[tp.topic]
                ing = ctx.ingest[stream]
                records: list[Any] = []
                offs: list[int] = []
                where: list[tuple[int, Optional[int]]] = []  # per record: its message (position in msgs) and array index
                dead: dict[str, int] = {}
                rejected: dict[int, list[Rejection]] = {}
                for i, msg in enumerate(msgs):
                    try:
                        recs, bad = ing.decode(msg.value, now_ms)
                    except Exception as exc:  # our bug on this message: it alone is dead-lettered
                        recs, bad = [], [Rejection("processing_error", f"soundcheck.ingest.{stream}: decode: {type(exc).__name__}: {str(exc)[:200]}")]
                    if recs:
                        records.extend(recs)
                        offs.extend([msg.offset] * len(recs))
                        where.extend([(i, None)] * len(recs))
                    if bad:
                        rejected[i] = list(bad)
                out, failed = ing.process_safely(tp.partition, records, np.array(offs, dtype=np.int64), now)
                for j, reason in failed:  # records our code failed on, one by one: their neighbours went on
                    i, _ = where[j]
                    rejected.setdefault(i, []).append(Rejection("processing_error", f"soundcheck.ingest.{stream}: {reason}"))
                for i, bad in rejected.items():
                    msg = msgs[i]
                    for value in dead_letters(topic=tp.topic, partition=tp.partition, offset=msg.offset, timestamp_ms=msg.timestamp,
                                              key=msg.key, value=msg.value, rejections=bad, stream=stream, now_ms=now_ms,
                                              keep_original=keep_original):
                        futures.append(await self.producer.send(settings.topics.dead_letter, value, key=msg.key))
                    for r in bad:
                        dead[r.kind] = dead.get(r.kind, 0) + 1
                if msgs[0].timestamp is not None and (oldest is None or msgs[0].timestamp < oldest):
                    oldest = msgs[0].timestamp
                counts.append((tp.topic, len(msgs), len(records) - len(failed), dead))
                futures += await self.send_all(out)
                self.next_offset[tp] = msgs[-1].offset + 1
            if batch:
                self.last_records, self.pending_flush = now, True
            # partitions with nothing more to read move on with the slowest busy partition of any
            # stream (a sparse stream, such as service samples every few seconds, keeps up with the
            # dense ones instead of holding every alert back by a window)
            busy = [ctx.ingest[by_topic[tp.topic]].busy_progress([tp.partition]) for tp in batch]
            busy = [b for b in busy if b is not None]
            target = min(busy) if busy else None
            for tp in self.consumer.assignment():
                if tp in batch or not self._caught_up(tp):
                    self.caught_since.pop(tp, None)
                else:
                    self.caught_since.setdefault(tp, now)
            for stream, ing in ctx.ingest.items():
                # caught up for IDLE_GRACE_S (Kafka Streams' max.task.idle.ms): a partition whose
                # producer is only a moment behind the others is not taken for idle
                caught_up = [tp.partition for tp, since in self.caught_since.items()
                             if by_topic.get(tp.topic) == stream and now - since >= IDLE_GRACE_S]
                if caught_up:
                    futures += await self.send_all(ing.idle(caught_up, target))
            if self.pending_flush and now - self.last_records >= IDLE_FLUSH_S:
                self.pending_flush = False  # the streams went quiet: close every open window
                for ing in ctx.ingest.values():
                    futures += await self.send_all(ing.flush())
            if futures:
                await asyncio.gather(*futures)  # a failure: nothing is counted or committed, the batch is read again
            for topic, n_msgs, n_records, dead in counts:
                m.messages_in.labels(topic=topic).inc(n_msgs)
                m.events_in.labels(topic=topic).inc(n_records)
                for kind, n in dead.items():
                    m.dead_letters.labels(topic=topic, reason=kind).inc(n)
            for stream, ing in ctx.ingest.items():
                m.open_windows.labels(stream=stream).set(ing.open_windows)
                late = ing.late_events - self.late_reported.get(stream, 0)
                if late > 0:
                    m.late_events.labels(stream=stream).inc(late)
                self.late_reported[stream] = ing.late_events
            if batch:
                m.batch_seconds.labels(stream="ingest").observe(time.perf_counter() - started)
                if oldest is not None:
                    m.processing_latency.labels(stream="ingest").observe(max(0.0, time.time() - oldest / 1000))
            try:
                await self.commit()
            except Exception as exc:  # a rebalance under way, say: the offsets are committed later (or read again)
                log.warning("soundcheck.ingest: commit failed (%s: %s); committing later", type(exc).__name__, exc)

        def _caught_up(self, tp: Any) -> bool:
            """Nothing more to read on ``tp`` (an empty partition included) as of the last fetch."""
            hw = self.consumer.highwater(tp)
            nxt = self.next_offset.get(tp, self.start_offset.get(tp))
            return hw is not None and nxt is not None and nxt >= hw

        async def send_all(self, msgs: list[AggregatesMessage]) -> list[asyncio.Future]:
            out = []
            for a in msgs:
                fut = await self.producer.send(internal[a.topic], a.value, partition=a.partition)
                count_when_sent(fut, m.internal_sent.labels(kind=a.topic))
                out.append(fut)
            return out

        async def commit(self, force: bool = False, only: Optional[set] = None) -> None:
            now = time.time()
            if not force and now - self.last_commit < COMMIT_EVERY_S:
                return
            offsets = {}
            for tp, nxt in self.next_offset.items():
                if only is not None and tp not in only:
                    continue
                ing = ctx.ingest[by_topic[tp.topic]]
                pa = ing.parts.get(tp.partition)
                closed = pa.closed_until if pa is not None else -(2**62)
                offsets[tp] = (ing.committable(tp.partition, nxt), _metadata(closed))
            if offsets:
                await self.consumer.commit(offsets)
            self.last_commit = now

        async def rewind(self) -> None:
            """Something was not acknowledged: forget stage 1 and read again from the last commit."""
            assigned = set(self.consumer.assignment())
            self.next_offset.clear()
            self.caught_since.clear()
            committed = await self.consumer._coordinator.fetch_committed_offsets(list(assigned))
            for tp in assigned:
                ing = ctx.ingest[by_topic[tp.topic]]
                ing.drop(tp.partition)
                meta = committed.get(tp)
                if meta is not None and meta.offset >= 0:
                    closed = _closed_until(meta.metadata)
                    ing.get(tp.partition, closed)
                    ing.sent_progress[tp.partition] = closed
                    self.start_offset[tp] = meta.offset
                    self.consumer.seek(tp, meta.offset)
                else:
                    ing.get(tp.partition)
                    self.start_offset[tp] = 0
                    await self.consumer.seek_to_beginning(tp)
            await asyncio.sleep(1.0)

    app.service(IngestService)
