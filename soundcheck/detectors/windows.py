"""Event-time tumbling windows that sum feature vectors per key, a batch at a time with numpy.

Windows close on a watermark (the highest event time seen, less the allowed lateness), so a
replay at full speed closes exactly the windows live traffic would. Events for a window that has
already closed are counted as late and left out.

>>> agg = TumblingAggregator(size_ms=10_000, lateness_ms=0, n_features=2)
>>> import numpy as np
>>> agg.add_batch(["a", "a", "b"], np.array([1_000, 2_000, 3_000]), np.array([[1., 2.], [3., 4.], [5., 6.]]))
>>> agg.advance(25_000)[0].key, agg.advance(25_000)
('a', [])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Optional, Sequence

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
    users: set = field(default_factory=set)

    def mean(self) -> np.ndarray:
        """Per-feature mean over the rows that had the feature (NaN where none had it)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.present > 0, self.sums / np.maximum(self.present, 1), np.nan)


class TumblingAggregator:
    """Sum feature vectors per (key, event-time window); hand back windows as they close."""

    def __init__(self, size_ms: int, lateness_ms: int, n_features: int) -> None:
        self.size_ms = int(size_ms)
        self.lateness_ms = int(lateness_ms)
        self.n_features = n_features
        self._open: dict[tuple[int, Hashable], WindowAggregate] = {}
        self.max_ts: int = -1
        self.closed_until: int = -(2**62)  # windows starting before this are closed
        self.late_events = 0

    def add_batch(
        self,
        keys: Sequence[Hashable],
        ts: np.ndarray,
        values: np.ndarray,
        users: Optional[Sequence[Any]] = None,
    ) -> None:
        """Add one row of ``values`` per key at event time ``ts`` (epoch ms); NaN marks a missing value."""
        if not len(keys):
            return
        starts = (ts // self.size_ms) * self.size_ms
        local: dict[tuple[int, Hashable], int] = {}
        idx = np.empty(len(keys), dtype=np.int64)
        closed_until = self.closed_until
        for i, (k, s) in enumerate(zip(keys, starts.tolist())):
            if s < closed_until:
                idx[i] = -1
                continue
            idx[i] = local.setdefault((s, k), len(local))
        keep = idx >= 0
        late = int((~keep).sum())
        if late:
            self.late_events += late
            idx, values = idx[keep], values[keep]
            if users is not None:
                users = [u for u, k in zip(users, keep) if k]
        if not len(local):
            return
        g = len(local)
        counts = np.bincount(idx, minlength=g)
        present = ~np.isnan(values)
        clean = np.where(present, values, 0.0)
        sums = np.stack([np.bincount(idx, weights=clean[:, j], minlength=g) for j in range(self.n_features)], axis=1)
        have = np.stack([np.bincount(idx, weights=present[:, j], minlength=g) for j in range(self.n_features)], axis=1)
        group_users: list[set] = [set() for _ in range(g)] if users is not None else []
        if users is not None:
            for gi, u in zip(idx.tolist(), users):
                group_users[gi].add(u)
        for (s, k), gi in local.items():
            agg = self._open.get((s, k))
            if agg is None:
                agg = self._open[(s, k)] = WindowAggregate(
                    k, s, s + self.size_ms, 0, np.zeros(self.n_features), np.zeros(self.n_features)
                )
            agg.count += int(counts[gi])
            agg.sums += sums[gi]
            agg.present += have[gi]
            if users is not None:
                agg.users |= group_users[gi]
        self.max_ts = max(self.max_ts, int(ts.max()))

    def advance(self, event_time: Optional[int] = None) -> list[WindowAggregate]:
        """Close and return (oldest first) the windows whose end the watermark has passed.

        The watermark is ``event_time`` (default: the highest event time seen) less the allowed
        lateness. A caller reading several partitions passes the slowest one's progress.
        """
        watermark = (self.max_ts if event_time is None else event_time) - self.lateness_ms
        done = [key for key, agg in self._open.items() if agg.end <= watermark]
        if not done:
            return []
        self.closed_until = max(self.closed_until, (watermark // self.size_ms) * self.size_ms)
        out = [self._open.pop(key) for key in done]
        out.sort(key=lambda a: a.start)
        return out

    @property
    def open_count(self) -> int:
        """Windows still open."""
        return len(self._open)
