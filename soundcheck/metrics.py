"""The worker's Prometheus metrics: one typed container built against a registry passed in.

Labels are few and bounded (topic, reason, detector, severity, stream), never an entity id.

>>> from prometheus_client import CollectorRegistry
>>> m = WorkerMetrics(CollectorRegistry())
>>> m.events_in.labels(topic="audio_quality_metrics").inc(3)
>>> m.value("soundcheck_events_in_total", topic="audio_quality_metrics")
3.0
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Hashable, Mapping, Optional, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# how late a timer due every LOOP_PROBE_S ran: 1 ms (scheduling noise) to 2.5 s (a stuck loop)
LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LOOP_PROBE_S = 0.01
BYTES_BUCKETS = tuple(float(2**k) for k in range(10, 25, 2))  # 1 KiB .. 16 MiB

TP = TypeVar("TP", bound=Hashable)


def consumer_lags(highwaters: Mapping[TP, Optional[int]], positions: Mapping[TP, Optional[int]]) -> dict[TP, int]:
    """Records behind, by partition: the highwater (the offset the next produced record gets) minus
    the consumer's position (the next offset it reads), both as last known. A partition without a
    highwater (not fetched yet) or without a position is left out; a stale highwater behind the
    position counts as 0.

    >>> consumer_lags({"a": 10, "b": None, "c": 5, "d": 3}, {"a": 7, "b": 0, "c": 6})
    {'a': 3, 'c': 0}
    """
    return {tp: max(0, hw - positions[tp]) for tp, hw in highwaters.items() if hw is not None and positions.get(tp) is not None}


async def probe_loop_lag(observe: Callable[[float], None], interval: float = LOOP_PROBE_S,
                         clock: Callable[[], float] = time.perf_counter) -> None:
    """Forever: sleep ``interval`` on the running event loop and ``observe`` how much later than
    due it woke (seconds, >= 0). Whatever else is on the loop (an agent, a callback, a fetch
    response being parsed) waits as long as the loop was stalled, so these are the stalls every
    message handled on the loop meets.

    >>> seen = []
    >>> async def stalled():
    ...     probe = asyncio.ensure_future(probe_loop_lag(seen.append, 0.01))
    ...     await asyncio.sleep(0.03)
    ...     time.sleep(0.2)  # a callback holding the loop for 200 ms
    ...     await asyncio.sleep(0.03)
    ...     probe.cancel()
    >>> asyncio.run(stalled())
    >>> max(seen) >= 0.15, min(seen) >= 0.0
    (True, True)
    """
    while True:
        due = clock() + interval
        await asyncio.sleep(interval)
        observe(max(0.0, clock() - due))


def histogram_buckets(samples: Mapping[str, float], name: str) -> list[tuple[float, float]]:
    """The cumulative ``(upper bound, count)`` buckets of the unlabelled histogram ``name`` in
    ``samples`` (``{'name_bucket{le="0.1"}': count}``, as scraped), by bound.

    >>> histogram_buckets({'h_bucket{le="0.1"}': 2.0, 'h_bucket{le="+Inf"}': 5.0, 'h_count': 5.0}, "h")
    [(0.1, 2.0), (inf, 5.0)]
    """
    out = []
    for key, value in samples.items():
        if key.startswith(name + '_bucket{le="'):
            out.append((float(key.split('"')[1]), value))
    return sorted(out)


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile (0..1) of cumulative ``buckets``, interpolated within its bucket as
    Prometheus' ``histogram_quantile`` does (the lowest bucket from 0; a quantile in the ``+Inf``
    bucket is the highest finite bound); NaN without observations.

    >>> histogram_quantile([(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (float("inf"), 100.0)], 0.5)
    0.01
    >>> round(histogram_quantile([(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (float("inf"), 100.0)], 0.95), 3)
    0.55
    """
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.messages_in = Counter(
            "soundcheck_messages_in", "Kafka messages read, by input topic", ["topic"], registry=registry
        )
        self.events_in = Counter(
            "soundcheck_events_in", "Valid records read (a message may hold many), by input topic", ["topic"], registry=registry
        )
        self.dead_letters = Counter(
            "soundcheck_dead_letters", "Records sent to the dead-letter topic, by source topic and reason",
            ["topic", "reason"], registry=registry,
        )
        self.dead_letter_failures = Counter(
            "soundcheck_dead_letter_failures", "Dead letters that could not be written (logged), by source topic", ["topic"],
            registry=registry,
        )
        self.late_events = Counter(
            "soundcheck_late_events", "Records that arrived after their event-time window closed (left out of detection)",
            ["stream"], registry=registry,
        )
        self.late_partials = Counter(
            "soundcheck_late_partials", "Partial aggregates that reached stage 2 after their window was evaluated "
            "(left out of detection), by stream", ["stream"], registry=registry,
        )
        self.partition_rewinds = Counter(
            "soundcheck_partition_rewinds", "Faust partitions read again because their commit waited on records never "
            "handed to the agent (agents/watchdog.py), by topic", ["topic"], registry=registry,
        )
        self.anomalies = Counter("soundcheck_anomalies", "Anomalies found, by detector", ["detector"], registry=registry)
        self.anomalies_handled = Counter(
            "soundcheck_anomalies_handled", "Anomalies through the alerting agent (alerted or folded into one)", registry=registry
        )
        self.internal_sent = Counter(
            "soundcheck_internal_sent", "Messages this worker wrote to its internal topics, by kind (aggregates, fraud: "
            "stage 1 to stage 2; ticks: stage 2's event-time ticks to the alerting agent)", ["kind"], registry=registry,
        )
        self.internal_read = Counter(
            "soundcheck_internal_read", "Messages this worker's stage-2 and alerting agents read from the internal topics, "
            "by kind (sent minus read: what is in flight between the stages)", ["kind"], registry=registry,
        )
        self.open_windows = Gauge(
            "soundcheck_open_windows", "Event-time windows still open (waiting for later events or the idle flush), by stream",
            ["stream"], registry=registry,
        )
        self.alerts = Counter("soundcheck_alerts", "Alert notifications sent, by severity", ["severity"], registry=registry)
        self.decisions = Counter(
            "soundcheck_decisions", "Decisions of the alert engine written to the decision log, by decision", ["decision"],
            registry=registry,
        )
        self.control_messages = Counter(
            "soundcheck_control_messages", "Control messages applied (silences added or expired), by action", ["action"],
            registry=registry,
        )
        self.alert_outcomes = Counter(
            "soundcheck_alert_outcomes",
            "What happened to anomalies and notifications besides being sent: suppressed (dedup), info (context, not sent), "
            "silenced, inhibited, released, resolved",
            ["outcome"], registry=registry,
        )
        self.batch_seconds = Histogram(
            "soundcheck_batch_processing_seconds", "Time to decode and detect one batch, by stream", ["stream"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.processing_latency = Histogram(
            "soundcheck_processing_latency_seconds",
            "From a message's Kafka timestamp to the end of its processing, by stream", ["stream"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.loop_lag = Histogram(
            "soundcheck_event_loop_lag_seconds",
            f"How late the worker's event loop ran a timer due every {LOOP_PROBE_S:g} s: its stalls, which every "
            "message handled on the loop (stage 1, the agents, the producer) waits out",
            buckets=LOOP_LAG_BUCKETS, registry=registry,
        )
        self.tracked_entities = Gauge(
            "soundcheck_tracked_entities", "Entities with detector state in this worker, by detector", ["detector"], registry=registry
        )
        self.consumer_lag = Gauge(
            "soundcheck_consumer_lag",
            "Records behind on the input topics (highwater - position) of this worker's input consumer, by assigned partition",
            ["topic", "partition"], registry=registry,
        )

        self.snapshots_written = Counter(
            "soundcheck_snapshots_written", "Detector state snapshots written (one per changed partition and interval), by stream",
            ["stream"], registry=registry,
        )
        self.snapshots_restored = Counter(
            "soundcheck_snapshots_restored", "Detector state snapshots restored on partition assignment, by stream",
            ["stream"], registry=registry,
        )
        self.snapshots_rejected = Counter(
            "soundcheck_snapshots_rejected",
            "Snapshots not restored (another format or River version, corrupt): the partition starts fresh, by stream",
            ["stream"], registry=registry,
        )
        self.snapshot_failures = Counter(
            "soundcheck_snapshot_failures", "Snapshots that could not be written or read (logged), by stream", ["stream"],
            registry=registry,
        )
        self.snapshot_bytes = Histogram(
            "soundcheck_snapshot_bytes", "Size of each snapshot written (compressed), by stream", ["stream"],
            buckets=BYTES_BUCKETS, registry=registry,
        )
        self.snapshot_seconds = Histogram(
            "soundcheck_snapshot_seconds", "Time to encode one snapshot (the event loop is busy meanwhile), by stream",
            ["stream"], buckets=LATENCY_BUCKETS, registry=registry,
        )

    def set_consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Set the lag of each (topic, partition) given (an aiokafka ``TopicPartition`` is such a pair)."""
        for (topic, partition), lag in lags.items():
            self.consumer_lag.labels(topic=topic, partition=str(partition)).set(lag)

    def remove_consumer_lag(self, topic: str, partition: int) -> None:
        """Drop a partition's lag series (it was revoked: another worker reports it now)."""
        try:
            self.consumer_lag.remove(topic, str(partition))
        except KeyError:  # never reported
            pass

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (for tests and the demo summary)."""
        for suffix in ("_total", ""):
            v = self.registry.get_sample_value(name if name.endswith("_total") else name + suffix, labels)
            if v is not None:
                return v
        return 0.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
