"""Audio quality: per-entity window aggregates against learned baselines and absolute floors.

Each batch of samples is summed with numpy into event-time windows per entity (a region, a CDN
PoP within its region, a device within a region). When a window closes, its means go to that
entity's :class:`RobustBaseline`; open signals become an :class:`Anomaly`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..contracts import AudioQualitySample
from ..settings import Settings
from .base import Finding, WindowedDetector, make_baseline
from .baseline import RobustBaseline
from .windows import WindowAggregate

FEATURES = (
    "bitrate_ratio",
    "buffering_ratio",
    "latency_ms",
    "buffer_health_percent",
    "packet_loss_percent",
    "stall_rate",
)
STALL_BUFFERING = 0.05  # a sample stalled more than this share of the time counts as a stall

# which dependency-map node an entity dimension points at
NODES = {"region": "audio_streaming", "cdn_pop": "cdn", "device": "audio_streaming", "user_segment": "audio_streaming"}


class AudioQualityDetector(WindowedDetector):
    """Windowed per-entity audio quality detection (no I/O; feed it batches of records)."""

    name = "audio.baseline"
    n_features = len(FEATURES)

    def __init__(self, settings: Settings, source_topic: str = "audio_quality_metrics") -> None:
        cfg = settings.detection
        self.dimensions = tuple(cfg["audio"]["dimensions"])
        self.min_events = int(cfg["min_events_per_window"])
        self.directions = {f: settings.metric_spec(f)["direction"] for f in FEATURES}
        self.limits = dict(cfg["audio"]["floors"])
        super().__init__(settings, source_topic)

    def new_state(self) -> RobustBaseline:
        return make_baseline(self.settings, self.directions, self.limits)

    def add(self, records: Sequence[AudioQualitySample]) -> None:
        n = len(records)
        ts = np.fromiter((r.ts for r in records), dtype=np.int64, count=n)
        raw = np.array(
            [
                (r.bitrate_kbps, r.requested_bitrate_kbps, r.buffering_ratio, r.latency_ms, r.buffer_health_percent, r.packet_loss_percent)
                for r in records
            ],
            dtype=np.float64,
        )
        values = np.empty((n, len(FEATURES)))
        with np.errstate(over="ignore", divide="ignore"):  # a tiny request must not make an infinity
            values[:, 0] = np.clip(raw[:, 0] / raw[:, 1], 0.0, 2.0)
        values[:, 1:5] = raw[:, 2:6]
        values[:, 5] = raw[:, 2] > STALL_BUFFERING
        users = [r.user_id for r in records]
        for dim in self.dimensions:
            if dim == "region":
                keys = [("region", r.region, "") for r in records]
            else:
                keys = [(dim, getattr(r, dim), r.region) for r in records]
            self.windows.add_batch(keys, ts, values, users)

    def findings(self, agg: WindowAggregate) -> list[Finding]:
        if agg.count < self.min_events:
            return []
        dim, value, region = agg.key
        region = region or value
        signals = self.entities.get(agg.key, agg.end).update_one(dict(zip(FEATURES, agg.mean().tolist())), agg.end)
        if not signals:
            return []
        entity = {"region": region} if dim == "region" else {"region": region, dim: value}
        return [Finding("audio_quality_degradation", entity, region, NODES.get(dim, "audio_streaming"), signals,
                        len(agg.users), {"dimension": dim})]
