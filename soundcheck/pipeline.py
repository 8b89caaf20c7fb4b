"""The worker's processing, free of Faust and Kafka: decode, stage 1, stage 2, alert.

* :class:`IngestStage` is stage 1 of one input stream over the input partitions a worker reads:
  decode (:mod:`soundcheck.ingest.contracts`), partial aggregates (:mod:`soundcheck.ingest.partials`),
  and the messages for the internal topics: partials keyed by entity for the aggregates topic,
  behaviour rows keyed by pseudonymised user for the fraud topic (held, then sent with the
  partition's watermark every half second of wall time and when a window closes: not one message
  per batch and fraud partition), each with the partition's progress (:class:`AggregatesMessage`).
* :class:`~soundcheck.detectors.stage2.Stage2` / :class:`~soundcheck.detectors.stage2.FraudStage`
  merge those per entity and detect.
* :class:`OfflinePipeline` runs the very same code over a simulator run without a broker, with
  any number of simulated input partitions and any producer keying (tests, evaluation).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import orjson

from soundcheck.alerting.engine import AlertEngine
from soundcheck.alerting.correlate import ServiceGraph, pseudonymize, public_entity
from soundcheck.ingest.contracts import Contract, Rejection, load_contracts
from soundcheck.detectors.base import Anomaly
from soundcheck.detectors.stage2 import STREAMS, FraudStage, Stage2, rows_progress
from soundcheck.ingest.partials import (
    Partial, PartitionAggregator, Pseudonyms, fraud_rows, internal_partition, offset_ordinals, stable_partition,
)
from soundcheck.settings import Settings

MAX_INTERNAL_BYTES = 512 * 1024  # an internal message (the internal topics keep the broker's 1 MB default limit)
PROGRESS_SKEW_MS = 5_000  # a partition's event-time progress never runs ahead of the wall clock by more
ROWS_EVERY_S = 0.5  # wall time between two sends of a partition's fraud rows within a window (see IngestStage)
KEYINGS = ("natural", "user", "session", "random")


def publish(anomaly: Anomaly, settings: Settings) -> None:
    """Make an anomaly fit to leave detection: user ids in its entity and device ids in its
    correlation links become keyed pseudonyms."""
    anomaly.entity = public_entity(anomaly.entity, settings)
    links = anomaly.details.get("links")
    if links:
        key = settings.pseudonym_key
        anomaly.details["links"] = [
            f"device:{pseudonymize(x[7:], key)}" if x.startswith("device:") else x for x in links
        ]


def entity_key(p: Partial) -> str:
    """The aggregates topic's key of a partial: its detector and entity."""
    key = p.key if isinstance(p.key, tuple) else (p.key,)
    return "|".join((p.detector, *map(str, key)))


@dataclass(slots=True)
class AggregatesMessage:
    """What stage 1 of one input partition sends to one partition of an internal topic."""

    topic: str  # "aggregates" or "fraud"
    partition: int  # of that internal topic
    value: bytes


def encode_partials(stream: str, source: int, closed_until: int, partials: Sequence[Partial], quiet: bool = False,
                    of: int = 0) -> bytes:
    """``quiet``: the stream went quiet (stage 1 flushed): the alerting clock may move on; ``of``:
    the input topic's partition count (stage 2 waits for every partition's progress)."""
    return orjson.dumps({"stream": stream, "source": source, "of": of, "closed_until": closed_until, "quiet": quiet,
                         "partials": [p.to_wire() for p in partials]}, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_rows(source: int, closed_until: int, rows: Sequence[Sequence[Any]], quiet: bool = False, of: int = 0,
                rows_until: Optional[int] = None) -> bytes:
    """``rows_until``: the partition sends no more rows before this event time (its watermark), but
    for records later than the lateness (see :func:`~soundcheck.detectors.stage2.rows_progress`)."""
    doc = {"stream": "fraud", "source": source, "of": of, "closed_until": closed_until, "quiet": quiet, "rows": rows}
    if rows_until is not None:
        doc["rows_until"] = rows_until
    return orjson.dumps(doc)


def _parts(items: Sequence[Any], encode: Any) -> list[tuple[Sequence[Any], bytes]]:
    """``items`` in consecutive slices, each with its encoding ``encode(slice)``, halved until each is
    at most MAX_INTERNAL_BYTES (one item goes as it is): a message always fits the internal topics."""
    value = encode(items)
    if len(value) <= MAX_INTERNAL_BYTES or len(items) <= 1:
        return [(items, value)]
    half = len(items) // 2
    return _parts(items[:half], encode) + _parts(items[half:], encode)


def _progress_last(items: Sequence[Any], encode: Any, encode_before: Any) -> list[tuple[Sequence[Any], bytes]]:
    """:func:`_parts` of ``items``, every part but the last encoded with ``encode_before`` (the
    previous progress): stage 2 closes no window before it has all the parts."""
    parts = _parts(items, encode)
    return [(chunk, encode_before(chunk) if k < len(parts) - 1 else value) for k, (chunk, value) in enumerate(parts)]


def decode_internal(value: bytes) -> dict[str, Any]:
    """An aggregates or fraud message (see schemas/aggregates.schema.json)."""
    doc = orjson.loads(value)
    if not isinstance(doc, dict) or doc.get("stream") not in (*STREAMS, "fraud") or not isinstance(doc.get("source"), int):
        raise ValueError("not an aggregates message: needs 'stream' (audio, behavior, system, fraud) and an integer 'source'")
    if doc["stream"] != "fraud":
        doc["partials"] = [Partial.from_wire(r) for r in doc.get("partials", [])]
    return doc


class IngestStage:
    """Stage 1 of one input stream over the input partitions this worker reads.

    ``aggregates_partitions`` / ``fraud_partitions``: the partition counts of the internal topics.
    Every call returns the :class:`AggregatesMessage` list to send; a partition whose window
    closed sends one message to *every* aggregates partition (its partials for that partition,
    possibly none, and its progress), so each stage-2 instance hears every input partition's progress.

    Behaviour rows also go out within a window, at most every ``rows_every_s`` of wall time (``None``:
    only when a window closes), with the partition's watermark as ``rows_until``: the fraud stage
    counts them as they complete, and at a window's end only its last rows and the scoring remain.
    """

    def __init__(self, settings: Settings, stream: str, contract: Optional[Contract] = None,
                 aggregates_partitions: int = 1, fraud_partitions: int = 1,
                 rows_every_s: Optional[float] = ROWS_EVERY_S) -> None:
        self.settings = settings
        self.stream = stream
        self.contract = contract or load_contracts()[stream]
        self.aggregates_partitions = aggregates_partitions
        self.fraud_partitions = fraud_partitions
        self.input_partitions = 0  # the input topic's partition count (0: unknown), told to stage 2
        self.parts: dict[int, PartitionAggregator] = {}
        self.sent_progress: dict[int, int] = {}
        #: behaviour rows for the fraud stage not sent yet: input partition -> fraud partition -> rows
        self.fraud_rows: dict[int, dict[int, list]] = {}
        self.rows_every_s = rows_every_s
        self.rows_sent: dict[int, tuple[int, float]] = {}  # partition -> the rows_until last sent, and when (wall)
        self.pseudonyms = Pseudonyms(settings.pseudonym_key, bool(settings.privacy.get("pseudonymize_user_ids", True)))
        self.devices = Pseudonyms(settings.pseudonym_key, True)
        self.max_future_ms = int(settings.worker.max_future_skew_s * 1000)

    def decode(self, value: Optional[bytes], now_ms: Optional[int] = None) -> tuple[list[Any], list[Rejection]]:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return self.contract.decode(value, now_ms=now_ms, max_future_ms=self.max_future_ms)

    def get(self, partition: int, closed_until: int = -(2**62)) -> PartitionAggregator:
        pa = self.parts.get(partition)
        if pa is None:
            pa = self.parts[partition] = PartitionAggregator(self.settings, self.stream, partition, closed_until)
        return pa

    def drop(self, partition: int) -> None:
        self.parts.pop(partition, None)
        self.sent_progress.pop(partition, None)
        self.fraud_rows.pop(partition, None)  # their records are not committed (open windows): the next owner reads them
        self.rows_sent.pop(partition, None)

    def process(self, partition: int, records: Sequence[Any], offsets: Optional[np.ndarray] = None,
                now: Optional[float] = None, ordinals: Optional[Sequence[int]] = None) -> list[AggregatesMessage]:
        """Add one partition's decoded records; return what is to be sent (``ordinals``: each record's
        position among the records of its offset, when the records are not a whole batch)."""
        pa = self.get(partition)
        out: list[AggregatesMessage] = []
        rows = None
        if records and self.stream == "behavior":
            rows = fraud_rows(records, pa.closed_until, pa.size_ms, self.pseudonyms, self.fraud_partitions, self.devices,
                              offsets.tolist() if offsets is not None else None, ordinals)
        pa.add(records, offsets)
        if rows:  # held until a window closes or rows_every_s passes (_close, _rows): not a message per batch
            held = self.fraud_rows.setdefault(partition, {})
            for part, r in rows.items():
                held.setdefault(part, []).extend(r)
        now = time.time() if now is None else now
        wm = pa.watermark()
        if now != float("inf"):  # one record from the near future cannot close everything
            wm = min(wm, int(now * 1000) + PROGRESS_SKEW_MS - pa.lateness_ms)
        partials = pa.advance(wm)
        if self.stream != "behavior":
            out.extend(self._close(partition, partials))
            return out
        mark = max(pa.closed_until, wm)
        sent = self._close(partition, partials, rows_until=mark)
        last, at = self.rows_sent.get(partition, (-(2**62), float("-inf")))
        if sent:
            self.rows_sent[partition] = (mark, now)
        elif self.rows_every_s is not None and now != float("inf") and mark > last and now - at >= self.rows_every_s:
            sent = self._rows(partition, pa.closed_until, pa.closed_until, False, mark)
            self.rows_sent[partition] = (mark, now)
        out.extend(sent)
        return out

    def process_safely(self, partition: int, records: Sequence[Any], offsets: Optional[np.ndarray] = None,
                       now: Optional[float] = None) -> tuple[list[AggregatesMessage], list[tuple[int, str]]]:
        """:meth:`process`, and if our code fails on the batch, the batch again record by record from
        the state before it: returns the messages and the (index, reason) of the records that failed
        alone, so that one bad record costs its own dead letter and its neighbours go on."""
        pa = self.get(partition)
        saved, sent, held, rows_sent = pa.snapshot(), self.sent_progress.get(partition), self._held(partition), self.rows_sent.get(partition)
        try:
            return self.process(partition, records, offsets, now), []
        except Exception as exc:
            first = f"{type(exc).__name__}: {str(exc)[:200]}"
        self.parts[partition] = saved
        self._unhold(partition, held)
        if sent is None:
            self.sent_progress.pop(partition, None)
        else:
            self.sent_progress[partition] = sent
        if rows_sent is None:
            self.rows_sent.pop(partition, None)
        else:
            self.rows_sent[partition] = rows_sent
        out: list[AggregatesMessage] = []
        failed: list[tuple[int, str]] = []
        ordinals = offset_ordinals(offsets.tolist() if offsets is not None else [0] * len(records))
        for j, rec in enumerate(records):
            before, held = self.parts[partition].snapshot(), self._held(partition)
            try:
                out += self.process(partition, [rec], None if offsets is None else offsets[j:j + 1], now, ordinals[j:j + 1])
            except Exception as exc:
                self.parts[partition] = before
                self._unhold(partition, held)
                failed.append((j, f"{type(exc).__name__}: {str(exc)[:200]} (the batch failed with {first})"))
        return out, failed

    def _held(self, partition: int) -> dict[int, int]:
        """How many fraud rows ``partition`` holds per fraud partition (to undo a failed batch)."""
        return {k: len(v) for k, v in self.fraud_rows.get(partition, {}).items()}

    def _unhold(self, partition: int, held: Mapping[int, int]) -> None:
        """Back to ``held`` (:meth:`_held`): rows are only appended, and only sent (popped) once
        encoded, so a failed batch added at most rows past those counts."""
        rows = self.fraud_rows.get(partition)
        if rows is not None:
            self.fraud_rows[partition] = {k: v[:held[k]] for k, v in rows.items() if held.get(k)}

    def idle(self, partitions: Iterable[int], target: Optional[int] = None) -> list[AggregatesMessage]:
        """These partitions are caught up (nothing more to read): they move on with the slowest of
        the busy ones of this stream on this worker (or to ``target``, the slowest busy partition
        of every stream the worker reads: a sparse stream then keeps up with the dense ones), so
        they do not hold stage 2 back. A record that arrives later for a window they closed is late."""
        idle = [p for p in partitions if p in self.parts]
        busy = [pa.closed_until for p, pa in self.parts.items() if p not in idle and pa.closed_until > -(2**61)]
        if target is None:
            if not busy:
                return []
            target = min(busy)
        if not idle:
            return []
        out: list[AggregatesMessage] = []
        for p in idle:
            if self.parts[p].closed_until < target:
                out.extend(self._close(p, self.parts[p].advance(target)))
        return out

    def flush(self) -> list[AggregatesMessage]:
        """The stream went quiet: close every open window of every partition."""
        out: list[AggregatesMessage] = []
        top = max((pa.max_ts for pa in self.parts.values()), default=-(2**62))
        for p, pa in sorted(self.parts.items()):
            closes = pa.flush()
            if top > -(2**61):
                closes += pa.advance(top - top % pa.size_ms + pa.size_ms)
            out.extend(self._close(p, closes, quiet=True))
        return out

    def _close(self, partition: int, partials: list[Partial], quiet: bool = False,
               rows_until: Optional[int] = None) -> list[AggregatesMessage]:
        pa = self.parts[partition]
        before = self.sent_progress.get(partition, -(2**62))
        if pa.closed_until <= before and not partials and not quiet:
            return []
        self.sent_progress[partition] = pa.closed_until
        by_part: dict[int, list[Partial]] = {i: [] for i in range(self.aggregates_partitions)}
        for p in partials:
            by_part[internal_partition(entity_key(p), self.aggregates_partitions)].append(p)
        of = self.input_partitions
        out = []
        for i, ps in by_part.items():
            for _, value in _progress_last(ps, lambda x: encode_partials(self.stream, partition, pa.closed_until, x, quiet, of),
                                           lambda x: encode_partials(self.stream, partition, before, x, False, of)):
                out.append(AggregatesMessage("aggregates", i, value))
        if self.stream == "behavior":  # the fraud stage needs the rows held so far and the progress
            out += self._rows(partition, pa.closed_until, before, quiet, rows_until)
        return out

    def _rows(self, partition: int, closed_until: int, before: int, quiet: bool,
              rows_until: Optional[int]) -> list[AggregatesMessage]:
        """The fraud rows ``partition`` holds, to every fraud partition (possibly none: the progress),
        every part but the last with the progress before (``before``, no ``rows_until``)."""
        held, of, out = self.fraud_rows.get(partition, {}), self.input_partitions, []
        for i in range(self.fraud_partitions):
            for _, value in _progress_last(held.get(i, []), lambda x: encode_rows(partition, closed_until, x, quiet, of, rows_until),
                                           lambda x: encode_rows(partition, before, x, False, of)):
                out.append(AggregatesMessage("fraud", i, value))
        self.fraud_rows.pop(partition, None)  # once encoded: a failure before leaves them held
        return out

    def busy_progress(self, partitions: Iterable[int]) -> Optional[int]:
        """The slowest progress among ``partitions`` (those that just had records)."""
        marks = [self.parts[p].closed_until for p in partitions if p in self.parts and self.parts[p].closed_until > -(2**61)]
        return min(marks) if marks else None

    def committable(self, partition: int, next_offset: int) -> int:
        pa = self.parts.get(partition)
        return next_offset if pa is None else pa.committable(next_offset)

    @property
    def late_events(self) -> int:
        return sum(pa.late_events for pa in self.parts.values())

    @property
    def open_windows(self) -> int:
        return sum(pa.open_count for pa in self.parts.values())


@dataclass
class DetectStage:
    """Stage 2 of every stream, for one partition of the aggregates and fraud topics."""

    settings: Settings
    stages: dict[str, Stage2] = field(default_factory=dict)
    fraud: Optional[FraudStage] = None
    idle_s: Optional[float] = None  # None: stage2.idle_after_s

    def __post_init__(self) -> None:
        for s in STREAMS:
            self.stages.setdefault(s, Stage2(self.settings, s, self.idle_s))
        if self.fraud is None:
            self.fraud = FraudStage(self.settings, self.idle_s)

    def on_message(self, doc: dict[str, Any], now: Optional[float] = None) -> list[Anomaly]:
        if doc["stream"] == "fraud":
            return self.fraud.add(doc["source"], doc.get("rows", []), rows_progress(doc), now, doc.get("of"), bool(doc.get("quiet")))
        out = self.stages[doc["stream"]].add(doc["source"], doc["partials"], doc.get("closed_until"), now, doc.get("of"), bool(doc.get("quiet")))
        for a in out:  # nothing leaves detection with a raw user or device id
            publish(a, self.settings)
        return out

    def flush(self) -> list[Anomaly]:
        out: list[Anomaly] = []
        for st in self.stages.values():
            found = st.flush()
            for a in found:
                publish(a, self.settings)
            out += found
        return out + self.fraud.flush()

    def event_time(self, stream: str, now: Optional[float] = None) -> Optional[int]:
        return self.stages[stream].event_time(now) if stream in self.stages else self.fraud.progress.watermark(now)


def route_key(stream: str, record: dict[str, Any], batch_key: str, keying: str) -> Optional[str]:
    """The Kafka key a producer keying by ``keying`` gives a record (None: no key, random partition)."""
    if keying == "natural":
        return batch_key
    if keying == "user":
        if not isinstance(record, dict):
            return batch_key
        return record.get("user_id") or record.get("service") or batch_key
    if keying == "session":
        if not isinstance(record, dict):
            return batch_key
        return record.get("session_id") or record.get("instance") or batch_key
    return None


@dataclass
class OfflinePipeline:
    """The whole worker in one process: stage 1 per simulated input partition, stage 2 per
    simulated aggregates partition, dicts for the Faust tables, ticks from the progress.

    ``partitions``: input partitions per topic; ``keying``: how producers key (``natural``: the
    simulator's region / user / service, ``user``: by user id, ``random``: no key);
    ``per_message``: records per Kafka message (1: single-record messages); ``rows_every_s``: see
    :class:`IngestStage` (0: with a clock, ``now_ms``, a partition's fraud rows go out at every poll,
    as the worker's do on live traffic, about twice a second). ``alerts`` collects every notification in the order the worker would send them.
    """

    settings: Settings
    partitions: int = 1
    keying: str = "natural"
    per_message: int = 50
    aggregates_partitions: int = 1
    seed: int = 0
    rows_every_s: Optional[float] = 0.0
    dedup: dict[str, dict] = field(default_factory=dict)
    scopes: dict[str, dict] = field(default_factory=dict)
    control: dict[str, dict] = field(default_factory=dict)
    anomalies: list[Anomaly] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)
    before_quiet: Optional[int] = None  # len(alerts) when finish() let quiet event time pass after the input
    rejections: list[tuple[str, Rejection]] = field(default_factory=list)
    events_in: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STREAMS})

    def __post_init__(self) -> None:
        if self.keying not in KEYINGS:
            raise ValueError(f"keying {self.keying!r}: expected one of {KEYINGS}")
        contracts = load_contracts()
        self.graph = ServiceGraph(self.settings.services)
        self.engine = AlertEngine(self.settings, self.graph, self.dedup, self.scopes, self.control)
        self.ingest = {s: IngestStage(self.settings, s, contracts[s], self.aggregates_partitions, self.aggregates_partitions,
                                      self.rows_every_s) for s in STREAMS}
        for ing in self.ingest.values():
            ing.input_partitions = self.partitions
        self.detect = [DetectStage(self.settings, idle_s=float("inf")) for _ in range(self.aggregates_partitions)]
        self.queues: dict[tuple[str, int], list[bytes]] = {}
        self.offsets: dict[tuple[str, int], int] = {}
        self.rng = random.Random(self.seed)
        self._tick = 0
        self.now_ms: Optional[int] = None

    # -- producing --------------------------------------------------------------------------

    def produce(self, stream: str, batch_key: str, records: Sequence[Any]) -> None:
        """Route records to input partitions as producers keying by ``keying`` would, and encode
        them into messages of ``per_message`` records (raw bytes: a malformed message, alone)."""
        groups: dict[int, list] = {}
        for r in records:
            if isinstance(r, (bytes, bytearray)):
                self._enqueue(stream, self._partition(batch_key), [bytes(r)])
                continue
            groups.setdefault(self._partition(route_key(stream, r, batch_key, self.keying)), []).append(r)
        for part, recs in groups.items():
            n = self.per_message
            values = [orjson.dumps(r) for r in recs] if n <= 1 else [orjson.dumps(recs[i:i + n]) for i in range(0, len(recs), n)]
            self._enqueue(stream, part, values)

    def _partition(self, key: Optional[str]) -> int:
        if self.partitions == 1:
            return 0
        if key is None:
            return self.rng.randrange(self.partitions)
        return stable_partition(key, self.partitions)

    def _enqueue(self, stream: str, part: int, values: list[bytes]) -> None:
        self.queues.setdefault((stream, part), []).extend(values)

    def feed(self, stream: str, values: Iterable[bytes], now_ms: Optional[int] = None, partition: int = 0) -> list[dict]:
        """Messages already encoded, to one partition; processed at once."""
        self._enqueue(stream, partition, list(values))
        return self.poll(now_ms)

    # -- consuming --------------------------------------------------------------------------

    def poll(self, now_ms: Optional[int] = None) -> list[dict]:
        """Every input partition reads what is queued for it (one batch each); caught-up
        partitions are idle; stage 2 and alerting run on what stage 1 sent."""
        now_ms = self.now_ms if now_ms is None else now_ms
        now = None if now_ms is None else now_ms / 1000
        out: list[dict] = []
        for stream in STREAMS:
            ing = self.ingest[stream]
            msgs: list[AggregatesMessage] = []
            busy = set()
            for (s, part), values in sorted(self.queues.items()):
                if s != stream or not values:
                    continue
                busy.add(part)
                records: list[Any] = []
                offs: list[int] = []
                base = self.offsets.get((s, part), 0)
                for i, v in enumerate(values):
                    recs, bad = ing.decode(v, now_ms)
                    records.extend(recs)
                    offs.extend([base + i] * len(recs))
                    self.rejections.extend((stream, r) for r in bad)
                self.offsets[(s, part)] = base + len(values)
                values.clear()
                self.events_in[stream] += len(records)
                msgs += ing.process(part, records, np.array(offs, dtype=np.int64), now=now if now is not None else float("inf"))
            msgs += ing.idle([p for p in ing.parts if p not in busy])
            out += self.deliver(msgs, now)
        out += self.tick()
        return out

    def deliver(self, msgs: Sequence[AggregatesMessage], now: Optional[float] = None) -> list[dict]:
        out: list[dict] = []
        for m in msgs:
            for a in self.detect[m.partition].on_message(decode_internal(m.value), now=0.0):
                out += self.alert(a)
        return out

    def alert(self, anomaly: Anomaly) -> list[dict]:
        self.anomalies.append(anomaly)
        out = self.engine.on_anomaly(anomaly, anomaly.event_time)
        self.alerts.extend(out)
        return out

    def event_time(self) -> Optional[int]:
        marks = [d.event_time(s, 0.0) for d in self.detect for s in STREAMS]
        marks = [m for m in marks if m is not None]
        return min(marks) if marks else None

    def tick(self, event_time: Optional[int] = None) -> list[dict]:
        """Event time reached ``event_time`` everywhere: let every scope resolve and send what is due."""
        event_time = self.event_time() if event_time is None else event_time
        if event_time is None:
            return []
        step = self.settings.windows.aggregate_s * 1000
        t = event_time - event_time % step
        if t <= self._tick:
            return []
        self._tick = t
        out: list[dict] = []
        for scope in list(self.scopes):
            out += self.engine.on_tick(scope, t, t)
        self.alerts.extend(out)
        return out

    def finish(self, quiet_s: Optional[int] = None) -> list[dict]:
        """The end of a replay: close the open windows, then let ``quiet_s`` of quiet event time
        pass (default: long enough for every group to be sent and every alert to resolve)."""
        w = self.settings.windows
        out = self.poll()
        for stream in STREAMS:
            out += self.deliver(self.ingest[stream].flush())
        for d in self.detect:
            for a in d.flush():
                out += self.alert(a)
        quiet = (quiet_s if quiet_s is not None else w.resolve_after_s + w.group_wait_s + 2 * w.aggregate_s) * 1000
        self.before_quiet = len(self.alerts)  # notifications the input itself gave, before the quiet event time after it
        start = max((pa.max_ts for ing in self.ingest.values() for pa in ing.parts.values()), default=0)
        for t in range(start, start + quiet + 1, w.aggregate_s * 1000):
            out += self.tick(t)
        return out


def run_simulation(settings: Settings, sim: Any, *, partitions: int = 1, keying: str = "natural", per_message: int = 50,
                   aggregates_partitions: int = 1, seed: int = 0, now_ms: Optional[int] = None) -> OfflinePipeline:
    """Every second of ``sim`` produced, then read by every partition; then the end of the replay."""
    pipe = OfflinePipeline(settings, partitions=partitions, keying=keying, per_message=per_message,
                           aggregates_partitions=aggregates_partitions, seed=seed)
    pipe.now_ms = now_ms if now_ms is not None else sim.start_ms + sim.duration_s * 1000 + 60_000
    for sec in range(sim.duration_s):
        for b in sim.tick(sim.start_ms + sec * 1000):
            pipe.produce(b.stream, b.key, b.records)
        pipe.poll()
    pipe.finish()
    return pipe
