"""Detection sees the whole population of an entity, whatever the partition count, the producers'
keying and the batching: the same recorded traffic gives the same anomalies (kind, entity, window).

Offline over the whole grid (1, 3 and 12 input partitions; producers keying by region/user/service,
by user, at random; single-record and batched messages), and through the real worker and broker
with 1 against 6 input partitions and records keyed by user.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from soundcheck.evaluation.harness import read_topic
from soundcheck.pipeline import run_simulation
from soundcheck.evaluation.simulator import Simulator

from tests.workers import isolated, start_worker

T0 = 1_700_000_000_000
PLAN = (("cdn_pop_degradation", 150, 120), ("fraud_farm", 120, 200), ("billing_error_spike", 180, 100),
        ("latency_regression", 200, 100))


def _found(anomalies) -> set[tuple]:
    return {(a.kind, a.detector, tuple(sorted(a.entity.items())), a.window_start) for a in anomalies}


@pytest.fixture(scope="module")
def reference(settings_module):
    sim = Simulator(seed=5, rate=100, duration_s=330, start_ms=T0, plan=PLAN)
    pipe = run_simulation(settings_module, sim, partitions=1, keying="natural", per_message=50)
    return _found(pipe.anomalies), sim


@pytest.fixture(scope="module")
def settings_module():
    from soundcheck.settings import load_settings

    return load_settings("development", environ={})


@pytest.mark.parametrize("partitions", [1, 3, 12])
@pytest.mark.parametrize("keying", ["natural", "user", "random"])
@pytest.mark.parametrize("per_message", [1, 50])
def test_the_same_traffic_gives_the_same_anomalies_whatever_the_partitioning(settings_module, reference, partitions, keying,
                                                                             per_message):
    expected, _ = reference
    kinds = {k for k, *_ in expected}
    assert {"audio_quality_degradation", "streaming_fraud", "payment_failure", "service_degradation"} <= kinds
    sim = Simulator(seed=5, rate=100, duration_s=330, start_ms=T0, plan=PLAN)
    pipe = run_simulation(settings_module, sim, partitions=partitions, keying=keying, per_message=per_message, seed=partitions)
    assert _found(pipe.anomalies) == expected
    assert sum(ing.late_events for ing in pipe.ingest.values()) == 0


def test_more_aggregates_partitions_change_nothing_either(settings_module, reference):
    expected, _ = reference
    sim = Simulator(seed=5, rate=100, duration_s=330, start_ms=T0, plan=PLAN)
    pipe = run_simulation(settings_module, sim, partitions=3, keying="user", aggregates_partitions=4)
    assert _found(pipe.anomalies) == expected


# ---------------------------------------------------------------------------------------------
# through the real worker


async def _produce_keyed_by_user(sim: Simulator, s) -> int:
    """Every record its own message, keyed by user (system samples by service), as many real producers do."""
    from aiokafka import AIOKafkaProducer

    topics = s.topics.inputs()
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka.bootstrap_servers, linger_ms=20, acks=1)
    await producer.start()
    n = 0
    try:
        pending = []
        for b in sim.ticks():
            for r in b.records:
                if isinstance(r, (bytes, bytearray)):
                    continue
                key = (r.get("user_id") or r.get("service") or b.key).encode()
                pending.append(await producer.send(topics[b.stream], orjson.dumps(r), key=key))
                n += 1
            if len(pending) > 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return n


def _worker_anomalies(kafka_bootstrap, unique_name, tmp_path, settings, partitions: int, start_ms: int) -> set[tuple]:
    s = isolated(settings.replace(kafka={"partitions": partitions}), kafka_bootstrap, unique_name, f"soundcheck-p{partitions}")
    worker = start_worker(s, tmp_path, f"p{partitions}")
    try:
        worker.wait_ready()
        sim = Simulator(seed=5, rate=100, duration_s=330, start_ms=start_ms, plan=PLAN)
        n = asyncio.run(_produce_keyed_by_user(sim, s))
        worker.wait_for(lambda: worker.metric_sum("soundcheck_events_in_total") >= n, timeout=240, what="every record read")
        worker.wait_for(lambda: worker.metric_sum("soundcheck_open_windows") == 0, timeout=60, what="the quiet flush")
        time.sleep(3)  # stage 2 and the anomalies topic
        emitted = worker.metric_sum("soundcheck_anomalies_total")
        recs = asyncio.run(read_topic(kafka_bootstrap, s.topics.anomalies,
                                      until=lambda r: sum(1 for x in r if b'"tick"' not in x.value) >= emitted, timeout=60))
    finally:
        worker.stop()
    docs = [orjson.loads(r.value) for r in recs]
    return {(d["kind"], d["detector"], tuple(sorted(d["entity"].items())), d["window_start"]) for d in docs if "tick" not in d}


@pytest.mark.integration
def test_one_and_six_input_partitions_give_the_same_anomalies_through_the_worker(kafka_bootstrap, unique_name, tmp_path, settings):
    start_ms = (int(time.time()) - 900) * 1000
    one = _worker_anomalies(kafka_bootstrap, unique_name, tmp_path, settings, 1, start_ms)
    six = _worker_anomalies(kafka_bootstrap, unique_name, tmp_path, settings, 6, start_ms)
    assert {"audio_quality_degradation", "streaming_fraud", "service_degradation"} <= {k for k, *_ in one}
    assert six == one
