"""Event-time tumbling windows that merge partial aggregates per key (stage 2).

Stage 1 (:mod:`soundcheck.ingest.partials`) sums each input partition's records per (entity,
window); here the partials of every partition are added up per (key, window), and a window closes
when the watermark (the slowest active input partition's progress) passes its end. A partial for
a window that has already closed is counted as late and left out.

>>> agg = TumblingAggregator(size_ms=10_000, lateness_ms=0, n_features=2)
>>> agg.add_partial("a", 0, 2, [4., 6.], [2., 2.], users=2)
True
>>> agg.add_partial("a", 0, 1, [5., 0.], [1., 0.], users=1)
True
>>> w = agg.advance(10_000)[0]
>>> w.key, w.count, w.mean().tolist(), w.users, agg.advance(25_000)
('a', 3, [3.0, 3.0], 3, [])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import numpy as np


@dataclass(slots=True)
class WindowAggregate:
    """The sums of one key over one window."""

    key: Hashable
    start: int
    end: int
    count: int
    sums: np.ndarray
    present: np.ndarray  # per feature: how many rows had a value (NaN means absent)
    users: int = 0  # distinct users, summed over the input partitions

    def mean(self) -> np.ndarray:
        """Per-feature mean over the rows that had the feature (NaN where none had it), to 12
        significant digits: the sums of a window split over partitions in another way differ in
        their last bits (float addition is not associative), and a detector must see the same
        window whatever the partitioning (a value reported to 4 digits flipped on it)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            m = np.where(self.present > 0, self.sums / np.maximum(self.present, 1), np.nan)
            mag = np.where(np.isfinite(m) & (m != 0), np.floor(np.log10(np.abs(np.where(m == 0, 1, m)))), 0)
            scale = 10.0 ** (11 - mag)
            return np.where(np.isfinite(m), np.round(m * scale) / scale, m)


class TumblingAggregator:
    """Merge partial sums per (key, event-time window); hand back windows as they close."""

    def __init__(self, size_ms: int, lateness_ms: int, n_features: int) -> None:
        self.size_ms = int(size_ms)
        self.lateness_ms = int(lateness_ms)
        self.n_features = n_features
        self._open: dict[tuple[int, Hashable], WindowAggregate] = {}
        self.max_ts: int = -1
        self.closed_until: int = -(2**62)  # windows starting before this are closed
        self.late_events = 0

    def add_partial(self, key: Hashable, start: int, count: int, sums: Sequence[float] | np.ndarray,
                    present: Sequence[float] | np.ndarray, users: int = 0) -> bool:
        """Add one partition's sums for ``key`` over the window starting at ``start``; False if late."""
        if start < self.closed_until:
            self.late_events += count
            return False
        agg = self._open.get((start, key))
        if agg is None:
            agg = self._open[(start, key)] = WindowAggregate(
                key, start, start + self.size_ms, 0, np.zeros(self.n_features), np.zeros(self.n_features))
        agg.count += int(count)
        n = len(sums)
        agg.sums[:n] += sums
        agg.present[:n] += present
        agg.users += int(users)
        self.max_ts = max(self.max_ts, start + self.size_ms - 1)
        return True

    def advance(self, event_time: Optional[int] = None) -> list[WindowAggregate]:
        """Close and return (oldest first, then by key) the windows whose end the watermark has passed.

        The watermark is ``event_time`` (default: the end of the newest window seen) less the
        allowed lateness.
        """
        watermark = (self.max_ts + 1 if event_time is None else event_time) - self.lateness_ms
        done = [key for key, agg in self._open.items() if agg.end <= watermark]
        self.closed_until = max(self.closed_until, (watermark // self.size_ms) * self.size_ms)
        if not done:
            return []
        out = [self._open.pop(key) for key in done]
        out.sort(key=lambda a: (a.start, str(a.key)))
        return out

    @property
    def open_count(self) -> int:
        """Windows still open."""
        return len(self._open)
