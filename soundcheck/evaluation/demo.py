"""``soundcheck demo``: a broker, a worker, a simulated incident scenario, the alerts live, a summary.

Starts the embedded local broker unless ``KAFKA_BOOTSTRAP_SERVERS`` names a cluster (then the
demo uses its own uniquely named topics and consumer group there), starts one real worker
process, replays the scenario through it at full speed, prints each alert as it arrives and
ends with events in, alerts out, dead letters and incidents found against injected.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import orjson

from soundcheck.kafka import local as kafka_local
from soundcheck.evaluation.score import evaluate
from soundcheck.evaluation.harness import WorkerProcess, worker_env
from soundcheck.oncall import TailFormatter, tail_alerts
from soundcheck.kafka.admin import ensure_topics_async, worker_topics
from soundcheck.evaluation.produce import produce
from soundcheck.settings import Settings
from soundcheck.evaluation.simulator import Simulator

def run_demo(settings: Settings, *, rate: float, duration_s: int, seed: int, batch: int, workdir: Optional[Path] = None) -> int:
    color = sys.stdout.isatty()
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="soundcheck-demo-"))
    broker: Optional[kafka_local.LocalKafka] = None
    worker: Optional[WorkerProcess] = None
    try:
        if external:
            bootstrap = external
            run = uuid.uuid4().hex[:8]
            topics = {role: f"{name}.demo-{run}" for role, name in settings.topics.__dict__.items()}
            app_id = f"soundcheck-demo-{run}"
            print(f"demo: using the Kafka cluster at {bootstrap} (topics suffixed .demo-{run})")
        else:
            print("demo: starting the local Kafka broker (first run fetches Apache Kafka from Maven Central) ...", flush=True)
            broker = kafka_local.LocalKafka(data_dir=workdir / "kafka")
            bootstrap = broker.start()
            topics = dict(settings.topics.__dict__)
            app_id = settings.kafka.app_id
            print(f"demo: broker up at {bootstrap}")
        settings = settings.replace(kafka={"bootstrap_servers": bootstrap, "app_id": app_id}, topics=topics)
        asyncio.run(ensure_topics_async(bootstrap, worker_topics(settings), settings.kafka.partitions, settings.kafka.replication_factor,
                                         client=settings.kafka_client()))
        worker = WorkerProcess(worker_env(bootstrap, app_id, topics, workdir / "worker-data"), workdir / "worker.log").start()
        print(f"demo: worker starting (log: {worker.log_path}) ...", flush=True)
        worker.wait_ready()
        print("demo: worker ready; replaying the incident scenario at full speed\n", flush=True)
        return asyncio.run(_replay(settings, worker, rate=rate, duration_s=duration_s, seed=seed, batch=batch, color=color,
                                   truth_path=workdir / "ground_truth.json"))
    finally:
        if worker:
            worker.stop()
        if broker:
            broker.stop()


async def _replay(settings: Settings, worker: WorkerProcess, *, rate: float, duration_s: int, seed: int, batch: int,
                  color: bool, truth_path: Path) -> int:
    start_ms = (int(time.time()) - duration_s - 60) * 1000
    sim = Simulator(seed=seed, rate=rate, duration_s=duration_s, start_ms=start_ms)
    alerts: list[dict[str, Any]] = []
    stop = asyncio.Event()

    class Collect:  # the live view is `soundcheck alerts tail`'s, times shown from the scenario's start
        def __init__(self) -> None:
            self.fmt = TailFormatter(color=color, clock=lambda a: f"t+{(a['event_time'] - start_ms) / 1000:5.0f}s")

        def format(self, alert: dict[str, Any]) -> str:
            alerts.append(alert)
            return self.fmt.format(alert)

    reader = asyncio.create_task(tail_alerts(settings, start="beginning", stop=stop, formatter=Collect()))  # type: ignore[arg-type]
    truth = await produce(sim, settings, batch=batch, progress=lambda line: print("  " + line, file=sys.stderr, flush=True),
                          progress_every_s=3.0)
    truth_path.write_bytes(orjson.dumps(truth, option=orjson.OPT_INDENT_2))
    valid = sum(truth["produced_valid"].values())
    loop = asyncio.get_running_loop()
    # wait until the worker has read every record (valid in, malformed dead-lettered) ...
    await loop.run_in_executor(None, lambda: worker.wait_for(
        lambda: worker.metric_sum("soundcheck_events_in_total") >= valid
        and worker.metric_sum("soundcheck_dead_letters_total") >= truth["produced_malformed"],
        timeout=600, what="the worker to read every record"))
    # ... then until the quiet-stream flush has run and every anomaly has been through alerting
    await loop.run_in_executor(None, lambda: worker.wait_for(
        worker.drained, timeout=120, what="the last windows to close and their anomalies to be alerted"))
    await asyncio.sleep(1.0)  # the alert consumer's last poll
    stop.set()
    await reader
    m = worker.metrics()
    report = evaluate(alerts, truth, settings)
    events_in = worker.metric_sum("soundcheck_events_in_total")
    dlq = worker.metric_sum("soundcheck_dead_letters_total")
    print("\nSummary")
    print(f"  events in          {events_in:,.0f} valid records ({truth['messages']:,} messages, {valid:,} produced)")
    print(f"  dead letters       {dlq:,.0f} (malformed injected: {truth['produced_malformed']})")
    print(f"  anomalies          {sum(v for k, v in m.items() if k.startswith('soundcheck_anomalies_total')):,.0f}")
    by_kind: dict[str, int] = {}
    for a in alerts:
        by_kind[a.get("notification", "new")] = by_kind.get(a.get("notification", "new"), 0) + 1
    print(f"  alerts out         {len(alerts)} notifications ({', '.join(f'{v} {k}' for k, v in sorted(by_kind.items()))})")
    print(f"  incidents found    {report['found']} of {report['injected']} injected")
    for row in report["scenarios"]:
        if row.get("must_not_page"):
            print(f"    {row['name']:<22} {row['region']:<3} pages: {row['pages']} ({'ok' if row['ok'] else 'PAGED'})")
        else:
            found = f"found after {row['delay_s']:.0f} s, {row['priority']} {row['severity']}" if row["found"] else "MISSED"
            print(f"    {row['name']:<22} {row['region']:<3} {found}")
    print(f"  ground truth       {truth_path}")
    ok = report["found"] == report["injected"] and report["benign_pages"] == 0 and dlq == truth["produced_malformed"]
    return 0 if ok else 1
