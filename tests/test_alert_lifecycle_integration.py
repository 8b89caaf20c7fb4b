"""The alert lifecycle through the real worker and broker: an incident fires once, repeats only
on escalation, resolves when it ends, and a worker restart in the middle neither loses nor
duplicates its notification. Also: a silence sent on the control topic at run time."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from soundcheck.alerting.classify import SEVERITY_RANK
from soundcheck.evaluation.harness import read_topic
from soundcheck.evaluation.produce import produce
from soundcheck.evaluation.simulator import Simulator

from tests.workers import isolated, start_worker

pytestmark = pytest.mark.integration
PLAN = (("cdn_pop_degradation", 200, 180),)






def _alerts(s, until, timeout=120):
    records = asyncio.run(read_topic(s.kafka.bootstrap_servers, s.topics.alerts, until=until, timeout=timeout))
    return [orjson.loads(r.value) for r in records]


def test_fires_once_escalates_only_up_resolves_and_survives_a_restart(kafka_bootstrap, unique_name, tmp_path, settings):
    s = isolated(settings, kafka_bootstrap, unique_name, "soundcheck-life")
    sim = Simulator(seed=44, rate=80, duration_s=620, start_ms=(int(time.time()) - 700) * 1000, plan=PLAN)
    pop = sim.scenarios[0].details["cdn_pop"]
    on_pop = lambda alerts: [a for a in alerts if a["entity"].get("cdn_pop") == pop]  # noqa: E731

    first = start_worker(s, tmp_path, "first", data="shared")
    try:
        first.wait_ready()
        asyncio.run(produce(sim, s, batch=40, seconds=range(0, 300)))  # the incident is under way at 300 s
        early = _alerts(s, until=lambda rs: any(orjson.loads(r.value)["entity"].get("cdn_pop") == pop for r in rs))
        assert on_pop(early), "the first worker notified the incident before it stopped"
        assert first.stop() == 0  # a clean stop (SIGTERM)
    finally:
        first.stop()

    second = start_worker(s, tmp_path, "second", data="shared")
    try:
        second.wait_ready()
        truth = asyncio.run(produce(sim, s, batch=40, seconds=range(300, 620)))
        assert truth["produced_malformed"] == 0
        got = _alerts(s, until=lambda rs: any(orjson.loads(r.value)["entity"].get("cdn_pop") == pop
                                             and orjson.loads(r.value)["status"] == "resolved" for r in rs), timeout=180)
    finally:
        second.stop()

    mine = on_pop(got)
    kinds = [a["notification"] for a in mine]
    assert kinds.count("new") == 1, kinds  # fired once, not again after the restart
    assert "repeat" not in kinds  # the repeat interval is longer than the incident
    assert kinds[-1] == "resolved" and kinds.count("resolved") == 1, kinds
    firing = [a for a in mine if a["status"] == "firing"]
    for before, after in zip(firing, firing[1:]):
        assert after["notification"] == "escalated" and SEVERITY_RANK[after["severity"]] > SEVERITY_RANK[before["severity"]]
    end = sim.scenarios[0].end_ms
    assert abs(mine[-1]["ends_at"] - end) <= 30_000  # resolved with the incident's real end
    assert len({a["alert_id"] for a in got}) == len(got)


def test_a_silence_on_the_control_topic_holds_alerts_back(kafka_bootstrap, unique_name, tmp_path, settings):
    from aiokafka import AIOKafkaProducer

    s = isolated(settings, kafka_bootstrap, unique_name, "soundcheck-life")
    sim = Simulator(seed=45, rate=80, duration_s=560, start_ms=(int(time.time()) - 700) * 1000, plan=PLAN)
    sc = sim.scenarios[0]
    silence = {"action": "silence", "silence": {"id": "maint-test", "matchers": {"region": sc.region},
                                                "starts_at": sim.start_ms, "ends_at": sim.start_ms + 10**9, "comment": "test"}}

    async def send_control() -> None:
        p = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await p.start()
        try:
            await p.send_and_wait(s.topics.control, orjson.dumps(silence))
            await p.send_and_wait(s.topics.control, b'{"action": "nonsense"}')
        finally:
            await p.stop()

    worker = start_worker(s, tmp_path, "silenced")
    try:
        worker.wait_ready()
        asyncio.run(send_control())
        worker.wait_for(lambda: worker.metric_sum("soundcheck_control_messages_total") >= 1, 60, "the silence to be applied")
        asyncio.run(produce(sim, s, batch=40))
        valid = sum(sim.produced.values())
        worker.wait_for(lambda: worker.metric_sum("soundcheck_events_in_total") >= valid, 180, "every record read")
        worker.wait_for(lambda: worker.metric_sum('soundcheck_alert_outcomes_total{outcome="silenced"}') > 0, 120,
                        "an alert to be silenced")
        assert worker.metric_sum('soundcheck_dead_letters_total{reason="schema",topic="' + s.topics.control + '"}') == 1
        # the event loop's stall probe runs in the worker (about 100 observations a second)
        assert worker.metric_sum("soundcheck_event_loop_lag_seconds_count") > 100
    finally:
        worker.stop()
    alerts = _alerts(s, until=lambda rs: False, timeout=5)
    assert not [a for a in alerts if a["entity"].get("region") == sc.region and a["status"] == "firing"]
