"""Predictive detection: warn before a metric crosses its limit (SLO, ceiling), with the lead time.

:class:`SloForecaster` follows one series (window means of one metric of one service in one
region) with River's Holt linear-trend model (``time_series.HoltWinters`` without seasonality)
and reports when the forecast crosses the limit within ``horizon_s`` while the series is still
under it. Only a trend that is real counts: the least-squares slope of the last ``trend_window``
values must be significant (``min_t`` standard errors) and the crossing foreseen ``confirm``
windows in a row, so noise on a flat series, or the model's start-up trend, predicts nothing.

>>> f = SloForecaster(limit=90.0, step_s=10, horizon_s=600, warmup=20)
>>> [f.update(55.0 + 0.1 * (i % 3)) for i in range(40)][-1] is None   # flat: nothing to foresee
True
>>> out = [f.update(55.0 + 0.5 * i) for i in range(40)]                # +0.5 per window: 90 in about 70 windows
>>> warning = next(o for o in out if o is not None)
>>> 0 < warning.lead_time_s <= 600 and warning.level < 90
True
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
from river import time_series


@dataclass(frozen=True, slots=True)
class Forecast:
    level: float  # the smoothed current value
    slope: float  # change per step
    crossing: float  # the forecast value at the first step at or past the limit
    lead_time_s: int  # how long until the limit is crossed, if the trend holds


class SloForecaster:
    """Holt linear-trend forecast of one series against an upper limit (see the module doc)."""

    def __init__(
        self,
        limit: float,
        *,
        step_s: int = 10,
        horizon_s: int = 900,
        alpha: float = 0.3,
        beta: float = 0.05,
        warmup: int = 30,
        confirm: int = 3,
        min_gap: float = 0.02,
        trend_window: int = 30,
        min_t: float = 4.0,
    ) -> None:
        self.limit = limit
        self.step_s = step_s
        self.horizon = max(1, horizon_s // step_s)
        self.warmup = warmup
        self.confirm = confirm
        self.min_gap = min_gap  # the series must be at least this share under the limit (else it is a breach, not a forecast)
        self.model = time_series.HoltWinters(alpha=alpha, beta=beta)
        self.recent: deque[float] = deque(maxlen=trend_window)
        self.min_t = min_t
        self.n = 0
        self.streak = 0

    def update(self, value: float) -> Optional[Forecast]:
        """Learn one window mean; return a :class:`Forecast` when a crossing is foreseen and confirmed."""
        self.model.learn_one(value)
        self.recent.append(value)
        self.n += 1
        if self.n <= self.warmup or not self._significant_rise():
            self.streak = 0
            return None
        path = self.model.forecast(horizon=self.horizon)
        level = path[0]
        slope = (path[-1] - path[0]) / max(len(path) - 1, 1)
        if slope <= 0 or level >= self.limit * (1 - self.min_gap) or value >= self.limit:
            self.streak = 0
            return None
        step = next((i for i, v in enumerate(path) if v >= self.limit), None)
        if step is None:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < self.confirm:
            return None
        return Forecast(level=level, slope=slope, crossing=path[step], lead_time_s=(step + 1) * self.step_s)

    def _significant_rise(self) -> bool:
        """Is the least-squares slope of the recent values positive by ``min_t`` standard errors?"""
        n = len(self.recent)
        if n < 5:
            return False
        y = np.fromiter(self.recent, dtype=float, count=n)
        x = np.arange(n, dtype=float) - (n - 1) / 2
        sxx = float(x @ x)
        slope = float(x @ (y - y.mean())) / sxx
        resid = y - y.mean() - slope * x
        se = math.sqrt(max(float(resid @ resid) / (n - 2), 1e-12) / sxx)
        return slope > self.min_t * se
