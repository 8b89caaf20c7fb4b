"""The false-alarm budget of RobustBaseline (soundcheck.detectors.baseline) and the Wilson
interval the behaviour rates judge their limits with: a deviation must last as long as the
entity's own noise asks, a limit pages while learning but a chronic one is not news."""

import random

import pytest

from soundcheck.detectors.base import false_alarm_budget
from soundcheck.detectors.baseline import RobustBaseline
from soundcheck.detectors.behavior import wilson_interval

BUDGET = 1 / (60480 * 7)  # one false alarm per entity and week: 10 s windows, 7 features


def baseline(**kw):
    return RobustBaseline(warmup=12, budget=BUDGET, max_confirm=3, directions={"latency": "up"}, **kw)


def feed(b, values, t0=0):
    """Windows opened (index of the first window with a signal), per value."""
    return [bool(b.update_one({"latency": v}, ts=t0 + i)) for i, v in enumerate(values)]


def test_the_budget_follows_the_configuration(settings):
    assert false_alarm_budget(settings, 7) == pytest.approx(
        settings.detection["false_alarms_per_entity_week"] / (7 * 86400 / settings.windows.aggregate_s * 7))


def test_a_series_with_one_window_spikes_learns_to_wait_for_a_run():
    rng = random.Random(1)
    b = baseline()
    normal = [100 * rng.gauss(1, 0.02) for _ in range(400)]
    for i in range(20, 400, 25):  # a spike every 25 windows, one window long
        normal[i] *= 2.0
    opened = feed(b, normal)
    assert sum(opened[:60]) <= 2  # before it has seen spikes, a spike can still get through
    assert not any(opened[100:])  # then one-window spikes no longer open a signal
    assert b.confirm("latency") == 3
    shift = feed(b, [180.0] * 5, t0=400)  # a real shift still opens, after the run the budget asks
    assert shift.index(True) <= 2


def test_a_quiet_series_opens_on_a_large_shift_within_two_windows():
    rng = random.Random(2)
    b = baseline()
    feed(b, [100 * rng.gauss(1, 0.02) for _ in range(400)])  # past the first hour: its onset rate is learned
    assert feed(b, [200.0] * 4, t0=400).index(True) == 1  # the second window of the shift


def test_while_the_onset_rate_is_learned_a_deviation_waits_the_longest_run_but_a_limit_does_not():
    """Learning is not paging: in its first hour a series has not shown its tail yet (its onset
    rate is mostly the prior), so two windows of a heavy-tailed spike must not open a signal; a
    lasting shift still does, after ``max_confirm`` windows, and a limit breach as soon as the
    budget asks."""
    rng = random.Random(6)
    b = baseline()
    feed(b, [100 * rng.gauss(1, 0.02) for _ in range(30)])
    assert b.confirm("latency") == b.confirm("latency", far=True) == 3
    assert not any(feed(b, [220.0, 215.0] + [100.0] * 5, t0=30))  # two far windows in a row: a GC pause, twice
    assert feed(b, [200.0] * 4, t0=40).index(True) == 2  # a real shift: its third window
    limited = baseline(limits={"latency": {"max": 150}})
    feed(limited, [100 * rng.gauss(1, 0.02) for _ in range(30)])
    assert limited.confirm("latency", breach=True) == 2
    assert feed(limited, [400.0] * 4, t0=30).index(True) == 1  # past the SLO: no wait for the learning


def test_without_a_budget_a_deviation_opens_at_once():
    rng = random.Random(3)
    b = RobustBaseline(warmup=12, directions={"latency": "up"})
    feed(b, [100 * rng.gauss(1, 0.02) for _ in range(50)])
    assert feed(b, [200.0], t0=50) == [True]


def openings(flags):
    return sum(1 for i, f in enumerate(flags) if f and (i == 0 or not flags[i - 1]))


def test_a_limit_pages_while_learning_but_a_chronic_breach_is_not_news():
    b = baseline(limits={"latency": {"max": 150}})
    assert any(feed(b, [400.0] * 6))  # an outage from the start: past the limit before any learning
    chronic = baseline(limits={"latency": {"max": 150}})
    rng = random.Random(4)
    values = [100 * rng.gauss(1, 0.02) for _ in range(5)]  # part of the warm-up, in limits
    values += [160 * rng.gauss(1, 0.01) for _ in range(200)]  # then past the limit: one episode, learned as the normal
    values += [140.0] * 5  # back under the limit: the episode closes
    values += [160 * rng.gauss(1, 0.01) for _ in range(50)]  # past it again: its normal, not news
    assert openings(feed(chronic, values)) == 1


def test_the_wilson_interval_is_right_for_small_counts():
    lo, hi = wilson_interval(0, 10, 2.0)
    assert lo == 0.0 and 0.2 < hi < 0.35  # no crash in ten plays does not prove a zero rate
    lo, hi = wilson_interval(6, 100, 4.6)
    assert lo < 0.03  # 6% crashes in a hundred plays is not proof of a rate past a 3% limit
    lo, _ = wilson_interval(450, 1000, 4.6)
    assert lo > 0.3  # 45% failing payments in a thousand is


def test_a_long_quiet_series_still_waits_for_a_second_window():
    """Steady state: however long a series has been quiet, a one-window spike does not open a
    signal (the onset rate's floor), and a shift still opens on its second window."""
    rng = random.Random(5)
    b = baseline()
    values = [100 * rng.gauss(1, 0.02) for _ in range(9000)]
    for i in range(3000, 9000, 3000):  # a spike every 8 hours, one window long
        values[i] *= 2.0
    assert not any(feed(b, values))
    assert b.confirm("latency") == 2
    assert feed(b, [200.0] * 3, t0=9000) == [False, True, True]
