"""Audio quality: per-entity window aggregates against learned baselines and absolute floors.

Each batch of samples is summed with numpy into event-time windows per entity (a region, a CDN
PoP within its region, a device within a region). When a window closes, its means go to that
entity's :class:`RobustBaseline`; open signals become an :class:`Anomaly`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..contracts import AudioQualitySample
from ..settings import Settings
from .base import Anomaly, EntityStore, anomaly_score
from .baseline import RobustBaseline
from .windows import TumblingAggregator

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
NODES = {"region": "audio_streaming", "cdn_pop": "cdn", "device": "audio_streaming"}


def make_baseline(settings: Settings, directions: Mapping[str, str], limits: Mapping) -> RobustBaseline:
    """A baseline with the detection settings (shared by every stream detector)."""
    d = settings.detection
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
        min_change=_MinChange(settings),
    )


class _MinChange(dict):
    """Each metric's minimum absolute change (``metrics.<name>.min_change``), looked up lazily."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._settings = settings

    def get(self, name: str, default: float = 0.0) -> float:  # type: ignore[override]
        if name not in self:
            self[name] = float(self._settings.metric_spec(name).get("min_change", 0.0))
        return dict.get(self, name, default)


class AudioQualityDetector:
    """Windowed per-entity audio quality detection (no I/O; feed it batches of records).

    ``name`` appears in anomalies and metric labels.
    """

    name = "audio.baseline"

    def __init__(self, settings: Settings, source_topic: str = "audio_quality_metrics") -> None:
        cfg = settings.detection
        self.settings = settings
        self.source_topic = source_topic
        self.dimensions = tuple(cfg["audio"]["dimensions"])
        self.min_events = int(cfg["min_events_per_window"])
        self.z_threshold = float(cfg["z_threshold"])
        self.directions = {f: settings.metric_spec(f)["direction"] for f in FEATURES}
        self.limits = dict(cfg["audio"]["floors"])
        w = settings.windows
        self.windows = TumblingAggregator(w.aggregate_s * 1000, w.allowed_lateness_s * 1000, len(FEATURES))
        self.entities: EntityStore[RobustBaseline] = EntityStore(
            lambda: make_baseline(settings, self.directions, self.limits), int(cfg["max_entities"]), w.entity_idle_s * 1000
        )

    def process(self, records: Sequence[AudioQualitySample], event_time: int | None = None) -> list[Anomaly]:
        """Add a batch; return the anomalies of the windows that closed."""
        if records:
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
            values[:, 0] = raw[:, 0] / raw[:, 1]
            values[:, 1:5] = raw[:, 2:6]
            values[:, 5] = raw[:, 2] > STALL_BUFFERING
            users = [r.user_id for r in records]
            for dim in self.dimensions:
                if dim == "region":
                    keys = [("region", r.region, "") for r in records]
                else:
                    keys = [(dim, getattr(r, dim), r.region) for r in records]
                self.windows.add_batch(keys, ts, values, users)
        return self._evaluate(event_time)

    def flush(self) -> list[Anomaly]:
        """Close all open windows (the stream went quiet); later events for them count as late."""
        self.windows.max_ts += self.windows.size_ms + self.windows.lateness_ms
        return self._evaluate()

    def _evaluate(self, now_ms: int | None = None) -> list[Anomaly]:
        out: list[Anomaly] = []
        closed = self.windows.advance(now_ms)
        for agg in closed:
            if agg.count < self.min_events:
                continue
            dim, value, region = agg.key
            region = region or value
            baseline = self.entities.get(agg.key, agg.end)
            means = agg.mean()
            signals = baseline.update_one(dict(zip(FEATURES, means.tolist())), agg.end)
            if not signals:
                continue
            entity = {"region": region} if dim == "region" else {"region": region, dim: value}
            out.append(
                Anomaly(
                    kind="audio_quality_degradation",
                    detector=self.name,
                    entity=entity,
                    region=region,
                    node=NODES.get(dim, "audio_streaming"),
                    signals=signals,
                    score=anomaly_score(signals, self.z_threshold),
                    event_time=agg.end,
                    window_start=agg.start,
                    source_topic=self.source_topic,
                    sampled_users=len(agg.users),
                    samples=agg.count,
                    details={"dimension": dim},
                )
            )
        if closed:
            self.entities.expire(closed[-1].end)
        return out
