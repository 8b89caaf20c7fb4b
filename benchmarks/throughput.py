"""Throughput of one soundcheck worker against a bare aiokafka consumer, on the same data.

``soundcheck bench [--events N] [--runs R]`` or ``python -m benchmarks.throughput``. Not a test:
it prints figures. One broker for the whole process run (the embedded local broker, or the
cluster named by ``KAFKA_BOOTSTRAP_SERVERS``); N valid ``audio_quality_metrics`` records are
generated once by the simulator and encoded two ways: one JSON object per message, and JSON
arrays of 100 records per message. For each mode and run the data is produced to fresh topics
*before* anything reads them, then:

* a bare aiokafka consumer decodes every message value with orjson (counting the records of
  arrays) until it has read all N records: events/s from the first record read to the last;
* one real worker process (``python -m soundcheck worker``, fresh consumer group and data dir)
  reads the same topic: events/s = N / (time from the worker being ready to
  ``soundcheck_events_in_total`` reaching N), polling its ``/metrics`` every 0.1 s. The worker's
  start-up and partition assignment are not counted.

Progress goes to stderr, the table to stdout. Workers and the broker are stopped on errors and
on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from soundcheck import kafka_local
from soundcheck.harness import WorkerProcess, worker_env
from soundcheck.kafka_admin import ensure_topics_async, worker_topics
from soundcheck.settings import Settings, load_settings
from soundcheck.simulator import REGIONS, Simulator, _pick

SINGLE_RECORD_CAP = 50_000  # the worker reads about 10k single-record messages/s: keep that mode short
BATCH = 100
EVENTS_PER_SECOND_OF_EVENT_TIME = 500  # spread of the records' ts (a realistic rate, windows of 10 s)
POLL_S = 0.1
METRIC = "soundcheck_events_in_total"


def log(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def generate(n: int, seed: int = 1) -> list[tuple[str, dict[str, Any]]]:
    """``n`` valid audio records as (region key, record), in event-time order, ending a minute ago."""
    sim = Simulator(seed=seed, plan=())
    span_ms = n * 1000 // EVENTS_PER_SECOND_OF_EVENT_TIME + 1000
    start_ms = int(time.time() * 1000) - span_ms - 60_000
    out = []
    for i in range(n):
        region = _pick(sim.rng, REGIONS)
        out.append((region, sim._audio(start_ms + i * 1000 // EVENTS_PER_SECOND_OF_EVENT_TIME, region)))
    return out


def encode_single(records: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[bytes, bytes]]:
    return [(key.encode(), orjson.dumps(rec)) for key, rec in records]


def encode_batched(records: Sequence[tuple[str, dict[str, Any]]], size: int = BATCH) -> list[tuple[bytes, bytes]]:
    """JSON arrays of ``size`` records of one region (key), in event-time order; the last of each region may be shorter."""
    pending: dict[str, list[dict[str, Any]]] = {}
    out: list[tuple[bytes, bytes]] = []
    for key, rec in records:
        buf = pending.setdefault(key, [])
        buf.append(rec)
        if len(buf) == size:
            out.append((key.encode(), orjson.dumps(buf)))
            pending[key] = []
    for key, buf in pending.items():
        if buf:
            out.append((key.encode(), orjson.dumps(buf)))
    return out


@dataclass
class Mode:
    name: str
    records: int
    messages: list[tuple[bytes, bytes]]
    bare: list[float] = field(default_factory=list)
    worker: list[float] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- Kafka


async def produce(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> float:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=50, max_batch_size=1_048_576, max_request_size=8_388_608, acks=1,
    )
    await producer.start()
    started = time.monotonic()
    try:
        pending: list[asyncio.Future] = []
        for key, value in messages:
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    return time.monotonic() - started


async def bare_consumer(bootstrap: str, topic: str, expected: int, timeout: float) -> tuple[float, float, float]:
    """Read ``topic`` from the start with orjson until ``expected`` records.

    Returns events/s and seconds from the first record read to the last, and seconds from the
    consumer's start (metadata, first fetch) to the last record, for context.
    """
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
        fetch_max_bytes=52_428_800, max_partition_fetch_bytes=10_485_760,
    )
    await consumer.start()
    started = time.monotonic()
    count = 0
    first = last = 0.0
    deadline = time.monotonic() + timeout
    try:
        while count < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bare consumer read {count:,} of {expected:,} records in {timeout:.0f} s")
            batch = await consumer.getmany(timeout_ms=500, max_records=50_000)
            for msgs in batch.values():
                for msg in msgs:
                    value = orjson.loads(msg.value)
                    count += len(value) if isinstance(value, list) else 1
                    if not first:
                        first = time.monotonic()
            if batch:
                last = time.monotonic()
    finally:
        await consumer.stop()
    elapsed = max(last - first, 1e-9)
    return expected / elapsed, elapsed, last - started


def run_worker(bootstrap: str, topics: dict[str, str], expected: int, workdir: Path, tag: str, timeout: float, env_name: str) -> tuple[float, float, float, float]:
    """One worker on the pre-filled topics: (events/s, seconds ready to N, start-up seconds, events counted at ready)."""
    app_id = f"soundcheck-bench-{tag}"
    env = worker_env(bootstrap, app_id, topics, workdir / f"data-{tag}", {"SOUNDCHECK_ENV": env_name})
    worker = WorkerProcess(env, workdir / f"worker-{tag}.log")
    try:
        launched = time.monotonic()
        worker.start()
        worker.wait_ready()
        # the snapshot is taken when the worker answers (a busy worker answers late): the clock starts then
        at_ready = max(0.0, worker.metric_sum(METRIC))
        ready = time.monotonic()
        deadline = ready + timeout
        while True:
            seen = worker.metric_sum(METRIC)
            now = time.monotonic()
            if seen >= expected:
                break
            if worker.proc and worker.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with code {worker.proc.returncode}; its log:\n{worker.log_tail()}")
            if now > deadline:
                dlq = worker.metric_sum("soundcheck_dead_letters_total")
                raise TimeoutError(f"the worker counted {seen:,.0f} of {expected:,} records ({dlq:,.0f} dead letters) "
                                   f"in {timeout:.0f} s; its log:\n{worker.log_tail()}")
            time.sleep(POLL_S)
        elapsed = max(now - ready, 1e-9)
        # what the worker read between ready and N; wait_ready polls every 0.25 s and the worker starts
        # fetching as soon as it has its partitions, so a few records may be counted before "ready"
        measured = expected - min(at_ready, expected)
        return (measured / elapsed if measured else float("nan")), elapsed, ready - launched, at_ready
    finally:
        code = worker.stop()
        if code not in (0, None, -signal.SIGTERM):
            log(f"worker {tag} exited with code {code} (log: {worker.log_path})")


def fresh_topics(settings: Settings) -> dict[str, str]:
    run = uuid.uuid4().hex[:12]
    return {role: f"bench-{run}-{role}" for role in settings.topics.__dict__}


# --------------------------------------------------------------------------- report


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # a run with nothing left to measure after ready is nan
    return statistics.median(values) if values else float("nan")


def report(modes: list[Mode], requested: int, runs: int, broker: str) -> str:
    cores = os.cpu_count()
    lines = [
        "",
        f"soundcheck bench: audio_quality_metrics records, {runs} run(s) per mode, fresh topics and consumer group per run",
        f"broker: {broker}",
        f"machine: {cores} cores (os.cpu_count); shared, noisy machine; medians of {runs} runs in one process run",
        "",
        f"{'mode':<15} {'records':>8} {'messages':>9} {'bare aiokafka ev/s':>19} {'worker ev/s':>12} {'worker/bare':>12}",
    ]
    for m in modes:
        bare, work = _median(m.bare), _median(m.worker)
        lines.append(f"{m.name:<15} {m.records:>8,} {len(m.messages):>9,} {bare:>19,.0f} {work:>12,.0f} {work / bare:>12.3f}")
    lines += ["", "each run:"]
    for m in modes:
        lines += [f"  {m.name:<15} {d}" for d in m.details]
    lines += [
        "",
        "bare aiokafka: one consumer (no group), orjson.loads of every message value, from the first record read to the last",
        "  ('from start' adds the consumer's metadata and first fetch, for context; not in the figure).",
        f"worker: one `soundcheck worker` process; (N - at ready) / (time from ready, i.e. partitions assigned, to {METRIC}",
        f"  reaching N), /metrics polled every {POLL_S} s; start-up not counted. 'at ready' = records the worker had already",
        "  counted when wait_ready returned (it polls every 0.25 s); they are left out of both numerator and time.",
    ]
    capped = [m for m in modes if m.name == "single-record" and m.records < requested]
    if capped:
        lines.append(f"single-record mode capped at min(N, {SINGLE_RECORD_CAP:,}) = {capped[0].records:,} records (asked for {requested:,}).")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def bench(settings: Settings, events: int, runs: int) -> int:
    # producing right after creating a topic: the first sends may be retried while its leaders are elected
    logging.getLogger("aiokafka.producer.sender").setLevel(logging.ERROR)
    if events <= 0 or runs <= 0:
        print("bench: --events and --runs must be positive", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="soundcheck-bench-"))
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker: Optional[kafka_local.LocalKafka] = None
    ok = False
    try:
        if external:
            bootstrap, broker_desc = external, f"the cluster at {external} (KAFKA_BOOTSTRAP_SERVERS)"
            log(f"using the Kafka cluster at {bootstrap}")
        else:
            log("starting the local Kafka broker ...")
            broker = kafka_local.LocalKafka(data_dir=workdir / "kafka")
            bootstrap = broker.start()
            broker_desc = f"local single-node Kafka {broker.version} on this machine ({bootstrap})"
            log(f"broker up at {bootstrap}")

        t = time.monotonic()
        records = generate(events)
        single_n = min(events, SINGLE_RECORD_CAP)
        modes = [
            Mode("single-record", single_n, encode_single(records[:single_n])),
            Mode(f"batched x{BATCH}", events, encode_batched(records)),
        ]
        log(f"generated {events:,} records in {time.monotonic() - t:.1f} s; "
            + ", ".join(f"{m.name}: {m.records:,} records in {len(m.messages):,} messages" for m in modes))
        del records

        for mode in modes:
            for run in range(1, runs + 1):
                tag = f"{mode.name.split()[0].split('-')[0]}-{run}-{uuid.uuid4().hex[:6]}"
                topics = fresh_topics(settings)
                s = settings.replace(kafka={"bootstrap_servers": bootstrap}, topics=topics)
                asyncio.run(ensure_topics_async(bootstrap, worker_topics(s), s.kafka.partitions, s.kafka.replication_factor))
                produce_s = asyncio.run(produce(bootstrap, s.topics.audio, mode.messages))
                log(f"{mode.name} run {run}/{runs}: produced {len(mode.messages):,} messages to {s.topics.audio} in {produce_s:.1f} s")
                timeout = max(120.0, mode.records / 1000)
                bare, bare_s, bare_total_s = asyncio.run(bare_consumer(bootstrap, s.topics.audio, mode.records, timeout))
                log(f"{mode.name} run {run}/{runs}: bare aiokafka {bare:,.0f} events/s ({bare_s:.2f} s first to last record, "
                    f"{bare_total_s:.2f} s from consumer start)")
                log(f"{mode.name} run {run}/{runs}: starting a worker ...")
                work, work_s, startup_s, at_ready = run_worker(bootstrap, topics, mode.records, workdir, tag, timeout, settings.env)
                log(f"{mode.name} run {run}/{runs}: worker {work:,.0f} events/s ({work_s:.2f} s after ready; "
                    f"start-up {startup_s:.1f} s, {at_ready:,.0f} records counted at ready)")
                mode.bare.append(bare)
                mode.worker.append(work)
                mode.details.append(
                    f"run {run}: bare {bare:>9,.0f} ev/s ({bare_s:5.2f} s; {bare_total_s:.2f} s from start)   worker {work:>8,.0f} ev/s ({work_s:5.2f} s, "
                    f"at ready {at_ready:,.0f}, start-up {startup_s:.1f} s)   ratio {work / bare:.3f}"
                )
        print(report(modes, events, runs, broker_desc), flush=True)
        ok = True
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping")
        return 130
    finally:
        if broker:
            log("stopping the broker")
            broker.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}")


def main(args: argparse.Namespace) -> int:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # stop workers and the broker on SIGTERM too
    try:
        settings = load_settings(getattr(args, "env", None))
        return bench(settings, args.events, args.runs)
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--env", choices=("development", "staging", "production"), help="config/<env>.yaml (default: $SOUNDCHECK_ENV or development)")
    p.add_argument("--events", type=int, default=100_000, help="records per run (single-record mode: at most 50,000)")
    p.add_argument("--runs", type=int, default=3)
    return p


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
