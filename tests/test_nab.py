"""NAB evaluation: the scorer reproduces NAB's published figures; the series detector is online."""

from __future__ import annotations

import csv
import math
import pickle
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from soundcheck.evaluation import nab
from soundcheck.detectors.series import SeriesDetector

SHARED = Path(__file__).resolve().parents[2] / "shared" / "nab"
LABELS = SHARED / "labels" / "combined_windows.json"

# published figures on the slice (standard, reward_low_FP_rate, reward_low_FN_rate)
REFERENCE = {
    "numenta": (64.85, 59.12, 69.85),
    "windowedGaussian": (28.16, 22.38, 31.59),
}
SMALL = ["realAdExchange/exchange-4_cpc_results.csv", "realKnownCause/ec2_request_latency_system_failure.csv"]


@pytest.fixture(scope="module")
def shared() -> Path:
    if not (SHARED / "data").is_dir() or not LABELS.is_file():
        pytest.fail(f"the NAB slice is missing: expected it at {SHARED} (../shared/nab beside the project)")
    return SHARED


@pytest.fixture(scope="module")
def windows(shared: Path) -> dict:
    return nab.load_windows(LABELS)


@pytest.mark.parametrize("detector", sorted(REFERENCE))
def test_scorer_reproduces_reference_figures(shared: Path, windows: dict, detector: str) -> None:
    scores = nab.score_folder(shared / "reference" / detector, windows, prefix=f"{detector}_")
    got = tuple(round(scores[p].score, 2) for p in ("standard", "reward_low_FP_rate", "reward_low_FN_rate"))
    assert got == pytest.approx(REFERENCE[detector], abs=0.005)


def test_default_profiles_match_config(shared: Path) -> None:
    from_file = nab.load_profiles(shared / "config" / "profiles.json")
    for name, weights in nab.load_profiles().items():
        for k in ("tpWeight", "fpWeight", "fnWeight"):
            assert from_file[name][k] == weights[k]


def _toy(n: int = 1000) -> tuple[list[str], dict]:
    start = np.datetime64("2020-01-01T00:00:00", "s")
    ts = [np.datetime_as_string(start + np.timedelta64(300 * i, "s")).replace("T", " ") for i in range(n)]
    return ts, {"a/toy.csv": [(ts[400], ts[449]), (ts[700], ts[719])]}


def test_scorer_null_perfect_and_false_positive_weights() -> None:
    ts, wins = _toy()
    zeros = np.zeros(len(ts))
    assert nab.score_corpus({"a/toy.csv": (ts, zeros)}, wins)["standard"].score == 0.0
    perfect = zeros.copy()
    perfect[[400, 700]] = 1.0
    res = nab.score_corpus({"a/toy.csv": (ts, perfect)}, wins)
    # the earliest row of a window is worth tpWeight exactly (sig(-1) / sig(-1))
    assert res["standard"].score == pytest.approx(100.0)
    assert res["standard"].tp == 2 and res["standard"].fp == 0
    # a false positive before any window ends costs -fpWeight; right after a window it costs less
    lay = nab.file_layout(ts, wins["a/toy.csv"])
    assert lay.fp[300] == -1.0
    assert -1.0 < lay.fp[451] < 0.0 and lay.fp[451] > lay.fp[470]
    assert lay.scored.sum() == len(ts) - 150  # probation: floor(0.15 * 1000)


def test_scorer_window_in_timestamps_only(windows: dict) -> None:
    # a window whose bounds are not row timestamps covers the rows inside [start, end]
    ts, _ = _toy()
    lay = nab.file_layout(ts, [("2020-01-02 09:02:00", "2020-01-02 10:58:00")])
    rows = np.nonzero(lay.window == 0)[0]
    assert ts[rows[0]] == "2020-01-02 09:05:00" and ts[rows[-1]] == "2020-01-02 10:55:00"


def _series(shared: Path, name: str):
    return nab.read_series(shared / "data" / name)


def test_detector_is_online_and_deterministic(shared: Path) -> None:
    ts, values = _series(shared, SMALL[0])
    full = nab.detect_series(ts, values)
    again = nab.detect_series(ts, values)
    assert np.array_equal(full, again)
    k = 900
    prefix = nab.detect_series(ts[:k], values[:k])
    assert np.array_equal(prefix, full[:k])
    # changing the future does not change the past
    altered = values.copy()
    altered[k:] = altered[k:] * 10 + 5
    assert np.array_equal(nab.detect_series(ts, altered)[:k], full[:k])
    assert ((full >= 0) & (full <= 1)).all()


def test_detector_pickle_round_trip(shared: Path) -> None:
    ts, values = _series(shared, SMALL[0])
    det = SeriesDetector()
    for t, v in zip(ts[:700], values[:700]):
        det.update(v, t)
    clone = pickle.loads(pickle.dumps(det))
    a = [det.update(v, t) for t, v in zip(ts[700:], values[700:])]
    b = [clone.update(v, t) for t, v in zip(ts[700:], values[700:])]
    assert a == b



def test_detector_state_from_before_the_histogram_tops_goes_on_the_same(shared: Path) -> None:
    """A detector pickled before it kept its histograms' highest bins (``tops``) restores and
    scores exactly as one that kept them; the quantile starting at the top is a full scan's."""
    ts, values = _series(shared, SMALL[0])
    det = SeriesDetector()
    for t, v in zip(ts[:700], values[:700]):
        det.update(v, t)
    old = pickle.loads(pickle.dumps(det))
    for d in (old, *old.children):
        del d.tops  # as a snapshot written before the attribute existed
    assert all("tops" not in d.__dict__ for d in (old, *old.children))
    a = [det.update(v, t) for t, v in zip(ts[700:], values[700:])]
    b = [old.update(v, t) for t, v in zip(ts[700:], values[700:])]
    assert a == b and max(a) > 0.5
    for d in (det, *det.children):
        for hist, top in ((d.hist_pred, d.tops[0]), (d.hist_novel, d.tops[1])):
            assert top == max(k for k, v in enumerate(hist) if v)
            full = next((0.1 * math.exp(d._bin_log * (k - 1)) for k in range(d._n_bins - 1, 0, -1)
                         if sum(hist[k:]) > (1.0 - d.q) * d.hist_n), 0.1)
            assert d._quantile(hist, top) == full

def test_detector_timestamps_and_bad_values() -> None:
    det = SeriesDetector(warmup=0)
    assert det.update(float("nan"), 0) == 0.0
    for i in range(100):
        det.update(10.0 + (i % 3), 10.0 * i)  # numeric seconds, 10 s windows
    assert det.dt == 10.0
    assert det.update(10.0, 1000.0) < 0.5 < det.update(1000.0, 1010.0)


def test_detector_expected_value() -> None:
    det = SeriesDetector()
    det.update(10.0, 0.0)
    assert math.isnan(det.expected)  # nothing to judge against yet
    for i in range(1, 200):
        det.update(10.0 + (i % 2) * 0.1, 300.0 * i)
    score = det.update(50.0, 300.0 * 200)
    assert score > 0.5 and 9.5 < det.expected < 10.5  # observed 50, expected about 10
    det.update(float("nan"), 300.0 * 201)
    assert math.isnan(det.expected)


def test_detector_coarse_scales_catch_a_missing_daily_peak() -> None:
    # a daily square wave with noise (5-minute samples); on day 10 the daytime high never comes:
    # each row looks like the one before it, only the block means show the missing peak
    rng = np.random.default_rng(0)
    tod = np.arange(288 * 12) % 288
    x = 20 + 60 * ((tod >= 108) & (tod < 216)) + rng.normal(0, 1.5, len(tod))
    start = 288 * 10 + 108
    x[start : start + 108] -= 60
    scores = {}
    for scales in ((32, 128), ()):
        det = SeriesDetector(scales=scales)
        s = np.array([det.update(v, 300.0 * i) for i, v in enumerate(x)])
        scores[scales] = s
        assert s[1000:start].max() < 0.5  # the normal days stay quiet
    assert scores[()][start : start + 108].max() < 0.5  # row level alone misses it
    hit = start + int(np.argmax(scores[(32, 128)][start : start + 108] >= 0.5))
    assert scores[(32, 128)][hit] >= 0.5 and hit - start <= 48  # within a few blocks
    det = SeriesDetector()
    for i, v in enumerate(x[:3000]):
        det.update(v, 300.0 * i)
    clone = pickle.loads(pickle.dumps(det))
    assert [det.update(v, 300.0 * i) for i, v in enumerate(x[3000:], 3000)] == [
        clone.update(v, 300.0 * i) for i, v in enumerate(x[3000:], 3000)
    ]


def test_detector_weekly_profile_is_online_and_picklable(shared: Path) -> None:
    ts, values = _series(shared, "realKnownCause/nyc_taxi.csv")
    ts, values = ts[:2000], values[:2000]  # 30-minute samples: six weeks
    det = SeriesDetector(weekly=True)
    first = [det.update(v, t) for t, v in zip(ts[:1500], values[:1500])]
    assert det.wprofile is not None and "week" in {m for m, k in det.seen.items() if k > 0}
    clone = pickle.loads(pickle.dumps(det))
    a = [det.update(v, t) for t, v in zip(ts[1500:], values[1500:])]
    b = [clone.update(v, t) for t, v in zip(ts[1500:], values[1500:])]
    assert a == b and all(0.0 <= s <= 1.0 for s in first + a)


def _copy_small(shared: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for name in SMALL:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared / "data" / name, data / name)
    return data


def test_run_writes_results_and_scores(shared: Path, windows: dict, tmp_path: Path) -> None:
    data = _copy_small(shared, tmp_path)
    seen = []
    report = nab.run(data, tmp_path / "out", {k: windows[k] for k in SMALL}, progress=lambda i, n, name: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]
    assert report["files"] == 2 and report["rows_per_s"] > 0
    for name in SMALL:
        cat, fname = name.split("/")
        out = tmp_path / "out" / cat / f"soundcheck_{fname}"
        with open(out, newline="") as f:
            rows = list(csv.reader(f))
        ts, values = nab.read_series(data / name)
        assert rows[0] == ["timestamp", "value", "anomaly_score"]
        assert len(rows) - 1 == len(ts)
        assert [r[0] for r in rows[1:]] == ts
        assert np.allclose([float(r[1]) for r in rows[1:]], values)
        s = np.array([float(r[2]) for r in rows[1:]])
        assert ((s >= 0) & (s <= 1)).all()
    scores = report["scores"]
    assert set(scores) == {"standard", "reward_low_FP_rate", "reward_low_FN_rate"}
    # a sanity floor on two files with clear anomalies, not the benchmark goal
    assert scores["standard"].score > 40 and scores["standard"].tp >= 4


def test_cli_main(shared: Path, windows: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _copy_small(shared, tmp_path)
    labels = tmp_path / "labels.json"
    labels.write_text(__import__("json").dumps({k: windows[k] for k in SMALL}))
    rc = nab.cli_main(Namespace(data=str(data), out=str(tmp_path / "out"), windows=str(labels), profiles=None))
    out = capsys.readouterr().out
    assert rc == 0 and "rows/s" in out and "reward_low_FN_rate" in out and "Numenta HTM" in out


def test_bad_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(nab.NabError, match="no such data folder"):
        nab.run(tmp_path / "nope", tmp_path / "out")
    bad = tmp_path / "data" / "cat"
    bad.mkdir(parents=True)
    (bad / "h.csv").write_text("time,val\n2020-01-01 00:00:00,1\n")
    with pytest.raises(nab.NabError, match=r"h\.csv:1: expected the header"):
        nab.run(tmp_path / "data", tmp_path / "out")
    (bad / "h.csv").write_text("timestamp,value\n2020-01-01 00:00:00,1\n2020-01-01 00:05:00,abc\n")
    with pytest.raises(nab.NabError, match=r"h\.csv:3: non-numeric value 'abc'"):
        nab.run(tmp_path / "data", tmp_path / "out")
    (bad / "h.csv").write_text("timestamp,value\nyesterday,1\n")
    with pytest.raises(nab.NabError, match=r"h\.csv:2: bad timestamp"):
        nab.read_series(bad / "h.csv")
    rc = nab.cli_main(Namespace(data=str(tmp_path / "nope"), out=str(tmp_path / "o"), windows=None, profiles=None))
    assert rc == 2 and "no such data folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(nab.NabError, match="no CSV files"):
        nab.run(empty, tmp_path / "out")


@pytest.mark.parametrize("detector", sorted(REFERENCE))
def test_a_fixed_threshold_scores_as_the_sweep_does_and_leave_one_category_out_uses_held_out_thresholds(
        shared: Path, windows: dict, detector: str) -> None:
    results = {}
    for name in windows:
        cat, _, fname = name.rpartition("/")
        results[name] = nab.read_scores(shared / "reference" / detector / cat / f"{detector}_{fname}")
    whole = nab.score_corpus(results, windows)
    for p, s in whole.items():  # raw_at at the swept threshold is the sweep's own raw score
        raw, null, perfect = nab.raw_at(results, windows, nab.load_profiles(None)[p], s.threshold)
        assert (raw, null, perfect) == pytest.approx((s.raw, s.null, s.perfect), abs=1e-6)
    loco = nab.leave_one_category_out(results, windows)
    for p, r in loco.items():
        assert set(r["folds"]) == {"artificialNoAnomaly", "artificialWithAnomaly", "realAdExchange", "realKnownCause"}
        for cat, fold in r["folds"].items():  # each fold's threshold is the best one on the other three
            train = {k: v for k, v in results.items() if not k.startswith(cat + "/")}
            assert fold["threshold"] == nab.score_corpus(train, windows, {p: nab.load_profiles(None)[p]})[p].threshold
        assert r["score"] != whole[p].score


def _reference(shared: Path, windows: dict, detector: str) -> dict:
    results = {}
    for name in windows:
        cat, _, fname = name.rpartition("/")
        results[name] = nab.read_scores(shared / "reference" / detector / cat / f"{detector}_{fname}")
    return results


def test_nested_leave_one_category_out_chooses_the_setting_on_the_other_categories_only(shared: Path, windows: dict) -> None:
    by_setting = {d: _reference(shared, windows, d) for d in sorted(REFERENCE)}
    profiles = nab.load_profiles(None)
    nested = nab.nested_leave_one_category_out(by_setting, windows)
    chose = set()
    for p, r in nested.items():
        raw_sum = null_sum = perfect_sum = 0.0
        for cat, fold in r["folds"].items():
            train_scores = {}
            for d, res in by_setting.items():
                train = {k: v for k, v in res.items() if not k.startswith(cat + "/")}
                train_scores[d] = nab.score_corpus(train, windows, {p: profiles[p]})[p]
            best = max(train_scores, key=lambda d: train_scores[d].score)
            assert fold["setting"] == best and fold["threshold"] == train_scores[best].threshold
            assert fold["train_score"] == pytest.approx(train_scores[best].score)
            test = {k: v for k, v in by_setting[best].items() if k.startswith(cat + "/")}
            raw, null, perfect = nab.raw_at(test, windows, profiles[p], fold["threshold"])
            assert fold["raw"] == pytest.approx(raw)
            raw_sum, null_sum, perfect_sum = raw_sum + raw, null_sum + null, perfect_sum + perfect
            chose.add(best)
        assert r["score"] == pytest.approx(100 * (raw_sum - null_sum) / (perfect_sum - null_sum))
    assert chose == {"numenta"}  # HTM scores better on every three categories than the windowed Gaussian
    # a setting perfect on one category only: no better than numenta without that category (numenta,
    # first, wins the tie), better on every other fold, whose held-out category is not the perfect one
    cat = "realKnownCause"
    perfect = {}
    for name, (ts, sc) in by_setting["numenta"].items():
        if name.startswith(cat + "/"):
            lay = nab.file_layout(ts, windows[name])
            sc = (lay.window >= 0).astype(float)
        perfect[name] = (ts, sc)
    folds = nab.nested_leave_one_category_out({"numenta": by_setting["numenta"], "perfect": perfect}, windows,
                                              {"standard": profiles["standard"]})["standard"]["folds"]
    assert {c: f["setting"] for c, f in folds.items()} == {c: "numenta" if c == cat else "perfect" for c in folds}
    with pytest.raises(nab.NabError, match="same files"):
        nab.nested_leave_one_category_out({"a": by_setting["numenta"], "b": dict(list(by_setting["numenta"].items())[:3])}, windows)


def test_nested_grid_parsing_and_cli(shared: Path, windows: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from soundcheck.detectors.series import SeriesDetector

    assert nab.parse_grid("z_min=2,2.5") == ("z_min", [2.0, 2.5])
    name, vals = nab.parse_grid("refractory=100,200")
    assert (name, vals) == ("refractory", [100, 200]) and all(type(v) is int for v in vals)
    for bad, why in (("z_min", "expected"), ("nope=1,2", "expected"), ("scales=1", "expected"), ("weekly=0,1", "expected"),
                     ("z_min=a", "numbers"), ("z_min=nan,1", "finite"), ("z_min=2,2", "distinct"),
                     ("refractory=1.5", "whole numbers")):
        with pytest.raises(nab.NabError, match=why):
            nab.parse_grid(bad)
    data = _copy_small(shared, tmp_path)
    labels = tmp_path / "labels.json"
    labels.write_text(__import__("json").dumps({k: windows[k] for k in SMALL}))
    args = Namespace(data=str(data), out=str(tmp_path / "out"), windows=str(labels), profiles=None, nested="z_min=2.5,3")
    assert nab.cli_main(args) == 0
    out = capsys.readouterr().out
    assert "nested leave-one-category-out: z_min and the threshold" in out and "z_min=3: standard whole" in out
    default = SeriesDetector().z_min
    report = nab.run(data, tmp_path / "out2", {k: windows[k] for k in SMALL}, progress=None, nested=("z_min", [default]))
    # the grid's one value is the default: its scores are the run's own
    assert report["grid"][default]["standard"]["whole"] == pytest.approx(report["scores"]["standard"].score)
    assert report["nested"]["standard"]["score"] == pytest.approx(report["loco"]["standard"]["score"])
    args.windows, args.nested = None, "z_min=2"
    assert nab.cli_main(args) == 2 and "needs --windows" in capsys.readouterr().err
    one = {SMALL[0]: windows[SMALL[0]]}  # a single category: nothing to hold out
    with pytest.raises(nab.NabError, match="at least two categories"):
        nab.run(data, tmp_path / "out3", one, progress=None, nested=("z_min", [default]))
