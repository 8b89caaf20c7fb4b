"""Throughput and alert latency of the soundcheck worker, against two baselines, on one broker.

``soundcheck bench [--events N] [--runs R] [--partitions P] [--json] [--skip-latency]``, or
``python -m benchmarks.throughput`` with the same options. Not a test: it prints figures and
asserts nothing about them. One broker for the whole process run: the embedded local broker, or
the cluster named by ``KAFKA_BOOTSTRAP_SERVERS``.

Throughput. N records of the three input topics are generated once by the simulator (no
incidents; its realistic mix of audio, behaviour and system records; event times ending a minute
before now), keyed as producers key them (audio and behaviour by ``user_id``, system by
``service``), and encoded two ways: one JSON object per message, and JSON arrays of 100 records
per message (a batching producer: one array holds records whose keys go to the same partition,
and is sent to that partition). For each mode and run, the data is produced to fresh topics of P
partitions *before* anything reads it, then three readers read all of it, one after the other:

a. a bare aiokafka consumer (no group) that ``orjson.loads`` every value and counts the records:
   events/s from the first record read to the last;
b. a stock faust-streaming app that only decodes (``benchmarks/faust_decode_only.py``, its own
   process, fresh consumer group): one agent per topic, ``async for value in stream``;
c. the real worker (``python -m soundcheck worker`` via :class:`soundcheck.evaluation.harness.WorkerProcess`,
   fresh app id, consumer group and data dir).

For b and c, events/s = records read after the process was ready (partitions assigned) / time
from ready until its counter (``faust_decode_only_records_total`` / ``soundcheck_events_in_total``,
polled on ``/metrics`` every 0.05 s) reaches N; start-up and assignment are not counted. Medians
of the runs, and the ratios worker/bare and worker/faust-decode-only.

Latency. One worker on fresh topics; a producer sends the simulator's traffic paced in real time
(event time = wall time, single-record messages, each sent once the wall clock has reached its
event time), with one CDN PoP degradation, at 80% of the worker's median single-record
throughput (capped at 80% of what one producer coroutine was measured to send, so that it keeps
pace; the output says when it is capped, and how far sends lagged), for 5 minutes of event time. Every
firing alert on the ``alerts`` topic (created with ``message.timestamp.type=LogAppendTime``)
gives latency = its append time - (its window end ``event_time`` + ``allowed_lateness_s``): the
earliest it could be produced is when a record of that event time has been appended. For that
run notification grouping is off (``group_wait_s`` = ``group_interval_s`` = 0): with the
configured 30 s / 60 s the first notification of an incident is held back on purpose for its
siblings, which is policy, not processing.

Progress goes to stderr; the table, or with ``--json`` one JSON object, to stdout. Every process
is started and stopped by :class:`Lab`, also on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import dataclasses
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

from soundcheck.kafka import local as kafka_local
from soundcheck.evaluation.harness import WorkerProcess, worker_env
from soundcheck.kafka.admin import ensure_topics_async, worker_topics
from soundcheck.metrics import histogram_buckets, histogram_quantile
from soundcheck.settings import Settings, load_settings
from soundcheck.evaluation.simulator import Simulator

BATCH = 100  # records per message in batched mode
SEED = 1
SIM_RATE = 500.0  # simulator rate (events per second of event time) of the throughput data
POLL_S = 0.05  # /health and /metrics polls of a measured process
READY_TIMEOUT_S = 60.0  # launch to partitions assigned (a few seconds normally)
WORKER_METRIC = "soundcheck_events_in_total"
DECODE_METRIC = "faust_decode_only_records_total"  # benchmarks/faust_decode_only.py
DECODE_SCRIPT = Path(__file__).resolve().with_name("faust_decode_only.py")
STREAMS = ("audio", "behavior", "system")

LATENCY_SHARE = 0.8  # of the worker's median single-record events/s
PRODUCER_HEADROOM = 0.8  # of one producer coroutine's measured rate: at 100% it falls behind the wall clock
LATENCY_DURATION_S = 300  # of event time: 12 windows of warm-up, the incident, and after
LATENCY_PLAN = (("cdn_pop_degradation", 150, 120),)  # (scenario, start s, duration s), see simulator.DEFAULT_PLAN
LATENCY_WINDOWS = {"group_wait_s": 0, "group_interval_s": 0}  # notification grouping off: see the module doc

TARGETS = {  # printed next to the figures; nothing fails on them
    "worker_over_bare_batched": 0.5,
    "worker_over_faust_decode_only_single": 1.3,
    "latency_p99_s": 1.0,
}


def log(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


def now_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- data


def record_key(stream: str, record: dict[str, Any]) -> str:
    """The Kafka key a producer gives a record: the user for audio and behaviour, the service for system."""
    return record["service"] if stream == "system" else record["user_id"]


def partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2), as aiokafka and the Java client apply it."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# (stream, key, value, partition or None for the producer's partitioner)
Message = tuple[str, bytes, bytes, Optional[int]]


@dataclass
class Data:
    """The throughput data set: generated once, encoded two ways."""

    records: int
    by_stream: dict[str, int]
    event_time_s: int  # seconds of event time it spans
    records_per_rate_s: float  # audio+behaviour records per second of event time, per unit of simulator rate
    system_per_s: float  # system records per second of event time (independent of the rate)
    generate_s: float
    encode_single_s: float
    single: list[Message]
    batched: list[Message]


def generate(n: int, rate: float = SIM_RATE, seed: int = SEED) -> tuple[list[tuple[str, str, dict[str, Any]]], int]:
    """The simulator's first ``n`` records (no incidents) as (stream, key, record), tick by tick,
    their event times shifted so that the last is a minute before now; and the ticks used."""
    sim = Simulator(seed=seed, rate=rate, plan=(), start_ms=0)
    out: list[tuple[str, str, dict[str, Any]]] = []
    ticks = 0
    while len(out) < n:
        for batch in sim.tick(ticks * 1000):
            out.extend((batch.stream, record_key(batch.stream, rec), rec) for rec in batch.records)
        ticks += 1
    del out[n:]
    shift = now_ms() - 60_000 - max(rec["ts"] for _, _, rec in out)
    for _, _, rec in out:
        rec["ts"] += shift
    return out, ticks


def encode_single(records: Sequence[tuple[str, str, dict[str, Any]]]) -> list[Message]:
    return [(stream, key.encode(), orjson.dumps(rec), None) for stream, key, rec in records]


def encode_batched(records: Sequence[tuple[str, str, dict[str, Any]]], partitions: int, size: int = BATCH) -> list[Message]:
    """JSON arrays of ``size`` records whose keys go to one partition, in order, sent to that
    partition with the first record's key; each partition's last array may be shorter."""
    pending: dict[tuple[str, int], list[tuple[bytes, dict[str, Any]]]] = {}
    out: list[Message] = []

    def flush(stream: str, part: int, buf: list[tuple[bytes, dict[str, Any]]]) -> None:
        out.append((stream, buf[0][0], orjson.dumps([rec for _, rec in buf]), part))

    for stream, key, rec in records:
        k = key.encode()
        slot = (stream, partition_of(k, partitions))
        buf = pending.setdefault(slot, [])
        buf.append((k, rec))
        if len(buf) == size:
            flush(*slot, buf)
            pending[slot] = []
    for slot, buf in pending.items():
        if buf:
            flush(*slot, buf)
    return out


def make_data(n: int, partitions: int) -> Data:
    t0 = time.perf_counter()
    records, ticks = generate(n)
    t1 = time.perf_counter()
    single = encode_single(records)
    t2 = time.perf_counter()
    batched = encode_batched(records, partitions)
    by_stream = {s: 0 for s in STREAMS}
    for stream, _, _ in records:
        by_stream[stream] += 1
    return Data(
        records=n, by_stream=by_stream, event_time_s=ticks,
        records_per_rate_s=(n - by_stream["system"]) / ticks / SIM_RATE, system_per_s=by_stream["system"] / ticks,
        generate_s=t1 - t0, encode_single_s=t2 - t1, single=single, batched=batched,
    )  # fmt: skip


# --------------------------------------------------------------------------- Kafka


def fresh_topics(settings: Settings) -> dict[str, str]:
    """uuid-suffixed names for every topic role of the settings (inputs, alerts, internal ...)."""
    run = uuid.uuid4().hex[:12]
    return {f.name: f"bench-{f.name}-{run}" for f in dataclasses.fields(settings.topics)}


async def create_topics(settings: Settings, log_append_time: Sequence[str] = ()) -> None:
    """The worker's topics, with the settings' partitions; ``log_append_time`` topics get broker timestamps."""
    configs = {name: {"message.timestamp.type": "LogAppendTime"} for name in log_append_time}
    k = settings.kafka
    await ensure_topics_async(k.bootstrap_servers, worker_topics(settings), k.partitions, k.replication_factor, configs=configs)


def new_producer(bootstrap: str, linger_ms: int) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=linger_ms, max_batch_size=1_048_576, max_request_size=8_388_608, acks=1,
    )


async def produce(bootstrap: str, topics: dict[str, str], messages: Sequence[Message]) -> float:
    """Send every message as fast as one producer coroutine can; seconds until all are acknowledged."""
    producer = new_producer(bootstrap, linger_ms=50)
    await producer.start()
    started = time.perf_counter()
    try:
        pending: list[asyncio.Future] = []
        for stream, key, value, part in messages:
            pending.append(await producer.send(topics[stream], value, key=key, partition=part))
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def read_to_end(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Any]:
    """Every message of ``topic`` up to its end offsets at the time of the call."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic} was not read to its end within {timeout:.0f} s")
            for msgs in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(m for m in msgs if m.offset < end[TopicPartition(m.topic, m.partition)])
        return out
    finally:
        await consumer.stop()


# --------------------------------------------------------------------------- processes


class ScriptProcess(WorkerProcess):
    """A :class:`WorkerProcess` (web port, ``/health``, ``/metrics``, stop) running another command."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        super().__init__(env, log_path)
        self.argv = argv

    def start(self) -> "ScriptProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self


class Lab:
    """The one place that starts and stops processes: the broker, workers and decode-only apps.
    :meth:`close` stops whatever is still running (errors, Ctrl-C, SIGTERM)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker: Optional[kafka_local.LocalKafka] = None
        self.procs: list[WorkerProcess] = []
        self.notes: list[str] = []  # what went wrong but was worked around: printed with the figures

    def start_broker(self) -> tuple[str, str]:
        """(bootstrap, description): ``KAFKA_BOOTSTRAP_SERVERS`` if set, else a local broker of our own."""
        external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if external:
            if not kafka_local.broker_answers(external, timeout=10.0):
                raise kafka_local.BrokerError(f"the Kafka cluster at {external} (KAFKA_BOOTSTRAP_SERVERS) does not answer")
            return external, f"the cluster at {external} (KAFKA_BOOTSTRAP_SERVERS)"
        log("starting the local Kafka broker ...")
        self.broker = kafka_local.LocalKafka(data_dir=self.workdir / "kafka")
        bootstrap = self.broker.start()
        log(f"broker up at {bootstrap}")
        return bootstrap, f"local single-node Kafka {self.broker.version} on this machine ({bootstrap})"

    def start(self, kind: str, env: dict[str, str], tag: str) -> WorkerProcess:
        """``kind``: ``worker`` (python -m soundcheck worker) or ``decode`` (faust_decode_only.py)."""
        log_path = self.workdir / f"{kind}-{tag}.log"
        proc = WorkerProcess(env, log_path) if kind == "worker" else ScriptProcess([sys.executable, str(DECODE_SCRIPT)], env, log_path)
        self.procs.append(proc)
        proc.start()
        return proc

    def start_ready(self, kind: str, env: dict[str, str], tag: str) -> tuple[WorkerProcess, float]:
        """Start a process and wait until it has its partitions; returns it and when it was launched.

        A process that is up but not ready within ``READY_TIMEOUT_S`` is stopped and started once
        more (same app id: the topics it created exist by then); that is logged and noted. Seen
        with the worker: Faust's assignor ignores a changelog topic it has just created and is not
        in the metadata yet ("Ignoring missing topic"), and the worker never finishes assignment."""
        launched = time.monotonic()
        proc = self.start(kind, env, tag)
        try:
            wait_ready(proc, READY_TIMEOUT_S)
            return proc, launched
        except TimeoutError as exc:
            self.stop(proc)
            note = f"{proc.log_path.stem} was not ready within {READY_TIMEOUT_S:.0f} s; started once more (log: {proc.log_path})"
            log(f"{note}; last lines:\n{str(exc).split('its log:', 1)[-1].strip()[-1500:]}")
            self.notes.append(note)
        except BaseException:
            self.stop(proc)
            raise
        launched = time.monotonic()
        proc = self.start(kind, env, f"{tag}-retry")
        try:
            wait_ready(proc, READY_TIMEOUT_S)
        except BaseException:
            self.stop(proc)
            raise
        return proc, launched

    def stop(self, proc: WorkerProcess) -> None:
        code = proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)
        if code not in (0, None, -signal.SIGTERM):
            log(f"{proc.log_path.stem} exited with code {code} (log: {proc.log_path})")

    def close(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)
        if self.broker is not None:
            log("stopping the broker")
            self.broker.stop()
            self.broker = None


# --------------------------------------------------------------------------- readers


@dataclass
class Reading:
    eps: float = float("nan")  # events/s
    seconds: float = float("nan")  # the measured span
    startup_s: Optional[float] = None  # processes: launch to ready
    at_ready: Optional[float] = None  # processes: records already counted when ready was seen
    first_to_last_s: Optional[float] = None  # bare consumer: first record decoded to last, for context
    error: Optional[str] = None

    def brief(self) -> str:
        if self.error:
            return "FAILED"
        if self.startup_s is not None:
            extra = f"; start-up {self.startup_s:.1f} s, {self.at_ready:,.0f} at ready"
        elif self.first_to_last_s is not None:
            extra = f"; first to last record {self.first_to_last_s:.2f} s"
        else:
            extra = ""
        return f"{self.eps:,.0f} ev/s ({self.seconds:.2f} s{extra})"


async def read_bare(bootstrap: str, topics: Sequence[str], expected: int, timeout: float) -> Reading:
    """(a) One aiokafka consumer, no group, from the start: orjson every value until ``expected`` records.

    Timed from ``start()`` returning (metadata fetched, all partitions assigned, fetching begins:
    what "ready" is for the processes) to the last record decoded."""
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
        fetch_max_bytes=52_428_800, max_partition_fetch_bytes=10_485_760,
    )  # fmt: skip
    await consumer.start()
    ready = time.monotonic()
    count = 0
    first = last = 0.0
    deadline = ready + timeout
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
    elapsed = max(last - ready, 1e-9)
    return Reading(eps=expected / elapsed, seconds=elapsed, first_to_last_s=last - first)


def wait_ready(proc: WorkerProcess, timeout: float = READY_TIMEOUT_S) -> None:
    """:meth:`WorkerProcess.wait_ready`, polling every ``POLL_S`` rather than 0.25 s: a process that
    reads fast has done much of the work within a quarter of a second."""
    proc.wait_ready(timeout, poll_s=POLL_S)


def read_process(lab: Lab, kind: str, env: dict[str, str], tag: str, metric: str, expected: int, timeout: float) -> Reading:
    """(b), (c) A process on pre-filled topics: records counted after ready / time from ready to ``expected``."""
    proc, launched = lab.start_ready(kind, env, tag)
    try:
        # the snapshot is taken when the process answers (a busy one answers late): the clock starts then
        at_ready = max(0.0, proc.metric_sum(metric))
        ready = time.monotonic()
        deadline = ready + timeout
        while True:
            seen = proc.metric_sum(metric)
            now = time.monotonic()
            if seen >= expected:
                break
            if proc.proc and proc.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with code {proc.proc.returncode}; its log:\n{proc.log_tail()}")
            if now > deadline:
                dlq = proc.metric_sum("soundcheck_dead_letters_total") if kind == "worker" else 0
                raise TimeoutError(f"{kind} counted {seen:,.0f} of {expected:,} records ({dlq:,.0f} dead letters) "
                                   f"in {timeout:.0f} s; its log:\n{proc.log_tail()}")
            time.sleep(POLL_S)
        elapsed = max(now - ready, 1e-9)
        measured = expected - min(at_ready, expected)
        return Reading(eps=measured / elapsed if measured else float("nan"), seconds=elapsed,
                       startup_s=ready - launched, at_ready=at_ready)
    finally:
        lab.stop(proc)


def guarded(what: str, errors: list[str], fn: Any, *args: Any) -> Reading:
    """Run one reader; a failure is reported (and kept in ``errors``), the other readers go on."""
    try:
        return fn(*args)
    except (KeyboardInterrupt, kafka_local.BrokerError):
        raise
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        log(f"{what} failed: {text}")
        errors.append(f"{what}: {text.split('; its log', 1)[0].splitlines()[0]}")
        return Reading(error=text)


# --------------------------------------------------------------------------- throughput


@dataclass
class Mode:
    name: str  # single-record, batched
    messages: list[Message]
    produce_s: list[float] = field(default_factory=list)
    bare: list[Reading] = field(default_factory=list)
    decode: list[Reading] = field(default_factory=list)
    worker: list[Reading] = field(default_factory=list)

    def median(self, reader: str) -> float:
        values = [r.eps for r in getattr(self, reader) if r.error is None and r.eps == r.eps]
        return statistics.median(values) if values else float("nan")


def run_settings(settings: Settings, bootstrap: str, app_id: str, topics: dict[str, str], partitions: int) -> Settings:
    return settings.replace(kafka={"bootstrap_servers": bootstrap, "app_id": app_id, "partitions": partitions}, topics=topics)


def process_env(settings: Settings, s: Settings, workdir: Path, tag: str, **windows: int) -> dict[str, str]:
    """The environment of a worker (or decode-only app) on the run's settings ``s``."""
    extra = {"SOUNDCHECK_ENV": settings.env, "SOUNDCHECK__KAFKA__PARTITIONS": str(s.kafka.partitions)}
    extra.update({f"SOUNDCHECK__WINDOWS__{k.upper()}": str(v) for k, v in windows.items()})
    topics = {f.name: getattr(s.topics, f.name) for f in dataclasses.fields(s.topics)}
    return worker_env(s.kafka.bootstrap_servers, s.kafka.app_id, topics, workdir / f"data-{tag}", extra)


def throughput_run(lab: Lab, settings: Settings, bootstrap: str, mode: Mode, records: int, partitions: int,
                   run: int, runs: int, errors: list[str]) -> None:
    tag = f"{mode.name.split('-')[0]}-{run}-{uuid.uuid4().hex[:6]}"
    where = f"{mode.name} run {run}/{runs}"
    topics = fresh_topics(settings)
    s = run_settings(settings, bootstrap, f"bench-{tag}", topics, partitions)
    asyncio.run(create_topics(s))
    produce_s = asyncio.run(produce(bootstrap, s.topics.inputs(), mode.messages))
    mode.produce_s.append(produce_s)
    log(f"{where}: produced {len(mode.messages):,} messages ({records:,} records) in {produce_s:.1f} s")
    timeout = max(120.0, records / 500)

    bare = guarded(f"{where}: bare aiokafka", errors,
                   lambda: asyncio.run(read_bare(bootstrap, list(s.topics.inputs().values()), records, timeout)))
    log(f"{where}: bare aiokafka {bare.brief()}")

    ds = s.replace(kafka={"app_id": f"bench-{tag}-decode"})
    decode = guarded(f"{where}: faust decode-only", errors, read_process,
                     lab, "decode", process_env(settings, ds, lab.workdir, f"{tag}-decode"), tag, DECODE_METRIC, records, timeout)
    log(f"{where}: faust decode-only {decode.brief()}")

    worker = guarded(f"{where}: worker", errors, read_process,
                     lab, "worker", process_env(settings, s, lab.workdir, tag), tag, WORKER_METRIC, records, timeout)
    log(f"{where}: worker {worker.brief()}")
    mode.bare.append(bare)
    mode.decode.append(decode)
    mode.worker.append(worker)


# --------------------------------------------------------------------------- latency


@dataclass
class Latency:
    skipped: Optional[str] = None
    records_per_s: float = float("nan")  # asked for
    capped: bool = False
    uncapped_records_per_s: float = float("nan")  # 80% of the worker's single-record median
    producer_cap_records_per_s: float = float("nan")
    sim_rate: float = float("nan")
    sent: int = 0
    sent_per_s: float = float("nan")  # achieved
    send_lag_p99_ms: float = float("nan")  # wall clock at send - event time
    send_lag_max_ms: float = float("nan")
    worker_counted: float = float("nan")
    alerts_total: int = 0
    alerts_counted: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    timestamp_type: str = ""
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    # the same, from when the first record of event time >= window end + lateness was sent (not
    # from that event time): leaves out how far the producer lagged behind the wall clock
    from_send_p50_ms: float = float("nan")
    from_send_p99_ms: float = float("nan")
    # where the time goes (medians over the counted alerts, ms after event_time + lateness, from
    # the internal topics' record timestamps, the broker's append times): every input partition of every stream has closed
    # the window (stage 1's aggregates messages), the anomaly is on the anomalies topic (stage 2),
    # every source's tick has passed it (the alerting clock), the alert is appended
    stages_p50_ms: dict[str, float] = field(default_factory=dict)
    # the worker's event-loop stalls while the records were sent (soundcheck_event_loop_lag_seconds:
    # how late a timer due every 10 ms ran): every message handled on the loop waits them out
    loop_lag_p50_ms: float = float("nan")
    loop_lag_p99_ms: float = float("nan")
    loop_lag_share: float = float("nan")  # the stalls' total over the sending time
    error: Optional[str] = None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


@dataclass
class SendLog:
    """What the paced producer sent: the wall clock at which each new largest event time was first
    sent (event times go up: ticks in order, each sorted), and how far sends lagged behind."""

    ts: array = field(default_factory=lambda: array("q"))
    wall: array = field(default_factory=lambda: array("q"))
    lags: array = field(default_factory=lambda: array("q"))  # per record: wall clock at send - event time

    def sent(self, ts: int, wall: int) -> None:
        self.lags.append(wall - ts)
        if not self.ts or ts > self.ts[-1]:
            self.ts.append(ts)
            self.wall.append(wall)

    def first_sent_at(self, ts: int) -> Optional[int]:
        """When the first record of event time >= ``ts`` was sent (None: none was)."""
        i = bisect.bisect_left(self.ts, ts)
        return self.wall[i] if i < len(self.ts) else None


async def paced_producer(bootstrap: str, topics: dict[str, str], sim: Simulator, proc: WorkerProcess, sent: SendLog) -> float:
    """Send the simulator's records as single-record messages, each once the wall clock has reached
    its event time; returns the seconds it took."""
    producer = new_producer(bootstrap, linger_ms=5)
    await producer.start()
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    next_progress = started + 30
    try:
        pending: list[asyncio.Future] = []
        for sec in range(sim.duration_s):
            tick = [(b.stream, rec) for b in sim.tick(sim.start_ms + sec * 1000) for rec in b.records]
            tick.sort(key=lambda sr: sr[1]["ts"])
            i = 0
            while i < len(tick):
                wall = now_ms()
                while i < len(tick) and tick[i][1]["ts"] <= wall:
                    stream, rec = tick[i]
                    sent.sent(rec["ts"], wall)
                    pending.append(await producer.send(topics[stream], orjson.dumps(rec), key=record_key(stream, rec).encode()))
                    i += 1
                if i < len(tick):
                    await asyncio.sleep(max(0.001, (tick[i][1]["ts"] - now_ms()) / 1000))
            if len(pending) > 5000:
                await asyncio.gather(*pending)
                pending.clear()
            if time.monotonic() >= next_progress:
                next_progress += 30
                counted = await loop.run_in_executor(None, proc.metric_sum, WORKER_METRIC)
                log(f"latency: {sec + 1}/{sim.duration_s} s of event time, {len(sent.lags):,} records sent "
                    f"({len(sent.lags) / (time.monotonic() - started):,.0f}/s; producer {now_ms() - sim.start_ms - (sec + 1) * 1000:,} ms "
                    f"behind the wall clock), worker counted {counted:,.0f}")
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    return time.monotonic() - started


def latency_run(lab: Lab, settings: Settings, bootstrap: str, partitions: int, lat: Latency) -> None:
    tag = f"latency-{uuid.uuid4().hex[:6]}"
    topics = fresh_topics(settings)
    s = run_settings(settings, bootstrap, f"bench-{tag}", topics, partitions)
    # broker timestamps on the alerts and on the internal topics the breakdown reads: a stage is
    # done when its record is on the topic, not when a producer created it (stage_times)
    asyncio.run(create_topics(s, log_append_time=[s.topics.alerts, s.topics.aggregates, s.topics.anomalies]))
    proc, _ = lab.start_ready("worker", process_env(settings, s, lab.workdir, tag, **LATENCY_WINDOWS), tag)
    sent = SendLog()
    try:
        log(f"latency: worker ready; sending {lat.records_per_s:,.0f} records/s (simulator rate {lat.sim_rate:,.0f}) "
            f"for {LATENCY_DURATION_S} s of event time, incident {LATENCY_PLAN[0]}")
        start = now_ms() + 1000
        sim = Simulator(seed=SEED + 1, rate=lat.sim_rate, duration_s=LATENCY_DURATION_S, start_ms=start, plan=LATENCY_PLAN)
        before = scrape(proc)
        seconds = asyncio.run(paced_producer(bootstrap, s.topics.inputs(), sim, proc, sent))
        loop_lag(lat, before, scrape(proc), seconds)
        lat.sent, lat.sent_per_s = len(sent.lags), len(sent.lags) / max(seconds, 1e-9)
        lat.send_lag_p99_ms, lat.send_lag_max_ms = percentile(sent.lags, 99), max(sent.lags, default=float("nan"))
        # let the worker finish what was sent (it should be caught up already), then read the alerts
        deadline = time.monotonic() + 60
        while (counted := proc.metric_sum(WORKER_METRIC)) < lat.sent and time.monotonic() < deadline:
            time.sleep(0.5)
        lat.worker_counted = counted
        time.sleep(3)
        messages = asyncio.run(read_to_end(bootstrap, s.topics.alerts))
        internal = {role: asyncio.run(read_to_end(bootstrap, getattr(s.topics, role))) for role in ("aggregates", "anomalies")}
    finally:
        lab.stop(proc)
    lateness_ms = settings.windows.allowed_lateness_s * 1000
    latencies: list[int] = []
    from_send: list[int] = []
    excluded: dict[str, int] = {}
    stages: dict[str, list[int]] = {}
    types = set()
    for msg in messages:
        alert = orjson.loads(msg.value)
        types.add("LogAppendTime" if msg.timestamp_type == 1 else "CreateTime")
        earliest = alert["event_time"] + lateness_ms
        first_sent = sent.first_sent_at(earliest)
        if alert.get("status") != "firing":
            why = "resolved"
        elif alert.get("released_from"):
            why = "released after a hold (silence/inhibition)"
        elif first_sent is None:
            why = "window closed by the idle flush after the last record"
        else:
            latencies.append(msg.timestamp - earliest)
            from_send.append(msg.timestamp - first_sent)
            for stage, at in stage_times(internal, alert, msg.timestamp).items():
                stages.setdefault(stage, []).append(at - earliest)
            continue
        excluded[why] = excluded.get(why, 0) + 1
    lat.alerts_total, lat.alerts_counted, lat.excluded = len(messages), len(latencies), excluded
    lat.timestamp_type = "/".join(sorted(types))
    lat.p50_ms, lat.p99_ms = percentile(latencies, 50), percentile(latencies, 99)
    lat.max_ms = max(latencies, default=float("nan"))
    lat.from_send_p50_ms, lat.from_send_p99_ms = percentile(from_send, 50), percentile(from_send, 99)
    lat.stages_p50_ms = {stage: percentile(v, 50) for stage, v in stages.items()}


def scrape(proc: WorkerProcess) -> dict[str, float]:
    """The worker's metrics, or nothing if it does not answer (a figure is then missing, not the run)."""
    try:
        return proc.metrics()
    except Exception as exc:
        log(f"the worker's metrics could not be read: {type(exc).__name__}: {exc}")
        return {}


def loop_lag(lat: Latency, before: Mapping[str, float], after: Mapping[str, float], seconds: float) -> None:
    """The worker's event-loop stalls between two scrapes of its metrics into ``lat``."""
    name = "soundcheck_event_loop_lag_seconds"
    start = dict(histogram_buckets(before, name))
    buckets = [(bound, count - start.get(bound, 0.0)) for bound, count in histogram_buckets(after, name)]
    lat.loop_lag_p50_ms = histogram_quantile(buckets, 0.5) * 1000
    lat.loop_lag_p99_ms = histogram_quantile(buckets, 0.99) * 1000
    if name + "_sum" in after:
        lat.loop_lag_share = (after[name + "_sum"] - before.get(name + "_sum", 0.0)) / max(seconds, 1e-9)


def stage_times(internal: Mapping[str, Sequence[Any]], alert: Mapping[str, Any], appended: int) -> dict[str, int]:
    """When (wall clock, ms: the records' timestamps, the broker's append times in :func:`latency_run`)
    each stage was done with the alert's window:
    ``stage 1`` every (stream, input partition) had sent an aggregates message closing it;
    ``stage 2`` the anomaly of the alert's kind and window was on the anomalies topic; ``clock``
    every (stream, stage-2 partition) whose ticks move the alert's scope had ticked past it on
    that anomaly's partition (the fraud stage's ticks move the fraud scope only); ``alert`` its
    append time. A stage whose records are not found is left out."""
    end = int(alert["event_time"])
    closed: dict[tuple[str, int], int] = {}
    for m in internal["aggregates"]:
        doc = orjson.loads(m.value)
        if doc.get("stream") != "fraud" and (doc.get("closed_until") or -1) >= end:
            key = (doc["stream"], int(doc["source"]))
            closed[key] = min(closed.get(key, m.timestamp), m.timestamp)
    out: dict[str, int] = {}
    if closed:
        out["stage 1"] = max(closed.values())
    found = [(m.timestamp, m.partition) for m in internal["anomalies"]
             if b'"tick"' not in m.value and (a := orjson.loads(m.value)).get("kind") == alert.get("kind")
             and int(a.get("event_time", -1)) == end]
    if found:
        out["stage 2"], partition = min(found)
        fraud = alert.get("kind") == "streaming_fraud"
        ticks: dict[tuple[str, int], int] = {}
        for m in internal["anomalies"]:
            if m.partition == partition and b'"tick"' in m.value:
                doc = orjson.loads(m.value)
                if "tick" in doc and int(doc["event_time"]) >= end and (fraud or doc["tick"] != "fraud"):
                    key = (doc["tick"], int(doc.get("source", -1)))
                    ticks[key] = min(ticks.get(key, m.timestamp), m.timestamp)
        if ticks:
            out["clock"] = max(ticks.values())
    out["alert"] = appended
    return out


def plan_latency(data: Data, single: Mode) -> Latency:
    """The paced rate: 80% of the worker's single-record median, capped at 80% of one producer
    coroutine's measured rate (generate + encode + send, from the single-record runs), so that it
    keeps up with the wall clock."""
    worker = single.median("worker")
    if worker != worker:
        return Latency(skipped="no single-record worker throughput was measured, so there is no rate to pace at")
    produce_s = statistics.median(single.produce_s)
    cap = data.records / (data.generate_s + data.encode_single_s + produce_s)
    wanted = LATENCY_SHARE * worker
    rate = min(wanted, PRODUCER_HEADROOM * cap)
    return Latency(
        records_per_s=rate, capped=rate < wanted, uncapped_records_per_s=wanted, producer_cap_records_per_s=cap,
        sim_rate=max(1.0, (rate - data.system_per_s) / data.records_per_rate_s),
    )


# --------------------------------------------------------------------------- report


def _ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else float("nan")


def _met(value: float, target: float, below: bool = False) -> str:
    if value != value:
        return "n/a"
    return "met" if (value < target if below else value >= target) else "NOT met"


def figures(data: Data, modes: list[Mode], lat: Latency, args: argparse.Namespace, broker: str, errors: list[str],
            notes: list[str], settings: Settings) -> dict[str, Any]:
    single, batched = modes
    out: dict[str, Any] = {
        "broker": broker,
        "cpus": os.cpu_count(),
        "events": data.records,
        "runs": args.runs,
        "partitions": args.partitions,
        "data": {"by_topic": data.by_stream, "event_time_s": data.event_time_s, "simulator_seed": SEED,
                 "simulator_rate": SIM_RATE, "batch": BATCH},
        "throughput": {},
    }
    for m in modes:
        bare, decode, worker = m.median("bare"), m.median("decode"), m.median("worker")
        out["throughput"][m.name] = {
            "messages": len(m.messages),
            "bare_aiokafka_eps": bare,
            "faust_decode_only_eps": decode,
            "worker_eps": worker,
            "worker_over_bare": _ratio(worker, bare),
            "worker_over_faust_decode_only": _ratio(worker, decode),
            "produce_s": m.produce_s,
            "runs": [{r: dataclasses.asdict(getattr(m, r)[i]) for r in ("bare", "decode", "worker")} for i in range(len(m.bare))],
        }
    wb = out["throughput"]["batched"]["worker_over_bare"]
    wd = out["throughput"]["single-record"]["worker_over_faust_decode_only"]
    out["targets"] = {
        "worker_over_bare_batched": {"target": f">= {TARGETS['worker_over_bare_batched']}", "value": wb,
                                     "met": _met(wb, TARGETS["worker_over_bare_batched"])},
        "worker_over_faust_decode_only_single": {"target": f">= {TARGETS['worker_over_faust_decode_only_single']}", "value": wd,
                                                 "met": _met(wd, TARGETS["worker_over_faust_decode_only_single"])},
        "latency_p99_s": {"target": f"< {TARGETS['latency_p99_s']}", "value": lat.p99_ms / 1000,
                          "met": _met(lat.p99_ms / 1000, TARGETS["latency_p99_s"], below=True)},
    }
    out["latency"] = {**dataclasses.asdict(lat), "share_of_worker_max": LATENCY_SHARE,
                      "producer_headroom": PRODUCER_HEADROOM, "duration_s": LATENCY_DURATION_S,
                      "plan": [list(p) for p in LATENCY_PLAN], "windows_override": LATENCY_WINDOWS,
                      "allowed_lateness_s": settings.windows.allowed_lateness_s}
    out["errors"] = errors
    out["notes"] = notes
    return out


def table(fig: dict[str, Any], settings: Settings) -> str:
    d = fig["data"]
    mix = ", ".join(f"{s} {n:,}" for s, n in d["by_topic"].items())
    lines = [
        "",
        f"soundcheck bench: {fig['events']:,} records ({mix}; simulator seed {d['simulator_seed']}, rate {d['simulator_rate']:.0f}, "
        f"{d['event_time_s']} s of event time ending a minute ago, no incidents)",
        f"{fig['partitions']} partitions per topic; {fig['runs']} run(s) per mode, fresh topics and consumer groups per run; medians",
        f"broker: {fig['broker']}",
        f"machine: {fig['cpus']} cores (os.cpu_count); shared with other work, so figures are noisy",
        "",
        "throughput, events/s",
        f"{'mode':<15} {'messages':>9} {'bare aiokafka':>14} {'faust decode-only':>18} {'worker':>9} {'worker/bare':>12} {'worker/faust':>13}",
    ]
    for name, t in fig["throughput"].items():
        label = f"batched x{d['batch']}" if name == "batched" else name
        lines.append(f"{label:<15} {t['messages']:>9,} {t['bare_aiokafka_eps']:>14,.0f} {t['faust_decode_only_eps']:>18,.0f} "
                     f"{t['worker_eps']:>9,.0f} {t['worker_over_bare']:>12.2f} {t['worker_over_faust_decode_only']:>13.2f}")
    tg = fig["targets"]
    lines += [
        "",
        f"targets: worker/bare batched {tg['worker_over_bare_batched']['target']}: {tg['worker_over_bare_batched']['value']:.2f} "
        f"({tg['worker_over_bare_batched']['met']}); worker/faust-decode-only single-record "
        f"{tg['worker_over_faust_decode_only_single']['target']}: {tg['worker_over_faust_decode_only_single']['value']:.2f} "
        f"({tg['worker_over_faust_decode_only_single']['met']})",
        "",
        "each run (events/s; for processes: seconds from ready to N, start-up, records counted at ready):",
    ]
    for name, t in fig["throughput"].items():
        for i, run in enumerate(t["runs"], 1):
            parts = [f"{r} {Reading(**run[r]).brief()}" for r in ("bare", "decode", "worker")]
            lines.append(f"  {name:<13} run {i}: produced in {t['produce_s'][i - 1]:.1f} s; " + "; ".join(parts))
    lines += ["", "latency, record append -> alert append"]
    lat = fig["latency"]
    lateness = settings.windows.allowed_lateness_s
    if lat["skipped"]:
        lines.append(f"  skipped: {lat['skipped']}")
    elif lat["error"]:
        lines.append(f"  FAILED: {lat['error'].split('; its log', 1)[0].splitlines()[0]}")
    else:
        pace = (f"{lat['records_per_s']:,.0f} records/s, CAPPED at {PRODUCER_HEADROOM:.0%} of what one producer coroutine "
                f"was measured to send ({lat['producer_cap_records_per_s']:,.0f}/s generate+encode+send); "
                f"{lat['share_of_worker_max']:.0%} of the worker's single-record median would be "
                f"{lat['uncapped_records_per_s']:,.0f}/s" if lat["capped"] else
                f"{lat['records_per_s']:,.0f} records/s = {lat['share_of_worker_max']:.0%} of the worker's single-record median "
                f"(one producer coroutine measured at {lat['producer_cap_records_per_s']:,.0f}/s)")
        lines += [
            f"  paced producer: {pace}; simulator rate {lat['sim_rate']:,.0f}, {lat['duration_s']} s of event time, "
            f"incident {lat['plan'][0][0]} at {lat['plan'][0][1]} s for {lat['plan'][0][2]} s, single-record messages",
            f"  sent {lat['sent']:,} records ({lat['sent_per_s']:,.0f}/s achieved; send lag behind event time p99 "
            f"{lat['send_lag_p99_ms']:,.0f} ms, max {lat['send_lag_max_ms']:,.0f} ms); worker counted {lat['worker_counted']:,.0f}",
            f"  worker: one process; notification grouping off for this run ({', '.join(f'{k}={v}' for k, v in lat['windows_override'].items())})",
            f"  worker's event loop while sending (soundcheck_event_loop_lag_seconds, a timer due every 10 ms): late p50 "
            f"{lat['loop_lag_p50_ms']:.1f} ms, p99 {lat['loop_lag_p99_ms']:.1f} ms; stalled {lat['loop_lag_share']:.0%} of the time",
        ]
        excl = ", ".join(f"{n} {why}" for why, n in lat["excluded"].items()) or "none"
        lines.append(f"  alerts on the topic: {lat['alerts_total']}; counted (firing): {lat['alerts_counted']}; left out: {excl}")
        if lat["alerts_counted"]:
            lines += [
                f"  latency = alert append time ({lat['timestamp_type']}) - (event_time + allowed_lateness_s {lateness} s): "
                f"p50 {lat['p50_ms'] / 1000:.3f} s, p99 {lat['p99_ms'] / 1000:.3f} s, max {lat['max_ms'] / 1000:.3f} s "
                f"(target p99 {tg['latency_p99_s']['target']} s: {tg['latency_p99_s']['met']})",
                f"  the same from when the first record of that event time was sent (leaves out the producer's lag): "
                f"p50 {lat['from_send_p50_ms'] / 1000:.3f} s, p99 {lat['from_send_p99_ms'] / 1000:.3f} s",
                "  where it goes (medians, s after event_time + lateness, from the internal topics' append times): " + ", ".join(
                    f"{stage} done {ms / 1000:.3f}" for stage, ms in lat["stages_p50_ms"].items()),
            ]
        else:
            lines.append("  NO ALERT ARRIVED: there is no latency to report (the incident was not alerted on within the run)")
    lines += [
        "",
        "bare aiokafka: one consumer (no group, 50 MB fetches), orjson.loads of every value, counting array elements;",
        "  from start() returning (partitions assigned) to the last record.",
        "faust decode-only: benchmarks/faust_decode_only.py, a stock faust.App, one agent per topic, orjson.loads per message.",
        f"worker: `python -m soundcheck worker` (--env {settings.env}). For both processes: (N - counted at ready) / (time from",
        f"  ready, i.e. partitions assigned, to the counter reaching N), /metrics polled every {POLL_S} s; start-up not counted.",
    ]
    if fig["notes"]:
        lines += ["", "NOTES (worked around; logs are kept, see stderr):"] + [f"  {n}" for n in fig["notes"]]
    if fig["errors"]:
        lines += ["", "ERRORS (figures above are missing for these; logs are kept, see stderr):"] + [f"  {e}" for e in fig["errors"]]
    return "\n".join(lines)


def dump_json(fig: dict[str, Any]) -> bytes:
    # orjson writes NaN as null
    return orjson.dumps(fig, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)


# --------------------------------------------------------------------------- main


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def bench(settings: Settings, args: argparse.Namespace) -> int:
    # producing right after creating a topic: the first sends may be retried while its leaders are elected
    logging.getLogger("aiokafka.producer.sender").setLevel(logging.ERROR)
    if args.events <= 0 or args.runs <= 0 or args.partitions <= 0:
        print("bench: --events, --runs and --partitions must be positive", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="soundcheck-bench-"))
    lab = Lab(workdir)
    errors: list[str] = []
    ok = False
    try:
        try:
            bootstrap, broker_desc = lab.start_broker()
        except kafka_local.BrokerError as exc:
            print(f"bench: ERROR: no Kafka broker: {exc}", file=sys.stderr)
            return 1

        data = make_data(args.events, args.partitions)
        modes = [Mode("single-record", data.single), Mode("batched", data.batched)]
        log(f"generated {data.records:,} records in {data.generate_s:.1f} s ("
            + ", ".join(f"{s} {n:,}" for s, n in data.by_stream.items())
            + f"; {data.event_time_s} s of event time); single-record: {len(data.single):,} messages, "
            f"batched x{BATCH}: {len(data.batched):,} messages")

        for mode in modes:
            for run in range(1, args.runs + 1):
                throughput_run(lab, settings, bootstrap, mode, data.records, args.partitions, run, args.runs, errors)

        if args.skip_latency:
            lat = Latency(skipped="--skip-latency")
        else:
            lat = plan_latency(data, modes[0])
            if not lat.skipped:
                try:
                    latency_run(lab, settings, bootstrap, args.partitions, lat)
                except (KeyboardInterrupt, kafka_local.BrokerError):
                    raise
                except Exception as exc:
                    lat.error = f"{type(exc).__name__}: {exc}"
                    log(f"latency run failed: {lat.error}")
                    errors.append(f"latency: {lat.error.split('; its log', 1)[0].splitlines()[0]}")
            else:
                log(f"latency: skipped: {lat.skipped}")
        fig = figures(data, modes, lat, args, broker_desc, errors, lab.notes, settings)
        if args.json:
            sys.stdout.buffer.write(dump_json(fig) + b"\n")
            sys.stdout.flush()
        else:
            print(table(fig, settings), flush=True)
        ok = not errors and not lab.notes
        return 0 if not errors else 1
    except KeyboardInterrupt:
        log("interrupted; stopping")
        return 130
    finally:
        lab.close()
        if ok or not any(workdir.iterdir()):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--events", type=int, default=100_000, help="records of the throughput data set (default 100000)")
    p.add_argument("--runs", type=int, default=3, help="runs per mode; medians are reported (default 3)")
    p.add_argument("--partitions", type=int, default=6, help="partitions of every topic (default 6)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object instead of the table")
    p.add_argument("--skip-latency", action="store_true", help="measure throughput only (the latency run takes about 6 minutes)")
    return p


def main(args: argparse.Namespace) -> int:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # stop workers and the broker on SIGTERM too
    try:
        settings = load_settings(getattr(args, "env", None))
        return bench(settings, args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--env", choices=("development", "staging", "production"), help="config/<env>.yaml (default: $SOUNDCHECK_ENV or development)")
    return add_arguments(p)


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
