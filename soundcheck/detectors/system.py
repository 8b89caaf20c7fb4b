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
from .base import Finding, WindowedDetector, make_baseline
from .baseline import RobustBaseline, Signal
from .windows import WindowAggregate

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


class SystemMetricsDetector(WindowedDetector):
    """Windowed per (service, region) detection over every metric a service reports."""

    name = "system.baseline"
    n_features = MAX_METRICS

    def __init__(self, settings: Settings, source_topic: str = "system_performance_metrics") -> None:
        self.ceilings = dict(settings.detection["system"]["ceilings"])
        self.columns: dict[str, int] = {}
        self.untracked_metrics = 0
        super().__init__(settings, source_topic)

    def new_state(self) -> RobustBaseline:
        return make_baseline(self.settings, _Directions(self.settings), self.ceilings)

    def _column(self, name: str) -> int | None:
        col = self.columns.get(name)
        if col is None:
            if len(self.columns) >= MAX_METRICS:
                self.untracked_metrics += 1
                return None
            col = self.columns[name] = len(self.columns)
        return col

    def add(self, records: Sequence[SystemPerformanceSample]) -> None:
        n = len(records)
        values = np.full((n, MAX_METRICS), np.nan)
        for i, r in enumerate(records):
            for name, v in r.metrics.items():
                col = self._column(name)
                if col is not None:
                    values[i, col] = v
        ts = np.fromiter((r.ts for r in records), dtype=np.int64, count=n)
        self.windows.add_batch([(r.service, r.region) for r in records], ts, values)

    def findings(self, agg: WindowAggregate) -> list[Finding]:
        service, region = agg.key
        means = agg.mean()
        x = {name: float(means[col]) for name, col in self.columns.items() if agg.present[col] > 0}
        baseline = self.entities.get(agg.key, agg.end)
        if baseline.observations == 0:  # a new entity: the service's own SLOs take over the generic ceilings
            baseline.limits = {**self.ceilings, **self.settings.services.get(service, {}).get("slo", {})}
        by_kind: dict[str, list[Signal]] = {}
        for s in baseline.update_one(x, agg.end):
            by_kind.setdefault(kind_of(s.metric), []).append(s)
        details = {"metrics": {k: round(v, 4) for k, v in x.items()}}
        return [Finding(kind, {"service": service, "region": region}, region, service, sigs, 0, details) for kind, sigs in by_kind.items()]


class _Directions(dict):
    """Each metric's bad direction from the settings, looked up the first time a name is seen."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings

    def get(self, name: str, default: str | None = None) -> str:  # type: ignore[override]
        if name not in self:
            self[name] = self._settings.metric_spec(name)["direction"]
        return dict.get(self, name, default)
