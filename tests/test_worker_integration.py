"""The real worker process against the real Kafka broker, fed by the simulator.

One scenario run is shared by the assertions below (module fixture); every run gets its own
uuid topics and consumer group.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import zlib

import jsonschema
import orjson
import pytest

from soundcheck.ingest.contracts import SCHEMA_DIR
from soundcheck.evaluation.score import evaluate
from soundcheck.evaluation.harness import WorkerProcess, read_topic
from soundcheck.evaluation.produce import produce
from soundcheck.evaluation.simulator import Simulator

from tests.workers import isolated, start_worker

pytestmark = pytest.mark.integration






@pytest.fixture(scope="module")
def scenario_run(kafka_bootstrap, unique_name, tmp_path_factory):
    from soundcheck.settings import load_settings

    tmp = tmp_path_factory.mktemp("e2e")
    s = isolated(load_settings("development", environ={}), kafka_bootstrap, unique_name)
    worker = start_worker(s, tmp, extra={"SOUNDCHECK_SNAPSHOT_INTERVAL_S": "5"})
    try:
        worker.wait_ready()
        sim = Simulator(seed=21, rate=100, duration_s=900, start_ms=(int(time.time()) - 1000) * 1000)
        truth = asyncio.run(produce(sim, s, batch=50))
        valid, bad = sum(truth["produced_valid"].values()), truth["produced_malformed"]
        worker.wait_for(
            lambda: worker.metric_sum("soundcheck_events_in_total") >= valid and worker.metric_sum("soundcheck_dead_letters_total") >= bad,
            timeout=300, what="every record read",
        )
        worker.wait_for(lambda: worker.metric_sum("soundcheck_anomalies_total") > 0, timeout=120, what="anomalies")
        worker.wait_settled(timeout=120, quiet_s=3.0, what="windows flushed and anomalies alerted")
        n_alerts, n_anomalies = worker.metric_sum("soundcheck_alerts_total"), worker.metric_sum("soundcheck_anomalies_total")
        alerts = asyncio.run(read_topic(kafka_bootstrap, s.topics.alerts, until=lambda r: len(r) >= n_alerts, timeout=60))
        anomalies = [orjson.loads(r.value) for r in asyncio.run(read_topic(
            kafka_bootstrap, s.topics.anomalies, timeout=60,
            until=lambda r: sum(1 for x in r if b'"tick"' not in x.value) >= n_anomalies))]
        anomalies = [a for a in anomalies if "tick" not in a]
        dead = asyncio.run(read_topic(kafka_bootstrap, s.topics.dead_letter, until=lambda r: len(r) >= bad, timeout=60))
        metrics = worker.metrics()
        metrics["(worker log)"] = [line for line in worker.log_path.read_text(errors="replace").splitlines()
                                   if re.search(r"Revoking|overlapping|ERROR|CRITICAL|soundcheck\.\w+:", line)][-40:]
        metrics_text = worker._get("/metrics")
        assert worker.stop() == 0  # a clean stop writes the last snapshots
        raw, records = asyncio.run(_raw_ids_by_topic(s, sim.tag))
        assert records[s.kafka.app_id + ".snapshots"] > 0, records  # the scan has snapshots to look into
        raw["(worker log)"] = len(set(_raw_id_pattern(sim.tag).findall(worker.log_path.read_bytes())))
        raw["(/metrics)"] = len(set(_raw_id_pattern(sim.tag).findall(metrics_text)))
        print("\nraw user/device ids by topic:", raw)
        yield s, sim, truth, alerts, dead, metrics, raw, anomalies
    finally:
        worker.stop()


def _why_missed(row: dict, truth: dict, alerts: list, anomalies: list[dict], metrics: dict) -> str:
    """What the worker did around a scenario it did not alert on: its alerts and anomalies in the
    scenario's region (event times in seconds from the run's start) and the records it left out."""
    start = truth["start_ms"]
    sc = next(x for x in truth["scenarios"] if x["name"] == row["name"])
    at = lambda ms: round((ms - start) / 1000)  # noqa: E731
    near = [orjson.loads(r.value) for r in alerts]
    near = [(a["status"], a["priority"], a["kind"], a["entity"], at(a["event_time"])) for a in near
            if row["region"] in (a["entity"].get("region"), a["entity"].get("country"))]
    found = [(a.get("detector"), a.get("entity"), at(a.get("event_time") or a.get("window_start") or start), a.get("score"))
             for a in anomalies if row["region"] in orjson.dumps(a).decode()]
    left_out = {k: v for k, v in metrics.items() if k.startswith(("soundcheck_late_events_total", "soundcheck_late_partials_total")) and v}
    log = "\n".join(metrics.get("(worker log)", []))
    return (f"{row}\nscenario {sc['name']} {at(sc['start_ms'])}-{at(sc['end_ms'])} s, expected {sc['expect']}"
            f"\nalerts in {row['region']}: {near}\nanomalies in {row['region']} ({len(found)}): {found[:40]}"
            f"\nrecords left out: {left_out}\nfrom the worker's log:\n{log}")


def _raw_id_pattern(tag: str) -> "re.Pattern[bytes]":
    """The simulator's raw user and device ids (``u-<tag>-...``, ``dev-<tag>-...``, ``farmdev-<tag>-...``),
    also inside session ids."""
    return re.compile(rb"(?:u|dev|farmdev)-" + tag.encode() + rb"-[a-z0-9-]+")


async def _raw_ids_by_topic(s, tag: str) -> tuple[dict[str, int], dict[str, int]]:
    """Distinct raw ids in every topic the worker reads or writes, read to its end; snapshots are
    unpacked (their payload is zlib-compressed) so that compression hides nothing."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from soundcheck.kafka.admin import topic_partitions, worker_topics
    from soundcheck.snapshots import decode_header

    pattern, out, counts = _raw_id_pattern(tag), {}, {}
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=32 << 20, fetch_max_bytes=64 << 20)
    await consumer.start()
    try:
        for topic in worker_topics(s):
            tps = [TopicPartition(topic, p) for p in await topic_partitions(s.kafka.bootstrap_servers, topic)]
            found: set[bytes] = set()
            if tps:
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                end = await consumer.end_offsets(tps)
                while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        counts[topic] = counts.get(topic, 0) + len(records)
                        for r in records:
                            for blob in (r.key or b"", r.value or b""):
                                found.update(pattern.findall(blob))
                                try:
                                    found.update(pattern.findall(zlib.decompress(decode_header(blob)[1])))
                                except Exception:
                                    pass  # not a snapshot
            out[topic] = len(found)
            counts.setdefault(topic, 0)
    finally:
        await consumer.stop()
    return out, counts


def test_each_injected_incident_alerts_on_the_right_entity_with_a_plausible_severity(scenario_run):
    s, sim, truth, alerts, dead, metrics, raw, anomalies = scenario_run
    report = evaluate([orjson.loads(r.value) for r in alerts], truth, s)
    for row in report["scenarios"]:
        if row.get("must_not_page"):
            continue
        assert row["found"], _why_missed(row, truth, alerts, anomalies, metrics)
        assert row["severity"] in ("medium", "high", "critical"), row


def test_the_benign_surge_pages_nobody(scenario_run):
    s, sim, truth, alerts, dead, metrics, raw, anomalies = scenario_run
    assert evaluate([orjson.loads(r.value) for r in alerts], truth, s)["benign_pages"] == 0


def test_alerts_are_keyed_by_fingerprint_and_match_the_alert_schema(scenario_run):
    s, sim, truth, alerts, dead, metrics, raw, anomalies = scenario_run
    schema = json.loads((SCHEMA_DIR / "alert.schema.json").read_text())
    assert alerts
    for r in alerts:
        alert = orjson.loads(r.value)
        jsonschema.validate(alert, schema)
        assert r.key.decode() == alert["fingerprint"]
    assert len({orjson.loads(r.value)["alert_id"] for r in alerts}) == len(alerts)


def test_every_malformed_record_is_dead_lettered_with_its_origin_and_nothing_else_is_lost(scenario_run):
    s, sim, truth, alerts, dead, metrics, raw, anomalies = scenario_run
    schema = json.loads((SCHEMA_DIR / "dead_letter.schema.json").read_text())
    assert len(dead) == truth["produced_malformed"] == 30
    for r in dead:
        d = orjson.loads(r.value)
        jsonschema.validate(d, schema)
        assert d["source_topic"] == s.topics.audio and d["partition"] >= 0 and d["offset"] >= 0 and d["reason"]
        assert base64.b64decode(d["original_value_b64"])  # the original bytes are kept
    kinds = sorted({orjson.loads(r.value)["error_kind"] for r in dead})
    assert kinds == ["future_ts", "impossible_value", "invalid_json", "not_an_object", "schema"]
    valid = sum(truth["produced_valid"].values())
    read = sum(v for k, v in metrics.items() if k.startswith("soundcheck_events_in_total"))
    assert read == valid  # every valid record was read exactly once, bad ones did not take good ones with them
    late = {k: v for k, v in metrics.items() if k.startswith("soundcheck_late_partials_total")}
    print("late partials:", late)
    assert len(late) == 3 and sum(late.values()) == 0  # and stage 2 left no input partition's partials out


def test_nothing_the_worker_writes_holds_a_raw_user_or_device_id(scenario_run):
    s, sim, truth, alerts, dead, metrics, raw, anomalies = scenario_run
    snapshots = s.kafka.app_id + ".snapshots"
    assert raw[s.topics.behavior] > 100 and raw[s.topics.audio] > 100  # the scan does find raw ids where they are
    assert raw[snapshots] == 0 and raw[s.topics.aggregates] == 0 and raw[s.topics.fraud] == 0
    outside = {t: n for t, n in raw.items() if t not in (*s.topics.inputs().values(), s.topics.dead_letter)}
    assert all(n == 0 for n in outside.values()), outside


def test_two_workers_share_the_partitions_of_one_consumer_group(kafka_bootstrap, unique_name, tmp_path, settings):
    s = isolated(settings, kafka_bootstrap, unique_name)
    a, b = start_worker(s, tmp_path, "a"), start_worker(s, tmp_path, "b")
    try:
        a.wait_ready()
        b.wait_ready()
        a.wait_for(lambda: (a.health() or {}).get("assigned_partitions", 0) + (b.health() or {}).get("assigned_partitions", 0)
                   == (a.health() or {}).get("assigned_partitions", 0) + (b.health() or {}).get("assigned_partitions", 0) > 0
                   and not (a.health() or {}).get("rebalancing") and (b.health() or {}).get("assigned_partitions", 0) > 0,
                   timeout=90, what="both workers to hold partitions")
        sim = Simulator(seed=5, rate=60, duration_s=60, start_ms=(int(time.time()) - 120) * 1000, plan=())
        truth = asyncio.run(produce(sim, s, batch=20))
        valid = sum(truth["produced_valid"].values())
        total = lambda: a.metric_sum("soundcheck_events_in_total") + b.metric_sum("soundcheck_events_in_total")  # noqa: E731
        a.wait_for(lambda: total() >= valid, timeout=120, what="the group to read everything")
        assert total() == valid
        assert a.metric_sum("soundcheck_events_in_total") > 0 and b.metric_sum("soundcheck_events_in_total") > 0
    finally:
        a.stop()
        b.stop()


def test_the_detection_goals_hold_through_the_real_broker(scenario_run):
    """`soundcheck eval scenarios` measures these offline; the same check on one scenario run through Kafka."""
    from soundcheck.evaluation.scenarios import GOALS, score_run

    s, sim, truth, alerts, dead, metrics, raw, anomalies = scenario_run
    r = score_run([orjson.loads(a.value) for a in alerts], truth, s)
    missed = [row for row in r["scenarios"] if row.get("found") is False]
    assert r["recall"] >= GOALS["recall"], [_why_missed(row, truth, alerts, anomalies, metrics) for row in missed]
    assert r["precision"] >= GOALS["precision"], r["unmatched"]
    assert r["median_delay_s"] < GOALS["median_delay_s"]
    assert r["benign_pages"] == 0
    assert r["flapping_notifications"] <= GOALS["flapping_notifications"]
