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
  ``clear_windows`` observations back under ``z_clear`` and within limits.

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
        self, x: Mapping[str, float], ts: int, spread: Optional[Mapping[str, float]] = None
    ) -> list[Signal]:
        """Score, update the hysteresis, learn what is normal; return the signals now open.

        ``spread`` may give a feature's expected spread for this observation (for a rate: its
        binomial standard error), instead of the learned one; such a feature must also be past
        its absolute limit by two spreads to count as a breach.
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
            limit = self._breach(name, value, 2.0 * given if given else 0.0)
            effect = self._min_effect(f, name)
            if _observer is not None and f.n >= 2:
                self._observe(f, name, value, given, effect)
            abnormal = warm and ((z >= self.z_threshold and delta >= effect) or limit is not None)
            still = warm and ((z >= self.z_clear and delta >= effect / 2) or limit is not None)
            if f.open_since is None and abnormal:
                f.open_since, f.normal_run = ts, 0
            elif f.open_since is not None:
                if still:
                    f.normal_run = 0
                else:
                    f.normal_run += 1
                    if f.normal_run >= self.clear_windows:
                        f.open_since = None
            # keep anomalies out of the baseline (only those: excluding every mildly high value
            # would bias it low), unless the shift lasts long enough to be the new normal
            f.abnormal_run = f.abnormal_run + 1 if abnormal or (f.open_since is not None and still) else 0
            if f.open_since is not None:
                out.append(Signal(name, value, f.mean.get(), min(max(z, 0.0), 999.0), limit, f.open_since))
            if f.abnormal_run == 0 or f.abnormal_run > self.relearn_after:
                f.mean.update(value)
                f.var.update(value)
                f.n += 1
        return out
