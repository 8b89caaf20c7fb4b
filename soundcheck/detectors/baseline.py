"""A learned per-entity baseline for a vector of named features, in River's style.

``RobustBaseline`` keeps, per feature, an exponentially weighted mean and variance (River's
``stats.EWMean`` / ``stats.EWVar``) and turns a new observation into a deviation score. Around
that sit the rules that make it usable for alerting:

* warm-up: no signal on a feature before ``warmup`` observations of it;
* non-finite values (NaN, infinity) are skipped: never scored, never learned;
* a spread floor (``relative_floor`` of the mean), so that a flat line is not infinitely
  sensitive (River's GaussianScorer scores 1.0 on a flat line);
* one bad direction per feature (latency up is bad, bitrate down is bad) and optional absolute
  limits (``{"max": 0.03}``) that open a signal even when the baseline drifted;
* an effect-size guard: a deviation must also be large in absolute terms (``min_change`` per
  feature, ``min_relative_change`` of the mean) to open a signal: significant is not enough;
* anomalous values are kept out of the baseline, unless a shift lasts ``relearn_after``
  observations, after which it is learned as the new normal;
* hysteresis: a signal opens above ``z_threshold`` (or past a limit) and closes only after
  ``clear_windows`` observations back under ``z_clear`` and within limits;
* a false-alarm budget: ``budget`` is the chance per observation and feature that may open a
  signal on normal data. The baseline learns how often a run of deviations starts on this
  feature (``onset_rate``: runs over observations, counted over a week with a Gaussian prior
  that is also its floor) and opens a signal only once a run has lasted ``k`` observations, the
  smallest ``k`` with ``onset_rate ** k <= budget`` (at most ``max_confirm``; with the floor a
  quiet series waits 2 observations, however long it has been quiet; while that rate is still
  mostly the prior, the first ``onset_prior_weight`` observations, a deviation waits
  ``max_confirm``): a series whose noise is heavy-tailed
  (one-window latency spikes) must persist before it pages, a quiet one does not wait. Runs of
  deviations twice as far (twice ``z_threshold`` and the minimum effect) have their own, lower,
  onset rate: a large change on a well-behaved series opens sooner than a marginal one. A limit
  breach counts as a deviation, and a feature whose own noise often crosses its limit (a small
  population near it) waits as long as the budget asks.

>>> b = RobustBaseline(warmup=5, directions={"latency_ms": "up"})
>>> for v in [100, 102, 98, 101, 99, 100, 103, 97]:
...     b.learn_one({"latency_ms": v})
>>> b.score_one({"latency_ms": 100}) < 0.1, b.score_one({"latency_ms": 400}) > 0.9
(True, True)
>>> [s.metric for s in b.update_one({"latency_ms": 400}, ts=1)]
['latency_ms']
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

from river import stats

#: Told ``(feature, observed, expected, lower, upper)`` of each value :meth:`RobustBaseline.update_one`
#: scores against a learned mean, while :func:`observing` has set it (the incident page's window
#: history). Module state, never part of a baseline; it changes nothing a baseline returns or learns.
_observer: Optional[Callable[[str, float, float, float, float], None]] = None


@contextmanager
def observing(fn: Callable[[str, float, float, float, float], None]) -> Iterator[None]:
    """Tell ``fn`` every value scored inside the ``with`` block (see ``_observer``)."""
    global _observer
    previous, _observer = _observer, fn
    try:
        yield
    finally:
        _observer = previous


@dataclass(slots=True)
class Signal:
    """One feature out of its normal range: what was seen, what was expected, how unusual."""

    metric: str
    observed: float
    expected: float
    score: float  # robust deviation (z) in the bad direction; 0 when only a limit is breached
    limit: Optional[float] = None  # the absolute limit breached, if any
    since: Optional[int] = None  # event time (ms) the signal opened

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "observed": _round(self.observed),
            "expected": _round(self.expected),
            "score": round(self.score, 2),
            "limit": self.limit,
            "since": self.since,
        }


def _round(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else x


@dataclass(slots=True)
class _Feature:
    mean: stats.EWMean
    var: stats.EWVar
    n: int = 0  # observations learned
    seen: int = 0  # observations scored
    open_since: Optional[int] = None
    normal_run: int = 0
    abnormal_run: int = 0
    onsets: float = 0.0  # runs of deviations seen (decayed, see RobustBaseline.onset_memory)
    onsets_far: float = 0.0  # ... runs of deviations twice as far (twice the threshold and the effect)
    windows: float = 0.0  # observations after the warm-up (decayed the same way)
    run: int = 0  # deviating observations in a row, before the signal opened
    far_run: int = 0  # ... of which the last ones in a row were twice as far
    far_onsets: int = 0  # runs twice as far started within the current run (counted when it is over)
    run_since: Optional[int] = None


@dataclass
class RobustBaseline:
    """Baseline and hysteresis for the named features of one entity (see the module doc)."""

    fading_factor: float = 0.05
    warmup: int = 12
    z_threshold: float = 5.0
    z_clear: float = 2.5
    clear_windows: int = 3
    relative_floor: float = 0.02
    absolute_floor: float = 1e-6
    relearn_after: int = 60
    min_relative_change: float = 0.2
    directions: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    min_change: Mapping[str, float] = field(default_factory=dict)
    budget: float = 0.0  # chance per observation and feature of opening a signal on normal data (0: no confirmation)
    max_confirm: int = 3
    onset_prior: float = 1e-4  # the onset rate assumed before any is seen, and its floor (about a Gaussian's at z 3.7)
    onset_memory: int = 60480  # observations the onset rate is counted over (a week of 10 s windows)
    onset_prior_weight: int = 360  # observations the prior counts for (an hour of 10 s windows)
    _features: dict[str, _Feature] = field(default_factory=dict, repr=False)
    observations: int = 0

    def _feature(self, name: str) -> _Feature:
        f = self._features.get(name)
        if f is None:
            f = self._features[name] = _Feature(stats.EWMean(self.fading_factor), stats.EWVar(self.fading_factor))
        return f

    def expected(self, name: str) -> Optional[float]:
        f = self._features.get(name)
        return f.mean.get() if f is not None and f.n else None

    def _z(self, f: _Feature, name: str, value: float, spread: Optional[float] = None) -> tuple[float, float]:
        """Deviation in the bad direction (positive = worse): as a z-score, and as a raw change."""
        mean = f.mean.get()
        if spread is None:
            spread = math.sqrt(max(f.var.get(), 0.0))
        spread = max(spread, self.relative_floor * abs(mean), self.absolute_floor)
        delta = value - mean
        direction = self.directions.get(name, "both")
        if direction == "down":
            delta = -delta
        elif direction != "up":
            delta = abs(delta)
        return delta / spread, delta

    def confirm(self, name: str, far: bool = False, breach: bool = False) -> int:
        """Observations in a row a deviation of ``name`` must last before it opens a signal: the
        smallest run whose chance on normal data is within the budget, that chance taken from how
        often runs have started (the onset rate) or, for a feature with a limit, how often its
        own noise alone would cross the limit, whichever is larger.

        While the onset rate is still being learned (fewer observations after the warm-up than
        the prior stands for, ``onset_prior_weight``: the first hour) a deviation from the learned
        normal, near or far, waits ``max_confirm``: the rate it would be judged by is mostly the
        prior, and a series with a heavy tail has not shown it yet. A limit ``breach`` does not
        wait for that (learning is not paging, but a limit is not learned)."""
        f = self._features.get(name)
        if self.budget <= 0:
            return 1
        if not breach and (f is None or f.windows < self.onset_prior_weight):
            return self.max_confirm
        prior = self.onset_prior / (10.0 if far else 1.0)
        q = prior
        if f is not None:  # runs seen over observations, with the prior as a few hundred observations; never below it
            seen = f.onsets_far if far else f.onsets
            q = max(prior, (seen + self.onset_prior_weight * prior) / (f.windows + self.onset_prior_weight))
        if f is not None and not far:
            q = max(q, self._crossing_chance(f, name))
        if q <= self.budget:
            return 1
        return max(1, min(self.max_confirm, math.ceil(math.log(self.budget) / math.log(min(q, 0.5)))))

    def _crossing_chance(self, f: _Feature, name: str) -> float:
        """The chance that one observation crosses ``name``'s limit by noise alone (normal model
        around the learned mean and spread): high for a small population near its limit."""
        lim = self.limits.get(name)
        if not lim or f.n < 2:
            return 0.0
        mean = f.mean.get()
        spread = max(math.sqrt(max(f.var.get(), 0.0)), self.relative_floor * abs(mean), self.absolute_floor)
        gaps = [(lim["max"] - mean) / spread] if "max" in lim else []
        gaps += [(mean - lim["min"]) / spread] if "min" in lim else []
        return max((0.5 * math.erfc(g / math.sqrt(2)) for g in gaps), default=0.0)

    def _min_effect(self, f: _Feature, name: str) -> float:
        return max(self.min_change.get(name, 0.0), self.min_relative_change * abs(f.mean.get()))

    def _breach(self, name: str, value: float, margin: float = 0.0) -> Optional[float]:
        """The limit ``value`` is past by more than ``margin`` (a measured rate's uncertainty), if any."""
        lim = self.limits.get(name)
        if not lim:
            return None
        if "max" in lim and value > lim["max"] + margin:
            return lim["max"]
        if "min" in lim and value < lim["min"] - margin:
            return lim["min"]
        return None

    def _observe(self, f: _Feature, name: str, value: float, given: Optional[float], effect: float) -> None:
        """Tell the observer the value, the mean and the band a value must leave to open a signal
        (``z_threshold`` spreads, at least the minimum effect, each side). Reads only."""
        mean = f.mean.get()
        spread = given if given is not None else math.sqrt(max(f.var.get(), 0.0))
        spread = max(spread, self.relative_floor * abs(mean), self.absolute_floor)
        width = max(self.z_threshold * spread, effect)
        try:
            if _observer is not None:
                _observer(name, value, mean, mean - width, mean + width)
        except Exception:  # the history is a view: it never breaks detection
            pass

    def learn_one(self, x: Mapping[str, float]) -> None:
        """Learn the observation unconditionally (use :meth:`update_one` to protect the baseline)."""
        self.observations += 1
        for name, value in x.items():
            if not math.isfinite(value):
                continue
            f = self._feature(name)
            f.seen += 1
            f.mean.update(value)
            f.var.update(value)
            f.n += 1

    def score_one(self, x: Mapping[str, float]) -> float:
        """How unusual the observation is, in [0, 1): 0 normal, towards 1 far past the threshold."""
        worst = 0.0
        for name, value in x.items():
            f = self._features.get(name)
            if f is None or f.n < 2 or not math.isfinite(value):
                continue
            worst = max(worst, self._z(f, name, value)[0])
        return 0.0 if worst <= 0 else 1.0 - math.exp(-worst / self.z_threshold)

    def update_one(
        self, x: Mapping[str, float], ts: int, spread: Optional[Mapping[str, float]] = None,
        bound: Optional[Mapping[str, float]] = None,
    ) -> list[Signal]:
        """Score, update the hysteresis, learn what is normal; return the signals now open.

        ``spread`` may give a feature's expected spread for this observation (for a rate: its
        binomial standard error), instead of the learned one; such a feature must also be past
        its absolute limit by two spreads to count as a breach. ``bound`` may give, instead, the
        value a limit is judged on (for a measured rate: the end of its confidence interval
        nearest the limit), with no margin.
        """
        self.observations += 1
        out: list[Signal] = []
        for name, value in x.items():
            if not math.isfinite(value):
                continue
            f = self._feature(name)
            f.seen += 1
            warm = f.seen > self.warmup
            given = (spread or {}).get(name)
            z, delta = self._z(f, name, value, given) if f.n >= 2 else (0.0, 0.0)
            # a rate judged by its standard error must be past its limit by two of them
            if bound is not None and name in bound:
                limit = self._breach(name, bound[name])
            else:
                limit = self._breach(name, value, 2.0 * given if given else 0.0)
            effect = self._min_effect(f, name)
            if _observer is not None and f.n >= 2:
                self._observe(f, name, value, given, effect)
            # a deviation (far from the learned normal, by a change that matters) or a limit
            # breached: either must last the run the budget asks for (:meth:`confirm`). A limit pages while the baseline is still learning (never its own moving
            # estimate); once it has learned, a limit its normal is already past is not news:
            # only a deviation from that normal opens a signal (one already open stays open)
            chronic = limit is not None and warm and self._crossing_chance(f, name) >= 0.5
            deviating = (warm and z >= self.z_threshold and delta >= effect) or (limit is not None and not chronic)
            far = warm and z >= 2 * self.z_threshold and delta >= 2 * effect
            if warm:  # the onset counts (see the module doc) decay on every observation after the warm-up ...
                keep = 1.0 - 1.0 / self.onset_memory
                f.onsets, f.onsets_far, f.windows = f.onsets * keep, f.onsets_far * keep, f.windows * keep + 1.0
            was_running = f.run > 0
            if deviating and f.open_since is None:
                f.far_onsets += 1 if far and f.far_run == 0 else 0
                f.run += 1
                f.run_since = ts if f.run == 1 else f.run_since
                f.far_run = f.far_run + 1 if far else 0
            confirmed = deviating and (f.open_since is not None or f.run >= self.confirm(name, breach=limit is not None and not chronic)
                                       or (f.far_run > 0 and f.far_run >= self.confirm(name, far=True)))
            if (confirmed and f.open_since is None) or (not deviating and was_running):
                # ... and count a run once it is over (opened, or back to normal), so that a run
                # being judged is not evidence against itself
                if warm:
                    f.onsets += 1.0
                    f.onsets_far += f.far_onsets
                f.far_onsets = 0
            if not deviating:
                f.run, f.run_since, f.far_run = 0, None, 0
            abnormal = confirmed
            still = (warm and z >= self.z_clear and delta >= effect / 2) or limit is not None
            if f.open_since is None and abnormal:
                f.open_since, f.normal_run = (f.run_since if f.run_since is not None else ts), 0
                f.run, f.run_since, f.far_run = 0, None, 0
            elif f.open_since is not None:
                if still:
                    f.normal_run = 0
                else:
                    f.normal_run += 1
                    if f.normal_run >= self.clear_windows:
                        f.open_since = None
            # keep anomalies out of the baseline (only those: excluding every mildly high value
            # would bias it low), unless the shift lasts long enough to be the new normal
            f.abnormal_run = f.abnormal_run + 1 if deviating or abnormal or (f.open_since is not None and still) else 0
            if f.open_since is not None:
                out.append(Signal(name, value, f.mean.get(), min(max(z, 0.0), 999.0), limit, f.open_since))
            if f.abnormal_run == 0 or f.abnormal_run > self.relearn_after:
                f.mean.update(value)
                f.var.update(value)
                f.n += 1
        return out
