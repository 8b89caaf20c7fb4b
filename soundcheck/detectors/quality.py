"""Audio quality: per-entity window aggregates against learned baselines and absolute floors.

Stage 1 (:mod:`soundcheck.ingest.partials`) sums the samples of each input partition into
event-time windows per entity (a region, a CDN PoP within its region, a device or a user segment
within a region); here the partials of every partition are merged, and when a window closes, its
means go to that entity's :class:`RobustBaseline`; open signals become an :class:`Anomaly`.
"""

from __future__ import annotations

from ..ingest.partials import AUDIO_FEATURES
from ..settings import Settings
from .base import Finding, WindowedDetector, make_baseline
from .baseline import RobustBaseline
from .windows import WindowAggregate

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
        super().__init__(settings, source_topic)

    def new_state(self) -> RobustBaseline:
        return make_baseline(self.settings, self.directions, self.limits)

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
                        agg.users, {"dimension": dim})]
