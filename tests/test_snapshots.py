"""Detector state snapshots: the format (round trip, refusals) and a restart against a real broker."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
import zlib
from types import SimpleNamespace

import orjson
import pytest
from prometheus_client import CollectorRegistry

from tests.workers import isolated, start_worker
from soundcheck import snapshots
from soundcheck.ingest.contracts import load_contracts
from soundcheck.evaluation.harness import WorkerProcess, read_topic
from soundcheck.kafka.admin import read_latest, snapshot_topic
from soundcheck.metrics import WorkerMetrics
from soundcheck.detectors.stage2 import STREAMS, FraudStage, Stage2
from soundcheck.pipeline import IngestStage, decode_internal
from soundcheck.evaluation.produce import produce
from soundcheck.evaluation.simulator import Simulator, encode

T0 = 1_700_000_000_000
ROLES = {"audio": "aggregates", "behavior": "aggregates", "system": "aggregates", "fraud": "fraud"}


def _unit(settings, stream: str):
    """A fresh stage-2 unit: the Stage2 dict of an aggregates partition, or a FraudStage."""
    return FraudStage(settings) if stream == "fraud" else {s: Stage2(settings, s) for s in STREAMS}


def _feed(settings, units: list, stream: str, sim: Simulator) -> list[list[bytes]]:
    """Stage 1 over ``sim``'s traffic of ``stream`` (behaviour for fraud), delivered to every unit;
    returns each unit's anomalies as JSON."""
    source = "behavior" if stream == "fraud" else stream
    ingest = IngestStage(settings, source)
    found: list[list[bytes]] = [[] for _ in units]
    batches = [b for b in sim.ticks() if b.stream == source]

    def deliver(msgs) -> None:
        for m in msgs:
            if (m.topic == "fraud") != (stream == "fraud"):
                continue
            doc = decode_internal(m.value)
            for i, u in enumerate(units):
                out = (u.add(doc["source"], doc["rows"], doc["closed_until"], now=0.0) if stream == "fraud"
                       else u[source].add(doc["source"], doc["partials"], doc["closed_until"], now=0.0))
                found[i].extend(a.to_json() for a in out)

    for b in batches:
        recs = [r for v in encode(b, 50) for r in ingest.decode(v, T0 + 3_600_000)[0]]
        deliver(ingest.process(0, recs, now=float("inf")))
    return found


def _fed(settings, stream: str, seconds: int = 240, seed: int = 4):
    unit = _unit(settings, stream)
    _feed(settings, [unit], stream, Simulator(seed=seed, rate=60, duration_s=seconds, start_ms=T0, plan=()))
    return unit


def _snapshot(settings, unit, stream: str, partition: int = 0, offset: int = 99) -> bytes:
    return snapshots.encode_snapshot(snapshots.capture_stage(unit), stream=ROLES[stream], partition=partition,
                                     last_offset=offset, last_event_time=None, settings=settings)


def _rewrite(blob: bytes, **changes) -> bytes:
    header, payload = snapshots.decode_header(blob)
    raw = orjson.dumps({**header, **changes})
    return snapshots.MAGIC + len(raw).to_bytes(4, "big") + raw + payload


def _baselines(unit) -> dict:
    out = {}
    if isinstance(unit, FraudStage):  # fraud: the per-user counters
        return {"users": len(unit.users), "pending": len(unit.pending), "state": pickle.dumps(unit.detector.users._items)}
    for st in unit.values():
        for det in st.detectors:
            for key in det.entities.keys():
                b = det.entities._items[key][1]
                b = getattr(b, "baseline", b)
                out[(det.name, key)] = (b.observations, {n: b.expected(n) for n in sorted(b._features)})
    return out


def _open(unit) -> int:
    return len(unit.pending) if isinstance(unit, FraudStage) else sum(st.open_windows for st in unit.values())


@pytest.mark.parametrize("stream", ["audio", "behavior", "system", "fraud"])
def test_a_snapshot_round_trip_restores_the_learned_state_and_the_detection_that_follows(settings, stream):
    unit = _fed(settings, stream)
    blob = _snapshot(settings, unit, stream, partition=2, offset=1234)
    header, state = snapshots.decode_snapshot(blob, settings)
    assert header["format"] == snapshots.FORMAT_VERSION and header["river"] == "0.26.1"
    assert (header["stream"], header["partition"], header["last_offset"]) == (ROLES[stream], 2, 1234)
    assert header["created_at"] > 0 and header["soundcheck"]
    restored = _unit(settings, stream)
    assert snapshots.restore_stage(restored, state) > 0
    assert _baselines(restored) == _baselines(unit) and _baselines(unit)
    assert _open(restored) == _open(unit)
    # the same later traffic gives the same findings from the original and from the restored state
    later = Simulator(seed=4, rate=60, duration_s=120, start_ms=T0 + 240_000, plan=(("fraud_farm", 10, 100),))
    a, b = _feed(settings, [unit, restored], stream, later)
    assert a == b
    assert _baselines(restored) == _baselines(unit)


def test_the_settings_are_not_in_the_snapshot_the_restoring_workers_stand_in(settings):
    unit = _fed(settings, "system", seconds=60)
    blob = _snapshot(settings, unit, "system")
    assert b"pseudonym" not in zlib.decompress(snapshots.decode_header(blob)[1])
    other = settings.replace(kafka={"app_id": "another"})
    _, state = snapshots.decode_snapshot(blob, other)
    restored = _unit(other, "system")
    snapshots.restore_stage(restored, state)
    det = restored["system"].detectors[0]
    baseline = next(iter(det.entities._items.values()))[1]
    assert getattr(baseline, "baseline", baseline).min_change._settings is other
    with pytest.raises(snapshots.SnapshotRejected):  # without settings it cannot be restored
        snapshots.decode_snapshot(blob)


@pytest.mark.parametrize("field,value,reason", [
    ("format", snapshots.FORMAT_VERSION + 1, "format_version"),
    ("river", "0.21.0", "river_version"),
    ("state_schema", "0" * 16, "state_schema"),
])
def test_a_snapshot_of_another_format_or_river_version_is_refused(settings, field, value, reason):
    blob = _rewrite(_snapshot(settings, _fed(settings, "audio", 60), "audio"), **{field: value})
    with pytest.raises(snapshots.SnapshotRejected) as err:
        snapshots.decode_snapshot(blob, settings)
    assert err.value.reason == reason


def test_a_snapshot_with_another_soundcheck_version_is_restored(settings):
    blob = _rewrite(_snapshot(settings, _fed(settings, "audio", 60), "audio"), soundcheck="0.0.1")
    assert snapshots.decode_snapshot(blob, settings)[0]["soundcheck"] == "0.0.1"


def test_corrupt_bytes_are_refused(settings):
    good = _snapshot(settings, _fed(settings, "audio", 60), "audio")
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF
    cases = [b"", b"SCSNAP", b"garbage" * 10, good[:-5], bytes(flipped), good[:20], snapshots.MAGIC + b"\xff\xff\xff\xff{}",
             snapshots.MAGIC + (2).to_bytes(4, "big") + b"[]" + good[-10:]]
    for blob in cases:
        with pytest.raises(snapshots.SnapshotRejected) as err:
            snapshots.decode_snapshot(blob, settings)
        assert err.value.reason == "corrupt"


def test_a_payload_naming_any_other_callable_is_refused(settings):
    import os

    for payload_obj in (os.system, print, snapshots.encode_snapshot):
        payload = zlib.compress(pickle.dumps(payload_obj))
        blob = _rewrite(_snapshot(settings, _unit(settings, "audio"), "audio"),
                        payload_bytes=len(payload), payload_crc32=zlib.crc32(payload))
        blob = blob[: -len(snapshots.decode_header(blob)[1])] + payload
        with pytest.raises(snapshots.SnapshotRejected, match="not allowed"):
            snapshots.decode_snapshot(blob, settings)


def test_the_keeper_restores_a_good_snapshot_and_counts_and_logs_once_a_refused_one(settings, caplog):
    from agents.detect import SnapshotKeeper, UnitHolder

    metrics = WorkerMetrics(CollectorRegistry())
    holder = UnitHolder("aggregates", lambda: _unit(settings, "audio"))
    ctx = SimpleNamespace(settings=settings, metrics=metrics, contracts=load_contracts(), processors={"aggregates": holder})
    keeper = SnapshotKeeper(SimpleNamespace(), ctx)
    good = _snapshot(settings, _fed(settings, "audio", 120), "audio", partition=1, offset=77)
    assert keeper.load("aggregates", 1, good)
    assert holder.offsets[1] == 77 and holder.tracked()["audio.baseline"] > 0 and not holder.dirty
    bad = _rewrite(good, river="0.19.0")
    with caplog.at_level(logging.WARNING, logger="agents.detect"):
        assert not keeper.load("aggregates", 2, bad)
        assert not keeper.load("aggregates", 2, bad)
        assert not keeper.load("aggregates", 0, good)  # a snapshot under another partition's key
    assert metrics.value("soundcheck_snapshots_rejected_total", stream="aggregates") == 3
    assert sum("River" in r.getMessage() for r in caplog.records) == 1
    assert 2 not in holder.partitions and 0 not in holder.partitions


def test_a_restored_partition_is_counted_only_once_its_state_and_gauges_are_in(settings, monkeypatch):
    """A reader who sees soundcheck_snapshots_restored_total go up also sees the restored gauges
    (the broker test waits on the counter and then compares the gauges)."""
    import agents.detect as detect

    metrics = WorkerMetrics(CollectorRegistry())
    holder = detect.UnitHolder("aggregates", lambda: _unit(settings, "audio"))
    ctx = SimpleNamespace(settings=settings, metrics=metrics, contracts=load_contracts(), processors={"aggregates": holder})
    keeper = detect.SnapshotKeeper(SimpleNamespace(), ctx)
    good = _snapshot(settings, _fed(settings, "audio", 120), "audio", partition=1, offset=77)
    seen: list[tuple[float, float]] = []
    counter = metrics.snapshots_restored.labels(stream="aggregates")
    inc = counter.inc

    def counting(*a, **kw):  # what a scrape at the moment of the increment would read
        seen.append((metrics.value("soundcheck_tracked_entities", detector="audio.baseline") or 0.0,
                     metrics.value("soundcheck_snapshots_restored_total", stream="aggregates") or 0.0))
        return inc(*a, **kw)

    monkeypatch.setattr(counter, "inc", counting)

    async def found(*a, **kw):
        return {b"aggregates:1": good}

    monkeypatch.setattr(detect, "read_latest", found)
    asyncio.run(keeper.restore([("aggregates", 1), ("aggregates", 2)]))
    assert len(seen) == 1 and seen[0][0] > 0 and seen[0][1] == 0
    assert metrics.value("soundcheck_snapshots_restored_total", stream="aggregates") == 1
    assert holder.offsets[1] == 77 and 2 not in holder.partitions


def test_the_snapshot_interval_comes_from_the_environment_when_set():
    from agents.detect import SNAPSHOT_INTERVAL_S, snapshot_interval

    assert snapshot_interval({}) == SNAPSHOT_INTERVAL_S == 30
    assert snapshot_interval({"SOUNDCHECK_SNAPSHOT_INTERVAL_S": "1.5"}) == 1.5


# ---------------------------------------------------------------------------------------------
# a restart against the real broker






def _sum(worker: WorkerProcess, prefix: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in worker.metrics().items()
               if (k == prefix or k.startswith(prefix + "{")) and all(w in k for w in want))


def _pages(worker: WorkerProcess, s) -> list[str]:
    """The alerts so far that page or come from a learned per-entity baseline, readable.

    Left out: P2/P3 behaviour-rate alerts, a population rate per region computed over one
    partition's users: on this little test traffic a rate near its absolute floor (crash_rate
    0.022 against 0.03) crosses it now and then, restart or not, as it does in a fresh worker.
    """
    n = _sum(worker, "soundcheck_alerts_total")
    if n <= 0:
        return []
    recs = asyncio.run(read_topic(s.kafka.bootstrap_servers, s.topics.alerts, until=lambda r: len(r) >= n, timeout=30))
    alerts = [orjson.loads(r.value) for r in recs]
    return [f"{a['priority']} {a['title']}: {a['summary']}" for a in alerts
            if a["priority"] in ("P0", "P1") or a["detector"] != "behavior.rates"]


def _tracked(worker: WorkerProcess) -> dict:
    return {k: v for k, v in worker.metrics().items() if k.startswith("soundcheck_tracked_entities")}


def _steady_tracked(worker: WorkerProcess, settle_s: float = 3.0, timeout: float = 60.0) -> dict:
    """The tracked entities once stage 2 has taken in the last progress (unchanged for ``settle_s``)."""
    deadline = time.monotonic() + timeout
    last = _tracked(worker)
    while time.monotonic() < deadline:
        time.sleep(settle_s)
        now = _tracked(worker)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the tracked entities kept changing: {last}")


def _settled(worker: WorkerProcess, events: int) -> bool:
    """Everything read, the windows flushed, every anomaly through alerting."""
    return _sum(worker, "soundcheck_events_in_total") >= events and worker.drained()


@pytest.mark.integration
def test_a_restarted_worker_restores_its_detector_state_and_does_not_page_on_its_cold_start(kafka_bootstrap, unique_name,
                                                                                           tmp_path, settings):
    s = isolated(settings, kafka_bootstrap, unique_name, "soundcheck-snap")
    start = (int(time.time()) - 900) * 1000
    warmup = Simulator(seed=21, rate=100, duration_s=240, start_ms=start, plan=())
    first = start_worker(s, tmp_path, "first", extra={"SOUNDCHECK_SNAPSHOT_INTERVAL_S": "1"})
    try:
        first.wait_ready()
        truth = asyncio.run(produce(warmup, s, batch=20))
        valid = sum(truth["produced_valid"].values())
        first.wait_for(lambda: _settled(first, valid), timeout=180, what="the warm-up traffic read and flushed")
        first.wait_for(lambda: all(_sum(first, "soundcheck_snapshots_written_total", stream=st) > 0 for st in ("aggregates", "fraud")),
                       timeout=60, what="periodic snapshots of every stage-2 unit")
        learned = _steady_tracked(first)
        assert sum(learned.values()) > 0
        assert not _pages(first, s)  # normal traffic: nothing to page about (a precondition)
    finally:
        assert first.stop() == 0, first.log_tail()  # SIGTERM: a clean shutdown writes what changed since

    stored = asyncio.run(read_latest(kafka_bootstrap, snapshot_topic(s)))
    assert {k.decode().split(":")[0] for k in stored} == {"aggregates", "fraud"}
    header = snapshots.decode_header(next(iter(stored.values())))[0]
    assert header["river"] == "0.26.1" and header["last_offset"] >= 0

    second = start_worker(s, tmp_path, "second", extra={"SOUNDCHECK_SNAPSHOT_INTERVAL_S": "1"})
    try:
        second.wait_ready()
        second.wait_for(lambda: _sum(second, "soundcheck_snapshots_restored_total") >= len(stored), timeout=60,
                        what="every partition's snapshot restored")
        # before any new record: the entities and baselines are back, where a worker of a fresh app id (no
        # snapshot) tracks nothing until it has read traffic, and then needs warmup_windows of it per entity
        restored = {k: v for k, v in second.metrics().items() if k.startswith("soundcheck_tracked_entities")}
        assert restored == learned
        assert _sum(second, "soundcheck_snapshots_rejected_total") == 0
        assert _sum(second, "soundcheck_events_in_total") == 0  # nothing read twice: the offsets were committed

        later = Simulator(seed=21, rate=100, duration_s=120, start_ms=start + 240_000, plan=())
        truth = asyncio.run(produce(later, s, batch=20))
        valid = sum(truth["produced_valid"].values())
        second.wait_for(lambda: _settled(second, valid), timeout=180, what="the later traffic read and flushed")
        assert not _pages(second, s)  # no paging on the restarted worker's cold start
    finally:
        second.stop()

