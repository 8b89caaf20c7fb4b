"""Online anomaly detection for one univariate metric series, in River's style.

``SeriesDetector`` turns each new value of a series into an anomaly score in [0, 1], using only
that value and the ones before it (``update`` scores first, then learns). It is meant for one
(service, region, metric) series fed with window means, and for one NAB file fed row by row
(``soundcheck eval nab``): one configuration for every series, set only in ``__init__``.

How a value is scored:

* **Predictors.** Three predictions of the value: the last value, a fast exponentially weighted
  mean, and, once the timestamps show a sampling interval shorter than 6 h, a daily profile
  (an EW mean per time-of-day bucket, at most ``buckets`` a day, plus a fast EW offset of the
  residuals from it) that copes with daily seasonality. Each predictor keeps an EW mean absolute
  residual (its scale). The residual z of the row is the smallest ``|x - pred| / scale`` among the
  predictors whose scale is within ``eligible`` times the best one: a value is surprising only
  if no predictor that fits the series well explains it (a daily step is no anomaly when the
  profile foresaw it; a spike, a level shift or a broken daily pattern is). The prediction that
  gave that smallest z is kept as ``expected`` ("observed x, expected y"). With ``weekly`` a
  time-of-week profile is a fourth predictor.
* **Novelty.** How far the value lies outside the central ``1 - 2 range_q`` of the last
  ``range_window`` values, in units of that range: catches slow drifts to levels not seen before,
  which a predictor following the drift would not notice.
* **Coarser scales.** The means of blocks of ``scales`` rows (each scale at ``phases`` offsets,
  so a block ends every ``size / phases`` rows) feed child detectors of the same kind, which
  predict, measure novelty and calibrate at that scale. A sustained small departure (a missing
  daily peak, a holiday, a slow drift) that hides in the row-level noise stands out in the block
  means; the largest calibrated statistic of a child whose block ends at this row joins the two
  row-level ones (and its prediction becomes ``expected`` when it is the largest).
* **Calibration.** Each statistic is divided by its own high quantile (``q``) over the series'
  history (a log-spaced histogram), but not by less than ``z_min``: a noisy series with frequent
  large deviations needs larger ones to alarm, a quiet series alarms on smaller ones. The larger
  of the calibrated statistics ``e`` gives the score ``e / (e + 1)``: 0.5 is "as unusual as
  the top ``1 - q`` of this series' history, and at least ``z_min`` robust deviations".
* **Keeping anomalies out of the baseline.** A row whose residual z exceeds ``clip`` is learned
  shrunk to z = ``clip`` (a Huber-style update): spikes barely move the predictors, a lasting
  level shift is learned within a few dozen rows.
* **Refractory period.** For ``refractory`` rows after a score, a score that is not higher than
  every score since is damped (times ``damp``), and within ``short`` rows a higher one is damped
  too unless its calibrated statistic is ``margin`` times the recent peak: one alarm when an
  anomaly starts, not one per row of a slowly growing run.

Non-finite values are neither scored (score 0.0) nor learned. Timestamps may be ``datetime``,
ISO-8601 text, or numbers (seconds since the epoch); without timestamps the daily profile is off.

>>> import math
>>> det = SeriesDetector()
>>> day = [10 + 5 * math.sin(2 * math.pi * h / 24) for h in range(24)]
>>> scores = [det.update(v, 3600.0 * i) for i, v in enumerate(day * 10)]
>>> max(scores[-48:]) < 0.5
True
>>> det.update(40.0, 3600.0 * 240) > 0.8
True
>>> abs(det.expected - day[0]) < 1.0  # observed 40, expected about 10
True
>>> det2 = SeriesDetector()
>>> [det2.update(v, 3600.0 * i) for i, v in enumerate(day * 10)] == scores  # deterministic
True
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from datetime import datetime, timezone
from typing import Any, Optional

DAY = 86400.0
WEEK = 7 * DAY
_MODELS = ("last", "fast", "season", "week")


def to_seconds(ts: Any) -> Optional[float]:
    """A timestamp as seconds since the epoch: ``datetime`` (naive = UTC), ISO text, or a number."""
    if ts is None:
        return None
    if isinstance(ts, (int, float)):
        return float(ts)
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts.strip())
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=timezone.utc)
        return ts.timestamp()
    raise TypeError(f"unsupported timestamp {ts!r}")


class SeriesDetector:
    """Online anomaly score in [0, 1] for one univariate series (see the module doc).

    Parameters
    ----------
    fast: weight of a new value in the fast EW mean (and in the daily profile's offset).
    spread: weight of a new residual in each predictor's scale (EW mean absolute residual).
    clip: residual z above which a row is learned shrunk to this z (keeps anomalies out).
    season_days: weight of a new day in the daily profile (per bucket, per day).
    buckets: most time-of-day buckets of the daily profile.
    eligible: predictors whose scale is within this factor of the best one explain a value.
    range_window, range_q, novelty_gain: the novelty statistic (see the module doc).
    q, z_min: calibration of each statistic against its own history (see the module doc).
    refractory, damp: rows after a score in which lower scores are damped, and by how much.
    margin, short: within ``short`` rows of a score, a higher one is damped too unless its
        calibrated statistic is ``margin`` times as large (a slowly rising run alarms once).
    weekly: also keep a time-of-week profile (a fourth predictor, once two weeks are seen).
    scales, phases: block sizes (rows) of the coarser-scale child detectors, and how many
        offsets of each (see the module doc); ``()`` turns them off.
    warmup: rows scored 0.0 at the start (still learned).
    """

    def __init__(
        self,
        fast: float = 0.1,
        spread: float = 0.01,
        clip: float = 3.0,
        season_days: float = 0.3,
        buckets: int = 288,
        eligible: float = 2.0,
        range_window: int = 2000,
        range_q: float = 0.005,
        novelty_gain: float = 30.0,
        q: float = 0.99,
        z_min: float = 2.5,
        refractory: int = 200,
        damp: float = 0.5,
        margin: float = 1.2,
        short: int = 50,
        weekly: bool = False,
        warmup: int = 20,
        scales: tuple[int, ...] = (32, 128),
        phases: int = 4,
    ) -> None:
        self.fast = fast
        self.spread = spread
        self.clip = clip
        self.season_days = season_days
        self.buckets = buckets
        self.eligible = eligible
        self.range_window = range_window
        self.range_q = range_q
        self.novelty_gain = novelty_gain
        self.q = q
        self.z_min = z_min
        self.refractory = refractory
        self.damp = damp
        self.margin = margin
        self.short = short
        self.weekly = weekly
        self.warmup = warmup
        self.scales = tuple(int(s) for s in scales)
        self.phases = phases

        self.n = 0  # rows learned
        self.last: Optional[float] = None
        self.mean_fast = 0.0
        self.mean_slow = 0.0
        self.dev_slow = 0.0
        self.scale = {m: 0.0 for m in _MODELS}
        self.seen = {m: 0 for m in _MODELS}
        # sampling interval and daily profile
        self.t_prev: Optional[float] = None
        self.diffs: list[float] = []
        self.dt: Optional[float] = None
        self.profile: Optional[list[Optional[list]]] = None  # per bucket: [mean, days seen, last day]
        self.offset = 0.0
        self.wprofile: Optional[list[Optional[list]]] = None  # per time-of-week bucket, likewise
        self.woffset = 0.0
        #: the prediction the last score was judged against (NaN before there is one)
        self.expected = math.nan
        # novelty: the last values, in arrival order and sorted
        self.fifo: deque = deque()
        self.sorted_values: list[float] = []
        # calibration histograms of the two statistics (log-spaced bins from 0.1 to 1e5)
        self._n_bins = 80
        self._bin_log = math.log(1e6) / (self._n_bins - 2)
        self.hist_pred = [0.0] * self._n_bins
        self.hist_novel = [0.0] * self._n_bins
        self.hist_n = 0.0
        self.tops = [0, 0]  # the highest bin with a count, of each histogram (where a quantile's scan starts)
        # refractory: (row, score) of a monotone deque, for the max of the recent scores
        self.recent: deque = deque()
        self.parts: tuple[float, ...] = (0.0, 0.0, 0.0)  # the last row's calibrated statistics
        # coarser scales: per (size, offset) a child detector of block means, and [size, rows, sum]
        # of the block being filled (rows start negative to offset the phases)
        self.children: list[SeriesDetector] = []
        self.blocks: list[list] = []
        for size in self.scales:
            for k in range(max(1, phases)):
                self.children.append(self._child(size))
                self.blocks.append([size, -(k * size // max(1, phases)), 0.0])

    def _child(self, size: int) -> "SeriesDetector":
        return SeriesDetector(
            fast=self.fast, spread=self.spread, clip=self.clip, season_days=self.season_days, buckets=self.buckets,
            eligible=self.eligible, range_window=max(50, self.range_window // size), range_q=self.range_q,
            novelty_gain=self.novelty_gain, q=self.q, z_min=self.z_min, weekly=self.weekly, warmup=0, scales=(),
        )

    def __repr__(self) -> str:
        return f"SeriesDetector(n={self.n}, dt={self.dt})"

    # ---------------------------------------------------------------------------- time of day
    def _bucket(self, t: Optional[float]) -> tuple[Optional[int], Optional[int]]:
        if t is None:
            return None, None
        if self.t_prev is not None and t > self.t_prev and len(self.diffs) < 64:
            self.diffs.append(t - self.t_prev)
            self.dt = sorted(self.diffs)[len(self.diffs) // 2]
        self.t_prev = t if self.t_prev is None else max(t, self.t_prev)
        if self.dt is None or self.dt > DAY / 4:
            return None, None
        nb = max(1, int(round(DAY / max(self.dt, DAY / self.buckets))))
        if self.profile is None or len(self.profile) != nb:
            self.profile = [None] * nb
            self.wprofile = [None] * (7 * nb) if self.weekly else None
        width = DAY / nb
        b = int(((t % DAY) + 1e-3) // width) % nb
        wb = int(((t % WEEK) + 1e-3) // width) % (7 * nb) if self.weekly else None
        return b, wb

    # ------------------------------------------------------------------------------ calibration
    def _bin(self, z: float) -> int:
        if z <= 0.1:
            return 0
        return min(self._n_bins - 1, 1 + int(math.log(z / 0.1) / self._bin_log))

    #: state pickled before ``tops`` existed has none: found by one scan of the histograms
    tops: Optional[list[int]] = None

    @staticmethod
    def _highest(hist: list[float]) -> int:
        """The highest bin with a count (0 if none)."""
        return max((k for k, v in enumerate(hist) if v), default=0)

    def _quantile(self, hist: list[float], top: int) -> float:
        """The histogram's ``q`` quantile (the lower edge of its bin; bins above ``top`` are empty)."""
        need = (1.0 - self.q) * self.hist_n
        acc = 0.0
        for k in range(top, 0, -1):
            acc += hist[k]
            if acc > need:
                return 0.1 * math.exp(self._bin_log * (k - 1))
        return 0.1

    # ---------------------------------------------------------------------------------- update
    def update(self, x: float, ts: Any = None) -> float:
        """Score ``x`` (observed at ``ts``) against the past, then learn it; return the score."""
        x = float(x)
        self.expected = math.nan
        if not math.isfinite(x):
            return 0.0
        t = to_seconds(ts)
        b, wb = self._bucket(t)
        day = None if t is None else int(t // DAY)
        week = None if t is None else int(t // WEEK)

        preds: dict[str, float] = {}
        if self.last is not None:
            preds["last"] = self.last
            preds["fast"] = self.mean_fast
        slot = self.profile[b] if (b is not None and self.profile is not None) else None
        if slot is not None and slot[1] >= 2:
            preds["season"] = slot[0] + self.offset
        wslot = self.wprofile[wb] if (wb is not None and self.wprofile is not None) else None
        if wslot is not None and wslot[1] >= 2:
            preds["week"] = wslot[0] + self.woffset

        # residual z: the best-fitting predictors must all be surprised
        floor = max(0.02 * self.dev_slow, 1e-9 * abs(self.mean_slow), 1e-12)
        zs = {m: abs(x - p) / max(1.25 * self.scale[m], floor) for m, p in preds.items() if self.seen[m] >= 5}
        z = 0.0
        if zs:
            best = min(self.scale[m] for m in zs)
            z, used = min((zs[m], m) for m in zs if self.scale[m] <= self.eligible * best + floor)
            self.expected = preds[used]

        # novelty: outside the central range of the recent values
        zn = 0.0
        win = self.sorted_values
        if len(win) >= 50:
            k = int(self.range_q * len(win))
            lo, hi = win[k], win[len(win) - 1 - k]
            zn = self.novelty_gain * max(x - hi, lo - x, 0.0) / max(hi - lo, floor)

        # calibrate each statistic against its own history
        tops = self.tops
        if tops is None:
            tops = self.tops = [self._highest(self.hist_pred), self._highest(self.hist_novel)]
        e_pred = z / max(self._quantile(self.hist_pred, tops[0]), self.z_min)
        e_novel = zn / max(self._quantile(self.hist_novel, tops[1]), self.z_min)
        # coarser scales: the children whose block ends at this row
        e_coarse, expected_coarse = 0.0, math.nan
        for block, child in zip(self.blocks, self.children):
            block[1] += 1
            if block[1] <= 0:
                continue
            block[2] += x
            if block[1] >= block[0]:
                child.update(block[2] / block[1], t)
                block[1], block[2] = 0, 0.0
                if child.n > self.warmup and max(child.parts) > e_coarse:
                    e_coarse, expected_coarse = max(child.parts), child.expected
        self.parts = (e_pred, e_novel, e_coarse)
        e = max(e_pred, e_novel, e_coarse)
        if e_coarse > max(e_pred, e_novel) and math.isfinite(expected_coarse):
            self.expected = expected_coarse
        raw = e / (e + 1.0)

        self._learn(x, preds, z, zn, slot, b, day, wslot, wb, week)

        if self.n <= self.warmup:
            return 0.0
        # refractory: within `refractory` rows of a score only a higher one comes through, and
        # within `short` rows only one higher by the factor `margin` (a rising run alarms once)
        dq = self.recent
        while dq and dq[0][0] <= self.n - self.refractory:
            dq.popleft()
        peak = dq[0][1] if dq else 0.0
        near = 0.0
        for row, val in dq:  # decreasing values: the first recent enough is the recent max
            if row > self.n - self.short:
                near = val
                break
        out = raw if (e > peak and e > self.margin * near) else raw * self.damp
        while dq and dq[-1][1] <= e:
            dq.pop()
        dq.append((self.n, e))
        return min(max(out, 0.0), 1.0)

    def _learn(self, x: float, preds: dict, z: float, zn: float, slot: Optional[list], b: Optional[int], day: Optional[int],
               wslot: Optional[list], wb: Optional[int], week: Optional[int]) -> None:
        self.n += 1
        bp, bn = self._bin(z), self._bin(zn)
        self.hist_pred[bp] += 1.0
        self.hist_novel[bn] += 1.0
        self.hist_n += 1.0
        tops = self.tops
        if bp > tops[0]:
            tops[0] = bp
        if bn > tops[1]:
            tops[1] = bn
        # an anomalous row is learned shrunk to z = clip
        shrink = 1.0 if z < self.clip else self.clip / z
        for m, p in preds.items():
            a = self.spread if self.seen[m] >= 20 else 1.0 / (self.seen[m] + 1)
            self.scale[m] += a * (abs(x - p) * shrink - self.scale[m])
            self.seen[m] += 1
        if self.last is None:
            self.last = self.mean_fast = self.mean_slow = x
        else:
            self.last += (x - self.last) * shrink
            self.mean_fast += self.fast * (x - self.mean_fast) * shrink
            self.mean_slow += 0.01 * (x - self.mean_slow)
            self.dev_slow += 0.01 * (abs(x - self.mean_slow) - self.dev_slow)
        if b is not None and self.profile is not None:
            if slot is None:
                self.profile[b] = [x, 1, day]
            else:
                self.offset += self.fast * ((x - slot[0]) * shrink - self.offset)
                per_day = max(1.0, DAY / len(self.profile) / self.dt)
                slot[0] += (self.season_days / per_day) * (x - slot[0]) * shrink
                if day != slot[2]:
                    slot[1] += 1
                    slot[2] = day
        if wb is not None and self.wprofile is not None:
            if wslot is None:
                self.wprofile[wb] = [x, 1, week]
            else:
                self.woffset += self.fast * ((x - wslot[0]) * shrink - self.woffset)
                per_week = max(1.0, WEEK / len(self.wprofile) / self.dt)
                wslot[0] += (self.season_days / per_week) * (x - wslot[0]) * shrink
                if week != wslot[2]:
                    wslot[1] += 1
                    wslot[2] = week
        bisect.insort(self.sorted_values, x)
        self.fifo.append(x)
        if len(self.fifo) > self.range_window:
            old = self.fifo.popleft()
            del self.sorted_values[bisect.bisect_left(self.sorted_values, old)]
