"""System performance: per (service, region) series of every metric, against baselines and SLOs.

Instance samples are averaged per event-time window; each metric of a (service, region) is a
feature of that entity's :class:`RobustBaseline`, with the service's SLO (from the dependency
map) or the generic ceilings as absolute limits. Unknown metric names are tracked too (up to
``MAX_METRICS`` names per worker), with a two-sided baseline.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..contracts import SystemPerformanceSample
from ..settings import Settings
from .base import Anomaly, EntityStore, anomaly_score
from .baseline import RobustBaseline, Signal
from .quality import make_baseline
from .windows import TumblingAggregator

MAX_METRICS = 64


def kind_of(metric: str) -> str:
    """The alert kind a system metric's anomaly belongs to."""
    if metric.startswith("latency") or metric == "error_rate":
        return "service_degradation"
    if metric in ("cpu_percent", "memory_percent"):
        return "resource_saturation"
    if metric == "requests_per_s":
        return "traffic_change"
    return "metric_anomaly"


class SystemMetricsDetector:
    """Windowed per (service, region) detection over every metric a service reports."""

    name = "system.baseline"

    def __init__(self, settings: Settings, source_topic: str = "system_performance_metrics") -> None:
        cfg = settings.detection
        self.settings = settings
        self.source_topic = source_topic
        self.z_threshold = float(cfg["z_threshold"])
        self.ceilings = dict(cfg["system"]["ceilings"])
        self.columns: dict[str, int] = {}
        self.untracked_metrics = 0
        w = settings.windows
        self.windows = TumblingAggregator(w.aggregate_s * 1000, w.allowed_lateness_s * 1000, MAX_METRICS)
        self.entities: EntityStore[RobustBaseline] = EntityStore(self._new_baseline, int(cfg["max_entities"]), w.entity_idle_s * 1000)
        self._pending_service = ""

    def _new_baseline(self) -> RobustBaseline:
        service = self._pending_service
        limits = {**self.ceilings, **self.settings.services.get(service, {}).get("slo", {})}
        return make_baseline(self.settings, _Directions(self.settings), limits)

    def _column(self, name: str) -> int | None:
        col = self.columns.get(name)
        if col is None:
            if len(self.columns) >= MAX_METRICS:
                self.untracked_metrics += 1
                return None
            col = self.columns[name] = len(self.columns)
        return col

    def process(self, records: Sequence[SystemPerformanceSample], event_time: int | None = None) -> list[Anomaly]:
        if records:
            n = len(records)
            values = np.full((n, MAX_METRICS), np.nan)
            for i, r in enumerate(records):
                for name, v in r.metrics.items():
                    col = self._column(name)
                    if col is not None:
                        values[i, col] = v
            ts = np.fromiter((r.ts for r in records), dtype=np.int64, count=n)
            self.windows.add_batch([(r.service, r.region) for r in records], ts, values)
        return self._evaluate(event_time)

    def flush(self) -> list[Anomaly]:
        """Close all open windows (the stream went quiet); later events for them count as late."""
        self.windows.max_ts += self.windows.size_ms + self.windows.lateness_ms
        return self._evaluate()

    def _evaluate(self, now_ms: int | None = None) -> list[Anomaly]:
        out: list[Anomaly] = []
        closed = self.windows.advance(now_ms)
        for agg in closed:
            service, region = agg.key
            means = agg.mean()
            x = {name: float(means[col]) for name, col in self.columns.items() if agg.present[col] > 0}
            self._pending_service = service
            signals = self.entities.get(agg.key, agg.end).update_one(x, agg.end)
            by_kind: dict[str, list[Signal]] = {}
            for s in signals:
                by_kind.setdefault(kind_of(s.metric), []).append(s)
            for kind, sigs in by_kind.items():
                out.append(
                    Anomaly(
                        kind=kind,
                        detector=self.name,
                        entity={"service": service, "region": region},
                        region=region,
                        node=service,
                        signals=sigs,
                        score=anomaly_score(sigs, self.z_threshold),
                        event_time=agg.end,
                        window_start=agg.start,
                        source_topic=self.source_topic,
                        samples=agg.count,
                        details={"metrics": {k: round(v, 4) for k, v in x.items()}},
                    )
                )
        if closed:
            self.entities.expire(closed[-1].end)
        return out


class _Directions(dict):
    """Each metric's bad direction from the settings, looked up the first time a name is seen."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings

    def get(self, name: str, default: str | None = None) -> str:  # type: ignore[override]
        if name not in self:
            self[name] = self._settings.metric_spec(name)["direction"]
        return dict.get(self, name, default)
