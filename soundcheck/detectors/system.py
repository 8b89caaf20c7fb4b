"""System performance: per (service, region) series of every metric, against baselines and SLOs.

Instance samples are averaged per event-time window; each metric of a (service, region) is a
feature of that entity's :class:`RobustBaseline`, with the service's SLO (from the dependency
map) or the generic ceilings as absolute limits. Unknown metric names are tracked too (up to
``MAX_METRICS`` names per worker), with a two-sided baseline. Each metric series also has its
own :class:`~soundcheck.detectors.series.SeriesDetector` (the detector ``soundcheck eval nab``
measures), which adds daily seasonality and novelty to the baseline's view. Every metric with an upper limit is
also followed by a :class:`~soundcheck.detectors.forecast.SloForecaster`, which warns
(``slo_forecast``) when its trend will cross the limit within the horizon, with the lead time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..settings import Settings
from .base import Finding, MetricSpecs, WindowedDetector, make_baseline
from .baseline import RobustBaseline, Signal
from .forecast import SloForecaster
from .series import SeriesDetector
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
    stream = "system"
    n_features = MAX_METRICS

    def __init__(self, settings: Settings, source_topic: str = "system_performance_metrics") -> None:
        self.ceilings = dict(settings.detection["system"]["ceilings"])
        self.forecast_cfg = dict(settings.detection["system"]["forecast"])
        self.series_threshold = float(settings.detection["system"]["series_threshold"])
        self.warmup = int(settings.detection["warmup_windows"])
        self.min_relative_change = float(settings.detection["min_relative_change"])
        self.columns: dict[str, int] = {}
        self.untracked_metrics = 0
        super().__init__(settings, source_topic)

    def new_state(self) -> "_ServiceState":
        return _ServiceState(make_baseline(self.settings, MetricSpecs(self.settings, "direction", "both"), self.ceilings))

    def _column(self, name: str) -> int | None:
        col = self.columns.get(name)
        if col is None:
            if len(self.columns) >= MAX_METRICS:
                self.untracked_metrics += 1
                return None
            col = self.columns[name] = len(self.columns)
        return col

    def add_partial(self, p: Any) -> bool:
        """Merge a partial whose metrics come by name (``p.named``: name -> [sum, present])."""
        sums = np.zeros(MAX_METRICS)
        present = np.zeros(MAX_METRICS)
        for name, (total, have) in p.named.items():
            col = self._column(name)
            if col is not None:
                sums[col], present[col] = total, have
        return self.windows.add_partial(p.key, p.start, p.count, sums, present, p.users)

    def findings(self, agg: WindowAggregate) -> list[Finding]:
        service, region = agg.key
        means = agg.mean()
        x = {name: float(means[col]) for name, col in self.columns.items() if agg.present[col] > 0}
        state = self.entities.get(agg.key, agg.end)
        baseline = state.baseline
        if baseline.observations == 0:  # a new entity: the service's own SLOs take over the generic ceilings
            baseline.limits = {**self.ceilings, **self.settings.services.get(service, {}).get("slo", {})}
        by_kind: dict[str, list[Signal]] = {}
        for s in baseline.update_one(x, agg.end):
            by_kind.setdefault(kind_of(s.metric), []).append(s)
        for s in self._series(state, x, agg, {s.metric for sigs in by_kind.values() for s in sigs}):
            by_kind.setdefault(kind_of(s.metric), []).append(s)
        entity = {"service": service, "region": region}
        details = {"metrics": {k: round(v, 4) for k, v in x.items()}}
        out = [Finding(kind, entity, region, service, sigs, 0, details) for kind, sigs in by_kind.items()]
        foreseen = self._forecast(state, x, agg, {s.metric for sigs in by_kind.values() for s in sigs})
        if foreseen:
            out.append(foreseen)
        return out

    def _series(self, state: "_ServiceState", x: dict[str, float], agg: WindowAggregate, open_metrics: set[str]) -> list[Signal]:
        """Each metric's own :class:`SeriesDetector` (daily seasonality, spikes, level shifts,
        drifts to new levels): a signal when it scores past ``series_threshold`` in the metric's
        bad direction by a change that matters, and the baseline has not already said so."""
        out: list[Signal] = []
        t = agg.end / 1000.0
        for name in [n for n in state.runs if n not in x]:  # a window without the metric ends its run
            state.runs[name] = 0
        for name, value in x.items():
            det = state.series.get(name)
            if det is None:
                det = state.series[name] = SeriesDetector()
            score = det.update(value, t)
            state.seen[name] = state.seen.get(name, 0) + 1
            if score < self.series_threshold or name in open_metrics or state.seen[name] <= self.warmup:
                state.runs[name] = 0
                continue
            expected = getattr(det, "expected", math.nan)
            if not math.isfinite(expected):  # no prediction yet: judge against the baseline's mean
                expected = state.baseline.expected(name)
            if expected is None or not math.isfinite(expected):
                state.runs[name] = 0
                continue
            spec = self.settings.metric_spec(name)
            delta = value - expected
            if spec.get("direction") == "down":
                delta = -delta
            elif spec.get("direction") != "up":
                delta = abs(delta)
            effect = max(float(spec.get("min_change", 0.0)), self.min_relative_change * abs(expected))
            if delta < effect:
                state.runs[name] = 0
                continue
            # the same false-alarm budget as the baseline's: on a series whose deviations often
            # start, one must last before it opens a signal
            state.runs[name] = state.runs.get(name, 0) + 1
            if state.runs[name] >= state.baseline.confirm(name):
                out.append(Signal(name, value, expected, round(score * 10, 2), None, agg.end))
        return out

    def _forecast(self, state: "_ServiceState", x: dict[str, float], agg: WindowAggregate, open_metrics: set[str]) -> Finding | None:
        """Follow each metric that has an upper limit; warn when its trend will cross it soon."""
        cfg = self.forecast_cfg
        signals: list[Signal] = []
        lead: dict[str, int] = {}
        for name, value in x.items():
            limit = (state.baseline.limits.get(name) or {}).get("max")
            if limit is None:
                continue
            f = state.forecasters.get(name)
            if f is None:
                f = state.forecasters[name] = SloForecaster(
                    limit, step_s=self.windows.size_ms // 1000, horizon_s=int(cfg["horizon_s"]), alpha=float(cfg["alpha"]),
                    beta=float(cfg["beta"]), warmup=int(cfg["warmup_windows"]), confirm=int(cfg["confirm_windows"]),
                )
            fc = f.update(value)
            if fc is not None and name not in open_metrics:
                signals.append(Signal(name, value, fc.crossing, round(fc.lead_time_s / 60, 2), limit, agg.end))
                lead[name] = fc.lead_time_s
        if not signals:
            return None
        service, region = agg.key
        soonest = min(lead.values())
        return Finding(
            "slo_forecast", {"service": service, "region": region}, region, service, signals, 0,
            {"lead_time_s": soonest, "forecast_crossing_at": agg.end + soonest * 1000, "lead_times_s": lead,
             "model": "river.time_series.HoltWinters (linear trend)"},
        )


@dataclass(slots=True)
class _ServiceState:
    baseline: RobustBaseline
    forecasters: dict[str, SloForecaster] = field(default_factory=dict)
    series: dict[str, SeriesDetector] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)  # windows in a row each metric's series detector has deviated
