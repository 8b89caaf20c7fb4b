"""The worker's processing, free of Faust and Kafka: decode, detect, alert.

The Faust agents are thin wiring around :class:`PartitionedProcessor` (one per input stream:
a :class:`StreamProcessor` per input partition, so detector state can be snapshotted and moved
with its partition) and :func:`soundcheck.alerting.alert_step`; :class:`OfflinePipeline` runs
the very same code over a simulator run without a broker (tests, evaluation, benchmarks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .alert_engine import AlertEngine
from .alerting import ServiceGraph, pseudonymize, public_entity
from .contracts import Contract, Rejection, load_contracts
from .detectors.base import Anomaly
from .detectors.behavior import BehaviorRateDetector, FraudDetector
from .detectors.quality import AudioQualityDetector
from .detectors.system import SystemMetricsDetector
from .settings import Settings

STREAMS = ("audio", "behavior", "system")


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
IDLE_PARTITION_S = 10.0  # a partition without records for this long stops holding the watermark back
PROGRESS_SKEW_MS = 5_000  # a partition's event-time progress never runs ahead of the wall clock by more


def make_detectors(settings: Settings, stream: str) -> list[Any]:
    topic = settings.topics.inputs()[stream]
    if stream == "audio":
        return [AudioQualityDetector(settings, topic)]
    if stream == "behavior":
        return [BehaviorRateDetector(settings, topic), FraudDetector(settings, topic)]
    if stream == "system":
        return [SystemMetricsDetector(settings, topic)]
    raise ValueError(f"unknown stream {stream!r}; expected one of {STREAMS}")


@dataclass
class StreamProcessor:
    """Decode and detect for one input stream (named ``stream``); keeps its detectors' state."""

    stream: str
    settings: Settings
    contract: Contract
    detectors: list[Any] = field(default_factory=list)
    _progress: dict[int, tuple[int, float]] = field(default_factory=dict, repr=False)  # partition -> (max ts, wall)

    @classmethod
    def create(cls, settings: Settings, stream: str, contracts: Optional[dict[str, Contract]] = None) -> "StreamProcessor":
        contracts = contracts or load_contracts()
        return cls(stream, settings, contracts[stream], make_detectors(settings, stream))

    def decode(self, value: Optional[bytes], now_ms: Optional[int] = None) -> tuple[list[Any], list[Rejection]]:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return self.contract.decode(value, now_ms=now_ms, max_future_ms=int(self.settings.worker.max_future_skew_s * 1000))

    def detect(self, records: list[Any], progress: Optional[dict[int, int]] = None, now: Optional[float] = None) -> list[Anomaly]:
        """Run the detectors over a batch.

        ``progress`` maps each partition in the batch to the highest event time it carried. The
        watermark is the slowest active partition's progress (partitions quiet for
        ``IDLE_PARTITION_S`` of wall time do not hold it back), so a partition read ahead of the
        others never closes their windows early.
        """
        if progress:
            now = time.time() if now is None else now
            # a record from the (allowed) near future must not close everybody's windows early
            horizon = int(now * 1000) + PROGRESS_SKEW_MS
            for part, ts in progress.items():
                ts = min(ts, horizon)
                seen = self._progress.get(part, (-(2**62), 0.0))[0]
                self._progress[part] = (max(seen, ts), now)
        out: list[Anomaly] = []
        watermark = self.watermark(now)
        for det in self.detectors:
            out.extend(det.process(records, watermark))
        for a in out:  # nothing leaves detection with a raw user or device id
            publish(a, self.settings)
        return out

    def watermark(self, now: Optional[float] = None) -> Optional[int]:
        if not self._progress:
            return None
        now = time.time() if now is None else now
        active = [ts for ts, wall in self._progress.values() if now - wall < IDLE_PARTITION_S]
        return min(active) if active else max(ts for ts, _ in self._progress.values())

    def flush(self) -> list[Anomaly]:
        """Close every open window now (the stream went quiet) and return what they found."""
        out: list[Anomaly] = []
        for det in self.detectors:
            flush = getattr(det, "flush", None)
            if flush is not None:
                out.extend(flush())
        for a in out:
            publish(a, self.settings)
        return out

    @property
    def open_windows(self) -> int:
        return sum(d.windows.open_count for d in self.detectors if hasattr(d, "windows"))

    @property
    def late_events(self) -> int:
        return sum(getattr(getattr(d, "windows", None), "late_events", 0) for d in self.detectors)


@dataclass
class PartitionedProcessor:
    """Detector state per (stream, input partition): one :class:`StreamProcessor` per partition,
    created when the partition's first records arrive (or restored from a snapshot).

    Each partition's watermark is its own event-time progress (still capped at the wall clock
    plus ``PROGRESS_SKEW_MS``). Alongside, per partition: the last input offset whose records
    are in the state (records at or below it are skipped after a restore), and whether the
    state changed since its last snapshot.

    >>> from soundcheck.settings import load_settings
    >>> pp = PartitionedProcessor.create(load_settings(environ={}), "audio")
    >>> pp.detect(2, [], None, offset=10, now=0.0), pp.seen(2, 10), pp.seen(2, 11), sorted(pp.dirty)
    ([], True, False, [2])
    """

    stream: str
    settings: Settings
    contracts: dict[str, Contract]
    partitions: dict[int, StreamProcessor] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> last input offset in the state
    dirty: set[int] = field(default_factory=set)  # partitions changed since their last snapshot
    late_events: int = 0  # late records counted by this process (monotonic, whatever is restored or dropped)
    detector_names: tuple[str, ...] = ()

    @classmethod
    def create(cls, settings: Settings, stream: str, contracts: Optional[dict[str, Contract]] = None) -> "PartitionedProcessor":
        names = tuple(d.name for d in make_detectors(settings, stream))
        return cls(stream, settings, contracts or load_contracts(), detector_names=names)

    @property
    def contract(self) -> Contract:
        return self.contracts[self.stream]

    def decode(self, value: Optional[bytes], now_ms: Optional[int] = None) -> tuple[list[Any], list[Rejection]]:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return self.contract.decode(value, now_ms=now_ms, max_future_ms=int(self.settings.worker.max_future_skew_s * 1000))

    def new_processor(self) -> StreamProcessor:
        """A fresh processor for one partition. The per-entity bounds of the settings
        (``max_entities``, ``fraud.max_users``) are per worker: each partition gets its share
        (entities are spread over the partitions by key), so a worker holding every partition
        keeps the same bound as before."""
        proc = StreamProcessor.create(self.settings, self.stream, self.contracts)
        share = max(1, int(self.settings.kafka.partitions))
        for det in proc.detectors:
            for attr in ("entities", "users"):
                store = getattr(det, attr, None)
                if store is not None:
                    store.max_entries = max(1, -(-store.max_entries // share))
        return proc

    def get(self, partition: int) -> StreamProcessor:
        proc = self.partitions.get(partition)
        if proc is None:
            proc = self.partitions[partition] = self.new_processor()
        return proc

    def seen(self, partition: int, offset: int) -> bool:
        """Whether the record at ``offset`` is already in the partition's state (a restore re-reads some)."""
        return offset <= self.offsets.get(partition, -1)

    def detect(self, partition: int, records: list[Any], top_ts: Optional[int], offset: Optional[int] = None,
               now: Optional[float] = None) -> list[Anomaly]:
        """Run one partition's detectors over its part of a batch (``top_ts``: its highest event time)."""
        proc = self.get(partition)
        late = proc.late_events
        out = proc.detect(records, {partition: top_ts} if records and top_ts is not None else None, now)
        self.late_events += proc.late_events - late
        if offset is not None and offset > self.offsets.get(partition, -1):
            self.offsets[partition] = offset
        self.dirty.add(partition)
        return out

    def flush(self) -> list[Anomaly]:
        out: list[Anomaly] = []
        for part, proc in self.partitions.items():
            if proc.open_windows:
                self.dirty.add(part)
            out.extend(proc.flush())
        return out

    def load(self, partition: int, proc: StreamProcessor, last_offset: int) -> None:
        """Install a restored processor for ``partition``."""
        self.partitions[partition] = proc
        self.offsets[partition] = last_offset
        self.dirty.discard(partition)

    def drop(self, partition: int) -> None:
        """Forget a revoked partition's state."""
        self.partitions.pop(partition, None)
        self.offsets.pop(partition, None)
        self.dirty.discard(partition)

    def event_time(self, now: Optional[float] = None, idle_s: float = 60.0) -> Optional[int]:
        """The stream's event-time progress for the alerting clock: the slowest partition that
        had records within ``idle_s`` of wall time (a longer horizon than the windows' idle
        timeout: a partition starved while a backlog is read must not let the clock run ahead)."""
        now = time.time() if now is None else now
        marks = [ts for proc in self.partitions.values() for ts, wall in proc._progress.values() if now - wall < idle_s]
        return min(marks) if marks else None

    def last_event_time(self, partition: int) -> Optional[int]:
        proc = self.partitions.get(partition)
        return proc.watermark() if proc is not None else None

    def tracked(self) -> dict[str, int]:
        """Entities with detector state, summed over partitions, by detector name."""
        out = dict.fromkeys(self.detector_names, 0)
        for proc in self.partitions.values():
            for det in proc.detectors:
                n = len(getattr(det, "entities", getattr(det, "users", ())))
                out[det.name] = out.get(det.name, 0) + n
        return out

    @property
    def open_windows(self) -> int:
        return sum(p.open_windows for p in self.partitions.values())


@dataclass
class OfflinePipeline:
    """The whole worker in one process: dicts for the Faust tables, ticks from the fed records.

    ``alerts`` collects every notification in the order the worker would send them.
    """

    settings: Settings
    processors: dict[str, StreamProcessor] = field(default_factory=dict)
    dedup: dict[str, dict] = field(default_factory=dict)
    scopes: dict[str, dict] = field(default_factory=dict)
    control: dict[str, dict] = field(default_factory=dict)
    anomalies: list[Anomaly] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)
    rejections: list[tuple[str, Rejection]] = field(default_factory=list)
    events_in: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STREAMS})

    def __post_init__(self) -> None:
        contracts = load_contracts()
        self.graph = ServiceGraph(self.settings.services)
        self.engine = AlertEngine(self.settings, self.graph, self.dedup, self.scopes, self.control)
        self._progress: dict[str, int] = {}
        self._tick = 0
        for s in STREAMS:
            self.processors.setdefault(s, StreamProcessor.create(self.settings, s, contracts))

    def feed(self, stream: str, values: Iterable[bytes], now_ms: Optional[int] = None) -> list[dict]:
        proc = self.processors[stream]
        records: list[Any] = []
        for v in values:
            recs, bad = proc.decode(v, now_ms)
            records.extend(recs)
            self.rejections.extend((stream, r) for r in bad)
        self.events_in[stream] += len(records)
        new: list[dict] = []
        for a in proc.detect(records):
            new += self.alert(a)
        if records:
            self._progress[stream] = max(self._progress.get(stream, 0), max(r.ts for r in records))
            new += self.tick(min(self._progress.values()))
        return new

    def alert(self, anomaly: Anomaly) -> list[dict]:
        self.anomalies.append(anomaly)
        out = self.engine.on_anomaly(anomaly, anomaly.event_time)
        self.alerts.extend(out)
        return out

    def tick(self, event_time: int) -> list[dict]:
        """Event time reached ``event_time`` everywhere: let every scope resolve and send what is due."""
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
        out: list[dict] = []
        for proc in self.processors.values():
            for a in proc.flush():
                out += self.alert(a)
        quiet = (quiet_s if quiet_s is not None else w.resolve_after_s + w.group_wait_s + 2 * w.aggregate_s) * 1000
        start = max(self._progress.values(), default=0)
        for t in range(start, start + quiet + 1, w.aggregate_s * 1000):
            out += self.tick(t)
        return out
