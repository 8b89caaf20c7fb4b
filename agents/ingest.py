"""Ingest agents: ``take_events`` batches from an input topic through a StreamProcessor.

Per batch (never per event): decode every message (a JSON object or an array of them), send
each rejected record to the dead-letter topic with the original bytes, source topic,
partition, offset and reason, run the stream's detectors, and send each anomaly to the
internal anomalies topic keyed by region. Counted in metrics; nothing logged per event.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any, Sequence

import faust
import orjson

from soundcheck.contracts import Rejection
from soundcheck.pipeline import StreamProcessor

log = logging.getLogger(__name__)
IDLE_FLUSH_S = 5.0  # close open windows when a stream has been quiet this long (wall time)
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


def register(app: faust.App, ctx: Any, stream: str) -> None:
    settings, m = ctx.settings, ctx.metrics
    topic = ctx.topics[stream]
    topic_name = settings.topics.inputs()[stream]
    proc = StreamProcessor.create(settings, stream, ctx.contracts)
    ctx.processors[stream] = proc
    anomalies_topic, dlq = ctx.topics["anomalies"], ctx.topics["dead_letter"]
    state = {"last_event_wall": 0.0, "pending": False, "late": 0}

    async def emit(anomalies: Sequence[Any]) -> None:
        for a in anomalies:
            m.anomalies.labels(detector=a.detector).inc()
            await anomalies_topic.send(key=a.region.encode(), value=a.to_json())

    async def process(events: Sequence[Any]) -> None:
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        records: list[Any] = []
        progress: dict[int, int] = {}
        for event in events:
            recs, bad = proc.decode(event.message.value, now_ms)
            if recs:
                records.extend(recs)
                part = event.message.partition
                top = max(r.ts for r in recs)
                if top > progress.get(part, -1):
                    progress[part] = top
            for r in bad:
                key, value = dead_letter(event, r, stream)
                await dlq.send(key=key, value=value)
                m.dead_letters.labels(topic=topic_name, reason=r.kind).inc()
        m.messages_in.labels(topic=topic_name).inc(len(events))
        m.events_in.labels(topic=topic_name).inc(len(records))
        await emit(proc.detect(records, progress))
        late = proc.late_events
        m.late_events.labels(stream=stream).inc(late - state["late"])
        state["late"] = late
        m.open_windows.labels(stream=stream).set(proc.open_windows)
        for det in proc.detectors:
            m.tracked_entities.labels(detector=det.name).set(len(getattr(det, "entities", getattr(det, "users", ()))))
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
            await emit(proc.flush())
            m.open_windows.labels(stream=stream).set(proc.open_windows)

    app.timer(interval=IDLE_FLUSH_S, name=f"soundcheck.flush.{stream}")(flush_idle)
