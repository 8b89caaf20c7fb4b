"""`soundcheck eval scenarios`: the goals of the detection issue, offline, on seeds the defaults were not tuned on."""

import pytest

from soundcheck.evaluation.scenarios import GOALS, evaluate_seeds, format_report


@pytest.fixture(scope="module")
def report():
    from soundcheck.settings import load_settings

    return evaluate_seeds(load_settings("development", environ={}), [31], rate=120, magnitude=0.8)


def test_scenario_goals_are_met_on_an_unseen_seed(report):
    t = report["total"]
    assert t["recall"] >= GOALS["recall"]
    assert t["precision"] >= GOALS["precision"]
    assert t["median_delay_s"] < GOALS["median_delay_s"]
    assert t["benign_pages"] == 0
    assert t["flapping_notifications"] <= GOALS["flapping_notifications"]


def test_the_slow_drift_is_foreseen_before_the_limit_is_crossed(report):
    drift = next(s for s in report["runs"][0]["scenarios"] if s["name"] == "slow_drift")
    assert drift["found"] and drift["first_kind"] == "slo_forecast" and drift["lead_time_s"] > 60


def test_the_report_prints_every_scenario(report):
    text = format_report(report)
    for name in ("cdn_pop_degradation", "fraud_farm", "billing_error_spike", "benign_surge", "flapping_metric", "slow_drift"):
        assert name in text
