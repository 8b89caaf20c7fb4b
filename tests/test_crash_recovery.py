"""``kill -9`` three quarters of the way through a scenario, a replacement worker, and a clean run
to compare with: a crash neither creates nor loses a notification, and the replacement processes
again within 30 s.

Two runs of one recorded input (the simulator's seed and start time), each on its own uuid topics
and consumer groups, one after the other (the machine is small), produced the same way in three
slices of event time: the first half, as fast as it goes; once the worker has read it and settled
(a pause in the input moves the alerting clock on: both runs pause the same way), the third
quarter; once the worker has read that too and settled, the last quarter, in the background, paced over a few
seconds so that a kill can fall while the worker reads.

* clean: one worker, to the end;
* crash: the worker (snapshotting its stage-2 state every second) is killed with SIGKILL to its
  process group as soon as it has read records of the last quarter, so while it reads (windows
  open, records not yet committed, notifications behind them not yet sent); a replacement starts
  at once on the same app id, topics and data dir. Where the kill falls does not depend on how
  the notifications are spread over the run.

A run is over when each consumer group of the worker has committed up to the end of what it
reads (stage 1 commits only past closed windows), no window is open, and nothing has moved for a
few seconds. The notifications are then read back from the alerts topic: one notification is
(fingerprint, status, kind of notification, severity, event time). Run with ``pytest -s`` to
see the figures: when the crash came, how long the replacement took, events read twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from typing import Any, Optional

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from soundcheck import snapshots
from soundcheck.evaluation.harness import WorkerProcess
from soundcheck.evaluation.produce import produce
from soundcheck.evaluation.simulator import Simulator
from soundcheck.kafka.admin import read_latest, snapshot_topic
from soundcheck.settings import Settings, load_settings

from tests.workers import isolated, start_worker

pytestmark = pytest.mark.integration

SEED, RATE, DURATION_S = 3, 100, 600  # about 80,000 events, 10 minutes of event time
SLICES = (range(0, DURATION_S // 2), range(DURATION_S // 2, 3 * DURATION_S // 4), range(3 * DURATION_S // 4, DURATION_S))
BATCH = 50  # records per message
LAST_PACE = 50  # the last slice: seconds of event time produced per wall second (3 s; the others as fast as they go)
EXTRA = {"SOUNDCHECK_SNAPSHOT_INTERVAL_S": "1"}  # both runs: stage-2 state snapshots every second (agents/detect.py)
RESUME_LIMIT_S = 30.0
VOLATILE = ("alert_id", "emitted_at")  # a notification's own id and the wall clock it was sent at
STABLE_S = 6.0  # a run is over when nothing has moved for this long (after the 5 s idle flush of stage 1)

Notes = dict[str, list[dict[str, Any]]]  # fingerprint -> its notifications, in order


class _Producer:
    """The recorded input, produced as both runs produce it: ``SLICES`` one after the other."""

    def __init__(self, s: Settings, start_ms: int) -> None:
        self.s = s
        self.sim = Simulator(seed=SEED, rate=RATE, duration_s=DURATION_S, start_ms=start_ms)
        self.truth: dict[str, Any] = {}
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._last_slice, daemon=True)

    def first_slices(self, worker: WorkerProcess) -> int:
        """Produce every slice but the last, each once ``worker`` has read the one before; the
        valid events produced."""
        for seconds in SLICES[:-1]:
            asyncio.run(produce(self.sim, self.s, batch=BATCH, seconds=seconds))
            valid = sum(self.sim.produced.values())
            worker.wait_for(lambda: worker.metric_sum("soundcheck_events_in_total") >= valid, timeout=120,
                            what=f"event time {seconds.start}-{seconds.stop} s read")
            # and settled: stage 1 closes its windows after IDLE_FLUSH_S of quiet input and stage 2
            # ticks the alerting clock past them (agents/detect.py, quiet), so a pause in the input
            # changes what is late; both runs pause here, the same way, until all is done
            _wait_drained(self.s, worker)
        return valid

    def start_last_slice(self) -> None:
        self.thread.start()

    def _last_slice(self) -> None:
        try:
            self.truth = asyncio.run(produce(self.sim, self.s, batch=BATCH, seconds=SLICES[-1], realtime=LAST_PACE))
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self) -> dict[str, Any]:
        """Wait for the last slice; the ground truth of the whole run."""
        self.thread.join(120)
        if self.error is not None or self.thread.is_alive():
            raise RuntimeError(f"producing the last slice failed: {self.error!r}")
        return self.truth


# -- reading the broker ------------------------------------------------------------------------


async def _read_all(bootstrap: str, topic: str, partitions: int) -> list[Any]:
    """Every record of ``topic``, from the beginning to its end offsets as of now."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = [tp for tp in tps if await consumer.position(tp) < end[tp]]
            if not left:
                return out
            for records in (await consumer.getmany(*left, timeout_ms=500)).values():
                out.extend(r for r in records if r.offset < end[TopicPartition(r.topic, r.partition)])
        raise TimeoutError(f"could not read {topic} to its end offsets {end}")
    finally:
        await consumer.stop()


async def _committed(s: Settings, group: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka.bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    return {tp: (offsets[tp].offset if tp in offsets and offsets[tp].offset >= 0 else 0) for tp in tps}


async def _progress(s: Settings) -> tuple[int, tuple, dict[str, int]]:
    """(records not yet committed by the worker's consumer groups, the alerts topic's end offsets,
    those records per group and topic partition)."""
    n, t = s.kafka.partitions, s.topics
    groups = {
        f"{s.kafka.app_id}.ingest": [t.audio, t.behavior, t.system],  # stage 1 (agents/ingest.py)
        s.kafka.app_id: [t.aggregates, t.fraud, t.anomalies],  # Faust: stage 2 (agents/detect.py), alerting
    }
    tps = {g: [TopicPartition(topic, p) for topic in topics for p in range(n)] for g, topics in groups.items()}
    alerts = [TopicPartition(t.alerts, p) for p in range(n)]
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka.bootstrap_servers, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        end = await consumer.end_offsets([tp for v in tps.values() for tp in v] + alerts)
    finally:
        await consumer.stop()
    names = {name: role for role, name in t.__dict__.items()}
    behind: dict[str, int] = {}
    for group, wanted in tps.items():
        committed = await _committed(s, group, wanted)
        for tp in wanted:
            if end[tp] > committed[tp]:
                behind[f"{group.rsplit('.', 1)[-1] if group.endswith('.ingest') else 'faust'} {names.get(tp.topic, tp.topic)}:{tp.partition}"] = end[tp] - committed[tp]
    return sum(behind.values()), tuple(end[tp] for tp in alerts), behind


def _wait_drained(s: Settings, worker: WorkerProcess, timeout: float = 240.0) -> None:
    """Until every group has committed all it reads, no window is open, and none of that nor the
    alerts topic has moved for ``STABLE_S``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        if worker.proc is not None and worker.proc.poll() is not None:
            raise RuntimeError(f"the worker exited with code {worker.proc.returncode}:\n{worker.log_tail()}")
        lag, alert_ends, behind = asyncio.run(_progress(s))
        state = (lag, alert_ends, worker.metric_sum("soundcheck_open_windows"))
        if state != last:
            last, since = state, time.monotonic()
        elif lag == 0 and state[2] == 0 and time.monotonic() - since >= STABLE_S:
            return
        time.sleep(0.5)
    if worker.proc is not None and worker.proc.poll() is None:
        os.kill(worker.proc.pid, signal.SIGUSR1)  # where each of its tasks waits, in its log (streams/app.py)
        time.sleep(2.0)
        print(f"\n[crash recovery] not drained; the worker's log with its tasks' stacks: {worker.log_path}")
    raise TimeoutError(f"not drained within {timeout} s (uncommitted, alerts end offsets, open windows = {last}; behind: {behind}):\n{worker.log_tail()}")


async def _stage2_at_kill(s: Settings) -> dict[str, tuple[int, Optional[int]]]:
    """Per stage-2 partition: (the offset the Faust group will resume from, the ``last_offset`` of
    its latest state snapshot). Resuming past ``last_offset + 1`` skips records for that state."""
    roles = {"aggregates": s.topics.aggregates, "fraud": s.topics.fraud}
    tps = [TopicPartition(topic, p) for topic in roles.values() for p in range(s.kafka.partitions)]
    committed = await _committed(s, s.kafka.app_id, tps)
    latest = await read_latest(s.kafka.bootstrap_servers, snapshot_topic(s), timeout=30)
    out = {}
    for role, topic in roles.items():
        for p in range(s.kafka.partitions):
            blob = latest.get(f"{role}:{p}".encode())
            out[f"{role}:{p}"] = (committed[TopicPartition(topic, p)], snapshots.decode_snapshot(blob, s)[0]["last_offset"] if blob else None)
    return out


def _notifications(s: Settings) -> Notes:
    """The alerts topic: per fingerprint (its key, so one partition, in order) the notifications
    without their volatile fields, the run's uuid topic names replaced by their role."""
    names = {name: role for role, name in s.topics.__dict__.items()}
    out: Notes = {}
    for r in asyncio.run(_read_all(s.kafka.bootstrap_servers, s.topics.alerts, s.kafka.partitions)):
        n = orjson.loads(r.value)
        assert r.key.decode() == n["fingerprint"]
        n["source_topics"] = [names.get(t, t) for t in n.get("source_topics", [])]
        out.setdefault(n["fingerprint"], []).append({k: v for k, v in n.items() if k not in VOLATILE})
    return out


def _summary(notes: Notes) -> Counter:
    """One count per notification: (fingerprint, status, notification, severity, event time)."""
    return Counter((fp, n["status"], n.get("notification"), n["severity"], n["event_time"]) for fp, ns in notes.items() for n in ns)


def _late(worker: WorkerProcess) -> dict[str, float]:
    """What stage 2 left out as late: partials by stream, and the fraud stage's rows."""
    m = worker.metrics()
    out = {k.split('"')[1]: v for k, v in m.items() if k.startswith("soundcheck_late_partials_total{")}
    out["fraud rows"] = m.get('soundcheck_late_events_total{stream="fraud"}', 0.0)
    return out


def _count(notes: Notes) -> int:
    return sum(len(ns) for ns in notes.values())


# -- the two runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def start_ms() -> int:
    """One recorded input for both runs; its event time ends a minute or two before the test
    starts, on a whole minute (the 10 s windows then cut it the same way in every session)."""
    t = int(time.time()) - DURATION_S - 60
    return (t - t % 60) * 1000


@pytest.fixture(scope="module")
def clean_run(kafka_bootstrap, unique_name, tmp_path_factory, start_ms):
    tmp = tmp_path_factory.mktemp("clean")
    s = isolated(load_settings("development", environ={}), kafka_bootstrap, unique_name, app="soundcheck-clean")
    worker = start_worker(s, tmp, extra=EXTRA)
    try:
        worker.wait_ready()
        producer = _Producer(s, start_ms)
        producer.first_slices(worker)
        producer.start_last_slice()
        truth = producer.join()
        _wait_drained(s, worker)
        events = worker.metric_sum("soundcheck_events_in_total")
        late = _late(worker)
        notes = _notifications(s)
    finally:
        worker.stop()
    print(f"\n[crash recovery] clean run: late partials and fraud rows {late}")
    return {"truth": truth, "events": events, "notes": notes}


@pytest.fixture(scope="module")
def crash_run(kafka_bootstrap, unique_name, tmp_path_factory, start_ms, clean_run):
    tmp = tmp_path_factory.mktemp("crash")
    s = isolated(load_settings("development", environ={}), kafka_bootstrap, unique_name, app="soundcheck-crash")
    first = start_worker(s, tmp, "first", data="worker", extra=EXTRA)
    replacement = None
    try:
        first.wait_ready()
        producer = _Producer(s, start_ms)
        before_last = producer.first_slices(first)
        first.wait_for(lambda: first.metric_sum("soundcheck_alerts_total") >= 1
                       and first.metric_sum("soundcheck_snapshots_written_total") >= 1,
                       timeout=180, what="a notification and a snapshot before the kill")
        producer.start_last_slice()
        first.wait_for(lambda: first.metric_sum("soundcheck_events_in_total") > before_last, timeout=120,
                       what="records of the last quarter read")
        at_kill = {name: first.metric_sum(f"soundcheck_{name}_total") for name in ("events_in", "anomalies", "anomalies_handled", "alerts")}
        at_kill["open_windows"] = first.metric_sum("soundcheck_open_windows")
        late_first = _late(first)
        os.killpg(first.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        first.proc.wait(10)
        replacement = start_worker(s, tmp, "replacement", data="worker", extra=EXTRA)
        stage2 = asyncio.run(_stage2_at_kill(s))
        # processing again: reading the input records the first worker had not committed, or (had
        # it committed them all) alerting on the anomalies it had not
        replacement.wait_for(lambda: replacement.metric_sum("soundcheck_events_in_total") > 0
                             or replacement.metric_sum("soundcheck_anomalies_handled_total") > 0,
                             timeout=120, what="the replacement to process records")
        resume_s = time.monotonic() - killed
        truth = producer.join()
        _wait_drained(s, replacement)
        events = replacement.metric_sum("soundcheck_events_in_total")
        restored = replacement.metric_sum("soundcheck_snapshots_restored_total")
        late_replacement = _late(replacement)
        notes = _notifications(s)
    finally:
        if first.proc is not None and first.proc.poll() is None:
            os.killpg(first.proc.pid, signal.SIGKILL)
        if replacement is not None:
            replacement.stop()
    valid = sum(truth["produced_valid"].values())
    twice = at_kill["events_in"] + events - clean_run["events"]
    print(
        f"\n[crash recovery] kill -9 after {at_kill['alerts']:.0f} of the clean run's {_count(clean_run['notes'])} notifications; "
        f"by then the first worker had read {at_kill['events_in']:.0f} of {valid} valid events ({before_last} before the last quarter), "
        f"emitted {at_kill['anomalies']:.0f} anomalies, alerted on {at_kill['anomalies_handled']:.0f}; "
        f"{at_kill['open_windows']:.0f} windows open\n"
        f"[crash recovery] the replacement processed again {resume_s:.1f} s after the kill "
        f"({restored:.0f} stage-2 snapshots restored; stage-2 (resume offset, snapshot last_offset): {stage2})\n"
        f"[crash recovery] events counted: clean run {clean_run['events']:.0f}; crash run {at_kill['events_in']:.0f} "
        f"(first worker, last scrape before the kill) + {events:.0f} (replacement) = {at_kill['events_in'] + events:.0f}: "
        f"{twice:.0f} counted twice\n"
        f"[crash recovery] notifications: clean run {_count(clean_run['notes'])}, crash run {_count(notes)}\n"
        f"[crash recovery] late partials and fraud rows: first worker {late_first}, replacement {late_replacement}"
    )
    return {"truth": truth, "at_kill": at_kill, "resume_s": resume_s, "events": events, "notes": notes, "valid": valid}


# -- the claims ---------------------------------------------------------------------------------


def test_the_clean_run_reads_everything_and_notifies(clean_run):
    assert clean_run["events"] == sum(clean_run["truth"]["produced_valid"].values())
    assert any(n["status"] == "firing" for ns in clean_run["notes"].values() for n in ns)
    assert any(n["status"] == "resolved" for ns in clean_run["notes"].values() for n in ns)


def test_a_replacement_processes_again_within_30_s_of_a_kill_9_while_reading(clean_run, crash_run):
    at_kill = crash_run["at_kill"]
    assert at_kill["alerts"] >= 1  # the crash came after some notifications
    assert at_kill["events_in"] < clean_run["events"]  # and before the input was all read
    assert crash_run["resume_s"] < RESUME_LIMIT_S


def test_a_crash_neither_creates_nor_loses_a_notification(clean_run, crash_run):
    clean, crash = _summary(clean_run["notes"]), _summary(crash_run["notes"])
    assert clean, "the clean run sent no notification: nothing to compare"
    created, lost = crash - clean, clean - crash
    what = {fp: (n.get("kind"), n.get("entity"), n.get("summary"))
            for notes in (clean_run["notes"], crash_run["notes"]) for fp, ns in notes.items() for n in ns}
    assert not created and not lost, (
        f"the crash created {sum(created.values())} and lost {sum(lost.values())} of the clean run's {sum(clean.values())} "
        f"notifications (fingerprint, status, notification, severity, event time):\n"
        f"created: {sorted(created)}\nlost: {sorted(lost)}\n"
        + "\n".join(f"{fp}: {what[fp]}" for fp in sorted({k[0] for k in created + lost}))
    )


#: how a notification's incident looked when it was sent: which alerts shared its group, which it
#: lists as related, the root cause of the moment. An anomaly whose window is evaluated after its
#: stream's clock has passed it (a partial that came late after an input partition was taken for
#: idle, a clock moved on by a pause in the input) is taken at the next tick and joins whatever
#: group is open then; a replacement re-reading the anomalies topic can take it before that group
#: went out, so these may differ after a crash while every notification, its alert and its times
#: stay the same
GROUPING = ("group", "related", "root_cause")
#: a fraud farm's notification carries its incident's view in its own fields: the incident it is
#: (``incident_id``) and the accounts the farm held when it was sent (``details``: accounts,
#: joined, links, example). Which accounts an account anomaly taken late joins is the same kind
#: of view, and a replacement can differ in it the same way (measured at e84b422: this test failed
#: in 3 of 5 local runs, the one whose output was kept on exactly this, the same farm notification
#: with other details under another incident id); its account count, fingerprint, severity,
#: priority and times must still be equal
FARM_VIEW = ("incident_id", "details")


def _farm_view_aside(notes: Notes) -> Notes:
    """The notes with a farm notification's incident view left out but its account count kept."""
    out: Notes = {}
    for fp, ns in notes.items():
        out[fp] = [{**{k: v for k, v in n.items() if k not in FARM_VIEW},
                    "account_count": (n.get("details") or {}).get("account_count")}
                   if (n.get("details") or {}).get("accounts") is not None and n.get("kind") == "streaming_fraud" else n
                   for n in ns]
    return out


def _field_diffs(clean: Notes, crash: Notes, skip: tuple = ()) -> list[str]:
    lines = []
    for fp in sorted(set(clean) | set(crash)):
        a, b = clean.get(fp, []), crash.get(fp, [])
        if len(a) != len(b):
            lines.append(f"{fp}: {len(a)} notifications in the clean run {[n['status'] for n in a]}, {len(b)} after the crash {[n['status'] for n in b]}")
            continue
        for x, y in zip(a, b):
            diff = {k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if k not in skip and x.get(k) != y.get(k)}
            if diff:
                lines.append(f"{fp} {x['status']}: " + ", ".join(f"{k}: clean {str(v[0])[:80]} / crash {str(v[1])[:80]}" for k, v in diff.items()))
    return lines


def test_a_crash_changes_no_notification(clean_run, crash_run):
    """Stronger: the same notifications field by field (their id and send time aside), in the
    same order per fingerprint; the incident's view as of sending (``GROUPING``, and a fraud
    farm's ``FARM_VIEW``) is printed when it differs, not asserted."""
    clean, crash = clean_run["notes"], crash_run["notes"]
    lines = _field_diffs(_farm_view_aside(clean), _farm_view_aside(crash), skip=GROUPING)
    assert not lines, "notifications that differ after the crash:\n" + "\n".join(lines)
    grouping = _field_diffs(clean, crash)
    print(f"\n[crash recovery] notifications whose incident view differs after the crash ({len(grouping)}):\n" + "\n".join(grouping))
