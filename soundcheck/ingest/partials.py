"""Stage 1, per input partition: decoded records -> mergeable partial aggregates per (entity, window).

No detection happens here and nothing is per record beyond building numpy columns: each batch is
grouped by (entity, event-time window) with ``np.bincount`` into counts, sums and
"how many rows had this feature" (NaN marks a missing value), plus the distinct users of the
group. Open windows accumulate across batches; when the partition's watermark (its highest event
time less the allowed lateness) passes a window's end, the window's partials are handed back
(:meth:`PartitionAggregator.advance`) to be sent to the aggregates topic, keyed by entity, where
stage 2 merges the partials of every input partition (:mod:`soundcheck.detectors.stage2`).

Because only sums travel, the statistics stage 2 sees for an entity are the same whatever the
partition count and the producers' keying: a region's audio may be spread over twelve partitions
and its window is still the whole region's window.

Behaviour events also leave here as compact rows for the fraud detector, keyed by pseudonymised
user (:func:`fraud_rows`), so that all of a user's events meet in one place whatever the input's
keying (a repartition, as Kafka Streams does it).

>>> import numpy as np
>>> from soundcheck.settings import load_settings
>>> pa = PartitionAggregator(load_settings(environ={}), "behavior", partition=0)
>>> pa.add_columns("behavior.rates", ["BR", "US"].__getitem__, 2, np.array([0, 0, 1]), np.array([1_000, 2_000, 3_000]),
...                np.array([[1.0], [1.0], [1.0]]), offsets=np.array([5, 6, 7]))
>>> pa.advance(), pa.committable(8)
([], 5)
>>> pa.max_ts = 16_000  # a later record moved the watermark past 10 s + 5 s of lateness
>>> [(p.key, p.start, p.count) for p in pa.advance()], pa.closed_until, pa.committable(8)
([('BR', 0, 2), ('US', 0, 1)], 10000, 8)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

import zlib

import numpy as np

from soundcheck.settings import Settings

STALL_BUFFERING = 0.05  # an audio sample stalled more than this share of the time counts as a stall
AUDIO_FEATURES = ("bitrate_ratio", "buffering_ratio", "latency_ms", "buffer_health_percent", "packet_loss_percent", "stall_rate")
EVENT_TYPES = (
    "play_start", "play_complete", "skip", "search", "add_to_playlist", "login", "logout",
    "payment_attempt", "payment_success", "payment_failure", "subscription_upgrade",
    "subscription_cancel", "app_crash", "ad_impression", "ad_failure",
)
EVENT_INDEX = {t: i for i, t in enumerate(EVENT_TYPES)}
MAX_METRICS = 64  # distinct system metric names one partition aggregates (more are counted, not tracked)
DENSE_LIMIT = 1 << 20  # group ids up to this are counted with a dense bincount, beyond with np.unique

#: which detector reads the partials of each stream (stage 2)
DETECTORS = {"audio": ("audio.baseline",), "behavior": ("behavior.rates",), "system": ("system.baseline",)}



@dataclass(slots=True)
class Partial:
    """One entity's statistics over one event-time window, from one input partition.

    ``sums``/``present`` are per feature (in the detector's feature order), or, for the system
    detector whose metric names are only known at run time, ``named`` maps a metric name to
    ``[sum, present]``. ``users`` is the number of distinct users of the partition in the window
    (exact per partition; summed over partitions, exact when producers key by user or session).
    """

    detector: str
    key: Hashable
    start: int
    count: int
    sums: list[float] = field(default_factory=list)
    present: list[float] = field(default_factory=list)
    named: dict[str, list[float]] = field(default_factory=dict)
    users: int = 0

    def to_wire(self) -> list:
        key = list(self.key) if isinstance(self.key, tuple) else self.key
        return [self.detector, key, self.start, self.count, self.sums, self.present, self.named, self.users]

    @classmethod
    def from_wire(cls, row: Sequence[Any]) -> "Partial":
        det, key, start, count, sums, present, named, users = row
        return cls(str(det), tuple(key) if isinstance(key, list) else key, int(start), int(count), sums, present, named, int(users))


@dataclass(slots=True)
class _Acc:
    count: int
    sums: np.ndarray
    present: np.ndarray
    users: Optional[list]  # the distinct user ids of each batch, as sets (region windows only; the others are estimated)


def _intern(column: Sequence[Hashable]) -> tuple[np.ndarray, list[Hashable]]:
    """Integer codes for a column of hashables (codes valid within this batch only)."""
    table = {v: i for i, v in enumerate(dict.fromkeys(column))}
    return np.fromiter(map(table.__getitem__, column), dtype=np.int64, count=len(column)), list(table)


class PartitionAggregator:
    """The open windows of one input partition of one stream, and its event-time progress.

    ``closed_until``: every window that ends at or before it has been handed back (it is what the
    partition tells stage 2, and what a restart restores from the committed offset's metadata);
    records of such windows are late: counted and left out. ``committable(next)`` is the offset
    a consumer may commit: the first offset whose records are still in an open window.
    """

    def __init__(self, settings: Settings, stream: str, partition: int, closed_until: int = -(2**62)) -> None:
        w = settings.windows
        self.settings = settings
        self.stream = stream
        self.partition = partition
        self.size_ms = int(w.aggregate_s * 1000)
        self.lateness_ms = int(w.allowed_lateness_s * 1000)
        self.dimensions = tuple(settings.detection["audio"]["dimensions"])
        self.max_ts = -(2**62)
        self.closed_until = closed_until
        self.open: dict[tuple[str, int, Hashable], _Acc] = {}
        self.first_offset: dict[int, int] = {}  # window start -> first offset with a record in it
        self.late_events = 0
        self.untracked_metrics = 0
        self.metric_names: dict[str, int] = {}

    # -- adding -----------------------------------------------------------------------------

    def add(self, records: Sequence[Any], offsets: Optional[np.ndarray] = None) -> None:
        """Add a batch of decoded records of this stream (``offsets``: each record's message offset)."""
        n = len(records)
        if not n:
            return
        if offsets is None:
            offsets = np.zeros(n, dtype=np.int64)
        if self.stream == "audio":
            self._add_audio(records, offsets)
        elif self.stream == "behavior":
            ts = np.fromiter([r.ts for r in records], dtype=np.int64, count=n)
            codes, keys = _intern([r.country for r in records])
            index = EVENT_INDEX
            etype = np.fromiter([index[r.event_type] for r in records], dtype=np.int64, count=n)
            self.add_events("behavior.rates", keys, codes, ts, etype, offsets)
        elif self.stream == "system":
            self._add_system(records, offsets)
        else:
            raise ValueError(f"unknown stream {self.stream!r}")

    def _add_audio(self, records: Sequence[Any], offsets: np.ndarray) -> None:
        n = len(records)
        ts = np.fromiter([r.ts for r in records], dtype=np.int64, count=n)
        values = np.empty((n, len(AUDIO_FEATURES)))
        bitrate = np.fromiter([r.bitrate_kbps for r in records], dtype=np.float64, count=n)
        requested = np.fromiter([r.requested_bitrate_kbps for r in records], dtype=np.float64, count=n)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # a tiny request must not make an infinity
            values[:, 0] = np.clip(bitrate / requested, 0.0, 2.0)
        values[:, 1] = [r.buffering_ratio for r in records]
        values[:, 2] = [r.latency_ms for r in records]
        values[:, 3] = [r.buffer_health_percent for r in records]
        values[:, 4] = [r.packet_loss_percent for r in records]
        values[:, 5] = values[:, 1] > STALL_BUFFERING
        rcodes, regions = _intern([r.region for r in records])
        n_regions = len(regions)
        for dim in self.dimensions:
            if dim == "region":
                users = _intern([r.user_id for r in records])
                self.add_columns("audio.baseline", lambda c: ("region", regions[c], ""), n_regions, rcodes, ts, values,
                                 offsets, users)
            else:
                vcodes, vals = _intern([getattr(r, dim) for r in records])
                self.add_columns("audio.baseline", lambda c, d=dim, v=vals: (d, v[c // n_regions], regions[c % n_regions]),
                                 len(vals) * n_regions, vcodes * n_regions + rcodes, ts, values, offsets)

    def _add_system(self, records: Sequence[Any], offsets: np.ndarray) -> None:
        n = len(records)
        names = self.metric_names
        values = np.full((n, max(len(names), 1) + 8), np.nan)
        for i, r in enumerate(records):
            for name, v in r.metrics.items():
                col = names.get(name)
                if col is None:
                    if len(names) >= MAX_METRICS:
                        self.untracked_metrics += 1
                        continue
                    col = names[name] = len(names)
                    if col >= values.shape[1]:
                        values = np.concatenate([values, np.full((n, MAX_METRICS), np.nan)], axis=1)
                values[i, col] = v
        values = values[:, : max(len(names), 1)]
        ts = np.fromiter([r.ts for r in records], dtype=np.int64, count=n)
        codes, keys = _intern([(r.service, r.region) for r in records])
        self.add_columns("system.baseline", keys.__getitem__, len(keys), codes, ts, values, offsets)

    def _groups(self, codes: np.ndarray, ts: np.ndarray, offsets: np.ndarray, n_keys: int) -> Optional[tuple]:
        """Group rows by (key, window); late rows dropped. Returns (row mask, group ids, group count, windows)."""
        starts = (ts // self.size_ms) * self.size_ms
        keep = starts >= self.closed_until
        late = int(len(keep) - np.count_nonzero(keep))
        if late:
            self.late_events += late
            if late == len(keep):
                return None
        if ts.size:
            self.max_ts = max(self.max_ts, int(ts.max()))
        w0 = int(starts[keep].min())
        widx = (starts - w0) // self.size_ms
        nw = int(widx[keep].max()) + 1
        for wi in range(nw):
            sel = keep & (widx == wi)
            if sel.any():
                s = w0 + wi * self.size_ms
                first = int(offsets[sel].min())
                if first < self.first_offset.get(s, 2**62):
                    self.first_offset[s] = first
        gid = codes * nw + widx
        return keep, gid, n_keys * nw, w0, nw

    def add_columns(self, detector: str, key_of: Callable[[int], Hashable], n_keys: int, codes: np.ndarray, ts: np.ndarray,
                    values: np.ndarray, offsets: Optional[np.ndarray] = None,
                    users: Optional[tuple[np.ndarray, list]] = None) -> None:
        """Add rows of ``values`` (one per record; NaN: missing) for the entities ``key_of(code)``
        (codes below ``n_keys``); ``users``: (codes, ids) of each row's user, for distinct counts
        (without it, a window's users are estimated from its region's, see :meth:`advance`)."""
        if offsets is None:
            offsets = np.zeros(len(ts), dtype=np.int64)
        grouped = self._groups(codes, ts, offsets, n_keys)
        if grouped is None:
            return
        keep, gid, n_groups, w0, nw = grouped
        if not keep.all():
            gid, values = gid[keep], values[keep]
            if users is not None:
                users = (users[0][keep], users[1])
        if n_groups > DENSE_LIMIT:
            uniq, gid = np.unique(gid, return_inverse=True)
            n_groups = len(uniq)
        else:
            uniq = None
        counts = np.bincount(gid, minlength=n_groups)
        nf = values.shape[1]
        sums = np.empty((n_groups, nf))
        missing = np.isnan(values)
        if missing.any():
            clean = np.where(missing, 0.0, values)
            have = np.empty((n_groups, nf))
            for j in range(nf):
                sums[:, j] = np.bincount(gid, weights=clean[:, j], minlength=n_groups)
                have[:, j] = np.bincount(gid, weights=~missing[:, j], minlength=n_groups)
        else:
            for j in range(nf):
                sums[:, j] = np.bincount(gid, weights=values[:, j], minlength=n_groups)
            have = np.repeat(counts[:, None].astype(np.float64), nf, axis=1)
        group_users = self._distinct_users(gid, users, n_groups) if users is not None else {}
        open_ = self.open
        size = self.size_ms
        for g in np.flatnonzero(counts).tolist():
            real = int(uniq[g]) if uniq is not None else g
            start = w0 + (real % nw) * size
            k = (detector, start, key_of(real // nw))
            acc = open_.get(k)
            if acc is None:
                acc = open_[k] = _Acc(0, np.zeros(nf), np.zeros(nf), [] if users is not None else None)
            elif acc.sums.shape[0] < nf:  # the system detector met a new metric name
                acc.sums = np.concatenate([acc.sums, np.zeros(nf - acc.sums.shape[0])])
                acc.present = np.concatenate([acc.present, np.zeros(nf - acc.present.shape[0])])
            acc.count += int(counts[g])
            acc.sums[:nf] += sums[g]
            acc.present[:nf] += have[g]
            if g in group_users:
                acc.users.append(group_users[g])

    @staticmethod
    def _distinct_users(gid: np.ndarray, users: tuple[np.ndarray, list], n_groups: int) -> dict[int, set]:
        ucodes, names = users
        n_users = max(len(names), 1)
        pairs = np.unique(gid * n_users + ucodes)
        groups = pairs // n_users
        members = (pairs % n_users).tolist()
        bounds = np.flatnonzero(np.diff(groups)) + 1
        out: dict[int, set] = {}
        lo = 0
        for hi in [*bounds.tolist(), len(members)]:
            out[int(groups[lo])] = {names[i] for i in members[lo:hi]}
            lo = hi
        return out

    def add_events(self, detector: str, keys: Sequence[Hashable], codes: np.ndarray, ts: np.ndarray, etype: np.ndarray,
                   offsets: np.ndarray) -> None:
        """Per-event-type counts per (entity, window): one bincount, no one-hot matrix."""
        grouped = self._groups(codes, ts, offsets, len(keys))
        if grouped is None:
            return
        keep, gid, n_groups, w0, nw = grouped
        if not keep.all():
            gid, etype = gid[keep], etype[keep]
        ne = len(EVENT_TYPES)
        table = np.bincount(gid * ne + etype, minlength=n_groups * ne).reshape(n_groups, ne).astype(np.float64)
        counts = table.sum(axis=1)
        for g in np.flatnonzero(counts).tolist():
            key = keys[g // nw]
            start = w0 + (g % nw) * self.size_ms
            acc = self.open.get((detector, start, key))
            if acc is None:
                acc = self.open[(detector, start, key)] = _Acc(0, np.zeros(ne), np.zeros(ne), set())
            acc.count += int(counts[g])
            acc.sums += table[g]
            acc.present += counts[g]

    # -- closing ----------------------------------------------------------------------------

    def watermark(self) -> int:
        return self.max_ts - self.lateness_ms

    def advance(self, watermark: Optional[int] = None) -> list[Partial]:
        """Hand back (oldest first) the windows whose end the watermark has passed."""
        wm = self.watermark() if watermark is None else watermark
        limit = (wm // self.size_ms) * self.size_ms  # windows starting before this have ended
        if limit <= self.closed_until:
            return []
        self.closed_until = limit
        done = sorted((k for k in self.open if k[1] < limit), key=lambda k: (k[1], k[0], str(k[2])))
        # users per record of each region's window: what a window of a CDN PoP, device or segment
        # within that region is estimated to have (distinct counts per dimension cost a sort each)
        distinct = {k: len(set().union(*acc.users)) for k in done if (acc := self.open[k]).users is not None}
        per_record = {(k[0], k[1], k[2][1]): n / self.open[k].count for k, n in distinct.items()
                      if self.open[k].count and isinstance(k[2], tuple)}
        out = [self._partial(k, self.open.pop(k), per_record, distinct.get(k)) for k in done]
        for s in [s for s in self.first_offset if s < limit]:
            del self.first_offset[s]
        return out

    def snapshot(self) -> "PartitionAggregator":
        """A copy to go back to if a batch fails half-way (cheap: the users of a window are kept as
        the per-batch sets, which are never changed once made)."""
        c = copy.copy(self)
        c.open = {k: _Acc(a.count, a.sums.copy(), a.present.copy(), None if a.users is None else list(a.users))
                  for k, a in self.open.items()}
        c.first_offset = dict(self.first_offset)
        c.metric_names = dict(self.metric_names)
        return c

    def flush(self) -> list[Partial]:
        """The stream went quiet: close every open window now."""
        if not self.open:
            return []
        top = max(s for _, s, _ in self.open) + self.size_ms
        return self.advance(top)

    def _partial(self, k: tuple[str, int, Hashable], acc: _Acc, per_record: dict, distinct: Optional[int] = None) -> Partial:
        detector, start, key = k
        if distinct is not None:
            users = distinct
        elif isinstance(key, tuple) and len(key) == 3 and (detector, start, key[2]) in per_record:
            users = max(1, round(acc.count * per_record[(detector, start, key[2])]))
        else:
            users = 0
        p = Partial(detector, key, start, acc.count, users=users)
        if detector == "system.baseline":
            names = self.metric_names
            p.named = {name: [float(acc.sums[col]), float(acc.present[col])] for name, col in names.items()
                       if col < len(acc.present) and acc.present[col] > 0}
        else:
            p.sums, p.present = acc.sums.tolist(), acc.present.tolist()
        return p

    def committable(self, next_offset: int) -> int:
        """The offset a consumer may commit: nothing below it is still needed by an open window."""
        return min(self.first_offset.values(), default=next_offset)

    @property
    def open_count(self) -> int:
        return len(self.open)


# ---------------------------------------------------------------------------------------------
# the fraud repartition: behaviour events keyed by (pseudonymised) user


class Pseudonyms:
    """Keyed pseudonyms (:func:`soundcheck.alerting.pseudonymize`) with a bounded cache: a batch
    holds few distinct users, and each costs one keyed hash the first time."""

    def __init__(self, key: bytes, enabled: bool = True, max_entries: int = 200_000) -> None:
        from soundcheck.alerting.correlate import pseudonymize

        self._hmac = pseudonymize
        self.key = key
        self.enabled = enabled
        self.max_entries = max_entries
        self._cache: dict[str, str] = {}

    def __call__(self, raw: str) -> str:
        out = self._cache.get(raw)
        if out is None:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            out = self._cache[raw] = self._hmac(raw, self.key) if self.enabled else raw
        return out


def internal_partition(key: str, partitions: int) -> int:
    """The partition of an internal topic (aggregates, fraud) for ``key``: a stable hash (CRC-32,
    ten times cheaper than Kafka's murmur2 in pure Python); only soundcheck writes these topics.

    >>> internal_partition("u_0123", 6) == internal_partition("u_0123", 6)
    True
    """
    return zlib.crc32(key.encode()) % partitions


def stable_partition(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (murmur2), so the fraud topic's
    keys and partitions agree with what any Kafka client would choose."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


_FRAUD_TYPES = frozenset({"play_start", "play_complete", "payment_attempt", "payment_success", "payment_failure"})


def offset_ordinals(offsets: Sequence[int]) -> list[int]:
    """Each record's position among the records of its offset (the records of one message are
    consecutive): ``[7, 7, 7, 8] -> [0, 1, 2, 0]``.

    >>> offset_ordinals([7, 7, 7, 8, 9, 9])
    [0, 1, 2, 0, 0, 1]
    """
    out, prev, k = [], None, 0
    for off in offsets:
        k = k + 1 if off == prev else 0
        prev = off
        out.append(k)
    return out


def fraud_rows(records: Sequence[Any], closed_until: int, size_ms: int, pseudonyms: Pseudonyms,
               partitions: int, device_pseudonyms: Optional[Pseudonyms] = None,
               offsets: Optional[Sequence[int]] = None, ordinals: Optional[Sequence[int]] = None) -> dict[int, list[tuple]]:
    """Compact rows of the behaviour events the fraud detector reads, grouped by the fraud
    topic's partition of their user: ``[ts, user, event_type, device, country, segment, artist,
    payment_method, source offset, ordinal]`` with user, device and payment method pseudonymised (the offset and
    the ordinal, the record's position among the records of its offset, let the fraud stage skip rows it already
    has when a partition is read again, also when one message's rows span several fraud messages). Late records (their window already
    closed on this partition) are left out, as stage 1 leaves them out of the aggregates.

    Every event type counts for devices and countries, so every event is forwarded."""
    out: dict[int, list[tuple]] = {}  # tuples: rows held for a window leave the garbage collector's care
    devices = device_pseudonyms or pseudonyms
    ucache, dcache = pseudonyms._cache, devices._cache  # inlined look-ups: this loop is per record
    where: dict[str, list] = {}
    offs = offsets if offsets is not None else [0] * len(records)
    kinds = _FRAUD_TYPES
    # (counted before late records are left out: the same on every read; given when the records
    # are not a whole batch, as when a batch is retried record by record)
    ords = ordinals if ordinals is not None else offset_ordinals(offs)
    for r, off, k in zip(records, offs, ords):
        ts = r.ts
        if ts < closed_until:  # closed_until is a window boundary: the record's window is closed
            continue
        uid = r.user_id
        u = ucache.get(uid) or pseudonyms(uid)
        bucket = where.get(u)
        if bucket is None:
            part = internal_partition(u, partitions)
            bucket = where[u] = out.setdefault(part, [])
        dev = r.device_id
        et = r.event_type
        pm = r.payment_method_id if et in kinds else None
        if pm is not None:  # a payment method id is personal data too (and often embeds the user's)
            pm = dcache.get(pm) or devices(pm)
        bucket.append((ts, u, et, dcache.get(dev) or devices(dev), r.country, r.user_segment, r.artist_id, pm, off, k))
    return out
