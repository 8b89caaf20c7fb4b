"""The randomised world of the simulator (soundcheck.evaluation.world) and the evaluation over it."""

from collections import Counter

import pytest

from soundcheck.evaluation.scenarios import parse_seeds, quiet_days
from soundcheck.evaluation.simulator import Simulator
from soundcheck.evaluation.world import REPORT_SEEDS, TUNE_SEEDS, World


def _events(sim):
    return [r for b in sim.ticks() if b.stream == "behavior" for r in b.records if isinstance(r, dict)]


def test_tuning_and_report_seeds_do_not_overlap():
    assert not set(TUNE_SEEDS) & set(REPORT_SEEDS) and len(REPORT_SEEDS) == 20


def test_each_seed_draws_its_own_world_the_same_every_time():
    worlds = [World.random(s) for s in REPORT_SEEDS]
    assert World.random(REPORT_SEEDS[0]) == worlds[0]
    assert len({tuple(w.markets) for w in worlds}) > 15  # markets differ from seed to seed
    assert {w.keying for w in worlds} == {"natural", "user", "session", "random"}
    assert len({w.per_message for w in worlds}) > 2
    sizes = [min(w.markets.values()) / max(w.markets.values()) for w in worlds]
    assert min(sizes) < 0.01  # some worlds have a market a hundred times smaller than their largest


def test_a_random_world_has_a_background_rate_for_every_event_type():
    sim = Simulator(seed=3, rate=300, duration_s=120, plan=(), world=World.random(3))
    kinds = Counter(r["event_type"] for r in _events(sim))
    for kind in ("app_crash", "skip", "ad_failure", "payment_failure", "subscription_cancel"):
        assert kinds[kind] > 0, kind
    assert set(r["country"] for r in _events(sim)) == set(sim.world.markets)


def test_the_default_world_is_the_one_the_simulator_always_had():
    a = [r for b in Simulator(seed=5, rate=50, duration_s=20).ticks() for r in b.records]
    b = [r for b in Simulator(seed=5, rate=50, duration_s=20, world=World.default()).ticks() for r in b.records]
    assert a == b and not any(r.get("event_type") == "app_crash" and "track_id" in r for r in a if isinstance(r, dict))


def test_incident_magnitudes_vary_with_the_world():
    mags = [Simulator(seed=s, rate=10, duration_s=10, world=World.random(s)).scenarios[0].details["magnitude"] for s in TUNE_SEEDS]
    assert min(mags) < 0.9 and max(mags) > 1.2


def test_seeds_parse_as_lists_and_ranges():
    assert parse_seeds("1-3,7") == [1, 2, 3, 7] and parse_seeds("100-119") == list(REPORT_SEEDS)
    with pytest.raises(ValueError, match="100-119"):
        parse_seeds("a-b")


def test_a_quiet_day_counts_every_notification_as_false(settings):
    rep = quiet_days(settings, [2], rate=60, duration_s=600)
    run = rep["runs"][0]
    assert run["hours"] == pytest.approx(600 / 3600) and run["per_hour"] == run["notifications"] * 6
    assert set(rep["met"]) == {"per_hour", "pages"} and run["world"]["seed"] == 2
