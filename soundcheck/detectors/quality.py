"""Audio quality: per-entity window aggregates against learned baselines and absolute floors.

Stage 1 (:mod:`soundcheck.ingest.partials`) sums the samples of each input partition into
event-time windows per entity (a region, a CDN PoP within its region, a device or a user segment
within a region); here the partials of every partition are merged, and when a window closes, its
means go to that entity's :class:`RobustBaseline`; open signals become an :class:`Anomaly`.

A market or a CDN PoP (``detection.audio.pool_dimensions``) with fewer than
``min_events_per_window`` samples in a window (a PoP of a market with a few listeners a minute)
is judged over a run of its consecutive short windows instead: their sums are pooled until they
hold that many samples, over at most ``detection.audio.pool_windows`` windows (older samples are
dropped), and the pooled window is judged when the last of them closes. So a small market's
outage is still seen, a little later, on as many samples as a large one's. A device or a user
segment within a region is not pooled: it is a breakdown of its region, whose own windows
already hold its samples (pooling them added false notifications on quiet days and found
nothing more).

>>> import numpy as np
>>> from soundcheck.settings import load_settings
>>> from soundcheck.detectors.windows import WindowAggregate
>>> det = AudioQualityDetector(load_settings(environ={}))
>>> def window(start, n):
...     return WindowAggregate(("cdn_pop", "br-gru2", "BR"), start, start + 10_000, n, np.full(len(FEATURES), float(n)), np.full(len(FEATURES), float(n)), n)
>>> det.judged(window(0, 2)) is None, det.judged(window(10_000, 2)) is None
(True, True)
>>> pooled = det.judged(window(20_000, 2))
>>> pooled.start, pooled.end, pooled.count, float(pooled.mean()[0])
(0, 30000, 6, 1.0)
>>> det.judged(window(30_000, 9)).count  # enough samples: judged alone
9
"""

from __future__ import annotations

from typing import Hashable, Optional

import numpy as np

from ..ingest.partials import AUDIO_FEATURES
from ..settings import Settings
from .base import Finding, WindowedDetector, make_baseline
from .baseline import RobustBaseline
from .windows import WindowAggregate

POOL_WINDOWS = 6  # default of detection.audio.pool_windows (1: no pooling)
# default of detection.audio.pool_dimensions: a market and a CDN PoP are populations of their own; a
# device or a user segment is a breakdown of its region, whose own windows already hold its samples
POOL_DIMENSIONS = ("region", "cdn_pop")

FEATURES = AUDIO_FEATURES

# which dependency-map node an entity dimension points at
NODES = {"region": "audio_streaming", "cdn_pop": "cdn", "device": "audio_streaming", "user_segment": "audio_streaming"}


class AudioQualityDetector(WindowedDetector):
    """Windowed per-entity audio quality detection (no I/O; feed it batches of records)."""

    name = "audio.baseline"
    stream = "audio"
    n_features = len(FEATURES)

    def __init__(self, settings: Settings, source_topic: str = "audio_quality_metrics") -> None:
        cfg = settings.detection
        self.dimensions = tuple(cfg["audio"]["dimensions"])
        self.min_events = int(cfg["min_events_per_window"])
        self.directions = {f: settings.metric_spec(f)["direction"] for f in FEATURES}
        self.limits = dict(cfg["audio"]["floors"])
        self.pool_windows = max(1, int(cfg["audio"].get("pool_windows", POOL_WINDOWS)))
        self.pool_dimensions = frozenset(cfg["audio"].get("pool_dimensions", POOL_DIMENSIONS))
        super().__init__(settings, source_topic)

    #: per entity, the pooled sums of its latest run of short windows (state from before pooling: None)
    pools: Optional[dict[Hashable, WindowAggregate]] = None
    _swept_at: int = -(2**62)

    def judged(self, agg: WindowAggregate) -> Optional[WindowAggregate]:
        """``agg`` when it has ``min_events`` samples; else the pool of the entity's consecutive short
        windows ending with it, once the pool has that many (None until then: nothing to judge)."""
        if self.pools is None:
            self.pools = {}
        pools, span = self.pools, self.pool_windows * (agg.end - agg.start)
        if agg.end - self._swept_at >= span:  # entities gone quiet leave no pool behind
            for key in [k for k, p in pools.items() if p.end <= agg.end - span]:
                del pools[key]
            self._swept_at = agg.end
        if agg.count >= self.min_events:
            pools.pop(agg.key, None)
            return agg
        if self.pool_windows <= 1 or agg.key[0] not in self.pool_dimensions:
            return None
        p = pools.get(agg.key)
        if p is None or agg.end - p.start > span:  # nothing to pool with, or it would span too long
            p = WindowAggregate(agg.key, agg.start, agg.end, 0, np.zeros_like(agg.sums), np.zeros_like(agg.present))
        pooled = WindowAggregate(agg.key, p.start, agg.end, p.count + agg.count, p.sums + agg.sums,
                                 p.present + agg.present, p.users + agg.users)
        if pooled.count >= self.min_events:
            pools.pop(agg.key, None)
            return pooled
        pools[agg.key] = pooled
        return None

    def new_state(self) -> RobustBaseline:
        return make_baseline(self.settings, self.directions, self.limits)

    def findings(self, agg: WindowAggregate) -> list[Finding]:
        """Findings of a judged window (see :meth:`judged`: a window, or a pool of short ones)."""
        if agg.count < self.min_events:
            return []
        dim, value, region = agg.key
        region = region or value
        signals = self.entities.get(agg.key, agg.end).update_one(dict(zip(FEATURES, agg.mean().tolist())), agg.end)
        if not signals:
            return []
        entity = {"region": region} if dim == "region" else {"region": region, dim: value}
        details = {"dimension": dim}
        if agg.end - agg.start > self.windows.size_ms:
            details["pooled_windows"] = -(-(agg.end - agg.start) // self.windows.size_ms)
        return [Finding("audio_quality_degradation", entity, region, NODES.get(dim, "audio_streaming"), signals,
                        agg.users, details)]
