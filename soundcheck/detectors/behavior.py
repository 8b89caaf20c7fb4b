"""User behaviour: population rates per region, and streaming fraud per user.

* Population: per region and event-time window, the counts of each event type become rates
  (skip, crash, payment failure, cancellation, ad failure); each rate with a large enough
  denominator goes to the region's :class:`RobustBaseline`.
* Fraud: :class:`FraudDetector` keeps bounded per-user counters over a sliding window (plays,
  completions, devices, countries, artists, payment methods) and scores them into a fraud
  probability with its reasons.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..ingest.partials import EVENT_INDEX, EVENT_TYPES
from ..settings import Settings
from .base import Anomaly, EntityStore, Finding, WindowedDetector, make_baseline
from .baseline import RobustBaseline, Signal
from .windows import WindowAggregate

_INDEX = EVENT_INDEX

# rate name -> (numerator event types, denominator event types)
RATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "skip_rate": (("skip",), ("play_start",)),
    "crash_rate": (("app_crash",), ("play_start",)),
    "payment_failure_rate": (("payment_failure",), ("payment_attempt",)),
    "cancel_rate": (("subscription_cancel",), ("login",)),
    "ad_failure_rate": (("ad_failure",), ("ad_impression", "ad_failure")),
}
KIND_OF_RATE = {"payment_failure_rate": "payment_failure"}


@dataclass(slots=True)
class _RegionRates:
    baseline: RobustBaseline
    recent: deque  # the last windows' event-type counts, for the sliding rates


class BehaviorRateDetector(WindowedDetector):
    """Population rates per region against learned baselines and floors."""

    name = "behavior.rates"
    stream = "behavior"
    n_features = len(EVENT_TYPES)

    def __init__(self, settings: Settings, source_topic: str = "user_behavior_events") -> None:
        cfg = settings.detection["behavior"]
        self.min_denominator = int(cfg["min_denominator"])
        self.prior_weight = float(cfg["prior_weight"])
        self.rate_windows = int(cfg["rate_windows"])
        self.directions = {r: settings.metric_spec(r)["direction"] for r in RATES}
        self.limits = dict(cfg["floors"])
        self._rate_index = {
            name: ([_INDEX[t] for t in num], [_INDEX[t] for t in den]) for name, (num, den) in RATES.items()
        }
        super().__init__(settings, source_topic)

    def new_state(self) -> "_RegionRates":
        return _RegionRates(make_baseline(self.settings, self.directions, self.limits), deque(maxlen=self.rate_windows))

    def findings(self, agg: WindowAggregate) -> list[Finding]:
        region = agg.key
        state = self.entities.get(region, agg.end)
        baseline, recent = state.baseline, state.recent
        # rates over a sliding span of the last few windows: rare events need the counts
        recent.append(agg.sums)
        sums = np.sum(recent, axis=0)
        x: dict[str, float] = {}
        spread: dict[str, float] = {}
        counts: dict[str, float] = {}
        for name, (num, den) in self._rate_index.items():
            d = float(sums[den].sum())
            if d < self.min_denominator:
                continue
            k = float(sums[num].sum())
            # shrink towards the baseline by a few pseudo-observations, and judge the rate by
            # its binomial standard error: three crashes in fifty plays are not an outbreak
            p0 = baseline.expected(name)
            p0 = max(k / d if p0 is None else p0, 1.0 / (d + self.prior_weight))
            x[name] = (k + self.prior_weight * p0) / (d + self.prior_weight)
            spread[name] = math.sqrt(max(p0 * (1 - p0), 1e-6) / (d + self.prior_weight))
            counts[name] = k
        if not x:
            return []
        by_node: dict[str, list[Signal]] = {}
        for s in baseline.update_one(x, agg.end, spread):
            by_node.setdefault(self.settings.metric_spec(s.metric).get("node", "client_experience"), []).append(s)
        details = {"rates": {k: round(v, 4) for k, v in x.items()}, "span_s": len(recent) * (agg.end - agg.start) // 1000}
        return [
            Finding(KIND_OF_RATE.get(sigs[0].metric, "behavior_rate_anomaly"), {"region": region, "service": node}, region, node, sigs,
                    int(max(counts.get(s.metric, 0) for s in sigs)), details)
            for node, sigs in by_node.items()
        ]


# ---------------------------------------------------------------------------------------------
# Streaming fraud


@dataclass(slots=True)
class UserActivity:
    """Bounded per-user counters over a sliding event-time window (buckets of ``bucket_ms``)."""

    buckets: deque = field(default_factory=deque)  # [bucket_start, plays, completes]
    first_ts: int = 0
    devices: dict = field(default_factory=dict)  # device -> last seen
    countries: dict = field(default_factory=dict)
    artists: dict = field(default_factory=dict)  # artist -> [plays, last seen]
    payment_methods: dict = field(default_factory=dict)
    segment: str = ""
    last_reported: int = -(2**62)

    CAP = 16  # at most this many devices, countries, artists, payment methods kept per user


def _remember(d: dict, key: Any, value: Any) -> None:
    if key in d or len(d) < UserActivity.CAP:
        d[key] = value


class FraudDetector:
    """Streaming fraud per user: counters over a sliding window scored into a probability.

    >>> from soundcheck.settings import load_settings
    >>> fd = FraudDetector(load_settings(environ={}))
    >>> fd.probability({"streams_per_hour": 300, "completion_rate": 0.05, "devices": 5, "countries": 2,
    ...                 "top_artist_share": 0.9, "payment_method_changes": 0})[0] > 0.9
    True
    >>> fd.probability({"streams_per_hour": 15, "completion_rate": 0.7, "devices": 1, "countries": 1,
    ...                 "top_artist_share": 0.2, "payment_method_changes": 0})[0]
    0.0
    """

    name = "behavior.fraud"
    BUCKET_MS = 60_000

    def __init__(self, settings: Settings, source_topic: str = "user_behavior_events") -> None:
        self.cfg: Mapping[str, Any] = settings.detection["fraud"]
        self.source_topic = source_topic
        self.window_ms = int(self.cfg["window_s"]) * 1000
        self.report_every_ms = settings.windows.aggregate_s * 1000
        self.users: EntityStore[UserActivity] = EntityStore(UserActivity, int(self.cfg["max_users"]), self.window_ms)
        self.now = 0

    def process(self, records: Sequence[Any], event_time: int | None = None) -> list[Anomaly]:
        """Count a batch; score the users it touched at ``event_time`` (the watermark; default:
        the latest record), so one early timestamp cannot age everybody's window."""
        if records:
            top = max(r.ts for r in records)
            self.now = max(self.now, top if event_time is None else min(event_time, top))
        touched: dict[str, UserActivity] = {}
        for r in records:
            u = self.users.get(r.user_id, r.ts)
            if not u.buckets:
                u.first_ts = r.ts
            u.segment = r.user_segment
            _remember(u.devices, r.device_id, r.ts)
            _remember(u.countries, r.country, r.ts)
            et = r.event_type
            if et == "play_start" or et == "play_complete":
                b = r.ts - r.ts % self.BUCKET_MS
                if not u.buckets or u.buckets[-1][0] < b:
                    u.buckets.append([b, 0, 0])
                bucket = u.buckets[-1]
                if et == "play_start":
                    bucket[1] += 1
                    if r.artist_id:
                        seen = u.artists.get(r.artist_id)
                        _remember(u.artists, r.artist_id, [seen[0] + 1 if seen else 1, r.ts])
                else:
                    bucket[2] += 1
            elif r.payment_method_id and et.startswith("payment"):
                _remember(u.payment_methods, r.payment_method_id, r.ts)
            touched[r.user_id] = u
        out = [a for uid, u in touched.items() if (a := self._evaluate(uid, u)) is not None]
        self.users.expire(self.now)
        return out

    def features(self, u: UserActivity, now: int) -> dict[str, float]:
        """The user's counters over the window ending at ``now``."""
        start = now - self.window_ms
        while u.buckets and u.buckets[0][0] < start:
            u.buckets.popleft()
        for d in (u.devices, u.countries, u.payment_methods):
            for k in [k for k, ts in d.items() if ts < start]:
                del d[k]
        for k in [k for k, (_, ts) in u.artists.items() if ts < start]:
            del u.artists[k]
        plays = sum(b[1] for b in u.buckets)
        completes = sum(b[2] for b in u.buckets)
        span = max(now - max(u.first_ts, start), int(self.cfg["min_observed_s"]) * 1000)
        return {
            "plays": plays,
            "streams_per_hour": plays * 3_600_000 / span,
            "completion_rate": completes / plays if plays else 1.0,
            "devices": len(u.devices),
            "countries": len(u.countries),
            "top_artist_share": max(c for c, _ in u.artists.values()) / max(sum(c for c, _ in u.artists.values()), 1) if u.artists else 0.0,
            "payment_method_changes": max(len(u.payment_methods) - 1, 0),
        }

    def probability(self, f: Mapping[str, float]) -> tuple[float, list[Signal]]:
        """Fraud probability in [0, 1] and the reasons behind it (one signal per reason)."""
        c = self.cfg
        reasons: list[tuple[float, Signal]] = []

        def reason(weight: float, metric: str, observed: float, expected: float, excess: float) -> None:
            if excess > 0:
                reasons.append((weight * min(1.0, excess), Signal(metric, observed, expected, round(excess * 10, 2))))

        sph = f["streams_per_hour"]
        reason(0.6, "streams_per_hour", sph, c["streams_per_hour"], (sph - c["streams_per_hour"]) / c["streams_per_hour"] * 2)
        if sph > c["streams_per_hour"] / 2:  # completion and artist share only matter for heavy streamers
            cr = f["completion_rate"]
            reason(0.5, "completion_rate", cr, c["min_completion_rate"], (c["min_completion_rate"] - cr) / c["min_completion_rate"] * 2)
            reason(0.3, "top_artist_share", f["top_artist_share"], 0.5, (f["top_artist_share"] - 0.5) * 2)
        reason(0.35, "distinct_devices", f["devices"], c["max_devices"], (f["devices"] - c["max_devices"]) / c["max_devices"])
        reason(0.45, "distinct_countries", f["countries"], c["max_countries"], f["countries"] - c["max_countries"])
        reason(0.35, "payment_method_changes", f["payment_method_changes"], c["max_payment_method_changes"],
               (f["payment_method_changes"] - c["max_payment_method_changes"]) / max(c["max_payment_method_changes"], 1))
        p = 1.0
        for w, _ in reasons:
            p *= 1.0 - w
        return round(1.0 - p, 3), [s for _, s in sorted(reasons, key=lambda r: -r[0])]

    def _evaluate(self, user_id: str, u: UserActivity) -> Anomaly | None:
        now = self.now
        if now - u.last_reported < self.report_every_ms:
            return None
        f = self.features(u, now)
        if f["plays"] < self.cfg["min_plays"]:
            return None
        prob, signals = self.probability(f)
        if prob < self.cfg["probability_threshold"]:
            return None
        u.last_reported = now
        since = max(u.first_ts, now - self.window_ms)
        for s in signals:
            s.since = since
        country = next(iter(u.countries), "unknown")  # the first country seen: a stable home
        return Anomaly(
            kind="streaming_fraud",
            detector=self.name,
            entity={"user_id": user_id},
            region=country,
            node="streaming_fraud",
            signals=signals,
            score=prob,
            event_time=now,
            window_start=since,
            source_topic=self.source_topic,
            sampled_users=1,
            samples=int(f["plays"]),
            details={
                "fraud_probability": prob,
                "features": {k: round(v, 3) for k, v in f.items()},
                "countries": sorted(u.countries),
                "top_artists": sorted(u.artists, key=lambda a: u.artists[a][0], reverse=True)[:3],
                "user_segment": u.segment,
                "links": [f"artist:{a}" for a in sorted(u.artists, key=lambda a: u.artists[a][0], reverse=True)[:3]]
                + [f"device:{d}" for d in sorted(u.devices)[:8]] + [f"country:{c}" for c in sorted(u.countries)],
            },
            # all fraud findings share one scope (they are few); within it, accounts that share an
            # artist, a device or a country are one farm (see alerting.correlate_step)
            scope="fraud",
        )
