"""Scenario seeds through the real worker and a real Kafka broker (``soundcheck eval scenarios --broker``).

For each seed: fresh uuid-named topics with ``partitions`` partitions each (6 by default), the
seed's world produced to them as its producers would send it (its keying and its records per
message), then one worker process that reads it all and alerts every anomaly; then the notifications the
worker sent are scored as the offline run's are; the anomalies stage 2 found (kind, detector,
entity, window) must be the offline pipeline's for the same simulated traffic, and its
notifications are compared with the offline run's too: fingerprint, priority and kind (new, repeat,
escalated, released, updated) of each firing notification. The worker must have sent every one the
offline run sent while the input lasted, and none the offline run did not send by the end of the
quiet event time it lets pass after the input (which the worker, with no later traffic, has
only partly seen); its resolved notifications must be among the offline run's, each at most as
often. That comparison is reported, not required: the alert lifecycle in the worker still
depends on when anomalies from different stage-2 partitions reach it relative to its clock (an
anomaly taken after its window's tick can be grouped, held or released differently), so a seed
can differ by a notification or two (one of the first three report seeds did). The broker is ``KAFKA_BOOTSTRAP_SERVERS``, or the embedded local one,
started for the run and stopped after it.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import orjson

from soundcheck.evaluation.harness import WorkerProcess, read_topic, worker_env
from soundcheck.evaluation.produce import produce
from soundcheck.evaluation.score import alerting_quality
from soundcheck.evaluation.simulator import Simulator
from soundcheck.evaluation.world import World
from soundcheck.kafka.admin import ensure_topics_async, worker_topics
from soundcheck.settings import Settings


def _anomaly_keys(anomalies: Iterable[dict[str, Any]]) -> set[tuple]:
    """What stage 2 found, once each (a restarted stage sends copies): kind, detector, entity, window."""
    return {(a["kind"], a["detector"], tuple(sorted(a["entity"].items())), a["window_start"]) for a in anomalies}


def _firing(alerts: Iterable[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted((a["fingerprint"], a["priority"], a.get("notification", "new")) for a in alerts if a["status"] == "firing")


def run_seed_on_broker(settings: Settings, bootstrap: str, sim: Simulator, *, partitions: int, workdir: Path,
                       progress: Optional[Callable[[str], None]] = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``sim`` through one real worker on fresh topics of ``partitions`` partitions: the
    notifications it sent, in the order it sent them, and the anomalies stage 2 found."""
    run = uuid.uuid4().hex[:8]
    topics = {role: f"{name}.eval-{run}" for role, name in settings.topics.__dict__.items()}
    s = settings.replace(kafka={"bootstrap_servers": bootstrap, "app_id": f"soundcheck-eval-{run}", "partitions": partitions},
                         topics=topics)
    asyncio.run(ensure_topics_async(bootstrap, worker_topics(s), partitions, s.kafka.replication_factor, client=s.kafka_client()))
    env = worker_env(bootstrap, s.kafka.app_id, topics, workdir / f"worker-{run}",
                     {"SOUNDCHECK__KAFKA__PARTITIONS": str(partitions), "SOUNDCHECK_ENV": settings.env})
    # the traffic is on the topics before the worker starts: a replay of recorded input, read as
    # fast as the worker can. (Produced while the worker reads, a producer that stalls for more
    # than the idle grace, 1 s of wall time, lets the other partitions close windows without it
    # and its records arrive late: live pacing is soundcheck bench's subject, not detection's.)
    w = sim.world
    truth = asyncio.run(produce(sim, s, batch=w.per_message, keying=w.keying, progress=progress, progress_every_s=10.0))
    valid = sum(truth["produced_valid"].values())
    worker = WorkerProcess(env, workdir / f"worker-{run}.log").start()
    try:
        worker.wait_ready()
        worker.wait_for(lambda: worker.metric_sum("soundcheck_events_in_total") >= valid
                        and worker.metric_sum("soundcheck_dead_letters_total") >= truth["produced_malformed"],
                        900, "the worker to read every record")
        worker.wait_for(worker.drained, 300, "the last windows to close and their anomalies to be alerted")
        n = _settled(worker, "soundcheck_alerts_total", quiet_s=10.0, timeout=120.0)
        records = asyncio.run(read_topic(bootstrap, topics["alerts"], until=lambda r: len(r) >= n, timeout=120,
                                         client=s.kafka_client()))
        if len(records) < n:
            raise RuntimeError(f"the worker counted {n:.0f} notifications but only {len(records)} were on {topics['alerts']}")
        found = worker.metric_sum("soundcheck_anomalies_total")
        docs = [orjson.loads(r.value) for r in asyncio.run(read_topic(
            bootstrap, topics["anomalies"], until=lambda r: sum(1 for x in r if b'"kind"' in x.value) >= found, timeout=120,
            client=s.kafka_client()))]
        anomalies = [d for d in docs if isinstance(d, dict) and "kind" in d]  # not the ticks
        if len(anomalies) < found:
            raise RuntimeError(f"the worker counted {found:.0f} anomalies but only {len(anomalies)} were on {topics['anomalies']}")
        return [orjson.loads(r.value) for r in records], anomalies
    except Exception as e:
        raise RuntimeError(f"{e}\n--- worker log (last lines) ---\n{worker.log_tail(60)}") from e
    finally:
        worker.stop()


def _contains(big: list, small: list) -> bool:
    """Every item of ``small`` in ``big``, as many times (multisets)."""
    from collections import Counter

    return not (Counter(small) - Counter(big))


def _settled(worker: WorkerProcess, metric: str, *, quiet_s: float, timeout: float) -> float:
    """``metric`` once it has not moved for ``quiet_s`` (the alerting clock runs on after the last
    anomaly is taken in: groups wait, the quiet streams' clock moves on)."""
    deadline = time.monotonic() + timeout
    last, since = worker.metric_sum(metric), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = worker.metric_sum(metric)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def evaluate_on_broker(
    settings: Settings, seeds: Iterable[int], *, world: str = "random", rate: float = 150.0, duration_s: int = 900, magnitude: float = 1.0,
    partitions: int = 6, progress: Optional[Callable[[str], None]] = None, workdir: Optional[Path] = None,
    bootstrap: Optional[str] = None,
) -> dict[str, Any]:
    """Each seed through the real worker (see the module doc): its scores, and whether its
    notifications are the offline pipeline's for the same traffic."""
    from soundcheck.evaluation.scenarios import run_world, score_run, world_of
    from soundcheck.kafka import local as kafka_local

    workdir = workdir or Path(tempfile.mkdtemp(prefix="soundcheck-eval-"))
    broker = None
    bootstrap = bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    runs = []
    try:
        if not bootstrap:
            broker = kafka_local.LocalKafka(data_dir=workdir / "kafka")
            bootstrap = broker.start()
        for seed in seeds:
            start_ms = (int(time.time()) - duration_s - 120) * 1000  # recent: the topics' retention keeps it
            make = lambda: Simulator(seed=seed, rate=rate, duration_s=duration_s, start_ms=start_ms,  # noqa: E731
                                     magnitude=magnitude, world=world_of(world, seed))
            started = time.monotonic()
            sim = make()
            sent, found = run_seed_on_broker(settings, bootstrap, sim, partitions=partitions, workdir=workdir, progress=progress)
            wall = time.monotonic() - started
            offline = run_world(settings, make())
            truth = sim.ground_truth()
            r = score_run(sent, truth, settings)
            r["alerting"] = alerting_quality(sent, len(found), truth, settings)
            mine, theirs = _anomaly_keys(found), _anomaly_keys(orjson.loads(a.to_json()) for a in offline.anomalies)
            same_anomalies = mine == theirs
            # the worker sends at least what the input gave offline, and nothing the offline run with
            # its quiet event time after the input (everything resolved, released) did not
            before = offline.alerts[:offline.before_quiet]
            resolved_sent = [a["fingerprint"] for a in sent if a["status"] == "resolved"]
            resolved_offline = [a["fingerprint"] for a in offline.alerts if a["status"] == "resolved"]
            same = (_contains(_firing(sent), _firing(before)) and _contains(_firing(offline.alerts), _firing(sent))
                    and _contains(resolved_offline, resolved_sent))
            r.update(seed=seed, partitions=partitions, world=sim.world.describe() if isinstance(sim.world, World) else {},
                     notifications=len(sent), offline_notifications=len(offline.alerts), same_as_offline=same,
                     anomalies=len(mine), same_anomalies=same_anomalies,
                     anomalies_only_broker=[list(map(str, k)) for k in sorted(mine - theirs, key=str)[:10]],
                     anomalies_only_offline=[list(map(str, k)) for k in sorted(theirs - mine, key=str)[:10]],
                     only_broker=sorted(set(_firing(sent)) - set(_firing(offline.alerts)))[:10],
                     only_offline=sorted(set(_firing(offline.alerts)) - set(_firing(sent)))[:10],
                     wall_s=round(wall, 1))
            runs.append(r)
            if progress:
                progress(f"eval broker: seed {seed}: {partitions} partitions, recall {r['recall']:.2f}, precision {r['precision']:.2f}, "
                         f"median delay {r['median_delay_s']} s, {len(mine)} anomalies ({'the same as' if same_anomalies else 'NOT the same as'} "
                         f"offline), {len(sent)} notifications ({'the same as' if same else 'not the same as'} offline) ({wall:.0f} s)")
    finally:
        if broker:
            broker.stop()
    return {"runs": runs, "all_same_anomalies": all(r["same_anomalies"] for r in runs),
            "all_same_as_offline": all(r["same_as_offline"] for r in runs),
            "recall": _mean(r["recall"] for r in runs), "precision": _mean(r["precision"] for r in runs)}


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return round(sum(xs) / len(xs), 3) if xs else 0.0


def format_broker(report: dict[str, Any]) -> str:
    lines = ["through the real worker and broker"]
    for r in report["runs"]:
        anomalies = "the offline anomalies" if r["same_anomalies"] else (
            f"anomalies DIFFER (broker only {r['anomalies_only_broker']}, offline only {r['anomalies_only_offline']})")
        same = "the offline notifications" if r["same_as_offline"] else (
            f"notifications differ (broker only {r['only_broker']}, offline only {r['only_offline']})")
        lines.append(f"  seed {r['seed']:<5} {r['partitions']} partitions  recall {r['recall']:.2f}  precision {r['precision']:.2f}  "
                     f"median delay {r['median_delay_s']} s  {r['anomalies']} anomalies, {r['notifications']} notifications: "
                     f"{anomalies}; {same}")
    lines.append(f"recall {report['recall']:.3f}, precision {report['precision']:.3f}; "
                 f"{'every seed found the offline anomalies' if report['all_same_anomalies'] else 'NOT every seed found the offline anomalies'}, "
                 f"{'and sent the offline notifications' if report['all_same_as_offline'] else 'not every seed sent the offline notifications'}")
    return "\n".join(lines)
