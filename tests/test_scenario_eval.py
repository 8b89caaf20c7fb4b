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


@pytest.mark.integration
def test_a_random_world_through_the_real_worker_with_six_partitions_gives_the_offline_notifications(kafka_bootstrap, settings, tmp_path):
    """``soundcheck eval scenarios --broker``: a randomised world produced as its producers would
    (its keying and batching) to topics of 6 partitions, through a real worker; scored like the
    offline run, and stage 2 finds the anomalies the offline pipeline finds for the same traffic."""
    from soundcheck.evaluation.broker_eval import evaluate_on_broker, format_broker

    rep = evaluate_on_broker(settings, [103], duration_s=600, partitions=6, bootstrap=kafka_bootstrap, workdir=tmp_path)
    (run,) = rep["runs"]
    assert run["partitions"] == 6 and run["notifications"] > 5, run
    assert run["same_anomalies"] and run["anomalies"] > 20, (run["anomalies_only_broker"], run["anomalies_only_offline"])
    assert run["recall"] >= 0.8, run["scenarios"]
    assert "the offline anomalies" in format_broker(rep)
