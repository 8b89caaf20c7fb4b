"""What every stream detector shares: the anomaly record and bounded per-entity state."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Iterator, Mapping, Optional, Sequence, TypeVar

import orjson

from .baseline import RobustBaseline, Signal, observing
from .windows import TumblingAggregator, WindowAggregate

T = TypeVar("T")


@dataclass(slots=True)
class Anomaly:
    """One detector's finding on one entity over one event-time window (or one evaluation).

    ``node`` names the service-dependency-map node the finding points at; ``region`` is the
    correlation scope and the key of the internal anomalies topic.
    """

    kind: str
    detector: str
    entity: dict[str, str]
    region: str
    node: str
    signals: list[Signal]
    score: float
    event_time: int
    window_start: int
    source_topic: str
    sampled_users: int = 0
    samples: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    scope: str = ""  # correlation scope (the internal topic's key); empty means the region

    def to_json(self) -> bytes:
        d = {k: getattr(self, k) for k in self.__slots__ if k != "signals"}
        d["signals"] = [s.to_dict() for s in self.signals]
        return orjson.dumps(d)

    @classmethod
    def from_json(cls, raw: bytes | dict) -> "Anomaly":
        d = orjson.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else dict(raw)
        d["signals"] = [Signal(**s) for s in d.get("signals", [])]
        return cls(**d)


class EntityStore(Generic[T]):
    """Per-entity state, bounded: least recently seen entities go first past ``max_entries``,
    and entities idle for ``idle_ms`` of event time are dropped by :meth:`expire`.

    >>> s = EntityStore(lambda: [], max_entries=2, idle_ms=100)
    >>> _ = s.get("a", 0); _ = s.get("b", 50); _ = s.get("c", 60)
    >>> list(s.keys()), s.evicted
    (['b', 'c'], 1)
    >>> s.expire(155), list(s.keys())
    (1, ['c'])
    """

    def __init__(self, factory: Callable[[], T], max_entries: int, idle_ms: int) -> None:
        self._factory = factory
        self._items: OrderedDict[Hashable, tuple[int, T]] = OrderedDict()
        self.max_entries = max_entries
        self.idle_ms = idle_ms
        self.evicted = 0

    def get(self, key: Hashable, ts: int) -> T:
        item = self._items.get(key)
        if item is None:
            value = self._factory()
            if len(self._items) >= self.max_entries:
                self._items.popitem(last=False)
                self.evicted += 1
        else:
            value = item[1]
            self._items.move_to_end(key)
        self._items[key] = (ts, value)
        return value

    def expire(self, now_ms: int) -> int:
        """Drop entities not seen for ``idle_ms``; returns how many went."""
        limit = now_ms - self.idle_ms
        gone = 0
        while self._items:
            key, (ts, _) = next(iter(self._items.items()))
            if ts >= limit:
                break
            del self._items[key]
            gone += 1
        return gone

    def keys(self) -> Iterator[Hashable]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def anomaly_score(signals: list[Signal], z_threshold: float) -> float:
    """A finding's score in [0, 1]: 0.5 at the threshold, towards 1 far past it; 0.8 for a limit alone."""
    best = 0.0
    for s in signals:
        z = s.score / (2.0 * z_threshold)
        best = max(best, min(1.0, z), 0.8 if s.limit is not None else 0.0)
    return round(best, 3)


@dataclass(slots=True)
class Finding:
    """What a windowed detector found in one closed window, before it becomes an Anomaly."""

    kind: str
    entity: dict[str, str]
    region: str
    node: str
    signals: list[Signal]
    sampled_users: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def false_alarm_budget(settings: Any, n_features: int) -> float:
    """The chance per window and feature that may open a signal on normal data: the configured
    false alarms per entity and week (``detection.false_alarms_per_entity_week``) spread over the
    tests an entity runs in a week (its features times its windows)."""
    d = settings.detection
    per_week = float(d.get("false_alarms_per_entity_week", 0) or 0)
    if per_week <= 0:
        return 0.0
    windows = 7 * 86400 / max(1, int(settings.windows.aggregate_s))
    return per_week / (windows * max(1, n_features))


def make_baseline(settings: Any, directions: Mapping[str, str], limits: Mapping) -> RobustBaseline:
    """A baseline with the detection settings (shared by every stream detector)."""
    d = settings.detection
    n_features = len(directions) if len(directions) else 8  # a service's metrics are only known as they come
    return RobustBaseline(
        fading_factor=d["fading_factor"],
        warmup=d["warmup_windows"],
        z_threshold=d["z_threshold"],
        z_clear=d["z_clear"],
        clear_windows=d["clear_windows"],
        relative_floor=d["relative_floor"],
        min_relative_change=d["min_relative_change"],
        directions=directions,
        limits=limits,
        min_change=MetricSpecs(settings, "min_change", 0.0),
        budget=false_alarm_budget(settings, n_features),
        max_confirm=int(d.get("max_confirm_windows", 3)),
    )


class MetricSpecs(dict):
    """One field of each metric's spec (``metrics.<name>.<field>`` in config), looked up the
    first time a metric name is seen: ``MetricSpecs(settings, "direction")["latency_ms"]``.
    Works for metric names only known at run time (a service's own metrics)."""

    def __init__(self, settings: Any, spec_field: str, default: Any = None) -> None:
        super().__init__()
        self._settings = settings
        self._field = spec_field
        self._default = default

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        if name not in self:
            self[name] = self._settings.metric_spec(name).get(self._field, self._default)
        return dict.get(self, name, default)


class WindowedDetector:
    """Shared shape of the windowed detectors (stage 2): merge the partial aggregates of every
    input partition into event-time windows, and when windows close, turn each into findings
    against its entity's baseline.

    Subclasses set ``name``, ``stream`` and ``n_features`` and implement :meth:`new_state` (an
    entity's state, usually its baseline) and :meth:`findings` (closed window -> findings).
    :meth:`process` runs stage 1 and stage 2 in one object for a single partition (tests,
    notebooks); the worker feeds :meth:`add_partial` and :meth:`evaluate` instead.
    """

    name = "windowed"
    stream = ""
    n_features = 1
    #: a :class:`~soundcheck.detectors.history.SeriesHistory` told every window's scored values
    #: (set by the worker, agents/detect.py); not detector state: snapshots do not capture it
    history: Any = None

    def __init__(self, settings: Any, source_topic: str) -> None:
        cfg = settings.detection
        w = settings.windows
        self.settings = settings
        self.source_topic = source_topic
        self.z_threshold = float(cfg["z_threshold"])
        self.windows = TumblingAggregator(w.aggregate_s * 1000, 0, self.n_features)
        self.entities: EntityStore[Any] = EntityStore(self.new_state, int(cfg["max_entities"]), w.entity_idle_s * 1000)
        self._stage1: Any = None

    def new_state(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def findings(self, agg: WindowAggregate) -> list[Finding]:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_partial(self, p: Any) -> bool:
        """Merge one input partition's :class:`~soundcheck.ingest.partials.Partial`."""
        return self.windows.add_partial(p.key, p.start, p.count, p.sums, p.present, p.users)

    def process(self, records: Sequence[Any], event_time: Optional[int] = None) -> list[Anomaly]:
        """Stage 1 and 2 over one partition: add a batch; return the anomalies of the windows
        that closed (watermark: ``event_time``, default the latest record, less the lateness)."""
        from ..ingest.partials import PartitionAggregator

        if self._stage1 is None:
            self._stage1 = PartitionAggregator(self.settings, self.stream, 0)
        s1 = self._stage1
        s1.add(records)
        wm = None if event_time is None else event_time - s1.lateness_ms
        for p in s1.advance(wm):
            self.add_partial(p)
        return self.evaluate(s1.closed_until)

    def flush(self) -> list[Anomaly]:
        """Close all open windows (the stream went quiet); later partials for them count as late."""
        if self._stage1 is not None:
            for p in self._stage1.flush():
                self.add_partial(p)
        if not self.windows.open_count:
            return []
        return self.evaluate(max(a.end for a in self.windows._open.values()))

    def judged(self, agg: WindowAggregate) -> Optional[WindowAggregate]:
        """The window to judge when ``agg`` closes: ``agg`` itself here; a detector may pool the
        short windows of a small entity into one (:class:`~soundcheck.detectors.quality.AudioQualityDetector`)
        or judge none (None)."""
        return agg

    def _findings(self, agg: WindowAggregate) -> list[Finding]:
        """:meth:`findings`, with the window's scored values told to :attr:`history` when set."""
        if self.history is None:
            return self.findings(agg)
        with observing(self.history.recorder(self.name, agg.key, agg.start)):
            return self.findings(agg)

    def evaluate(self, watermark: int) -> list[Anomaly]:
        """The anomalies of the windows that end at or before ``watermark`` (which close)."""
        closed = self.windows.advance(watermark)
        out = [
            Anomaly(
                kind=f.kind,
                detector=self.name,
                entity=f.entity,
                region=f.region,
                node=f.node,
                signals=f.signals,
                score=anomaly_score(f.signals, self.z_threshold),
                event_time=agg.end,
                window_start=w.start,
                source_topic=self.source_topic,
                sampled_users=f.sampled_users,
                samples=w.count,
                details=f.details,
            )
            for agg in closed
            if (w := self.judged(agg)) is not None
            for f in self._findings(w)
        ]
        if closed:
            self.entities.expire(closed[-1].end)
        return out
