"""``soundcheck eval scenarios``: the simulator's scenarios through detection and alerting, offline.

The same code the worker runs (:class:`soundcheck.pipeline.OfflinePipeline`), no broker. For
each seed it reports, per scenario and overall:

* recall: injected incidents with at least one alert on the right entity;
* precision: alerts (severity low or above) that belong to an injected incident, over all
  alerts; an alert belongs to an incident when it is on one of the incident's entities, or in
  its region while it lasts (its symptoms: the region's audio, the skips, the dependent services);
* detection delay: event time from the incident's start to its first alert;
* pages (P0/P1) in the benign surge's region while it lasts;
* notifications for the flapping metric's entity;
* for the slow drift, how long before the limit was crossed the first warning came (lead time).

Goals (from the issues): recall >= 0.95, precision >= 0.9, median delay at most 30 s, no page during
the benign surge, at most two notifications for the flapping metric.

``--world random`` draws a different world per seed (:class:`~soundcheck.evaluation.world.World`:
markets and their sizes, base rates, noise, daily curve, producer keying and batching, incident
magnitudes), read through 3 input partitions. Tune on seeds 1-10, report on 100-119.
``--quiet-days`` adds, per seed, an hour of the same world with no incident at all: every
notification there is false (goal: at most one an hour, no P0/P1).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Iterable, Mapping, Optional

import orjson

from soundcheck.evaluation.score import alerting_quality, evaluate
from soundcheck.pipeline import OfflinePipeline, run_simulation
from soundcheck.settings import Settings, load_settings
from soundcheck.evaluation.simulator import Simulator, encode
from soundcheck.evaluation.world import World

GOALS = {"recall": 0.95, "precision": 0.9, "median_delay_s": 30.0, "benign_pages": 0, "flapping_notifications": 2,
         "compression": 0.9, "grouping_purity": 0.95, "root_cause_accuracy": 0.9}
START_MS = 1_700_000_000_000


def run_offline(settings: Settings, sim: Simulator, batch: int = 50, partitions: int = 1, keying: str = "natural") -> OfflinePipeline:
    """Feed every second of ``sim`` through the offline pipeline, then flush the open windows."""
    return run_simulation(settings, sim, partitions=partitions, keying=keying, per_message=batch)


def score_run(alerts: list[dict[str, Any]], truth: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    report = evaluate(alerts, truth, settings)
    counted = [a for a in alerts if a["severity"] != "info"]
    noise = report["unmatched_alerts"]
    flapping = next((r for r in report["scenarios"] if r["name"] == "flapping_metric"), None)
    delays = [r["delay_s"] for r in report["scenarios"] if r.get("found")]
    return {
        "recall": report["found"] / report["injected"] if report["injected"] else 1.0,
        "precision": (len(counted) - noise) / len(counted) if counted else 1.0,
        "median_delay_s": statistics.median(delays) if delays else None,
        "benign_pages": report["benign_pages"],
        "flapping_notifications": flapping["notifications"] if flapping else 0,
        "alerts": len(alerts),
        "counted_alerts": len(counted),
        "unmatched": report["unmatched_examples"],
        "scenarios": report["scenarios"],
    }


def world_of(kind: str, seed: int) -> Optional[World]:
    """The world of ``seed``: None (the simulator's default) or a random one."""
    if kind not in ("default", "random"):
        raise ValueError(f"world {kind!r}: expected 'default' or 'random'")
    return World.random(seed) if kind == "random" else None


def run_world(settings: Settings, sim: Simulator) -> OfflinePipeline:
    """``sim`` through the offline pipeline as its world's producers would send it (the default
    world: one partition, natural keys, 50 records a message; a random one: 3 partitions)."""
    w = sim.world
    if w.seed is None:
        return run_offline(settings, sim)
    return run_simulation(settings, sim, partitions=3, keying=w.keying, per_message=w.per_message, seed=w.seed)


def evaluate_seeds(
    settings: Settings, seeds: Iterable[int], *, rate: float = 150.0, duration_s: int = 900, magnitude: float = 1.0,
    progress: Optional[Any] = None, world: str = "default",
) -> dict[str, Any]:
    runs = []
    rows = 0
    started = time.perf_counter()
    for seed in seeds:
        sim = Simulator(seed=seed, rate=rate, duration_s=duration_s, start_ms=START_MS, magnitude=magnitude,
                        world=world_of(world, seed))
        pipe = run_world(settings, sim)
        rows += sum(pipe.events_in.values())
        r = score_run(pipe.alerts, sim.ground_truth(), settings)
        r["alerting"] = alerting_quality(pipe.alerts, len(pipe.anomalies), sim.ground_truth(), settings)
        r["seed"] = seed
        r["world"] = sim.world.describe()
        runs.append(r)
        if progress:
            progress(f"eval scenarios: seed {seed}: recall {r['recall']:.2f}, precision {r['precision']:.2f}, "
                     f"median delay {r['median_delay_s']} s, {r['alerts']} alerts")
    elapsed = time.perf_counter() - started
    delays = [s["delay_s"] for r in runs for s in r["scenarios"] if s.get("found")]
    total = {
        "recall": statistics.mean(r["recall"] for r in runs),
        "precision": statistics.mean(r["precision"] for r in runs),
        "median_delay_s": statistics.median(delays) if delays else None,
        "benign_pages": sum(r["benign_pages"] for r in runs),
        "flapping_notifications": max(r["flapping_notifications"] for r in runs),
        "events_per_s": rows / elapsed if elapsed else 0.0,
        "compression": statistics.mean(r["alerting"]["compression"] for r in runs),
        "grouping_purity": statistics.mean(r["alerting"]["grouping_purity"] for r in runs),
        "root_cause_accuracy": _mean([r["alerting"]["root_cause_accuracy"] for r in runs]),
        "priority_match": _mean([r["alerting"]["priority_match"] for r in runs]),
        "notifications_per_incident": statistics.mean(r["alerting"]["mean_notifications_per_incident"] for r in runs),
    }
    return {"runs": runs, "total": total, "goals": GOALS, "met": met(total)}


QUIET_GOALS = {"per_hour": 1.0, "pages": 0}


def quiet_days(
    settings: Settings, seeds: Iterable[int], *, rate: float = 150.0, duration_s: int = 3600, world: str = "random",
    progress: Optional[Any] = None,
) -> dict[str, Any]:
    """Per seed, ``duration_s`` of its world with no incident (starting at an hour of the day that
    varies with the seed, so the daily curve is rising, falling or at its peak): every firing
    notification is false."""
    if duration_s < 60:
        raise ValueError(f"a quiet day of {duration_s} s: it needs at least 60 s of event time")
    runs = []
    for seed in seeds:
        start = START_MS + (seed * 7 % 24) * 3_600_000
        sim = Simulator(seed=seed, rate=rate, duration_s=duration_s, start_ms=start, plan=(), world=world_of(world, seed))
        pipe = run_world(settings, sim)
        firing = [a for a in pipe.alerts if a["status"] == "firing" and a["severity"] != "info"]
        hours = duration_s / 3600
        kinds: dict[str, int] = {}
        for a in firing:
            metric = (a.get("signals") or [{}])[0].get("metric", "")
            label = f"{a['kind']}:{metric}" if metric else a["kind"]
            kinds[label] = kinds.get(label, 0) + 1
        r = {"seed": seed, "hours": hours, "notifications": len(firing), "per_hour": len(firing) / hours,
             "pages": sum(1 for a in firing if a["priority"] in ("P0", "P1")), "kinds": kinds,
             "world": sim.world.describe()}
        runs.append(r)
        if progress:
            progress(f"eval quiet day: seed {seed}: {r['per_hour']:.1f} notifications an hour, {r['pages']} P0/P1")
    hours = sum(r["hours"] for r in runs)
    total = {"hours": hours, "per_hour": sum(r["notifications"] for r in runs) / hours if hours else 0.0,
             "worst_per_hour": max((r["per_hour"] for r in runs), default=0.0), "pages": sum(r["pages"] for r in runs)}
    met_ = {"per_hour": total["per_hour"] <= QUIET_GOALS["per_hour"], "pages": total["pages"] <= QUIET_GOALS["pages"]}
    return {"runs": runs, "total": total, "goals": QUIET_GOALS, "met": met_}


def format_quiet(rep: Mapping[str, Any]) -> str:
    lines = ["quiet days (no incident: every notification is false)"]
    for r in rep["runs"]:
        top = ", ".join(f"{k} x{n}" for k, n in sorted(r["kinds"].items(), key=lambda x: -x[1])[:3])
        lines.append(f"  seed {r['seed']:<4} {r['per_hour']:6.1f} an hour  {r['pages']} P0/P1  {top}")
    t, ok = rep["total"], rep["met"]
    lines += [
        f"false notifications    {t['per_hour']:.2f} an hour over {t['hours']:.1f} h (worst seed {t['worst_per_hour']:.1f})"
        f"   (goal <= {QUIET_GOALS['per_hour']:.0f})  {'ok' if ok['per_hour'] else 'MISSED GOAL'}",
        f"P0/P1 on quiet days    {t['pages']}       (goal 0)  {'ok' if ok['pages'] else 'MISSED GOAL'}",
    ]
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    """``1,2,3`` or ``100-119`` or a mix: ``1-3,7``."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
        except ValueError:
            raise ValueError(f"seeds {text!r}: expected numbers and ranges such as 1,2,3 or 100-119") from None
        if sep and int(hi) < int(lo):
            raise ValueError(f"seeds {text!r}: the range {part} is empty (write it low-high)")
    if not out:
        raise ValueError(f"seeds {text!r}: no seed")
    return out


def _mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def met(total: Mapping[str, Any]) -> dict[str, bool]:
    return {
        "recall": total["recall"] >= GOALS["recall"],
        "precision": total["precision"] >= GOALS["precision"],
        "median_delay_s": total["median_delay_s"] is not None and total["median_delay_s"] <= GOALS["median_delay_s"],
        "benign_pages": total["benign_pages"] <= GOALS["benign_pages"],
        "flapping_notifications": total["flapping_notifications"] <= GOALS["flapping_notifications"],
        "compression": total["compression"] >= GOALS["compression"],
        "grouping_purity": total["grouping_purity"] >= GOALS["grouping_purity"],
        "root_cause_accuracy": (total["root_cause_accuracy"] or 0) >= GOALS["root_cause_accuracy"],
    }


def format_report(rep: Mapping[str, Any]) -> str:
    lines = ["scenario               " + "".join(f"seed {r['seed']:<22}" for r in rep["runs"])]
    names = [s["name"] for s in rep["runs"][0]["scenarios"]]
    for name in names:
        cells = []
        for r in rep["runs"]:
            s = next(x for x in r["scenarios"] if x["name"] == name)
            if s.get("must_not_page"):
                cells.append(f"pages {s['pages']}".ljust(27))
            elif s["found"]:
                lead = f" lead {s['lead_time_s']:.0f}s" if "lead_time_s" in s else ""
                cells.append(f"{s['delay_s']:>5.0f} s {s['priority']} x{s['notifications']}{lead}".ljust(27))
            else:
                cells.append("MISSED".ljust(27))
        lines.append(f"{name:<23}" + "".join(cells))
    t, ok = rep["total"], rep["met"]
    mark = lambda k: "ok" if ok[k] else "MISSED GOAL"  # noqa: E731
    lines += [
        "",
        f"recall                 {t['recall']:.3f}   (goal >= {GOALS['recall']})  {mark('recall')}",
        f"precision              {t['precision']:.3f}   (goal >= {GOALS['precision']})  {mark('precision')}",
        f"median detection delay {t['median_delay_s']} s (goal <= {GOALS['median_delay_s']:.0f} s)  {mark('median_delay_s')}",
        f"P0/P1 in benign surge  {t['benign_pages']}       (goal 0)  {mark('benign_pages')}",
        f"flapping notifications {t['flapping_notifications']}       (goal <= 2)  {mark('flapping_notifications')}",
        f"notifications/incident {t['notifications_per_incident']:.1f}",
        f"compression            {t['compression']:.3f}   (goal >= {GOALS['compression']}: raw anomalies to notifications)  {mark('compression')}",
        f"grouping purity        {t['grouping_purity']:.3f}   (goal >= {GOALS['grouping_purity']})  {mark('grouping_purity')}",
        f"root-cause accuracy    {t['root_cause_accuracy'] or 0:.3f}   (goal >= {GOALS['root_cause_accuracy']})  {mark('root_cause_accuracy')}",
        f"priority match         {t['priority_match'] or 0:.3f}   (first notified priority = the scenario's expected one)",
        f"throughput             {t['events_per_s']:,.0f} events/s offline (simulation included)",
    ]
    return "\n".join(lines)


def cli_main(args: Any) -> int:
    settings = load_settings(getattr(args, "env", None))
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        print(f"soundcheck eval scenarios: {exc}", file=sys.stderr)
        return 2
    try:
        broker_seeds = parse_seeds(args.broker) if getattr(args, "broker", None) else []
    except ValueError as exc:
        print(f"soundcheck eval scenarios: --broker: {exc}", file=sys.stderr)
        return 2
    if broker_seeds and not 1 <= args.partitions <= 64:
        print(f"soundcheck eval scenarios: --partitions {args.partitions}: 1 to 64", file=sys.stderr)
        return 2
    if getattr(args, "quiet_days", False) and args.quiet_duration < 60:
        print(f"soundcheck eval scenarios: --quiet-duration {args.quiet_duration}: at least 60 s", file=sys.stderr)
        return 2
    world = getattr(args, "world", "default")
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    rep = evaluate_seeds(settings, seeds, rate=args.rate, duration_s=args.duration, magnitude=args.magnitude,
                         progress=progress, world=world)
    print(f"world: {world}; seeds {args.seeds}")
    print(format_report(rep))
    ok = all(rep["met"].values())
    if getattr(args, "quiet_days", False):
        quiet = quiet_days(settings, seeds, rate=args.rate, duration_s=args.quiet_duration, world=world, progress=progress)
        rep["quiet_days"] = quiet
        print()
        print(format_quiet(quiet))
        ok = ok and all(quiet["met"].values())
    if broker_seeds:
        from soundcheck.evaluation.broker_eval import evaluate_on_broker, format_broker

        on_broker = evaluate_on_broker(settings, broker_seeds, world=world, rate=args.rate, duration_s=args.duration,
                                       magnitude=args.magnitude, partitions=args.partitions, progress=progress)
        rep["broker"] = on_broker
        print()
        print(format_broker(on_broker))
        ok = ok and on_broker["all_same_anomalies"]
    if args.json:
        with open(args.json, "wb") as f:
            f.write(orjson.dumps(rep, option=orjson.OPT_INDENT_2))
    return 0 if ok else 1
