"""The recent window values of each detector series, for the incident page's plots.

:class:`SeriesHistory` keeps, per series (detector, entity labels, metric), a ring of the last
``span_s`` of event time of stage-2 windows: the window's start, the observed value, what the
baseline expected, and the band around it (expected +- the deviation that would open a signal:
``z_threshold`` spreads, at least the minimum effect). It is fed by
:meth:`soundcheck.detectors.base.WindowedDetector.evaluate` through
:func:`soundcheck.detectors.baseline.observing` while a window is scored, and read by
:func:`soundcheck.alerting.page.render_incidents`.

It is bounded twice: ``span_s // step_s + 1`` points per series (361 for an hour of 10 s
windows) and ``max_series`` series, the least recently fed one going first. A point costs 20
bytes (the start in epoch seconds as a 32-bit integer, four 32-bit floats), so a full series is
about 8 KB with its bookkeeping and the default bound (5,000 series) at most about 40 MB; the
development scenario feeds under 1,000 series. Recording a value costs about 3 us.

History is per worker and is not detector state: it is never in a snapshot, it holds only the
windows this worker's stage-2 partitions evaluated, and it starts empty after a restart (the
plots fill again as windows close). A window evaluated again (a snapshot restored and caught
up after a rebalance) replaces its point, or is ignored when older than the series' last one.

This is a plain class on purpose (no dataclass): the detector modules' dataclasses make up the
snapshot schema's fingerprint (:func:`soundcheck.snapshots.state_schema`).

>>> h = SeriesHistory(span_s=30, step_s=10, max_series=2)
>>> for i, v in enumerate([1.0, 2.0, 3.0, 4.0, 5.0]):
...     h.recorder("system.baseline", ("search", "US"), i * 10_000)("latency_ms", v, 1.0, 0.5, 1.5)
>>> [p.observed for p in h.points("system.baseline", {"service": "search", "region": "US"}, "latency_ms")]
[2.0, 3.0, 4.0, 5.0]
>>> h.recorder("audio.baseline", ("cdn_pop", "de-b2", "DE"), 0)("buffering_ratio", 0.1, 0.02, 0.0, 0.05)
>>> h.recorder("behavior.rates", "DE", 0)("skip_rate", 0.3, 0.2, 0.1, 0.3)
>>> len(h), h.evicted  # the system series was the least recently fed
(2, 1)
>>> h.find("behavior.rates", {"region": "DE", "service": "client_experience"}, "skip_rate")[0]
(('region', 'DE'),)
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from itertools import combinations
from typing import Any, Callable, Hashable, Iterable, Mapping, NamedTuple, Optional

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs

SPAN_S = 3600  # an hour of event time per series
MAX_SERIES = 5000  # series kept; the least recently fed goes first


class Point(NamedTuple):
    """One evaluated window of one series."""

    start: int  # window start, epoch ms
    observed: float
    expected: float
    lower: float
    upper: float


class _Ring:
    """The points of one series: a ring over two flat arrays (20 bytes a point)."""

    __slots__ = ("starts", "values", "head")

    def __init__(self) -> None:
        self.starts = array("I")  # window start, epoch seconds
        self.values = array("f")  # observed, expected, lower, upper per point
        self.head = 0  # index of the oldest point once the ring is full

    def __len__(self) -> int:
        return len(self.starts)

    def last_start(self) -> Optional[int]:
        if not self.starts:
            return None
        return self.starts[(self.head - 1) % len(self.starts)]

    def add(self, cap: int, start_s: int, vals: Iterable[float]) -> None:
        last = self.last_start()
        if last is not None and start_s < last:
            return  # an older window evaluated again: the ring has moved past it
        if last is not None and start_s == last:  # the same window evaluated again: replace
            i = (self.head - 1) % len(self.starts)
        elif len(self.starts) < cap:
            self.starts.append(start_s)
            self.values.extend((0.0, 0.0, 0.0, 0.0))
            i = len(self.starts) - 1
        else:
            i = self.head
            self.head = (self.head + 1) % cap
        self.starts[i] = start_s
        self.values[4 * i:4 * i + 4] = array("f", vals)

    def points(self) -> list[Point]:
        n = len(self.starts)
        out = []
        for k in range(n):
            i = (self.head + k) % n if n else 0
            o, e, lo, hi = self.values[4 * i:4 * i + 4]
            out.append(Point(self.starts[i] * 1000, o, e, lo, hi))
        return out


def labels_of(detector: str, key: Hashable) -> Labels:
    """A stage-2 window key as the entity labels the detector's anomalies carry."""
    if detector == "audio.baseline" and isinstance(key, tuple) and len(key) == 3:
        dim, value, region = key
        d = {"region": str(region or value)} if dim == "region" else {"region": str(region), str(dim): str(value)}
    elif detector == "system.baseline" and isinstance(key, tuple) and len(key) == 2:
        d = {"service": str(key[0]), "region": str(key[1])}
    elif isinstance(key, str):  # behavior.rates: the region (its anomalies add the service the metric points at)
        d = {"region": key}
    else:
        d = {"key": "/".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))}
    return tuple(sorted(d.items()))


class SeriesHistory:
    """Per-worker ring of the last hour of window values per (detector, entity, metric); see the module doc."""

    def __init__(self, span_s: int = SPAN_S, step_s: int = 10, max_series: int = MAX_SERIES) -> None:
        self.span_ms = int(span_s) * 1000
        self.step_ms = max(1, int(step_s)) * 1000  # the window size: a point's value is known at start + step
        self.max_points = max(2, int(span_s) // max(1, int(step_s)) + 1)
        self.max_series = int(max_series)
        self._series: OrderedDict[tuple[str, Labels, str], _Ring] = OrderedDict()
        self.evicted = 0  # series dropped to stay within max_series

    def __len__(self) -> int:
        return len(self._series)

    def recorder(self, detector: str, key: Hashable, window_start: int) -> Callable[[str, float, float, float, float], None]:
        """A callable ``(metric, observed, expected, lower, upper)`` recording one window of the
        entity ``key`` (a stage-2 window key) of ``detector``."""
        labels = labels_of(detector, key)

        def record(metric: str, observed: float, expected: float, lower: float, upper: float) -> None:
            self.record(detector, labels, metric, window_start, observed, expected, lower, upper)

        return record

    def record(self, detector: str, labels: Labels, metric: str, window_start: int,
               observed: float, expected: float, lower: float, upper: float) -> None:
        vals = (observed, expected, lower, upper)
        if not all(math.isfinite(v) for v in vals):
            return
        key = (detector, labels, metric)
        ring = self._series.get(key)
        if ring is None:
            if len(self._series) >= self.max_series:
                self._series.popitem(last=False)
                self.evicted += 1
            ring = self._series[key] = _Ring()
        else:
            self._series.move_to_end(key)
        ring.add(self.max_points, int(window_start) // 1000, vals)

    def find(self, detector: str, entity: Mapping[str, Any], metric: str) -> Optional[tuple[Labels, list[Point]]]:
        """The series of an alert's ``detector``, ``entity`` and signal ``metric``: the one with the
        same labels, else with the most of them (a behaviour rate's series is per region; its
        anomalies also name the service the rate points at)."""
        items = sorted((str(k), str(v)) for k, v in entity.items())
        for n in range(len(items), 0, -1):
            for labels in combinations(items, n):
                ring = self._series.get((detector, labels, metric))
                if ring is not None:
                    return labels, self._recent(ring)
        return None

    def points(self, detector: str, entity: Mapping[str, Any], metric: str) -> list[Point]:
        found = self.find(detector, entity, metric)
        return found[1] if found else []

    def _recent(self, ring: _Ring) -> list[Point]:
        pts = ring.points()
        if not pts:
            return pts
        since = pts[-1].start - self.span_ms
        return [p for p in pts if p.start >= since]

    def nbytes(self) -> int:
        """The bytes the points take (the arrays' buffers; Python objects aside)."""
        return sum(r.starts.itemsize * len(r.starts) + r.values.itemsize * len(r.values) for r in self._series.values())
