"""The Faust app factory: topics, tables, agents and web pages, from one settings object.

Nothing here runs at import time: ``create_app(settings)`` builds a fresh app each call (the
CLI for the worker, tests for their own), and registers the agents of :mod:`agents`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from prometheus_client import CollectorRegistry

from soundcheck.alerting.correlate import ServiceGraph
from soundcheck.ingest.contracts import Contract, load_contracts
from soundcheck.kafka.security import faust_credentials
from soundcheck.metrics import WorkerMetrics, probe_loop_lag
from soundcheck.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What the agents share: settings, metrics, contracts and the app's topics."""

    settings: Settings
    metrics: WorkerMetrics
    contracts: dict[str, Contract]
    graph: ServiceGraph
    topics: dict[str, Any] = field(default_factory=dict)  # faust topics by role
    processors: dict[str, Any] = field(default_factory=dict)  # role (aggregates, fraud) -> agents.detect.UnitHolder
    ingest: dict[str, Any] = field(default_factory=dict)  # stream -> soundcheck.pipeline.IngestStage (stage 1)
    ingest_service: Any = None  # agents.ingest.IngestService, once started
    snapshots: Any = None  # agents.detect.SnapshotKeeper: stage-2 state snapshots per partition
    history: Any = None  # soundcheck.detectors.history.SeriesHistory: recent window values (the incident page)
    fraud_process: Any = None  # agents.fraud_process.FraudProcess: the child process the fraud stage runs in
    fraud_batch: Any = None  # agents.detect: a batch of fraud-topic events into the fraud process (the fraud agent's handler)


#: how long a fetch of Faust's consumer may wait at the broker for data (Faust hard-codes 1,500 ms).
#: aiokafka leaves out of the outstanding fetch the partitions it still holds records of, so a
#: record arriving on such a partition waits for that fetch to come back empty: up to this long on
#: each of the two internal hops (aggregates -> stage 2, anomalies -> alerting). Measured: the
#: alerting hop alone added 1.4-1.5 s to append -> alert latency at 1,500.
FETCH_MAX_WAIT_MS = 100


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by AIOKafkaConsumer.start() for its Fetcher
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> Any:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Producer(faust_aiokafka.Producer):
    """faust-streaming's producer with a flush that waits for everything sent before it.

    Table changelog writes go through Faust's send buffer, and an offset commit flushes the
    producer first; but faust-streaming 0.15's ``ProducerBuffer.flush`` returns as soon as 0.1 s
    pass without a message leaving the buffer (``flush_atmost``), and a message taken out of the
    buffer is not yet in aiokafka's. A commit could then go to the broker ahead of the table
    changes of the records it commits, and a ``kill -9`` right after it lose those changes for
    good (a held alert never released, measured in tests/test_crash_recovery.py). Here the buffer
    is drained until empty and nothing is still being handed over, then aiokafka flushes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handing_over = 0
        handover = self.buffer._send_pending  # the buffer's task binds it when it starts, after this

        async def counted(fut: Any) -> None:
            self.handing_over += 1
            try:
                await handover(fut)
            finally:
                self.handing_over -= 1

        self.buffer._send_pending = counted  # type: ignore[method-assign]

    async def flush(self) -> None:
        waited = time.monotonic()
        while self.buffer.size or self.handing_over:
            if self.buffer.size:
                await self.buffer.flush()
            else:
                await asyncio.sleep(0.002)
            if time.monotonic() - waited > 10.0:
                log.warning("producer flush: %d messages still in Faust's send buffer after 10 s", self.buffer.size)
                waited = time.monotonic()
        await super().flush()


class Transport(faust_aiokafka.Transport):
    """faust-streaming's aiokafka transport with :data:`FETCH_MAX_WAIT_MS` for its consumer and a
    producer whose flush (before every offset commit) waits for the tables' changelog writes."""

    Consumer = _Consumer
    Producer = _Producer


def broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip()]


def data_dir(settings: Settings) -> Path:
    root = Path(os.environ.get("SOUNDCHECK_DATA_DIR") or Path.home() / ".cache" / "soundcheck" / "worker")
    return root / settings.kafka.app_id


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> tuple[faust.App, WorkerContext]:
    """Build the worker app and its context (metrics registered on ``registry``)."""
    k, w = settings.kafka, settings.worker
    datadir = data_dir(settings)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        k.app_id,
        broker=broker_urls(k.bootstrap_servers),
        broker_credentials=faust_credentials(k.security, settings.kafka_secrets),
        store="memory://",
        datadir=str(datadir),
        topic_partitions=k.partitions,
        topic_replication_factor=k.replication_factor,
        consumer_auto_offset_reset=k.auto_offset_reset,
        stream_buffer_maxsize=w.stream_buffer_maxsize,
        web_enabled=True,
        web_host=w.web_host,
        web_port=w.web_port,
        web_in_thread=False,
        table_cleanup_interval=30.0,
        producer_linger_ms=5,
        # a dead letter carries a whole (up to 1 MB) original message (detector state snapshots, up to
        # 16 MB, go through their own producer: agents.ingest.SnapshotKeeper)
        producer_max_request_size=8 * 1024 * 1024,
        broker_commit_every=10_000,
        broker_commit_interval=1.0,
        # failover: a crashed worker's partitions move after session_timeout_s. No static membership
        # here: faust-streaming 0.15's assignor asserts that the assignment's metadata carries this
        # process's URL, which a static member handed its predecessor's assignment fails (the worker
        # then never processes); the ingest consumer (agents/ingest.py) does use worker.instance_id
        broker_session_timeout=w.session_timeout_s,
        broker_heartbeat_interval=max(1.0, w.session_timeout_s / 3),
    )
    app.transport = Transport(app.conf.broker_consumer, app)  # (see FETCH_MAX_WAIT_MS)
    ctx = WorkerContext(
        settings=settings,
        metrics=WorkerMetrics(registry or CollectorRegistry()),
        contracts=load_contracts(),
        graph=ServiceGraph(settings.services),
    )
    t = settings.topics
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    # the input topics are read by agents.ingest.IngestService's own consumer, not by Faust
    ctx.topics["aggregates"] = app.topic(t.aggregates, partitions=k.partitions, internal=True, **raw)
    ctx.topics["fraud"] = app.topic(t.fraud, partitions=k.partitions, internal=True, **raw)
    ctx.topics["anomalies"] = app.topic(t.anomalies, partitions=k.partitions, internal=True, **raw)
    ctx.topics["alerts"] = app.topic(t.alerts, partitions=k.partitions, **raw)
    ctx.topics["dead_letter"] = app.topic(t.dead_letter, partitions=k.partitions, **raw)
    ctx.topics["control"] = app.topic(t.control, **raw)
    ctx.topics["decisions"] = app.topic(t.decisions, partitions=k.partitions, **raw)

    from agents import alerting, detect, ingest, watchdog, web  # the agents are thin wiring over soundcheck.*

    detect.register_snapshots(app, ctx)
    ingest.register(app, ctx)
    detect.register(app, ctx)
    alerting.register(app, ctx)
    web.register(app, ctx)
    watchdog.register(app, ctx)

    @app.task
    async def event_loop_lag() -> None:
        """``soundcheck_event_loop_lag_seconds``: the event loop's stalls, as every message meets them."""
        await probe_loop_lag(ctx.metrics.loop_lag.observe)

    @app.task
    async def stack_dumps() -> None:
        """``kill -USR1 <worker pid>`` logs where every asyncio task of the worker is waiting."""
        import asyncio
        import io
        import logging
        import signal

        def awaiting(task: asyncio.Task) -> list[str]:
            """The chain of awaits a suspended task waits in (``Task.print_stack`` shows only its
            outermost frame), outermost first."""
            lines, coro, seen = [], task.get_coro(), 0
            while coro is not None and seen < 40:
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
                if frame is not None:
                    lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
                coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
                seen += 1
            if coro is not None:
                lines.append(f"  waiting for {coro!r}"[:300])
            return lines

        def consumer_state() -> None:
            """Which partitions Faust's consumer fetches, and how far it has committed (its private
            state, read for diagnosis only)."""
            consumer = app.consumer
            logging.getLogger("soundcheck.tasks").warning(
                "faust consumer: assigned %s; active %s; paused %s; buffered (stream queue full) %s; in recovery %s",
                sorted(map(tuple, consumer.assignment())), sorted(map(tuple, consumer._active_partitions or ())),
                sorted(map(tuple, consumer._paused_partitions)), sorted(map(tuple, consumer._buffered_partitions)), app.in_recovery)
            for tp in sorted(consumer.assignment()):
                if tp.topic in (settings.topics.anomalies, settings.topics.aggregates, settings.topics.fraud):
                    acked = consumer._acked.get(tp) or []
                    logging.getLogger("soundcheck.tasks").warning(
                        "faust consumer %s: committed %s read %s; %d acked offsets not committed (%s..%s); gaps %s",
                        tuple(tp), consumer._committed_offset.get(tp), consumer._read_offset.get(tp), len(acked),
                        min(acked) if acked else None, max(acked) if acked else None, sorted(consumer._gap.get(tp) or [])[:5])

        def dump() -> None:
            try:
                consumer_state()
            except Exception as exc:  # faust-streaming's internals moved: the task stacks still help
                logging.getLogger("soundcheck.tasks").warning("faust consumer state not read: %s: %s", type(exc).__name__, exc)
            for task in asyncio.all_tasks():
                buf = io.StringIO()
                task.print_stack(limit=4, file=buf)
                logging.getLogger("soundcheck.tasks").warning("task %s:\n%s\n%s", task.get_name(), buf.getvalue(), "\n".join(awaiting(task)))

        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)
        except (NotImplementedError, RuntimeError, ValueError):  # no signals here (not the main thread, Windows)
            pass

    return app, ctx
