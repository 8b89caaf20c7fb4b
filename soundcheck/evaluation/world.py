"""The world the simulator draws traffic from: markets, base rates, noise, producers.

:meth:`World.default` is the fixed world the simulator always had (six markets, no background
crashes, skips only after plays); :meth:`World.random` draws a different one per seed, so that an
evaluation cannot be tuned to one world:

* 3-8 markets out of a pool of twenty, sizes log-uniform over about three decades (the smallest
  sees a few events a minute when the largest sees hundreds a second);
* a base rate for every event type (crashes, skips, ad failures, payment failures, logins,
  cancellations ...), a latency and packet-loss level per market, noise levels;
* a daily volume curve (amplitude and phase);
* heavy-tailed latencies (log-normal spread per world, occasional spikes in service p95);
* how producers key records (by the natural key, by user, by session, at random) and how many
  records go in one message;
* incident magnitudes from barely visible to severe (:meth:`World.magnitudes`).

Tune on seeds 1-10 only; report on seeds 100-119 (:data:`TUNE_SEEDS`, :data:`REPORT_SEEDS`).

>>> a, b = World.random(100), World.random(101)
>>> a == World.random(100), a.markets == b.markets
(True, False)
>>> 3 <= len(a.markets) <= 8 and abs(sum(a.markets.values()) - 1) < 1e-9
True
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Optional

TUNE_SEEDS = tuple(range(1, 11))
REPORT_SEEDS = tuple(range(100, 120))

MARKET_POOL = ("US", "BR", "GB", "DE", "JP", "MX", "FR", "IN", "SE", "NG", "KR", "AU", "ES", "IT", "PL", "AR", "ZA", "ID",
               "CA", "NL")
KEYINGS = ("natural", "user", "session", "random")
SCENARIO_MAGNITUDE = (0.6, 1.6)  # incident magnitudes, relative to the default's: barely visible to severe


@dataclass(frozen=True)
class World:
    """What the simulator's traffic looks like (see the module doc)."""

    seed: Optional[int] = None  # None: the default world
    markets: dict[str, float] = field(default_factory=lambda: {"US": 0.32, "BR": 0.18, "GB": 0.14, "DE": 0.14, "JP": 0.12, "MX": 0.10})
    behavior: dict[str, float] = field(default_factory=lambda: {
        "play_start": 0.34, "play_complete": 0.0, "skip": 0.0, "search": 0.08, "add_to_playlist": 0.04,
        "login": 0.05, "logout": 0.02, "payment_attempt": 0.07, "subscription_upgrade": 0.004,
        "subscription_cancel": 0.002, "app_crash": 0.0, "ad_impression": 0.06, "ad_failure": 0.0,
    })
    crash_per_play: float = 0.003
    skip_per_play: float = 0.28
    ad_failure: float = 0.02
    payment_failure: float = 0.02
    base_latency_ms: dict[str, float] = field(default_factory=lambda: {"JP": 55.0, "BR": 55.0})  # others: 45
    latency_sigma: float = 0.25  # log-normal spread of playback latency
    bitrate_noise: float = 0.02
    buffering_share: float = 0.15  # share of samples with any buffering
    packet_loss: float = 0.01
    system_noise: float = 0.04  # relative spread of a service's p95 between samples
    error_noise: float = 0.15
    spike_rate: float = 0.0  # chance a service sample's p95 is a spike (heavy tail)
    diurnal_amplitude: float = 0.0  # volume = 1 + amplitude * sin(2 pi (hour - peak + 6) / 24)
    peak_hour: float = 20.0
    keying: str = "natural"
    per_message: int = 50
    users_per_market: int = 3000

    @classmethod
    def default(cls) -> "World":
        return cls()

    @classmethod
    def random(cls, seed: int) -> "World":
        rng = random.Random(f"world-{seed}")
        n = rng.randint(3, 8)
        names = rng.sample(MARKET_POOL, n)
        sizes = [math.exp(rng.uniform(0, math.log(1000))) for _ in names]
        total = sum(sizes)
        markets = {m: s / total for m, s in sorted(zip(names, sizes), key=lambda x: -x[1])}
        behavior = {
            "play_start": rng.uniform(0.25, 0.45), "play_complete": 0.0, "skip": rng.uniform(0.0, 0.04),
            "search": rng.uniform(0.04, 0.12), "add_to_playlist": rng.uniform(0.01, 0.06), "login": rng.uniform(0.02, 0.08),
            "logout": rng.uniform(0.01, 0.03), "payment_attempt": rng.uniform(0.02, 0.09),
            "subscription_upgrade": rng.uniform(0.001, 0.008), "subscription_cancel": rng.uniform(0.001, 0.006),
            "app_crash": rng.uniform(0.0, 0.01), "ad_impression": rng.uniform(0.02, 0.1), "ad_failure": rng.uniform(0.0, 0.004),
        }
        return cls(
            seed=seed,
            markets=markets,
            behavior=behavior,
            crash_per_play=rng.uniform(0.002, 0.03),
            skip_per_play=rng.uniform(0.15, 0.4),
            ad_failure=rng.uniform(0.005, 0.05),
            payment_failure=rng.uniform(0.005, 0.05),
            base_latency_ms={m: rng.uniform(30, 90) for m in markets},
            latency_sigma=rng.uniform(0.2, 0.6),
            bitrate_noise=rng.uniform(0.01, 0.05),
            buffering_share=rng.uniform(0.05, 0.3),
            packet_loss=rng.uniform(0.005, 0.03),
            system_noise=rng.uniform(0.02, 0.12),
            error_noise=rng.uniform(0.1, 0.4),
            spike_rate=rng.uniform(0.0, 0.02),
            diurnal_amplitude=rng.uniform(0.0, 0.5),
            peak_hour=rng.uniform(17, 23),
            keying=rng.choice(KEYINGS),
            per_message=rng.choice((1, 1, 10, 50, 100)),
            users_per_market=rng.choice((1000, 3000, 8000)),
        )

    def latency(self, market: str) -> float:
        return self.base_latency_ms.get(market, 45.0)

    def volume(self, t_ms: int) -> float:
        """The daily curve: how much traffic there is at ``t_ms`` relative to the day's mean."""
        if not self.diurnal_amplitude:
            return 1.0
        hour = (t_ms / 3_600_000.0) % 24
        return 1.0 + self.diurnal_amplitude * math.sin(2 * math.pi * (hour - self.peak_hour + 6) / 24)

    def magnitudes(self, names: list[str]) -> dict[str, float]:
        """Each scenario's magnitude in this world (1.0 everywhere in the default world)."""
        if self.seed is None:
            return {n: 1.0 for n in names}
        rng = random.Random(f"magnitude-{self.seed}")
        return {n: rng.uniform(*SCENARIO_MAGNITUDE) for n in names}

    def describe(self) -> dict[str, Any]:
        return {"seed": self.seed, "markets": {m: round(s, 4) for m, s in self.markets.items()}, "keying": self.keying,
                "per_message": self.per_message, "crash_per_play": round(self.crash_per_play, 4),
                "skip_per_play": round(self.skip_per_play, 3), "diurnal_amplitude": round(self.diurnal_amplitude, 2)}
