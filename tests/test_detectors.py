"""Detector contracts (River style) and behaviour on synthetic data."""

import pickle
import random

import numpy as np
import pytest

from soundcheck.ingest.contracts import load_contracts
from soundcheck.detectors.base import Anomaly, EntityStore
from soundcheck.detectors.baseline import RobustBaseline
from soundcheck.detectors.behavior import BehaviorRateDetector, FraudDetector
from soundcheck.detectors.quality import AudioQualityDetector
from soundcheck.detectors.system import SystemMetricsDetector
from soundcheck.detectors.windows import TumblingAggregator
from soundcheck.evaluation.simulator import Simulator, encode

T0 = 1_700_000_000_000


def noisy(seed=0, n=200, mean=100.0, sd=3.0):
    rng = random.Random(seed)
    return [rng.gauss(mean, sd) for _ in range(n)]


def run_baseline(values, **kw):
    b = RobustBaseline(directions={"x": "up"}, **kw)
    return b, [b.update_one({"x": v}, ts=i) for i, v in enumerate(values)]


def test_baseline_is_quiet_on_noise_and_fires_on_a_spike():
    vals = noisy() + [200.0] + noisy(1, 20)
    b, out = run_baseline(vals, warmup=12)
    opened = [i for i, s in enumerate(out) if s]
    assert opened and opened[0] == 200
    assert out[200][0].observed == 200.0 and out[200][0].expected == pytest.approx(100, abs=3)


def test_baseline_warmup_holds_back_signals():
    b, out = run_baseline([100.0] * 5 + [500.0] * 3, warmup=10)
    assert not any(out)


def test_flat_line_is_not_infinitely_sensitive():
    """River's GaussianScorer scores 1.0 on a flat line; the spread floor prevents that."""
    b, out = run_baseline([50.0] * 100 + [50.5, 51.0], warmup=5)
    assert not any(out)


def test_direction_and_limits():
    b = RobustBaseline(warmup=3, directions={"bitrate": "down"}, limits={"bitrate": {"min": 200}})
    for i in range(20):
        assert b.update_one({"bitrate": 320.0 + (i % 3)}, ts=i) == []
    assert b.update_one({"bitrate": 400.0}, ts=21) == []  # better than normal is not an anomaly
    sig = b.update_one({"bitrate": 150.0}, ts=22)
    assert sig[0].limit == 200 and sig[0].metric == "bitrate"


def test_hysteresis_holds_a_signal_at_the_edge_and_closes_after_clear_windows():
    b, out = run_baseline(noisy(n=100) + [200.0] + [112.0] * 4 + [100.0] * 4, warmup=10, clear_windows=3, min_relative_change=0.1)
    assert out[100] and all(out[101:105])  # held open while still clearly high
    assert out[105] and out[106] and not out[107]  # three normal windows to close


def test_anomalies_stay_out_of_the_baseline_until_the_shift_is_the_new_normal():
    b, out = run_baseline(noisy(n=100) + [300.0] * 80, warmup=10, relearn_after=30)
    assert b.expected("x") > 250  # learned after the relearn horizon
    b2, _ = run_baseline(noisy(n=100) + [300.0] * 20, warmup=10, relearn_after=30)
    assert b2.expected("x") == pytest.approx(100, abs=5)


def test_effect_size_guard_ignores_significant_but_tiny_changes():
    b, out = run_baseline([100.0 + 0.01 * (i % 2) for i in range(100)] + [101.0], warmup=5, min_relative_change=0.2)
    assert not out[-1]


@pytest.mark.parametrize("features", [{"x": 1.0}, {"x": 1.0, "y": 2.0}, {}])
def test_baseline_contract_pickle_determinism_missing_features(features):
    a, _ = run_baseline(noisy(3, 50))
    b = pickle.loads(pickle.dumps(a))
    assert a.score_one(features) == b.score_one(features)
    assert a.update_one(features, 99) == b.update_one(features, 99)
    assert 0.0 <= a.score_one(features) < 1.0


def test_stage1_sums_per_key_and_window_closes_on_the_watermark_and_counts_late_events(settings):
    from soundcheck.ingest.partials import PartitionAggregator

    s = settings.replace(windows={"aggregate_s": 10, "allowed_lateness_s": 2})
    pa = PartitionAggregator(s, "system", 0)
    users = (np.array([0, 1, 0]), ["u1", "u2"])
    pa.add_columns("x", ["a", "b"].__getitem__, 2, np.array([0, 0, 1]), np.array([T0, T0 + 9_000, T0 + 1_000]),
                   np.array([[1.0], [3.0], [np.nan]]), np.array([10, 11, 12]), users)
    pa.max_ts = T0 + 9_000
    assert pa.advance() == [] and pa.committable(13) == 10
    pa.add_columns("x", ["a"].__getitem__, 1, np.array([0]), np.array([T0 + 12_500]), np.array([[5.0]]), np.array([13]))
    closed = {p.key: p for p in pa.advance()}
    assert closed["a"].count == 2 and closed["a"].sums == [4.0] and closed["a"].present == [2.0] and closed["a"].users == 2
    assert closed["b"].present == [0.0]  # NaN means absent, not zero
    assert pa.committable(14) == 13  # the records of the closed window are no longer needed
    pa.add_columns("x", ["a"].__getitem__, 1, np.array([0]), np.array([T0 + 100]), np.array([[7.0]]), np.array([14]))
    assert pa.late_events == 1


def test_stage2_merges_the_partials_of_every_partition_and_closes_when_all_passed():
    agg = TumblingAggregator(size_ms=10_000, lateness_ms=0, n_features=1)
    assert agg.add_partial("a", T0, 2, [4.0], [2.0], users=2) and agg.add_partial("a", T0, 1, [5.0], [1.0], users=1)
    assert agg.advance(T0 + 9_999) == []
    (w,) = agg.advance(T0 + 10_000)
    assert (w.count, w.mean()[0], w.users) == (3, 3.0, 3)
    assert not agg.add_partial("a", T0, 1, [1.0], [1.0]) and agg.late_events == 1


def test_entity_store_is_bounded():
    s = EntityStore(dict, max_entries=100, idle_ms=10**9)
    for i in range(1000):
        s.get(i, i)
    assert len(s) == 100 and s.evicted == 900


def simulate(seed=4, duration=420, plan=(("cdn_pop_degradation", 200, 180),), **kw):
    return Simulator(seed=seed, rate=150, duration_s=duration, start_ms=T0, plan=plan, **kw)


def feed(det, sim, stream):
    contract = load_contracts()[stream]
    out = []
    for b in sim.ticks():
        if b.stream != stream:
            continue
        recs = []
        for v in encode(b, 100):
            recs.extend(contract.decode(v, now_ms=T0 + 10**8)[0])
        out.extend(det.process(recs))
    return out


def test_audio_detector_finds_the_degraded_pop_quickly_and_nothing_before(settings):
    sim = simulate()
    pop = sim.scenarios[0].details["cdn_pop"]
    found = feed(AudioQualityDetector(settings), sim, "audio")
    before = [a for a in found if a.event_time <= sim.scenarios[0].start_ms]
    assert before == []
    on_pop = [a for a in found if a.entity.get("cdn_pop") == pop]
    assert on_pop and on_pop[0].event_time - sim.scenarios[0].start_ms <= 30_000
    assert {s.metric for s in on_pop[0].signals} >= {"bitrate_ratio", "buffering_ratio"}
    assert on_pop[0].node == "cdn" and on_pop[0].sampled_users > 0


def test_a_small_markets_degraded_pop_is_judged_on_its_pooled_short_windows(settings):
    """At 8 events/s the PoP has 1-4 samples a window, under ``min_events_per_window``: its short
    windows are pooled, so the degradation is found (on the pooled samples, naming how many
    windows), nothing is found before it, and without pooling nothing is found at all."""
    from soundcheck.settings import load_settings

    def small():
        return Simulator(seed=4, rate=8, duration_s=420, start_ms=T0, plan=(("cdn_pop_degradation", 200, 180),))

    sim = small()
    inc = sim.scenarios[0]
    pop = inc.details["cdn_pop"]
    per_window: dict[int, int] = {}
    for b in sim.ticks():
        for r in b.records if b.stream == "audio" else ():
            if r["cdn_pop"] == pop:
                per_window[r["ts"] // 10_000] = per_window.get(r["ts"] // 10_000, 0) + 1
    assert max(per_window.values()) < settings.detection["min_events_per_window"]
    found = feed(AudioQualityDetector(settings), small(), "audio")
    assert [a for a in found if a.event_time <= inc.start_ms] == []
    on_pop = [a for a in found if a.entity.get("cdn_pop") == pop]
    assert on_pop and on_pop[0].event_time - inc.start_ms <= 60_000
    first = on_pop[0]
    assert first.details["pooled_windows"] >= 2 and first.samples >= settings.detection["min_events_per_window"]
    assert first.event_time - first.window_start == first.details["pooled_windows"] * 10_000
    assert {s.metric for s in first.signals} & {"bitrate_ratio", "buffering_ratio", "buffer_health_percent"}
    unpooled = load_settings(environ={"SOUNDCHECK__DETECTION__AUDIO__POOL_WINDOWS": "1"})
    assert [a for a in feed(AudioQualityDetector(unpooled), small(), "audio") if a.entity.get("cdn_pop") == pop] == []


def test_behavior_rates_find_a_payment_failure_spike(settings):
    sim = simulate(plan=(("billing_error_spike", 240, 180),))
    sc = sim.scenarios[0]
    found = feed(BehaviorRateDetector(settings), sim, "behavior")
    hits = [a for a in found if a.kind == "payment_failure" and a.region == sc.region]
    assert hits and hits[0].event_time - sc.start_ms <= 60_000
    assert [a for a in found if a.event_time < sc.start_ms] == []


def test_fraud_detector_flags_the_farm_and_no_ordinary_listener(settings):
    sim = simulate(plan=(("fraud_farm", 60, 300),), duration=400)
    farm = set(sim.scenarios[0].details["accounts"])
    found = feed(FraudDetector(settings), sim, "behavior")
    flagged = {a.entity["user_id"] for a in found}
    assert flagged and flagged <= farm
    assert len(flagged) >= len(farm) * 0.8
    assert found[0].details["fraud_probability"] >= 0.7 and found[0].signals


def test_fraud_state_is_bounded_by_max_users(settings):
    s = settings.replace(detection={"fraud": {"max_users": 50}})
    det = FraudDetector(s)
    sim = simulate(plan=(), duration=30)
    feed(det, sim, "behavior")
    assert len(det.users) == 50 and det.users.evicted > 0


def test_system_detector_uses_the_service_slo_and_tracks_unknown_metrics(settings):
    sim = simulate(plan=(("latency_regression", 240, 120),))
    sc = sim.scenarios[0]
    det = SystemMetricsDetector(settings)
    found = feed(det, sim, "system")
    hits = [a for a in found if a.entity == {"service": sc.details["service"], "region": sc.region}]
    assert hits and hits[0].kind == "service_degradation"
    assert [a for a in found if a.event_time < sc.start_ms and a.kind != "traffic_change"] == []
    contract = load_contracts()["system"]
    import orjson
    rec = {"ts": T0 + 10**6, "service": "cdn", "region": "US", "metrics": {"queue_depth": 3.0}}
    det.process(contract.decode(orjson.dumps(rec), now_ms=T0 + 10**8)[0])
    det.flush()
    assert "queue_depth" in det.columns


def test_anomaly_json_round_trip(settings):
    sim = simulate()
    a = feed(AudioQualityDetector(settings), sim, "audio")[0]
    b = Anomaly.from_json(a.to_json())
    assert b.to_json() == a.to_json()


def test_non_finite_and_extreme_inputs_never_poison_a_baseline():
    b = RobustBaseline(warmup=3, directions={"x": "up"})
    for i in range(20):
        b.update_one({"x": 10.0 + i % 2}, ts=i)
    assert b.update_one({"x": float("inf")}, ts=21) == [] and b.update_one({"x": float("nan")}, ts=22) == []
    assert b.expected("x") == pytest.approx(10.5, abs=0.5)
    assert b.update_one({"x": 100.0}, ts=23)  # still able to fire


def test_a_tiny_requested_bitrate_is_no_infinity(settings):
    import orjson

    sim = simulate(plan=(), duration=40)
    rec = next(b.records[0] for b in sim.ticks() if b.stream == "audio")
    det = AudioQualityDetector(settings)
    recs, bad = load_contracts()["audio"].decode(orjson.dumps({**rec, "requested_bitrate_kbps": 5e-324}), now_ms=T0 + 10**8)
    assert not bad
    det.process(recs)
    assert all(np.isfinite(w.sums).all() for w in det.windows._open.values())


def test_one_future_record_does_not_close_the_other_partitions_windows(settings):
    from soundcheck.detectors.stage2 import Stage2
    from soundcheck.pipeline import IngestStage, decode_internal

    ingest = IngestStage(settings, "audio")
    stage2 = Stage2(settings, "audio")
    sim = simulate(plan=(), duration=30)
    contract = load_contracts()["audio"]
    recs = [r for b in sim.ticks() if b.stream == "audio" for v in encode(b, 50) for r in contract.decode(v, now_ms=T0 + 10**8)[0]]
    wall = (T0 + 20_000) / 1000  # the wall clock sits at the end of the data

    def deliver(msgs):
        for m in msgs:
            doc = decode_internal(m.value)
            stage2.add(doc["source"], doc["partials"], doc["closed_until"], now=wall)

    deliver(ingest.process(0, recs[:100], now=wall))
    deliver(ingest.process(1, recs[:100], now=wall))
    far = recs[100]
    far.ts = T0 + 290_000  # allowed by the contract (under max_future_skew_s), but far ahead
    deliver(ingest.process(1, [far], now=wall))
    assert ingest.parts[1].closed_until <= T0 + 25_000  # the future is capped at the wall clock
    assert stage2.event_time(wall) <= ingest.parts[0].closed_until  # partition 0 still holds stage 2 back
    assert ingest.late_events == 0


def test_fraud_detector_in_steps_finds_and_keeps_what_it_does_in_one_piece(settings):
    """The worker scores a window in steps (other agents run between them): same anomalies, same state."""
    from soundcheck.detectors.behavior import drain

    sim = simulate(plan=(("fraud_farm", 60, 300),), duration=400)
    contract = load_contracts()["behavior"]
    whole, stepped = FraudDetector(settings), FraudDetector(settings)
    found_whole, found_stepped, steps = [], [], 0
    for b in sim.ticks():
        if b.stream != "behavior":
            continue
        recs = [r for m in encode(b, 100) for r in contract.decode(m, now_ms=T0 + 10**8)[0]]
        found_whole += whole.process(recs)
        gen = stepped.process_steps(recs, step=7)
        while True:
            try:
                next(gen)
                steps += 1
            except StopIteration as done:
                found_stepped += done.value
                break
    assert steps > 100  # it did run in steps
    assert found_whole and [a.to_json() for a in found_stepped] == [a.to_json() for a in found_whole]
    assert pickle.dumps(stepped.users.state) == pickle.dumps(whole.users.state)
    assert drain(iter(())) is None


def test_a_window_sorted_in_steps_is_sorted_as_in_one_piece():
    """The fraud stage sorts a closed window's rows in runs merged step by step: the same order as
    one stable sort, ties (rows equal in every field) included, whatever the run length."""
    import random

    from soundcheck.detectors.stage2 import _order, _sorted_steps

    rng = random.Random(5)
    rows = [(T0 + rng.randrange(50), f"u{rng.randrange(30)}", rng.choice(["play_start", "skip"]), "d", "SE", None, None, None)
            for _ in range(1_000)]
    rows = [r + (i,) for i, r in enumerate(rows)]  # a tag past the key: equal keys keep their order
    for chunk in (1, 7, 100, 999, 1_000, 5_000):
        gen, steps = _sorted_steps(list(rows), chunk), 0
        while True:
            try:
                next(gen)
                steps += 1
            except StopIteration as done:
                out = done.value
                break
        assert out == sorted(rows, key=_order), chunk
        assert (steps > 0) == (chunk < len(rows))


def test_a_quiet_stream_moves_the_alerting_clock_on_only_once_all_its_partitions_flushed(settings):
    """After a pause in the input, stage 1 closes every window and says so (``quiet``); the stream
    may then tick the alerting clock past what it evaluated, so that its last groups go out. Not
    before every input partition's last partials are in, and not for the other streams: their
    anomalies would come after the clock and be taken late (the crash test's flake at 6b5f355)."""
    from soundcheck.detectors.stage2 import Stage2, clock_ticks

    size, quiet_ms = settings.windows.aggregate_s * 1000, 40_000
    unit = {s: Stage2(settings, s, idle_s=float("inf")) for s in ("audio", "system")}

    def ticks() -> dict:
        return clock_ticks({s: st.done_until for s, st in unit.items()}, size, quiet_ms,
                           frozenset(s for s, st in unit.items() if st.progress.all_quiet))

    for p in (0, 1):
        for st in unit.values():
            st.add(p, [], 10 * size, now=0.0, of=2)
    assert ticks() == {"audio": 10 * size, "system": 10 * size}
    unit["audio"].add(0, [], 12 * size, now=1.0, of=2, quiet=True)  # partition 0 flushed, 1 not yet
    assert ticks() == {"audio": 10 * size, "system": 10 * size}
    unit["audio"].add(1, [], 12 * size, now=1.0, of=2, quiet=True)
    assert ticks() == {"audio": 12 * size + quiet_ms, "system": 10 * size}  # the system stream waits for its own
    unit["system"].add(0, [], 12 * size, now=1.0, of=2, quiet=True)
    unit["system"].add(1, [], 12 * size, now=1.0, of=2, quiet=True)
    assert ticks()["system"] == 12 * size + quiet_ms
    unit["audio"].add(0, [], 13 * size, now=2.0, of=2)  # records again: no more quiet
    assert not unit["audio"].progress.all_quiet and ticks()["audio"] == 12 * size


def test_partitions_reporting_once_a_window_are_never_taken_for_idle(settings):
    """On live traffic stage 1 moves each input partition's progress once a window, each a moment
    after the window closes: stage 2 waits for all of them, and no partition's partials come after
    their window was evaluated (at an idle time of one window, about a fifth did)."""
    import random

    from soundcheck.detectors.stage2 import SourceProgress, idle_after_s

    size = settings.windows.aggregate_s
    rng = random.Random(1)
    progress = SourceProgress(idle_after_s(settings))
    done, late, messages = -1, 0, 0
    for k in range(1, 200):
        for wall, part in sorted((size * k + rng.uniform(0, 0.4), p) for p in range(6)):
            messages += 1
            late += size * 1000 * k <= done  # its window was evaluated before its partials came
            progress.update(part, size * 1000 * k, now=wall, of=6)
            done = max(done, progress.watermark(now=wall) or -1)
    assert messages == 199 * 6 and late == 0
    assert done == size * 1000 * 199
    # a partition that really stops (its worker died) is left out after idle_after_s, not before
    progress.update(0, size * 1000 * 200, now=size * 200.0, of=6)
    assert progress.watermark(now=size * 200.0) == size * 1000 * 199
    assert progress.watermark(now=size * 199.5 + idle_after_s(settings)) == size * 1000 * 200
