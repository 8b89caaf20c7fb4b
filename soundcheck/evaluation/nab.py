"""NAB (Numenta Anomaly Benchmark) evaluation: run the series detector, write results, score them.

``soundcheck eval nab --data DATA_DIR --out OUT_DIR [--windows LABELS_JSON]`` runs
:class:`soundcheck.detectors.series.SeriesDetector` (one configuration for every file, online:
each row's score uses only that row and the rows before it) over every NAB-format CSV file
(``timestamp,value``) under ``DATA_DIR`` and writes ``OUT_DIR/<category>/soundcheck_<file>.csv``
with ``timestamp,value,anomaly_score``. With a labels file it also scores the results the way
NAB does (``nab/sweeper.py``, ``nab/optimizer.py``, ``nab/runner.py`` of numenta/NAB):

* the first ``P = min(floor(0.15 N), 750)`` rows of a file are a probation period: not scored;
* a window is entered at the row whose timestamp equals its start and left after the row whose
  timestamp equals its end (if a bound is not a row's timestamp: the rows inside ``[start, end]``);
* a detection inside a window is worth ``sig(-(e - i + 1) / W) * tpWeight / sig(-1)``; only the best
  (earliest) detection of a window counts, a missed window costs ``-fnWeight``;
* a detection outside windows is worth ``sig(|i - e_prev| / (W_prev - 1)) * fpWeight`` (``sig`` is
  -1 from 3 on), or ``-fpWeight`` before the first window has ended;
* the threshold is chosen per profile over all files at once (every distinct score, and 1.1);
* the score is normalised: ``100 * (S - S_null) / (S_perfect - S_null)``.

The scorer reproduces the published figures of the reference detectors (``tests/test_nab.py``).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

#: NAB's three scoring profiles (``config/profiles.json`` of numenta/NAB).
DEFAULT_PROFILES: dict[str, dict[str, float]] = {
    "standard": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11, "tnWeight": 1.0},
    "reward_low_FP_rate": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.22, "tnWeight": 1.0},
    "reward_low_FN_rate": {"tpWeight": 1.0, "fnWeight": 2.0, "fpWeight": 0.11, "tnWeight": 1.0},
}

#: Published scores on the shared 24-file slice (standard, reward_low_FP_rate, reward_low_FN_rate).
PUBLISHED: dict[str, tuple[float, float, float]] = {
    "ARTime": (68.8, 60.0, 74.1),
    "Numenta HTM": (64.9, 59.1, 69.8),
    "CAD OSE": (57.5, 53.8, 61.4),
    "Random Cut Forest": (55.7, 43.1, 63.6),
    "KNN CAD": (53.5, 38.2, 61.3),
    "Relative Entropy": (45.3, 35.6, 50.7),
    "Windowed Gaussian": (28.2, 22.4, 31.6),
}

PROBATION_PERCENT = 0.15
PROBATION_MAX = 750  # NAB: probationPercent * 5000


class NabError(ValueError):
    """Bad NAB input: says which file (and line) is wrong."""


# ---------------------------------------------------------------------------------------- input


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.strip())


def read_series(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a NAB CSV file (header ``timestamp,value``): its timestamps (as text) and values.

    Raises :class:`NabError` naming the file and line on a wrong header, a missing or
    non-numeric value, or an unparseable timestamp.
    """
    path = Path(path)
    if not path.is_file():
        raise NabError(f"{path}: no such file")
    timestamps: list[str] = []
    values: list[float] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise NabError(f"{path}: empty file (expected the header 'timestamp,value')")
        cols = [h.strip().lower() for h in header]
        if cols[:2] != ["timestamp", "value"]:
            raise NabError(f"{path}:1: expected the header 'timestamp,value', found {','.join(header)!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < 2:
                raise NabError(f"{path}:{lineno}: expected 'timestamp,value', found {','.join(row)!r}")
            ts, raw = row[0].strip(), row[1].strip()
            try:
                _parse_time(ts)
            except ValueError:
                raise NabError(f"{path}:{lineno}: bad timestamp {ts!r}") from None
            try:
                v = float(raw)
            except ValueError:
                raise NabError(f"{path}:{lineno}: non-numeric value {raw!r}") from None
            if not math.isfinite(v):
                raise NabError(f"{path}:{lineno}: non-finite value {raw!r}")
            timestamps.append(ts)
            values.append(v)
    return timestamps, np.asarray(values, dtype=float)


def read_scores(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a results CSV file (``timestamp,...,anomaly_score,...``): timestamps and scores."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        if "anomaly_score" not in header or "timestamp" not in header:
            raise NabError(f"{path}:1: expected the columns 'timestamp' and 'anomaly_score'")
        it, js = header.index("timestamp"), header.index("anomaly_score")
        ts, scores = [], []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            ts.append(row[it].strip())
            try:
                scores.append(float(row[js]))
            except (ValueError, IndexError):
                raise NabError(f"{path}:{lineno}: bad anomaly_score") from None
    return ts, np.asarray(scores, dtype=float)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NabError(f"{path}: no such {what} file") from None
    except json.JSONDecodeError as exc:
        raise NabError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None


def load_windows(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """NAB labels (``combined_windows.json``): ``{"category/name.csv": [(start, end), ...]}``."""
    path = Path(path)
    raw = _read_json(path, "labels")
    if not isinstance(raw, dict):
        raise NabError(f"{path}: expected an object of 'category/name.csv': [[start, end], ...]")
    out: dict[str, list[tuple[str, str]]] = {}
    for name, wins in raw.items():
        try:
            pairs = [(str(s), str(e)) for s, e in wins]
            for s, e in pairs:
                _parse_time(s), _parse_time(e)
        except (TypeError, ValueError):
            raise NabError(f"{path}: {name}: expected a list of [start, end] timestamps") from None
        out[name.replace("\\", "/")] = pairs
    return out


def load_profiles(path: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Scoring profiles ``{name: {tpWeight, fpWeight, fnWeight, ...}}``; NAB's defaults without a path."""
    if path is None:
        return {k: dict(v) for k, v in DEFAULT_PROFILES.items()}
    path = Path(path)
    raw = _read_json(path, "profiles")
    out = {}
    for name, prof in raw.items():
        cm = prof.get("CostMatrix", prof) if isinstance(prof, dict) else None
        if not isinstance(cm, dict) or not all(k in cm for k in ("tpWeight", "fpWeight", "fnWeight")):
            raise NabError(f"{path}: profile {name!r} needs tpWeight, fpWeight and fnWeight")
        out[name] = {k: float(v) for k, v in cm.items()}
    return out


# -------------------------------------------------------------------------------------- scoring


def scaled_sigmoid(y: np.ndarray | float) -> np.ndarray:
    """NAB's ``scaledSigmoid``: ``2 / (1 + exp(5 y)) - 1``, and -1 from ``y >= 3`` on."""
    y = np.asarray(y, dtype=float)
    with np.errstate(over="ignore"):
        s = 2.0 / (1.0 + np.exp(5.0 * y)) - 1.0
    return np.where(y >= 3.0, -1.0, s)


def probation_length(n: int) -> int:
    return int(min(math.floor(PROBATION_PERCENT * n), PROBATION_MAX))


@dataclass
class FileLayout:
    """How the rows of one file score, independently of the detector (see :func:`file_layout`).

    ``window``: per row the window index (within the file) or -1; ``tp``: the unweighted TP value of
    a row inside a window, ``sig(y) / sig(-1)``; ``fp``: the unweighted FP value ``sig(y)`` of a row
    outside windows (negative); ``scored``: rows past probation.
    """

    n_windows: int
    window: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    scored: np.ndarray


def _window_rows(times: np.ndarray, start: str, end: str) -> tuple[int, int] | None:
    s, e = np.datetime64(_parse_time(start)), np.datetime64(_parse_time(end))
    lo = int(np.searchsorted(times, s, side="left"))
    hi = int(np.searchsorted(times, e, side="right")) - 1
    return (lo, hi) if hi >= lo else None


@functools.lru_cache(maxsize=128)
def _times(timestamps: tuple[str, ...]) -> np.ndarray:
    """The parsed timestamps of a file (read-only; cached: scoring many thresholds, folds and
    settings parses the same files again and again)."""
    times = np.array([np.datetime64(_parse_time(t)) for t in timestamps], dtype="datetime64[us]")
    times.flags.writeable = False
    return times


def file_layout(timestamps: Sequence[str], windows: Iterable[tuple[str, str]]) -> FileLayout:
    """Row roles for one file: which window a row is in, its TP and FP value, whether it is scored."""
    n = len(timestamps)
    times = _times(tuple(timestamps))
    window = np.full(n, -1, dtype=np.int64)
    tp = np.zeros(n)
    fp = np.full(n, -1.0)
    max_tp = float(scaled_sigmoid(-1.0))
    spans = [w for w in (_window_rows(times, s, e) for s, e in sorted(windows, key=lambda w: _parse_time(w[0]))) if w]
    idx = np.arange(n)
    for k, (lo, hi) in enumerate(spans):
        width = hi - lo + 1
        rows = idx[lo : hi + 1]
        window[lo : hi + 1] = k
        tp[lo : hi + 1] = scaled_sigmoid(-(hi - rows + 1) / width) / max_tp
        nxt = spans[k + 1][0] if k + 1 < len(spans) else n
        after = idx[hi + 1 : nxt]
        if len(after):
            # NAB divides by (W_prev - 1): a one-row window makes every later FP worth -fpWeight
            y = np.abs(hi - after) / (width - 1) if width > 1 else np.full(len(after), np.inf)
            fp[hi + 1 : nxt] = scaled_sigmoid(y)
    scored = idx >= probation_length(n)
    return FileLayout(len(spans), window, tp, fp, scored)


@dataclass
class ProfileScore:
    profile: str
    score: float  # normalised, 0 = no detections, 100 = perfect
    raw: float
    threshold: float
    null: float
    perfect: float
    tp: int  # windows detected
    fn: int  # windows missed
    fp: int  # false-positive rows


def score_corpus(
    results: Mapping[str, tuple[Sequence[str], np.ndarray]],
    windows: Mapping[str, Sequence[tuple[str, str]]],
    profiles: Optional[Mapping[str, Mapping[str, float]]] = None,
) -> dict[str, ProfileScore]:
    """Score a detector's results (``{"category/name.csv": (timestamps, scores)}``) per profile.

    The threshold is swept over every distinct score of the scored rows of all files (and 1.1,
    no detections) and the one with the best summed raw score is kept (the highest of ties, as
    NAB's ``max`` does). Vectorised: one sort of all rows, then cumulative sums.
    """
    profiles = load_profiles(None) if profiles is None else profiles
    scores_l, win_l, tp_l, fp_l = [], [], [], []
    n_windows = 0
    for name, (ts, sc) in results.items():
        sc = np.asarray(sc, dtype=float)
        if len(sc) != len(ts):
            raise NabError(f"{name}: {len(ts)} timestamps but {len(sc)} scores")
        lay = file_layout(ts, windows.get(name, []))
        m = lay.scored
        win = np.where(lay.window[m] >= 0, lay.window[m] + n_windows, -1)
        n_windows += lay.n_windows
        scores_l.append(sc[m])
        win_l.append(win)
        tp_l.append(lay.tp[m])
        fp_l.append(lay.fp[m])
    n_labelled = sum(len(v) for k, v in windows.items() if k in results)
    scores = np.concatenate(scores_l) if scores_l else np.zeros(0)
    win = np.concatenate(win_l) if win_l else np.zeros(0, dtype=np.int64)
    tpv = np.concatenate(tp_l) if tp_l else np.zeros(0)
    fpv = np.concatenate(fp_l) if fp_l else np.zeros(0)
    # windows with at least one scored row: those are the ones the raw score counts
    scorable = np.unique(win[win >= 0])

    order = np.argsort(-scores, kind="stable")
    s_sorted, w_sorted = scores[order], win[order]
    in_win = w_sorted >= 0
    # groups of equal score: the threshold at the group includes every row up to its last row
    last_of_group = np.r_[s_sorted[1:] != s_sorted[:-1], True] if len(s_sorted) else np.zeros(0, bool)
    out: dict[str, ProfileScore] = {}
    for pname, prof in profiles.items():
        tpw, fpw, fnw = float(prof["tpWeight"]), float(prof["fpWeight"]), float(prof["fnWeight"])
        null = -fnw * len(scorable)
        delta = np.where(in_win, 0.0, fpv[order] * fpw)
        if in_win.any():
            # best TP value so far in each window, in sorted order: a cumulative max per window
            pos = np.nonzero(in_win)[0]
            wv = w_sorted[pos]
            vals = tpv[order][pos] * tpw
            g = np.argsort(wv, kind="stable")  # group by window, keep the sorted (threshold) order
            wg, vg = wv[g], vals[g]
            offset = (wg - wg.min()).astype(float) * 10.0 * (abs(tpw) + abs(fnw) + 1.0)
            cmax = np.maximum.accumulate(np.maximum(vg, -fnw) + offset) - offset
            first = np.r_[True, wg[1:] != wg[:-1]]
            prev = np.where(first, -fnw, np.r_[-fnw, cmax[:-1]])
            gain = np.empty_like(vals)
            gain[g] = cmax - prev
            delta[pos] = gain
        running = null + np.cumsum(delta)
        cand_scores = np.r_[null, running[last_of_group]]
        cand_thresh = np.r_[1.1, s_sorted[last_of_group]]
        best = int(np.argmax(cand_scores))  # first max: the highest threshold of ties
        raw, thr = float(cand_scores[best]), float(cand_thresh[best])
        perfect = tpw * n_labelled
        det = scores >= thr
        tp_n = len(np.unique(win[det & (win >= 0)]))
        fp_n = int(np.sum(det & (win < 0)))
        denom = perfect - null
        norm = 100.0 * (raw - null) / denom if denom else 0.0
        out[pname] = ProfileScore(pname, norm, raw, thr, null, perfect, tp_n, len(scorable) - tp_n, fp_n)
    return out


def raw_at(
    results: Mapping[str, tuple[Sequence[str], np.ndarray]],
    windows: Mapping[str, Sequence[tuple[str, str]]],
    profile: Mapping[str, float],
    threshold: float,
) -> tuple[float, float, float]:
    """The raw score of ``results`` at a fixed ``threshold`` (not chosen on them), with its null
    and perfect scores: what a threshold tuned elsewhere earns here."""
    tpw, fpw, fnw = float(profile["tpWeight"]), float(profile["fpWeight"]), float(profile["fnWeight"])
    raw = null = perfect = 0.0
    for name, (ts, sc) in results.items():
        lay = file_layout(ts, windows.get(name, []))
        sc = np.asarray(sc, dtype=float)
        m = lay.scored
        det = m & (sc >= threshold)
        scorable = np.unique(lay.window[m & (lay.window >= 0)])
        null -= fnw * len(scorable)
        perfect += tpw * len(windows.get(name, []))
        for k in scorable:
            hits = det & (lay.window == k)
            raw += float(np.max(lay.tp[hits]) * tpw) if hits.any() else -fnw
        raw += float(np.sum(lay.fp[det & (lay.window < 0)]) * fpw)
    return raw, null, perfect


def leave_one_category_out(
    results: Mapping[str, tuple[Sequence[str], np.ndarray]],
    windows: Mapping[str, Sequence[tuple[str, str]]],
    profiles: Optional[Mapping[str, Mapping[str, float]]] = None,
) -> dict[str, dict[str, Any]]:
    """Per profile: the threshold chosen on three categories and scored on the fourth, for each
    category in turn; the held-out raw scores add up to one normalised score over the whole slice,
    comparable with :func:`score_corpus`'s (where the threshold is chosen on the data it is scored on).
    (:func:`nested_leave_one_category_out` with one setting.)"""
    return nested_leave_one_category_out({None: results}, windows, profiles)


def nested_leave_one_category_out(
    results_by_setting: Mapping[Any, Mapping[str, tuple[Sequence[str], np.ndarray]]],
    windows: Mapping[str, Sequence[tuple[str, str]]],
    profiles: Optional[Mapping[str, Mapping[str, float]]] = None,
) -> dict[str, dict[str, Any]]:
    """:func:`leave_one_category_out` when a detector setting is tuned too: ``results_by_setting``
    holds the results of each candidate setting (in the order to prefer on ties). Per profile and
    category, the setting and the threshold that score best on the other three categories are
    applied to it; the held-out raw scores add up to one normalised score. Each fold gives its
    ``setting``, ``threshold``, ``train_score``, held-out ``raw`` and normalised ``score`` (None for
    a category without windows)."""
    profiles = load_profiles(None) if profiles is None else profiles
    settings = list(results_by_setting)
    if not settings:
        raise NabError("nested leave-one-category-out needs at least one setting")
    names = set(results_by_setting[settings[0]])
    if any(set(r) != names for r in results_by_setting.values()):
        raise NabError("every setting needs results for the same files")
    cats = sorted({name.rpartition("/")[0] for name in names})
    if len(cats) < 2:
        raise NabError("leave-one-category-out needs files of at least two categories")
    # the best threshold of every setting on every three categories, for all profiles at once
    trained = {(cat, setting): score_corpus(train, {k: windows.get(k, []) for k in train}, profiles)
               for cat in cats for setting in settings
               for train in [{k: v for k, v in results_by_setting[setting].items() if k.rpartition("/")[0] != cat}]}
    out: dict[str, dict[str, Any]] = {}
    for pname, prof in profiles.items():
        folds, raw_sum, null_sum, perfect_sum = {}, 0.0, 0.0, 0.0
        for cat in cats:
            best = None
            for setting in settings:  # the first of equals wins
                sc = trained[(cat, setting)][pname]
                if best is None or sc.score > best[0]:
                    best = (sc.score, setting, sc.threshold)
            train_score, setting, thr = best
            test = {k: v for k, v in results_by_setting[setting].items() if k.rpartition("/")[0] == cat}
            raw, null, perfect = raw_at(test, windows, prof, thr)
            raw_sum, null_sum, perfect_sum = raw_sum + raw, null_sum + null, perfect_sum + perfect
            folds[cat] = {"setting": setting, "threshold": thr, "train_score": train_score, "raw": raw,
                          "score": 100.0 * (raw - null) / (perfect - null) if perfect != null else None}
        denom = perfect_sum - null_sum
        out[pname] = {"score": 100.0 * (raw_sum - null_sum) / denom if denom else 0.0, "folds": folds}
    return out


def parse_grid(text: str) -> tuple[str, list[float]]:
    """``"z_min=2,2.5,3"`` -> ``("z_min", [2.0, 2.5, 3.0])``: a :class:`SeriesDetector` setting and
    the values to choose it from.

    >>> parse_grid("z_min=2, 2.5,3")
    ('z_min', [2.0, 2.5, 3.0])
    """
    import inspect

    from soundcheck.detectors.series import SeriesDetector

    name, sep, values = text.partition("=")
    name = name.strip()
    params = {k: p.default for k, p in inspect.signature(SeriesDetector.__init__).parameters.items()
              if k != "self" and type(p.default) in (int, float)}
    if not sep or name not in params:
        raise NabError(f"--nested {text!r}: expected <setting>=<v1>,<v2>,... with a numeric SeriesDetector setting "
                       f"({', '.join(params)})")
    try:
        vals = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise NabError(f"--nested {text!r}: the values must be numbers") from None
    if not all(math.isfinite(v) for v in vals):
        raise NabError(f"--nested {text!r}: the values must be finite numbers")
    if not vals or len(set(vals)) != len(vals):
        raise NabError(f"--nested {text!r}: give distinct values, at least one")
    if isinstance(params[name], int):
        if not all(v.is_integer() for v in vals):
            raise NabError(f"--nested {text!r}: {name} takes whole numbers")
        vals = [int(v) for v in vals]
    return name, vals


def score_folder(
    results_dir: str | Path,
    windows: Mapping[str, Sequence[tuple[str, str]]],
    profiles: Optional[Mapping[str, Mapping[str, float]]] = None,
    prefix: str = "",
) -> dict[str, ProfileScore]:
    """Score a NAB results folder ``<category>/<prefix><name>.csv`` for every labelled file."""
    results_dir = Path(results_dir)
    results = {}
    for name in windows:
        cat, _, fname = name.rpartition("/")
        path = results_dir / cat / f"{prefix}{fname}"
        if not path.is_file():
            raise NabError(f"{path}: missing results file for {name}")
        results[name] = read_scores(path)
    return score_corpus(results, windows, profiles)


# ------------------------------------------------------------------------------------ detection


def find_series(data_dir: str | Path) -> list[tuple[str, Path]]:
    """Every CSV file under ``data_dir`` (any depth) as ``("category/name.csv", path)``, sorted."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise NabError(f"{data_dir}: no such data folder")
    files = sorted(p for p in data_dir.rglob("*.csv") if p.is_file())
    if not files:
        raise NabError(f"{data_dir}: no CSV files found")
    return [(p.relative_to(data_dir).as_posix(), p) for p in files]


def detect_series(timestamps: Sequence[str], values: np.ndarray, detector_factory: Optional[Callable[[], Any]] = None) -> np.ndarray:
    """Online scores of one series: a fresh detector, fed row by row (score, then learn)."""
    from soundcheck.detectors.series import SeriesDetector

    det = detector_factory() if detector_factory is not None else SeriesDetector()
    out = np.empty(len(values))
    for i, (t, v) in enumerate(zip(timestamps, values)):
        out[i] = det.update(float(v), t)
    return out


def _stderr_progress(i: int, n: int, name: str) -> None:
    if sys.stderr.isatty():
        print(f"\rfile {i}/{n} {name[:100]:<100}", end="" if i < n else "\n", file=sys.stderr, flush=True)
    else:
        print(f"file {i}/{n} {name}", file=sys.stderr, flush=True)


def run(
    data_dir: str | Path,
    out_dir: str | Path,
    windows: Optional[str | Path | Mapping[str, Sequence[tuple[str, str]]]] = None,
    profiles: Optional[str | Path | Mapping[str, Mapping[str, float]]] = None,
    progress: Optional[Callable[[int, int, str], None]] = _stderr_progress,
    detector_factory: Optional[Callable[[], Any]] = None,
    nested: Optional[tuple[str, Sequence[float]]] = None,
) -> dict[str, Any]:
    """Run the detector over every CSV file under ``data_dir``, write results, optionally score.

    Returns ``{"files", "rows", "seconds", "rows_per_s", "scores": {profile: ProfileScore} | None}``,
    with ``"loco"`` (:func:`leave_one_category_out`) when the labelled files span two categories;
    ``nested=(setting, values)`` also runs the series detector once per value of that setting
    (progress on stderr) and adds ``"nested"`` (:func:`nested_leave_one_category_out`) and
    ``"grid"``: per value, its whole-slice and leave-one-category-out scores.
    """
    if nested is not None and (windows is None or detector_factory is not None):
        raise NabError("--nested needs --windows (the labels to score with), and the series detector's own settings")
    series = find_series(data_dir)
    if windows is not None and not isinstance(windows, Mapping):
        windows = load_windows(windows)
    if profiles is None or not isinstance(profiles, Mapping):
        profiles = load_profiles(profiles)
    inputs = [(name, *read_series(path)) for name, path in series]  # validate everything first
    out_dir = Path(out_dir)
    results: dict[str, tuple[list[str], np.ndarray]] = {}
    rows, seconds = 0, 0.0
    for i, (name, ts, values) in enumerate(inputs, start=1):
        if progress:
            progress(i, len(inputs), name)
        t0 = time.perf_counter()
        scores = detect_series(ts, values, detector_factory)
        seconds += time.perf_counter() - t0
        rows += len(values)
        cat, _, fname = name.rpartition("/")
        target = out_dir / cat / f"soundcheck_{fname}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["timestamp", "value", "anomaly_score"])
            for t, v, s in zip(ts, values, scores):
                w.writerow([t, repr(float(v)) if not float(v).is_integer() else int(v), f"{s:.6f}"])
        results[name] = (ts, np.round(scores, 6))
    report: dict[str, Any] = {
        "files": len(inputs),
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds if seconds > 0 else float("inf"),
        "scores": None,
    }
    if windows is not None:
        missing = [k for k in windows if k not in results]
        extra = [k for k in results if k not in windows]
        scored = {k: v for k, v in results.items() if k in windows}
        report["unlabelled_files"] = extra
        report["labelled_files_missing"] = missing
        labelled = {k: v for k, v in windows.items() if k in scored}
        report["scores"] = score_corpus(scored, labelled, profiles)
        if len({k.rpartition("/")[0] for k in scored}) >= 2:
            report["loco"] = leave_one_category_out(scored, labelled, profiles)
            if nested is not None:
                report["nested"], report["grid"] = _nested(inputs, labelled, profiles, nested, progress)
        elif nested is not None:
            raise NabError("--nested needs labelled files of at least two categories (folders under --data)")
    return report


def _nested(inputs: Sequence[tuple[str, list[str], np.ndarray]], labelled: Mapping[str, Sequence[tuple[str, str]]],
            profiles: Mapping[str, Mapping[str, float]], nested: tuple[str, Sequence[float]],
            progress: Optional[Callable[[int, int, str], None]]) -> tuple[dict[str, Any], dict[float, dict[str, Any]]]:
    from soundcheck.detectors.series import SeriesDetector

    setting, values = nested
    by_value: dict[float, dict[str, tuple[list[str], np.ndarray]]] = {}
    todo = [(name, ts, v) for name, ts, v in inputs if name in labelled]
    for j, value in enumerate(values, start=1):
        res = {}
        for i, (name, ts, v) in enumerate(todo, start=1):
            if progress:
                progress(i, len(todo), f"{setting}={value:g} ({j}/{len(values)}): {name}")
            res[name] = (ts, np.round(detect_series(ts, v, lambda: SeriesDetector(**{setting: value})), 6))
        by_value[value] = res
    grid = {}
    for value, res in by_value.items():
        whole, loco = score_corpus(res, labelled, profiles), leave_one_category_out(res, labelled, profiles)
        grid[value] = {p: {"whole": whole[p].score, "loco": loco[p]["score"]} for p in profiles}
    return nested_leave_one_category_out(by_value, labelled, profiles), grid


def cli_main(args: Any) -> int:
    try:
        grid = getattr(args, "nested", None)
        grid_spec = parse_grid(grid) if grid else None
        if grid_spec is not None and not getattr(args, "windows", None):
            raise NabError("--nested needs --windows (the labels to score with)")
        report = run(args.data, args.out, getattr(args, "windows", None), getattr(args, "profiles", None), nested=grid_spec)
    except NabError as exc:
        print(f"soundcheck eval nab: {exc}", file=sys.stderr)
        return 2
    print(f"{report['files']} files, {report['rows']} rows -> {args.out}")
    print(f"detector: {report['rows_per_s']:,.0f} rows/s ({report['seconds']:.1f} s)")
    scores = report["scores"]
    if scores is None:
        return 0
    if report.get("unlabelled_files"):
        print(f"not scored (no labels): {', '.join(report['unlabelled_files'])}")
    if report.get("labelled_files_missing"):
        print(f"labelled but not in the data folder: {', '.join(report['labelled_files_missing'])}")
    names = list(scores)
    print()
    print(f"{'detector':<38}" + "".join(f"{n:>20}" for n in names))
    print(f"{'soundcheck (this run)':<38}" + "".join(f"{scores[n].score:>20.2f}" for n in names))
    std = ["standard", "reward_low_FP_rate", "reward_low_FN_rate"]
    if names == std:
        for det, figs in PUBLISHED.items():
            print(f"{det + ' (published, slice)':<38}" + "".join(f"{x:>20.1f}" for x in figs))
    loco = report.get("loco")
    if loco:
        print(f"{'soundcheck, leave-one-category-out':<38}" + "".join(f"{loco[n]['score']:>20.2f}" for n in names))
    print()
    for n in names:
        s = scores[n]
        print(f"{n}: threshold {s.threshold:.4f}, windows detected {s.tp}/{s.tp + s.fn}, false-positive rows {s.fp}")
    if loco:
        print()
        print("leave-one-category-out: the threshold chosen on the other three categories, scored on this one")
        for n in names:
            folds = "; ".join(f"{c} {f['score']:.1f}" if f["score"] is not None else f"{c} raw {f['raw']:.2f} (no windows)"
                              for c, f in loco[n]["folds"].items())
            gap = scores[n].score - loco[n]["score"]
            print(f"  {n}: {loco[n]['score']:.2f} overall, {gap:.2f} below the whole-slice score"
                  f"{' (more than 5: fitted to the slice)' if gap > 5 else ''}; {folds}")
    nested = report.get("nested")
    if nested and grid_spec is not None:
        setting, values = grid_spec
        print()
        print(f"nested leave-one-category-out: {setting} and the threshold chosen on the other three categories "
              f"({setting} from {', '.join(f'{v:g}' for v in values)})")
        for v, figs in report["grid"].items():
            print(f"  {setting}={v:g}: " + "; ".join(f"{n} whole {figs[n]['whole']:.2f}, leave-one-category-out {figs[n]['loco']:.2f}"
                                                 for n in names))
        for n in names:
            folds = "; ".join(f"{c} {setting}={f['setting']:g}"
                              + (f" {f['score']:.1f}" if f["score"] is not None else f" raw {f['raw']:.2f} (no windows)")
                              for c, f in nested[n]["folds"].items())
            gap = scores[n].score - nested[n]["score"]
            print(f"  {n}: {nested[n]['score']:.2f} overall, {gap:.2f} below the whole-slice score of the default setting"
                  f"{' (more than 5: fitted to the slice)' if gap > 5 else ''}; {folds}")
    return 0
