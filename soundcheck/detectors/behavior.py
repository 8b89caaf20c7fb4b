"""User behaviour: population rates per region, and streaming fraud per user.

* Population: per region and event-time window, the counts of each event type become rates
  (skip, crash, payment failure, cancellation, ad failure); each rate with a large enough
  denominator goes to the region's :class:`RobustBaseline`.
* Fraud: :class:`FraudDetector` keeps bounded per-user counters over a sliding window (plays,
  completions, devices, countries, artists, payment methods), packed into one fixed-size row
  of bytes per user (:class:`FraudState`), and scores them into a fraud probability with its
  reasons.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from collections import deque
from statistics import NormalDist
from dataclasses import dataclass, field

from scipy.stats import binom
from typing import Any, Generator, Iterator, Mapping, Sequence

import numpy as np

from ..ingest.partials import EVENT_INDEX, EVENT_TYPES
from ..settings import Settings
from .base import Anomaly, Finding, WindowedDetector, false_alarm_budget, make_baseline
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
    learned: dict = field(default_factory=dict)  # per rate: denominator events behind its baseline (decayed as the baseline forgets)


def rate_surprise(k: float, n: float, p0: float, learned: float) -> float:
    """How surprising ``k`` events in ``n`` are for a rate whose baseline ``p0`` rests on
    ``learned`` events, as a one-sided normal deviate: the exact binomial tail of ``k`` or more
    (right for a handful of events, where a z-score of the proportion is far too sure), at the
    top of the baseline's own uncertainty (two standard errors over ``p0``: a baseline that
    has seen few events is not trusted to the third decimal).

    >>> round(rate_surprise(10, 60, 0.02, 10_000), 1)  # ten failures in sixty at a settled 2% (a z of the proportion says 8.1)
    4.8
    >>> round(rate_surprise(10, 60, 0.02, 200), 1)  # ... against a baseline of 200 events only
    3.7
    >>> rate_surprise(450, 1000, 0.02, 100_000) > 30  # 45% of a thousand payments failing
    True
    >>> rate_surprise(1, 60, 0.02, 10_000) <= 0.0
    True
    """
    if n <= 0 or k <= 0:
        return 0.0
    p_hi = min(1.0, p0 + 2.0 * math.sqrt(max(p0 * (1 - p0), 1e-9) / max(learned, 1.0)))
    tail = float(binom.sf(k - 1, int(round(n)), p_hi))  # P(K >= k)
    if tail >= 0.5:
        return 0.0
    return -NormalDist().inv_cdf(max(tail, 1e-300))


def wilson_interval(k: float, n: float, z: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n`` at ``z`` standard deviations: unlike
    ``p +- z * se`` it stays inside [0, 1] and is right for small counts.

    >>> lo, hi = wilson_interval(3, 50, 4.0); round(lo, 3), round(hi, 3)
    (0.008, 0.325)
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


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
        # a limit counts as breached when the rate's whole confidence interval is past it, at the
        # confidence the false-alarm budget allows (a Wilson interval: right for small counts too)
        budget = false_alarm_budget(settings, len(RATES))
        self.z_limit = NormalDist().inv_cdf(1.0 - budget) if budget > 0 else 2.0
        super().__init__(settings, source_topic)

    def new_state(self) -> "_RegionRates":
        return _RegionRates(make_baseline(self.settings, self.directions, self.limits), deque(maxlen=self.rate_windows))

    def findings(self, agg: WindowAggregate) -> list[Finding]:
        region = agg.key
        state = self.entities.get(region, agg.end)
        baseline, recent = state.baseline, state.recent
        learned = getattr(state, "learned", None)
        if learned is None:  # a snapshot from before the field
            learned = state.learned = {}
        keep = 1.0 - float(self.settings.detection["fading_factor"])
        # rates over a sliding span of the last few windows: rare events need the counts
        recent.append(agg.sums)
        sums = np.sum(recent, axis=0)
        x: dict[str, float] = {}
        spread: dict[str, float] = {}
        counts: dict[str, float] = {}
        bound: dict[str, float] = {}
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
            settled = baseline.expected(name)
            if settled is not None and self.directions.get(name) == "up" and x[name] > settled:
                # judged by the exact tail of the counts, not the normal approximation: the spread
                # that makes the baseline's deviation that many standard deviates
                z = max(rate_surprise(k, d, settled, learned.get(name, 0.0)), 0.01)
                spread[name] = (x[name] - settled) / z
            learned[name] = learned.get(name, 0.0) * keep + float(agg.sums[den].sum())
            counts[name] = k
            lo, hi = wilson_interval(k, d, self.z_limit)
            bound[name] = lo if self.directions.get(name) != "down" else hi
        if not x:
            return []
        by_node: dict[str, list[Signal]] = {}
        for s in baseline.update_one(x, agg.end, spread, bound):
            by_node.setdefault(self.settings.metric_spec(s.metric).get("node", "client_experience"), []).append(s)
        details = {"rates": {k: round(v, 4) for k, v in x.items()}, "span_s": len(recent) * (agg.end - agg.start) // 1000}
        return [
            Finding(KIND_OF_RATE.get(sigs[0].metric, "behavior_rate_anomaly"), {"region": region, "service": node}, region, node, sigs,
                    int(max(counts.get(s.metric, 0) for s in sigs)), details)
            for node, sigs in by_node.items()
        ]


# ---------------------------------------------------------------------------------------------
# Streaming fraud
#
# Per-user state is packed: one fixed-size row of bytes per tracked user (about 210) in one
# numpy array, :class:`FraudState`, found through a sorted array of 64-bit user hashes; no
# Python object per user stays in memory. A batch unpacks the rows of the users it touches
# into flat lists of the row's values (a user's "activity", laid out by :class:`_Codec`), counts
# its events there, scores them and packs them back. A row holds:
#
# * last seen (event ms, int64), first seen and last reported (int32 ms before last seen);
# * plays and completions in buckets of ``bucket_ms`` (10 minutes over the hour; a ring of
#   ``n_buckets``, uint16 counts, with when in the bucket its first and last event were, in
#   256ths): the bucket the window starts in counts for the part of its events after the start;
# * devices, countries, artists and payment methods, each with a 16-bit stamp of when it was last
#   seen (event seconds modulo 65536: enough to tell ages within a few windows apart; a user idle
#   for longer than the window has none left), in the order first seen; at most as many as the
#   probability can tell apart (twice ``max_devices``; ``max_countries`` + 2; twice
#   ``max_payment_method_changes``, + 1), the least recently seen one making room: the counts in
#   the window are exact up to there, and more would not change the score;
# * devices and artists as stable 64-bit hashes (blake2b: the same in every process, unlike
#   ``hash()``), payment methods as 32-bit ones (only told apart within one user), countries and
#   segments as indexes into small shared tables, artist ids also in a shared table (swept of the
#   artists no tracked user refers to) so that the links and top artists carry the real ids; device
#   links are the hex of the device hash, the same for every user;
# * the top ``TOP_ARTISTS`` artists with their play counts, and one count for the rest: a new
#   artist takes the place of the least played one, whose plays go to the rest.

NEVER = -(2**62)
BUCKET_MS = 600_000  # plays and completions are counted in buckets of 10 minutes (at most a sixth of the window)
TOP_ARTISTS = 3
MAX_SEGMENTS = 255  # shared tables: segments (uint8), countries (uint16); past these, new ones share the last entry
MAX_COUNTRIES = 4096
ARTIST_NAMES_MIN = 8192  # the shared artist ids are swept of unreferenced ones past twice the live count (at least this)
_U16 = 0xFFFF
_HALF = 0x8000
_I32 = (-(2**31), 2**31 - 1)
# an activity's fixed places: the row's first values, then three after the row's
_SEEN, _FIRST, _REPORTED, _HEAD, _SEGMENT = range(5)
_ACTIVE, _SLOT, _KEY = -3, -2, -1  # any plays or completions in the ring; the row (-1: new); the user's hash


def _h64(value: Any) -> int:
    """A stable 64-bit hash of an id: blake2b, the same in every process (never Python's salted
    ``hash()``); 0 and 1 are reserved ("empty", None).

    >>> _h64("artist-1") == _h64("artist-1") != _h64("artist-2"), f"{_h64('u_0123456789abcdef0123'):016x}"
    (True, '02a9e6394167c3aa')
    """
    if value is None:
        return 1
    h = int.from_bytes(hashlib.blake2b(str(value).encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h if h > 1 else h + 2


def fraud_layout(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """A row's ``(devices, countries, artists, payment methods, buckets, bucket ms, stamp unit ms)``.

    >>> fraud_layout({"window_s": 3600, "max_devices": 3, "max_countries": 1, "max_payment_method_changes": 2})
    (6, 3, 3, 5, 8, 600000, 1000)
    """
    window_ms = int(cfg["window_s"]) * 1000
    md, mc, mp = int(cfg["max_devices"]), int(cfg["max_countries"]), int(cfg["max_payment_method_changes"])
    bucket_ms = max(10_000, min(BUCKET_MS, window_ms // 6 // 1000 * 1000))
    n_buckets = -(-window_ms // bucket_ms) + 2
    unit_ms = 1000 * max(1, -(-window_ms * 8 // (_HALF * 1000)))  # 16-bit stamps reach 8 windows either way
    return (max(2 * md, md + 1), mc + 2, TOP_ARTISTS, mp + max(mp, 1) + 1, n_buckets, bucket_ms, unit_ms)


class _Codec:
    """The packed row of a layout: a ``struct`` for one row, a numpy dtype for its columns, and
    where each field starts in the unpacked values (``codec.plays``, ``codec.dev`` ...)."""

    def __init__(self, layout: tuple[int, ...]) -> None:
        nd, nc, na, npm, nb, self.bucket_ms, self.unit_ms = layout
        self.nd, self.nc, self.na, self.npm, self.nb = nd, nc, na, npm, nb
        spec = (("seen", "q", 1), ("first", "i", 1), ("reported", "i", 1), ("head", "i", 1), ("segment", "B", 1),
                ("plays", "H", nb), ("completes", "H", nb), ("b_first", "B", nb), ("b_last", "B", nb),
                ("dev", "Q", nd), ("dev_t", "H", nd), ("cty", "H", nc), ("cty_t", "H", nc),
                ("art", "Q", na), ("art_n", "H", na), ("art_t", "H", na), ("other", "H", 2),
                ("pay", "I", npm), ("pay_t", "H", npm))
        np_code = {"q": "<i8", "i": "<i4", "B": "u1", "H": "<u2", "Q": "<u8", "I": "<u4"}
        self.struct = struct.Struct("<" + "".join(f"{n}{c}" for _, c, n in spec))
        self.dtype = np.dtype([(name, np_code[c], (n,)) if n > 1 else (name, np_code[c]) for name, c, n in spec])
        assert self.dtype.itemsize == self.struct.size
        self.size = self.struct.size
        i = 0
        for name, _, n in spec:
            setattr(self, name, i)
            i += n
        self.n = i  # values in a row
        blank = [0] * (i + 3)
        blank[_REPORTED] = NEVER
        self.blank = blank


@functools.lru_cache(maxsize=16)
def _codec(layout: tuple[int, ...]) -> _Codec:
    return _Codec(layout)


def _drop(u: list, j: int, starts: Sequence[int], n: int) -> None:
    """Take item ``j`` out of the groups of ``n`` places at ``starts``; the later ones move up."""
    for g in starts:
        del u[g + j]
        u.insert(g + n - 1, 0)


def _note(u: list, key: int, t: int, at: int, at_t: int, n: int) -> None:
    """Note ``key`` seen at stamp ``t`` in the group of ``n`` places at ``at`` (stamps at ``at_t``);
    when it is full, the least recently seen one makes room (so the count is exact up to ``n``)."""
    try:
        j = u.index(key, at, at + n) - at
    except ValueError:
        if u[at + n - 1]:
            _drop(u, max(range(n), key=lambda i: (t - u[at_t + i] + _HALF) & _U16), (at, at_t), n)
            j = n - 1
        else:
            j = u.index(0, at, at + n) - at
        u[at + j] = key
    u[at_t + j] = t


def _expire(u: list, s: int, starts: Sequence[int], at_t: int, n: int) -> int:
    """Drop the items of a group last seen before stamp ``s`` (by less than half the stamps' range);
    returns how many are left."""
    at = starts[0]
    if not u[at]:
        return 0
    left = n - u[at:at + n].count(0)
    for j in range(left - 1, -1, -1):
        if 0 < (s - u[at_t + j]) & _U16 < _HALF:
            _drop(u, j, starts, n)
            left -= 1
    return left


def _smallest(values: np.ndarray, m: int) -> np.ndarray:
    """Positions of the ``m`` smallest values, ties by position (deterministic, linear).

    >>> _smallest(np.array([5, 1, 3, 1, 3]), 3).tolist()
    [1, 3, 2]
    """
    if m >= len(values):
        return np.arange(len(values))
    kth = np.partition(values, m - 1)[m - 1]
    below = np.flatnonzero(values < kth)
    return np.concatenate([below, np.flatnonzero(values == kth)[: m - len(below)]])


@dataclass(eq=False)
class FraudState:
    """The fraud detector's per-user state, packed (see the section's comment): what snapshots keep.

    Reads like the ``OrderedDict`` of an :class:`~soundcheck.detectors.base.EntityStore` where
    the snapshot code and tests look: ``len``, ``keys()`` (user hashes), ``state[key]`` (the
    row's values), ``popitem(last=False)`` (drops the least recently seen user).
    """

    layout: tuple
    rows: np.ndarray  # (capacity, row bytes) uint8
    keys_: np.ndarray  # uint64, sorted: the tracked users' hashes
    slots: np.ndarray  # int32: the row of each
    free: np.ndarray  # int32: rows free for reuse (taken from the end)
    used: int = 0  # rows handed out so far (rows[used:] never were)
    clock: int = 0  # the event time the rows were last written at (what their stamps are near)
    oldest: int = 2**62  # at most the least recent last-seen time of a tracked user
    segments: list = field(default_factory=lambda: [""])
    segment_ix: dict = field(default_factory=lambda: {"": 0})
    countries: list = field(default_factory=lambda: [""])  # index 0: none
    country_ix: dict = field(default_factory=dict)
    artist_names: dict = field(default_factory=dict)  # artist hash -> artist id
    artist_gc_at: int = ARTIST_NAMES_MIN

    @classmethod
    def empty(cls, layout: tuple) -> "FraudState":
        layout = tuple(layout)
        return cls(layout, np.zeros((0, _codec(layout).size), np.uint8), np.zeros(0, np.uint64),
                   np.zeros(0, np.int32), np.zeros(0, np.int32))

    # -- the mapping face (snapshots, tests) ---------------------------------------------------

    def _settle(self) -> None:
        """Carry out the removals :meth:`popitem` deferred."""
        gone = self.__dict__.pop("_gone", None)
        self.__dict__.pop("_order", None)
        if gone:
            self.remove(np.sort(np.array(gone, np.int64)))

    def __getstate__(self) -> dict:
        self._settle()
        return dict(self.__dict__)

    def __len__(self) -> int:
        return len(self.keys_) - len(self.__dict__.get("_gone", ()))

    def keys(self) -> Iterator[int]:
        self._settle()
        return iter(self.keys_.tolist())

    __iter__ = keys

    def __getitem__(self, key: int) -> tuple:
        self._settle()
        i = int(np.searchsorted(self.keys_, np.uint64(key)))
        if i >= len(self.keys_) or int(self.keys_[i]) != key:
            raise KeyError(key)
        return self.row(int(self.slots[i]))

    def items(self) -> Iterator[tuple[int, tuple]]:
        return ((k, self[k]) for k in list(self.keys()))

    def popitem(self, last: bool = True) -> tuple[int, tuple]:
        """Drop the most (``last``) or the least recently seen user; removals are carried out in bulk
        by the next other call (restoring trims a snapshot to ``max_users`` one user at a time)."""
        if len(self) == 0:
            raise KeyError("popitem(): no users")
        order = self.__dict__.get("_order")
        if order is None:
            seen = self.column("seen")[self.slots]
            order = self.__dict__["_order"] = np.argsort(seen, kind="stable")[::-1].tolist()  # least recent last
            self.__dict__["_gone"] = []
        pos = order.pop(0 if last else -1)
        self.__dict__["_gone"].append(pos)
        return int(self.keys_[pos]), self.row(int(self.slots[pos]))

    # -- rows and the index ------------------------------------------------------------------

    def buffer(self) -> Any:
        """The rows as one writable byte buffer (for ``struct``); None while there are none."""
        return self.rows.data.cast("B") if self.rows.size else None

    def row(self, slot: int) -> tuple:
        c = _codec(self.layout)
        return c.struct.unpack_from(self.buffer(), slot * c.size)

    def column(self, name: str) -> np.ndarray:
        return self.rows.reshape(-1).view(_codec(self.layout).dtype)[name]

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The rows of these user hashes (-1: not tracked)."""
        if not len(self.keys_):
            return np.full(len(keys), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.keys_, keys), len(self.keys_) - 1)
        return np.where(self.keys_[pos] == keys, self.slots[pos], -1)

    def allocate(self, n: int, limit: int) -> np.ndarray:
        """``n`` free rows; the table grows by an eighth at a time, not past ``limit`` rows unless it must."""
        take = min(n, len(self.free))
        out = self.free[len(self.free) - take:][::-1].astype(np.int32)
        self.free = self.free[: len(self.free) - take].copy()
        n -= take
        if n:
            cap = len(self.rows)
            if self.used + n > cap:
                grown = max(self.used + n, min(cap + max(1024, cap // 8), limit))
                rows = np.zeros((grown, self.rows.shape[1]), np.uint8)
                rows[:cap] = self.rows
                self.rows = rows
            out = np.concatenate([out, np.arange(self.used, self.used + n, dtype=np.int32)])
            self.used += n
        return out

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        keys, slots = keys[order], slots[order]
        pos = np.searchsorted(self.keys_, keys)
        self.keys_ = np.insert(self.keys_, pos, keys)
        self.slots = np.insert(self.slots, pos, slots)

    def remove(self, positions: np.ndarray) -> None:
        """Stop tracking the users at these positions of the index; their rows become free."""
        if not len(positions):
            return
        freed = self.slots[positions]
        self.rows[freed] = 0
        self.free = np.concatenate([self.free, freed.astype(np.int32)])
        self.keys_ = np.delete(self.keys_, positions)
        self.slots = np.delete(self.slots, positions)

    def sweep_artists(self) -> None:
        """Forget the artist ids no tracked user refers to any more."""
        live = set(np.unique(self.column("art")[self.slots]).tolist()) if len(self.slots) else set()
        self.artist_names = {h: a for h, a in self.artist_names.items() if h in live}
        self.artist_gc_at = max(ARTIST_NAMES_MIN, 2 * len(self.artist_names))

    # -- shared tables -----------------------------------------------------------------------

    def segment_index(self, segment: Any) -> int:
        i = self.segment_ix.get(segment)
        if i is None:
            if len(self.segments) >= MAX_SEGMENTS:
                return MAX_SEGMENTS - 1
            i = self.segment_ix[segment] = len(self.segments)
            self.segments.append(segment)
        return i

    def country_index(self, country: Any) -> int:
        i = self.country_ix.get(country)
        if i is None:
            if len(self.countries) >= MAX_COUNTRIES:
                return MAX_COUNTRIES - 1
            i = self.country_ix[country] = len(self.countries)
            self.countries.append(country)
        return i

    # -- pack / unpack -----------------------------------------------------------------------

    def unpack(self, slot: int, key: int, now: int, window_ms: int, buf: Any = None) -> list:
        """A user's activity: its row's values (first seen and last reported as event ms), then
        whether its ring has counts, its row and its hash."""
        c = _codec(self.layout)
        u = list(c.struct.unpack_from(self.buffer() if buf is None else buf, slot * c.size))
        seen = u[_SEEN]
        u[_FIRST] = seen - u[_FIRST]
        u[_REPORTED] = seen - u[_REPORTED]
        if seen < now - window_ms - c.bucket_ms:  # idle for longer than the window: its items are all out of it
            u[c.dev:] = c.blank[c.dev:c.n]
        u += (any(u[c.plays:c.b_first]), slot, key)
        return u

    def pack(self, u: list, slot: int, buf: Any = None) -> None:
        c = _codec(self.layout)
        v = u[: c.n]
        seen = v[_SEEN]
        v[_FIRST] = max(_I32[0], min(seen - v[_FIRST], _I32[1]))
        v[_REPORTED] = max(_I32[0], min(seen - v[_REPORTED], _I32[1]))
        c.struct.pack_into(self.buffer() if buf is None else buf, slot * c.size, *v)

    def relayout(self, layout: tuple, window_ms: int) -> "FraudState":
        """The same users in rows of another layout (the limits or the window changed)."""
        self._settle()
        layout = tuple(layout)
        out = FraudState.empty(layout)
        for name in ("clock", "oldest", "segments", "segment_ix", "countries", "country_ix", "artist_names", "artist_gc_at"):
            setattr(out, name, getattr(self, name))
        old, new = _codec(self.layout), _codec(layout)
        clock_u = self.clock // old.unit_ms + _HALF  # a stamp t is the time clock_u - ((clock_u - t) & 0xFFFF), in units

        def restamp(t: int) -> int:
            return (clock_u - ((clock_u - t) & _U16)) * old.unit_ms // new.unit_ms & _U16

        slots = out.allocate(len(self.keys_), len(self.keys_))
        for slot, key, to in zip(self.slots.tolist(), self.keys_.tolist(), slots.tolist()):
            u = self.unpack(slot, key, self.clock, window_ms)
            v = new.blank[: new.n]
            v[:5] = u[:5]
            if (new.bucket_ms, new.nb) == (old.bucket_ms, old.nb):
                v[new.plays:new.dev] = u[old.plays:old.dev]
            else:  # the counts into the new buckets, spread over each
                head = v[_HEAD] = u[_HEAD] * old.bucket_ms // new.bucket_ms
                for i in range(old.nb):
                    k = (u[_HEAD] - (u[_HEAD] - i) % old.nb) * old.bucket_ms // new.bucket_ms
                    if head - new.nb < k:
                        j = k % new.nb
                        v[new.plays + j] = min(v[new.plays + j] + u[old.plays + i], _U16)
                        v[new.completes + j] = min(v[new.completes + j] + u[old.completes + i], _U16)
                        v[new.b_last + j] = 255
            for (at, at_t, n), (to_at, to_t, cap) in (((old.dev, old.dev_t, old.nd), (new.dev, new.dev_t, new.nd)),
                                                     ((old.cty, old.cty_t, old.nc), (new.cty, new.cty_t, new.nc)),
                                                     ((old.pay, old.pay_t, old.npm), (new.pay, new.pay_t, new.npm))):
                items = [(u[at + j], u[at_t + j]) for j in range(n) if u[at + j]]
                while len(items) > cap:  # the least recently seen go
                    items.remove(max(items, key=lambda x: (clock_u - x[1]) & _U16))
                for j, (h, t) in enumerate(items):
                    v[to_at + j], v[to_t + j] = h, restamp(t)
            artists = [(u[old.art + j], u[old.art_n + j], u[old.art_t + j]) for j in range(old.na) if u[old.art + j]]
            other = [u[old.other], u[old.other + 1]]
            while len(artists) > new.na:  # the least played give their place; their plays go to the rest
                least = min(artists, key=lambda x: x[1])
                artists.remove(least)
                other = [other[0] + least[1], least[2]]
            for j, (h, n, t) in enumerate(artists):
                v[new.art + j], v[new.art_n + j], v[new.art_t + j] = h, n, restamp(t)
            v[new.other], v[new.other + 1] = min(other[0], _U16), restamp(other[1]) if other[0] else 0
            out.pack(v, to)
        out.keys_, out.slots = self.keys_.copy(), slots
        return out


#: records (or users loaded, scored, stored) per step of FraudDetector.process_steps: 1-3 ms. Every
#: step is a turn of the worker's event loop, and faust-streaming's consumer hands over one message
#: per turn, so this bounds how long a region's aggregates wait behind the fraud stage's window
STEP_RECORDS = 500
# the fields of a fraud record (FraudEvent's order)
_TS, _USER, _ET, _DEV, _CTY, _SEG, _ARTIST, _PM = range(8)


def drain(steps: Generator[None, None, Any]) -> Any:
    """Run a generator of steps to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class FraudUsers:
    """The users a :class:`FraudDetector` tracks: at most ``max_entries``, the least recently seen
    dropped first (counted in ``evicted``), users idle for ``idle_ms`` of event time dropped by
    :meth:`expire`. ``_items`` is the state (:class:`FraudState`) snapshots keep and restore.

    A batch's new users past ``max_entries`` push the least recently seen out when the batch is
    stored, after all its users were scored (so one batch never holds more than its own users).
    """

    def __init__(self, layout: tuple, max_entries: int, idle_ms: int) -> None:
        self.layout = tuple(layout)
        self.max_entries = max_entries
        self.idle_ms = idle_ms
        self.evicted = 0
        self.state = FraudState.empty(self.layout)

    @property
    def _items(self) -> FraudState:
        return self.state

    @_items.setter
    def _items(self, state: FraudState) -> None:
        state._settle()
        self.state = state if tuple(state.layout) == self.layout else state.relayout(self.layout, self.idle_ms)

    def __len__(self) -> int:
        return len(self.state)

    def keys(self) -> Iterator[int]:
        return self.state.keys()

    def load(self, user_ids: Sequence[Any], now: int) -> dict[Any, list]:
        """The activity of these users (see :meth:`FraudState.unpack`; new users: empty)."""
        return drain(self.load_steps(user_ids, now))

    def load_steps(self, user_ids: Sequence[Any], now: int, step: int = STEP_RECORDS) -> Generator[None, None, dict[Any, list]]:
        """:meth:`load` in steps of ``step`` users (see :meth:`FraudDetector.process_steps`)."""
        st = self.state
        st._settle()
        keys = [_h64(uid) for uid in user_ids]
        slots = st.find(np.array(keys, np.uint64)).tolist()
        buf, blank = st.buffer(), _codec(self.layout).blank  # (nothing moves the rows while this runs)
        out = {}
        for lo in range(0, len(keys), step):
            if lo:
                yield
            for uid, k, s in zip(user_ids[lo:lo + step], keys[lo:lo + step], slots[lo:lo + step]):
                if s >= 0:
                    out[uid] = st.unpack(s, k, now, self.idle_ms, buf)
                else:
                    u = out[uid] = blank[:]
                    u[_SLOT], u[_KEY] = -1, k
        return out

    def store(self, touched: Sequence[list], now: int) -> None:
        """Pack the activity of the users a batch touched; new users past ``max_entries`` push out
        the least recently seen."""
        drain(self.store_steps(touched, now))

    def store_steps(self, touched: Sequence[list], now: int, step: int = STEP_RECORDS) -> Generator[None, None, None]:
        """:meth:`store` in steps of ``step`` users (see :meth:`FraudDetector.process_steps`)."""
        st = self.state
        st.clock = now
        new = [u for u in touched if u[_SLOT] < 0]
        old = [u for u in touched if u[_SLOT] >= 0]
        for lo in range(0, len(old), step):
            if lo:
                yield
            buf = st.buffer()
            for u in old[lo:lo + step]:
                st.pack(u, u[_SLOT], buf)
        yield
        over = len(st.keys_) + len(new) - self.max_entries
        if over > 0:
            seen = np.concatenate([st.column("seen")[st.slots], np.array([u[_SEEN] for u in new], np.int64)])
            victims = _smallest(seen, over)
            n_old = len(st.keys_)
            st.remove(np.sort(victims[victims < n_old]))
            dropped = set((victims[victims >= n_old] - n_old).tolist())
            new = [u for i, u in enumerate(new) if i not in dropped]
            self.evicted += over
        if new:
            slots = st.allocate(len(new), self.max_entries)
            for lo in range(0, len(new), step):
                if lo:
                    yield
                buf = st.buffer()
                for u, s in zip(new[lo:lo + step], slots[lo:lo + step].tolist()):
                    st.pack(u, s, buf)
            st.insert(np.array([u[_KEY] for u in new], np.uint64), slots)
        if touched:
            st.oldest = min(st.oldest, min(u[_SEEN] for u in touched))
        if len(st.artist_names) > st.artist_gc_at:
            st.sweep_artists()

    def expire(self, now_ms: int) -> int:
        """Drop the users not seen for ``idle_ms``; returns how many went."""
        st = self.state
        st._settle()
        limit = now_ms - self.idle_ms
        if st.oldest >= limit:
            return 0
        seen = st.column("seen")[st.slots]
        keep = seen >= limit
        st.remove(np.flatnonzero(~keep))
        st.oldest = int(seen[keep].min()) if keep.any() else 2**62
        return int(len(seen) - keep.sum())


FRAUD_SCOPE = "fraud"  # the correlation scope of every fraud finding (the alerting clock of this scope waits for the fraud stage)


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

    def __init__(self, settings: Settings, source_topic: str = "user_behavior_events") -> None:
        self.cfg: Mapping[str, Any] = settings.detection["fraud"]
        self.source_topic = source_topic
        self.window_ms = int(self.cfg["window_s"]) * 1000
        self.min_observed_ms = int(self.cfg["min_observed_s"]) * 1000
        self.report_every_ms = settings.windows.aggregate_s * 1000
        self.layout = fraud_layout(self.cfg)
        self.users = FraudUsers(self.layout, int(self.cfg["max_users"]), self.window_ms)
        self.now = 0
        #: users counted (:meth:`count_steps`) and not scored yet (unpacked, by id)
        self.live: dict[Any, list] = {}
        self.top = -(2**62)  # the latest event time counted since the last scoring

    def process(self, records: Sequence[Any], event_time: int | None = None) -> list[Anomaly]:
        """Count a batch; score the users it touched at ``event_time`` (the watermark; default:
        the latest record), so one early timestamp cannot age everybody's window. A record is a
        decoded behaviour event, or a sequence in the field order of
        :class:`~soundcheck.detectors.stage2.FraudEvent`."""
        return drain(self.process_steps(records, event_time))

    def process_steps(self, records: Sequence[Any], event_time: int | None = None,
                      step: int = STEP_RECORDS) -> Generator[None, None, list[Anomaly]]:
        """:meth:`process` in steps of about ``step`` records (a generator that returns the
        anomalies): the worker lets other agents run between steps, as a window of a busy stream
        is tens of thousands of events. The outcome is :meth:`process`'s, however it is stepped,
        as long as nothing else uses the detector until the generator is done."""
        if records and not isinstance(records[0], (list, tuple)):  # decoded records (their fields by name)
            records = [(r.ts, r.user_id, r.event_type, r.device_id, r.country, r.user_segment, r.artist_id, r.payment_method_id)
                       for r in records]
        top = max((r[_TS] for r in records), default=None)
        at = None if top is None else top if event_time is None else min(event_time, top)
        yield from self.count_steps(records, step, at)
        return (yield from self.evaluate_steps(event_time, step))

    def count_steps(self, records: Sequence[Any], step: int = STEP_RECORDS, at: int | None = None) -> Generator[None, None, None]:
        """Count records into the users' activity without scoring them (the first half of
        :meth:`process_steps`): the fraud stage counts a window's events as they become complete,
        in event-time order, and scores the window's users once at its end
        (:meth:`evaluate_steps`). A user is loaded as of ``at`` (the fraud stage: its window's start;
        at least the last scoring's time), so that one idle for longer than the window starts afresh
        however long nothing was scored. The users' rows in :attr:`users` change only when they are
        scored (its shared tables of artist names, segments and countries grow as rows are counted;
        counting the same rows again gives the same); until then the counted users wait in
        :attr:`live`."""
        if records and not isinstance(records[0], (list, tuple)):  # decoded records (their fields by name)
            records = [(r.ts, r.user_id, r.event_type, r.device_id, r.country, r.user_segment, r.artist_id, r.payment_method_id)
                       for r in records]
        if not records:
            return
        self.top = max(self.top, max(r[_TS] for r in records))
        users = self.users
        st = users.state
        touched = self.live
        new = [uid for uid in dict.fromkeys(r[_USER] for r in records) if uid not in touched]
        touched.update((yield from users.load_steps(new, self.now if at is None else max(self.now, at), step)))
        yield
        c = _codec(self.layout)
        nb, bucket_ms, unit = c.nb, c.bucket_ms, c.unit_ms
        plays_at, completes_at, firsts_at, lasts_at = c.plays, c.completes, c.b_first, c.b_last
        names, segment_ix, country_ix = st.artist_names, st.segment_ix, st.country_ix
        hashes: dict = {}  # device and artist ids -> their 64-bit hash
        pm_hashes: dict = {}  # payment methods -> their 32-bit one (never the same dict: an id can be both)
        dev_at, dev_end, dev_t, nd = c.dev, c.dev + c.nd, c.dev_t, c.nd
        cty_at, cty_end, cty_t, nc = c.cty, c.cty + c.nc, c.cty_t, c.nc
        for n, r in enumerate(records):
            if n and not n % step:
                yield
            u = touched[r[_USER]]
            ts = r[_TS]
            t = ts // unit & _U16
            if not u[_ACTIVE]:
                u[_FIRST] = ts
            u[_SEEN] = ts
            seg = r[_SEG]
            i = segment_ix.get(seg)
            u[_SEGMENT] = i if i is not None else st.segment_index(seg)
            dev = r[_DEV]
            h = hashes.get(dev)
            if h is None:
                h = hashes[dev] = _h64(dev)
            try:  # _note's common case, inlined (this loop is per event): a device the user has
                u[dev_t + u.index(h, dev_at, dev_end) - dev_at] = t
            except ValueError:
                _note(u, h, t, dev_at, dev_t, nd)
            cty = r[_CTY]
            i = country_ix.get(cty)
            if i is None:
                i = st.country_index(cty)
            try:
                u[cty_t + u.index(i, cty_at, cty_end) - cty_at] = t
            except ValueError:
                _note(u, i, t, cty_at, cty_t, nc)
            et = r[_ET]
            if et == "play_start" or et == "play_complete":
                b = ts // bucket_ms
                if not u[_ACTIVE]:
                    u[_HEAD], u[_ACTIVE] = b, True
                elif u[_HEAD] < b:  # a new bucket (a late event counts in the newest)
                    for k in range(max(u[_HEAD] + 1, b - nb + 1), b + 1):
                        u[plays_at + k % nb] = u[completes_at + k % nb] = 0
                    u[_HEAD] = b
                i = u[_HEAD] % nb
                q = (ts - u[_HEAD] * bucket_ms) * 256 // bucket_ms
                q = 0 if q < 0 else 255 if q > 255 else q
                if not (u[plays_at + i] or u[completes_at + i]):
                    u[firsts_at + i] = u[lasts_at + i] = q
                elif q < u[firsts_at + i]:
                    u[firsts_at + i] = q
                elif q > u[lasts_at + i]:
                    u[lasts_at + i] = q
                if et == "play_start":
                    if u[plays_at + i] < _U16:
                        u[plays_at + i] += 1
                    artist = r[_ARTIST]
                    if artist:
                        h = hashes.get(artist)
                        if h is None:
                            h = hashes[artist] = _h64(artist)
                        if h not in names:  # (its hash may be known already as a device's)
                            names[h] = artist
                        self._play(u, h, t, c)
                elif u[completes_at + i] < _U16:
                    u[completes_at + i] += 1
            elif (pm := r[_PM]) and et.startswith("payment"):
                h = pm_hashes.get(pm)
                if h is None:
                    h = pm_hashes[pm] = (_h64(pm) >> 32) or 1
                _note(u, h, t, c.pay, c.pay_t, c.npm)

    def evaluate_steps(self, event_time: int | None = None, step: int = STEP_RECORDS) -> Generator[None, None, list[Anomaly]]:
        """Score the users counted since the last scoring at ``event_time`` (the window's end;
        default: the latest record counted), store their activity and expire the idle (the second
        half of :meth:`process_steps`); the anomalies."""
        users = self.users
        touched, self.live = self.live, {}
        if self.top > -(2**62):
            self.now = max(self.now, self.top if event_time is None else min(event_time, self.top))
            self.top = -(2**62)
        yield
        out = []
        for n, (uid, u) in enumerate(touched.items()):
            if n and not n % step:
                yield
            if (a := self._evaluate(uid, u)) is not None:
                out.append(a)
        yield
        yield from users.store_steps(list(touched.values()), self.now, step)
        yield
        users.expire(self.now)
        return out

    @staticmethod
    def _play(u: list, h: int, t: int, c: _Codec) -> None:
        """One play of artist ``h`` at stamp ``t``: when the top artists are full, the least played
        (of those, the longest unplayed) gives its place and its plays go to the rest."""
        at, na = c.art, c.na
        try:
            j = u.index(h, at, at + na) - at
        except ValueError:
            if u[at + na - 1]:
                j = min(range(na), key=lambda i: (u[c.art_n + i], -((t - u[c.art_t + i] + _HALF) & _U16)))
                n, lt, o = u[c.art_n + j], u[c.art_t + j], c.other
                if not u[o] or (lt - u[o + 1]) & _U16 < _HALF:
                    u[o + 1] = lt
                u[o] += n
                _drop(u, j, (at, c.art_n, c.art_t), na)
                j = na - 1
            else:
                j = u.index(0, at, at + na) - at
            u[at + j] = h
        u[c.art_n + j] += 1
        u[c.art_t + j] = t
        if u[c.art_n + j] > _U16 or u[c.other] > _U16:  # the counts fit 16 bits; the shares are what counts
            for k in (*range(c.art_n, c.art_n + na), c.other):
                u[k] = (u[k] + 1) // 2

    def features(self, u: list, now: int) -> dict[str, float]:
        """The user's counters over the window ending at ``now`` (what left the window is dropped)."""
        c = _codec(self.layout)
        start = now - self.window_ms
        nb, bucket_ms = c.nb, c.bucket_ms
        plays = completes = 0.0
        if u[_ACTIVE]:
            lo = start // bucket_ms  # the bucket the window starts in counts in part
            head, p0, c0 = u[_HEAD], c.plays, c.completes
            for j in range(max(head - lo + 1, 0), nb):  # the buckets before it are out
                u[p0 + (head - j) % nb] = u[c0 + (head - j) % nb] = 0
            plays, completes = sum(u[p0:p0 + nb]), sum(u[c0:c0 + nb])
            u[_ACTIVE] = bool(plays or completes)
            if start % bucket_ms and 0 <= head - lo < nb:  # the part of its events at or after the start
                e = lo % nb
                first = lo * bucket_ms + u[c.b_first + e] * bucket_ms / 256
                last = lo * bucket_ms + (u[c.b_last + e] + 1) * bucket_ms / 256
                if start > first:
                    w = max(0.0, (last - start) / (last - first))
                    plays -= (1 - w) * u[p0 + e]
                    completes -= (1 - w) * u[c0 + e]
        s = start // c.unit_ms & _U16  # a stamp before this one (by less than half their range) is out of the window
        devices = _expire(u, s, (c.dev, c.dev_t), c.dev_t, c.nd)
        countries = _expire(u, s, (c.cty, c.cty_t), c.cty_t, c.nc)
        methods = _expire(u, s, (c.pay, c.pay_t), c.pay_t, c.npm)
        artists = _expire(u, s, (c.art, c.art_n, c.art_t), c.art_t, c.na)
        if u[c.other] and 0 < (s - u[c.other + 1]) & _U16 < _HALF:
            u[c.other] = u[c.other + 1] = 0
        counts = u[c.art_n:c.art_n + c.na]
        span = max(now - max(u[_FIRST], start), self.min_observed_ms)
        return {
            "plays": plays,
            "streams_per_hour": plays * 3_600_000 / span,
            "completion_rate": completes / plays if plays else 1.0,
            "devices": devices,
            "countries": countries,
            "top_artist_share": max(counts) / max(sum(counts) + u[c.other], 1) if artists else 0.0,
            "payment_method_changes": max(methods - 1, 0),
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

    def _evaluate(self, user_id: str, u: list) -> Anomaly | None:
        now = self.now
        if now - u[_REPORTED] < self.report_every_ms:
            return None
        f = self.features(u, now)
        if f["plays"] < self.cfg["min_plays"]:
            return None
        prob, signals = self.probability(f)
        if prob < self.cfg["probability_threshold"]:
            return None
        u[_REPORTED] = now
        since = max(u[_FIRST], now - self.window_ms)
        for s in signals:
            s.since = since
        st, c = self.users.state, _codec(self.layout)
        countries = [st.countries[i] for i in u[c.cty:c.cty + c.nc] if i]
        by_plays = sorted((j for j in range(c.na) if u[c.art + j]), key=lambda j: -u[c.art_n + j])
        top = [st.artist_names.get(u[c.art + j]) or f"{u[c.art + j]:016x}" for j in by_plays[:3]]
        devices = sorted(f"{h:016x}" for h in u[c.dev:c.dev + c.nd] if h)
        return Anomaly(
            kind="streaming_fraud",
            detector=self.name,
            entity={"user_id": user_id},
            region=countries[0] if countries else "unknown",  # the first country seen: a stable home
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
                "countries": sorted(countries),
                "top_artists": top,
                "user_segment": st.segments[u[_SEGMENT]],
                # devices by the hex of their stable hash: the same for every user, so accounts sharing one join
                "links": [f"artist:{a}" for a in top] + [f"device:{d}" for d in devices[:8]]
                + [f"country:{x}" for x in sorted(countries)],
            },
            # all fraud findings share one scope (they are few); within it, accounts that share an
            # artist, a device or a country are one farm (see alerting.correlate_step)
            scope=FRAUD_SCOPE,
        )
