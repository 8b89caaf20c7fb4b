"""Realistic traffic for the three topics, with named incidents injected at known times.

The world (markets, base rates, noise, producers) is :class:`~soundcheck.evaluation.world.World`:
a fixed default, or a random one per seed. Everything runs on a simulated event-time clock (``start_ms`` onwards, one tick per second), so
a run is reproducible from its seed and can be replayed at any speed. The generator is pure;
:func:`produce` (in :mod:`soundcheck.simulate_cli`) writes it to Kafka.

Scenarios (each with a start, a duration, a place and a magnitude; names vary with the seed):

* ``cdn_pop_degradation``: one CDN PoP in one region loses bitrate, stalls, slows; the cdn
  service there errors; listeners in the region skip more. Root cause: that PoP.
* ``billing_error_spike``: payments fail in one region; billing and gateway error rates jump.
* ``fraud_farm``: a group of accounts streams one artist round the clock from many devices.
* ``latency_regression``: one service's latency triples in one region.
* ``benign_surge``: traffic triples in one region, nothing breaks: must not page anyone.
* ``flapping_metric``: a latency that crosses its SLO and back every 30 s.
* ``slow_drift``: one service's memory creeps up (a leak) until it passes the 90% ceiling; the
  predictive detector should warn before it does.
* ``malformed_slice``: records that cannot be read (bad JSON, broken schema, NaN, negative
  latency, ratios out of range, far-future timestamps); they must all reach the dead-letter topic.

>>> sim = Simulator(seed=3, rate=50, duration_s=30)
>>> batches = list(sim.ticks())
>>> sum(len(b.records) for b in batches if b.stream == "audio") > 500
True
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import orjson

from soundcheck.evaluation.world import World

DEVICES = {"ios": 0.3, "android": 0.35, "web": 0.1, "desktop": 0.12, "car": 0.05, "speaker": 0.08}
NETWORKS = {"wifi": 0.6, "cellular": 0.35, "ethernet": 0.05}
SEGMENTS = {"premium": 0.45, "family": 0.1, "student": 0.05, "free": 0.4}
SERVICES = {  # nominal p95 latency (ms), error rate, requests/s per instance
    "audio_streaming": (120, 0.002, 900),
    "cdn": (60, 0.001, 2500),
    "search": (90, 0.002, 400),
    "recommendation_engine": (180, 0.003, 300),
    "licensing_service": (40, 0.001, 600),
    "user_auth": (70, 0.001, 200),
    "premium_billing": (150, 0.002, 40),
    "payment_gateway": (200, 0.003, 40),
    "ad_server": (80, 0.004, 500),
    "content_catalog": (50, 0.001, 700),
}
CITY = {"US": ["iad", "ord", "sjc"], "BR": ["gru", "gig", "poa"], "GB": ["lhr", "man", "edi"],
        "DE": ["fra", "ber", "muc"], "JP": ["nrt", "kix", "fuk"], "MX": ["mex", "gdl", "mty"]}

DEFAULT_PLAN = (
    # name, start (s of event time), duration (s)
    ("cdn_pop_degradation", 200, 180),
    ("fraud_farm", 240, 300),
    ("malformed_slice", 300, 10),
    ("billing_error_spike", 420, 180),
    ("latency_regression", 480, 180),
    ("benign_surge", 640, 180),
    ("flapping_metric", 660, 180),
    ("slow_drift", 300, 420),
)


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


@dataclass
class Batch:
    """The records of one stream for one routing key (region, user or service) in one tick."""

    stream: str  # audio, behavior, system
    key: str  # routing key: region for audio, user_id for behavior, service for system
    records: list[Any]  # dicts, or raw bytes for malformed records
    malformed: int = 0  # how many of the records are malformed


@dataclass
class Injected:
    """The ground truth of one scenario."""

    name: str
    start_ms: int
    end_ms: int
    region: str
    expect: list[dict[str, str]]  # an alert on an entity holding all labels of one of these matches
    root_cause: Optional[str] = None
    expected_priority: Optional[str] = None
    must_not_page: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Simulator:
    """Deterministic traffic generator; see the module doc."""

    def __init__(
        self,
        seed: int = 7,
        rate: float = 200.0,
        duration_s: int = 900,
        start_ms: Optional[int] = None,
        plan: tuple = DEFAULT_PLAN,
        magnitude: float = 1.0,
        users_per_region: Optional[int] = None,
        world: Optional[World] = None,
    ) -> None:
        """``world``: markets, base rates, noise and producers (:class:`World`; default: the
        fixed :meth:`World.default`). ``magnitude`` scales every incident (times the world's
        per-scenario magnitude)."""
        self.world = w = world if world is not None else World.default()
        self.regions = w.markets
        users_per_region = users_per_region if users_per_region is not None else w.users_per_market
        self.seed = seed
        self.rng = random.Random(seed)
        self.rate = rate
        self.duration_s = duration_s
        self.start_ms = start_ms if start_ms is not None else 1_700_000_000_000
        self.magnitude = magnitude
        tag = uuid.UUID(int=random.Random(seed * 7919).getrandbits(128)).hex[:4]
        self.tag = tag
        self.pops = {r: [f"{r.lower()}-{c}{self.rng.randint(1, 9)}" for c in CITY.get(r, ("a", "b", "c"))] for r in self.regions}
        self.users: dict[str, list[tuple[str, str, str]]] = {}
        for r in self.regions:
            n = max(20, int(users_per_region * self.regions[r] / max(self.regions.values())))
            self.users[r] = [
                (f"u-{tag}-{r.lower()}{i:05d}", _pick(self.rng, SEGMENTS), f"dev-{tag}-{r.lower()}{i:05d}") for i in range(n)
            ]
        # a surge brings new listeners (twice the usual crowd), not the same ones playing faster
        self.surge_users = {
            r: [(f"u-{tag}-{r.lower()}s{i:05d}", _pick(self.rng, SEGMENTS), f"dev-{tag}-{r.lower()}s{i:05d}") for i in range(2 * len(us))]
            for r, us in self.users.items()
        }
        self.artists = [f"ar-{tag}-{i:04d}" for i in range(300)]
        self.mags = w.magnitudes([p[0] for p in plan])
        self.scenarios = self._place(plan)
        self.produced: dict[str, int] = {"audio": 0, "behavior": 0, "system": 0}
        self.malformed = 0
        self.malformed_kinds: dict[str, int] = {}

    # -- scenario placement (where each incident happens varies with the seed) ----------------

    def _place(self, plan: tuple) -> list[Injected]:
        rng = random.Random(self.seed * 31 + 1)
        regions = list(self.regions)
        rng.shuffle(regions)
        while len(regions) < 6:  # a world of few markets: some incidents share one
            regions += regions[: 6 - len(regions)]
        big = sorted(self.regions, key=self.regions.get, reverse=True)[:2]
        out: list[Injected] = []
        for name, start, dur in plan:
            s, e = self.start_ms + start * 1000, self.start_ms + (start + dur) * 1000
            if name == "cdn_pop_degradation":
                r = regions[0]
                pop = rng.choice(self.pops[r])
                out.append(Injected(name, s, e, r, [{"cdn_pop": pop}], "cdn", "P1", details={"cdn_pop": pop}))
            elif name == "billing_error_spike":
                r = rng.choice(big)
                out.append(Injected(name, s, e, r, [{"service": "payment_gateway", "region": r}, {"service": "premium_billing", "region": r}],
                                    "payment_gateway", "P0"))
            elif name == "fraud_farm":
                r = regions[1]
                n = rng.randint(6, 12)
                accounts = [f"u-{self.tag}-farm{i:03d}" for i in range(n)]
                artist = rng.choice(self.artists)
                out.append(Injected(name, s, e, r, [{"user_id": a} for a in accounts], "streaming_fraud", "P2",
                                    details={"accounts": accounts, "artist_id": artist, "other_country": regions[2]}))
            elif name == "latency_regression":
                r = regions[3]
                svc = rng.choice(["search", "user_auth", "audio_streaming"])
                out.append(Injected(name, s, e, r, [{"service": svc, "region": r}], svc, "P1", details={"service": svc}))
            elif name == "benign_surge":
                # a big market, but not one where another incident could be running at the same time
                busy = {regions[3], regions[4]} if len(set(regions)) > 2 else set()
                r = rng.choice([x for x in big if x not in busy] or [x for x in regions if x not in busy])
                out.append(Injected(name, s, e, r, [], None, None, must_not_page=True))
            elif name == "flapping_metric":
                r = regions[4]
                out.append(Injected(name, s, e, r, [{"service": "recommendation_engine", "region": r}], "recommendation_engine", "P1",
                                    details={"service": "recommendation_engine", "period_s": 30}))
            elif name == "slow_drift":
                r = regions[5]
                svc = rng.choice(["content_catalog", "licensing_service", "ad_server"])
                # memory climbs 45 points over the scenario: it passes the 90% ceiling about 3/4 of the way
                out.append(Injected(name, s, e, r, [{"service": svc, "region": r}], svc, "P2",
                                    details={"service": svc, "metric": "memory_percent", "crosses_at_ms": s + int(dur * 1000 * 35 / 45)}))
            elif name == "malformed_slice":
                out.append(Injected(name, s, e, "", [], details={"per_second": 3}))
            else:
                raise ValueError(f"unknown scenario {name!r}")
            out[-1].details["magnitude"] = round(self._m(name), 3)
        return out

    def _m(self, name: str) -> float:
        """How strong the scenario ``name`` is in this run."""
        return self.magnitude * self.mags.get(name, 1.0)

    def active(self, name: str, t_ms: int) -> Optional[Injected]:
        for sc in self.scenarios:
            if sc.name == name and sc.start_ms <= t_ms < sc.end_ms:
                return sc
        return None

    def ground_truth(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "rate": self.rate,
            "duration_s": self.duration_s,
            "start_ms": self.start_ms,
            "end_ms": self.start_ms + self.duration_s * 1000,
            "scenarios": [s.to_dict() for s in self.scenarios],
            "produced_valid": dict(self.produced),
            "produced_malformed": self.malformed,
            "malformed_kinds": dict(self.malformed_kinds),
        }

    # -- traffic ---------------------------------------------------------------------------

    def ticks(self) -> Iterator[Batch]:
        """All batches, tick by tick (one simulated second each), in event-time order."""
        for sec in range(self.duration_s):
            yield from self.tick(self.start_ms + sec * 1000)

    def _count(self, mean: float) -> int:
        # Poisson-ish count per tick, cheap: floor of the mean plus a Bernoulli on the rest
        base = int(mean)
        return base + (1 if self.rng.random() < mean - base else 0)

    def tick(self, t: int) -> Iterator[Batch]:
        rng = self.rng
        surge = self.active("benign_surge", t)
        audio: dict[str, list] = {}
        volume = self.world.volume(t)
        n_audio = self._count(self.rate * 0.55 * volume)
        for _ in range(n_audio):
            region = _pick(rng, self.regions)
            audio.setdefault(region, []).append(self._audio(t + rng.randrange(1000), region))
        if surge:  # tripled traffic in the surge region
            for _ in range(int(n_audio * self.regions[surge.region] * 2)):
                audio.setdefault(surge.region, []).append(self._audio(t + rng.randrange(1000), surge.region))
        for region, recs in audio.items():
            self.produced["audio"] += len(recs)
            yield Batch("audio", region, recs)

        behavior: dict[str, list] = {}
        n_beh = self._count(self.rate * 0.40 * volume)
        for _ in range(n_beh):
            region = _pick(rng, self.regions)
            reps = 3 if surge and region == surge.region else 1
            for rep in range(reps):
                for rec in self._behavior(t + rng.randrange(1000), region, surge_crowd=rep > 0):
                    behavior.setdefault(rec["user_id"], []).append(rec)
        farm = self.active("fraud_farm", t)
        if farm:
            for rec in self._fraud(t, farm):
                behavior.setdefault(rec["user_id"], []).append(rec)
        for user, recs in behavior.items():
            self.produced["behavior"] += len(recs)
            yield Batch("behavior", user, recs)

        if (t - self.start_ms) % 10_000 == 0:
            system: dict[str, list] = {}
            for svc in SERVICES:
                for region in self.regions:
                    for inst in range(2):
                        system.setdefault(svc, []).append(self._system(t + inst * 37, svc, region, inst))
            for svc, recs in system.items():
                self.produced["system"] += len(recs)
                yield Batch("system", svc, recs)

        bad = self.active("malformed_slice", t)
        if bad:
            yield from self._malformed(t, int(bad.details["per_second"]))

    def _audio(self, ts: int, region: str) -> dict[str, Any]:
        rng = self.rng
        user, segment, _dev = rng.choice(self.users[region])
        pop = rng.choice(self.pops[region])
        requested = 160 if segment == "free" else 320
        w = self.world
        bitrate = requested * (1 - abs(rng.gauss(0, w.bitrate_noise)))
        latency = rng.lognormvariate(math.log(w.latency(region)), w.latency_sigma)
        buffering = 0.0 if rng.random() < 1 - w.buffering_share else rng.uniform(0, 0.02)
        health = rng.uniform(92, 100)
        loss = abs(rng.gauss(w.packet_loss, w.packet_loss))
        cdn = self.active("cdn_pop_degradation", ts)
        if cdn and cdn.details["cdn_pop"] == pop:
            m = self._m("cdn_pop_degradation")
            bitrate *= 1 - 0.5 * m
            buffering = min(1.0, rng.uniform(0.06, 0.16) * m)
            latency *= 1 + 3 * m
            health = max(0.0, health - 35 * m)
            loss = min(100.0, loss + 1.5 * m)
        return {
            "event_id": f"a-{rng.getrandbits(48):012x}",
            "ts": ts,
            "session_id": f"s-{user}",
            "user_id": user,
            "track_id": f"tr-{rng.randrange(5000):05d}",
            "region": region,
            "cdn_pop": pop,
            "device": _pick(rng, DEVICES),
            "network": _pick(rng, NETWORKS),
            "user_segment": segment,
            "bitrate_kbps": round(bitrate, 1),
            "requested_bitrate_kbps": requested,
            "latency_ms": round(latency, 1),
            "buffering_ratio": round(buffering, 4),
            "buffer_health_percent": round(health, 1),
            "packet_loss_percent": round(loss, 3),
            "cdn_hit_rate": round(rng.uniform(0.95, 0.99), 3),
            "codec": "ogg",
        }

    def _behavior(self, ts: int, region: str, surge_crowd: bool = False) -> list[dict[str, Any]]:
        rng = self.rng
        user, segment, device = rng.choice((self.surge_users if surge_crowd else self.users)[region])
        w = self.world
        et = _pick(rng, w.behavior)
        base = {
            "ts": ts, "user_id": user, "session_id": f"s-{user}", "device_id": device,
            "country": region, "user_segment": segment,
        }
        out = []
        if et == "play_start":
            track, artist = f"tr-{rng.randrange(5000):05d}", rng.choice(self.artists)
            out.append({**base, "event_type": "play_start", "track_id": track, "artist_id": artist})
            skip_p = w.skip_per_play
            if self.active("cdn_pop_degradation", ts) and region == self.active("cdn_pop_degradation", ts).region:
                skip_p = w.skip_per_play + 0.25 * self._m("cdn_pop_degradation")
            if rng.random() < w.crash_per_play:
                out.append({**base, "event_type": "app_crash", "error_code": "E_CRASH"})
            elif rng.random() < skip_p:
                out.append({**base, "event_type": "skip", "track_id": track, "artist_id": artist, "listen_ms": rng.randrange(5000, 30000),
                            "track_duration_ms": 200_000})
            else:
                out.append({**base, "event_type": "play_complete", "track_id": track, "artist_id": artist,
                            "listen_ms": 200_000, "track_duration_ms": 200_000})
        elif et == "payment_attempt":
            pm = f"pm-{user}"
            out.append({**base, "event_type": "payment_attempt", "amount": 10.99, "currency": "USD", "payment_method_id": pm})
            billing = self.active("billing_error_spike", ts)
            fail_p = w.payment_failure + (0.4 * self._m("billing_error_spike") if billing and billing.region == region else 0.0)
            if rng.random() < fail_p:
                out.append({**base, "event_type": "payment_failure", "amount": 10.99, "currency": "USD", "error_code": "PAY_DECLINED",
                            "payment_method_id": pm})
            else:
                out.append({**base, "event_type": "payment_success", "amount": 10.99, "currency": "USD", "payment_method_id": pm})
        elif et == "ad_impression":
            out.append({**base, "event_type": "ad_failure" if rng.random() < w.ad_failure else "ad_impression"})
        elif et == "app_crash":  # a crash outside playback (background rate of the world)
            out.append({**base, "event_type": "app_crash", "error_code": "E_CRASH"})
        elif et == "skip":  # a skip without its play in this batch (the play came earlier)
            out.append({**base, "event_type": "skip", "track_id": f"tr-{rng.randrange(5000):05d}", "artist_id": rng.choice(self.artists),
                        "listen_ms": rng.randrange(5000, 30000), "track_duration_ms": 200_000})
        else:
            out.append({**base, "event_type": et})
        for rec in out:
            rec["event_id"] = f"b-{rng.getrandbits(48):012x}"
        return out

    def _fraud(self, t: int, farm: Injected) -> list[dict[str, Any]]:
        rng = self.rng
        out = []
        per_second = 450 / 3600 * self._m("fraud_farm")  # plays per account per second
        for i, user in enumerate(farm.details["accounts"]):
            if rng.random() >= per_second:
                continue
            country = farm.region if rng.random() < 0.7 else farm.details["other_country"]
            base = {"ts": t + rng.randrange(1000), "user_id": user, "session_id": f"s-{user}-{rng.randrange(50)}",
                    "device_id": f"farmdev-{self.tag}-{i}-{rng.randrange(6)}", "country": country, "user_segment": "free"}
            track = f"tr-{rng.randrange(40):05d}"
            out.append({**base, "event_id": f"b-{rng.getrandbits(48):012x}", "event_type": "play_start", "track_id": track,
                        "artist_id": farm.details["artist_id"]})
            out.append({**base, "event_id": f"b-{rng.getrandbits(48):012x}", "event_type": "skip", "track_id": track,
                        "artist_id": farm.details["artist_id"], "listen_ms": 31_000, "track_duration_ms": 180_000})
        return out

    def _system(self, ts: int, svc: str, region: str, inst: int) -> dict[str, Any]:
        rng = self.rng
        p95, err, rps = SERVICES[svc]
        surge = self.active("benign_surge", ts)
        load = 3.0 if surge and surge.region == region else 1.0
        w = self.world
        p95 = p95 * rng.gauss(1, w.system_noise) * (1 + 0.08 * (load - 1) / 2)
        if w.spike_rate and rng.random() < w.spike_rate:  # the heavy tail: a GC pause, a slow disk
            p95 *= rng.lognormvariate(0.4, 0.3)
        err = max(0.0, err * rng.gauss(1, w.error_noise))
        cpu = min(99.0, rng.gauss(38, 2) * (1 + 0.35 * (load - 1) / 2))
        m = self._m("cdn_pop_degradation")
        cdn = self.active("cdn_pop_degradation", ts)
        if cdn and svc == "cdn" and region == cdn.region:
            err += 0.06 * m
            p95 *= 1 + 1.5 * m
        billing = self.active("billing_error_spike", ts)
        m = self._m("billing_error_spike")
        if billing and svc in ("payment_gateway", "premium_billing") and region == billing.region:
            err += (0.3 if svc == "payment_gateway" else 0.2) * m
        lat = self.active("latency_regression", ts)
        m = self._m("latency_regression")
        if lat and svc == lat.details["service"] and region == lat.region:
            p95 *= 1 + 2 * m
        flap = self.active("flapping_metric", ts)
        m = self._m("flapping_metric")
        if flap and svc == "recommendation_engine" and region == flap.region:
            if ((ts - flap.start_ms) // 1000 // flap.details["period_s"]) % 2 == 0:
                p95 = 400 * (1 + 0.15 * m)  # just above the 400 ms SLO, then back to normal
        memory = rng.gauss(55, 1.5)
        drift = self.active("slow_drift", ts)
        m = self._m("slow_drift")
        if drift and svc == drift.details["service"] and region == drift.region:
            memory += 45 * m * (ts - drift.start_ms) / (drift.end_ms - drift.start_ms)
        return {
            "ts": ts,
            "service": svc,
            "region": region,
            "instance": f"{svc}-{region.lower()}-{inst}",
            "metrics": {
                "latency_p50_ms": round(p95 * 0.45, 2),
                "latency_p95_ms": round(p95, 2),
                "latency_p99_ms": round(p95 * 1.6, 2),
                "error_rate": round(min(err, 1.0), 5),
                "requests_per_s": round(rps * load * rng.gauss(1, 0.05), 1),
                "cpu_percent": round(cpu, 1),
                "memory_percent": round(min(memory, 100.0), 1),
            },
        }

    def _malformed(self, t: int, n: int) -> Iterator[Batch]:
        """Unreadable records, each kind in turn; one per batch, mixed with good records sometimes."""
        kinds = ["invalid_json", "missing_field", "nan", "negative_latency", "ratio_out_of_range", "future_ts", "not_an_object"]
        for _ in range(n):
            kind = kinds[self.malformed % len(kinds)]
            region = _pick(self.rng, self.regions)
            good = self._audio(t + self.rng.randrange(1000), region)
            bad: Any = dict(good)
            if kind == "invalid_json":
                raw = b'{"event_id": "x", "ts": 17000'  # truncated
            elif kind == "nan":
                raw = orjson.dumps(good)[:-1] + b', "latency_ms": NaN}'
            else:
                if kind == "missing_field":
                    del bad["user_id"]
                elif kind == "negative_latency":
                    bad["latency_ms"] = -12.5
                elif kind == "ratio_out_of_range":
                    bad["buffering_ratio"] = 1.7
                elif kind == "future_ts":
                    bad["ts"] = t + 30 * 24 * 3600 * 1000
                elif kind == "not_an_object":
                    bad = ["not", "an", "object"]
                raw = None
            self.malformed += 1
            self.malformed_kinds[kind] = self.malformed_kinds.get(kind, 0) + 1
            if raw is not None:
                yield Batch("audio", region, [raw], malformed=1)
            else:
                # a bad record inside an array of good ones: the good ones must survive
                self.produced["audio"] += 1
                yield Batch("audio", region, [good, bad], malformed=1)


def encode(batch: Batch, max_per_message: int) -> Iterator[bytes]:
    """Kafka message values for a batch: JSON arrays of at most ``max_per_message`` records
    (a single object when it is 1). Raw malformed bytes always go alone."""
    recs = batch.records
    if any(isinstance(r, (bytes, bytearray)) for r in recs):
        for r in recs:
            yield r if isinstance(r, (bytes, bytearray)) else orjson.dumps(r)
        return
    if max_per_message <= 1:
        for r in recs:
            yield orjson.dumps(r)
        return
    for i in range(0, len(recs), max_per_message):
        yield orjson.dumps(recs[i : i + max_per_message])
