"""``soundcheck silence add|list|expire`` and ``soundcheck alerts tail`` against a real worker and broker.

The commands run as a user runs them (``python -m soundcheck ...`` in a subprocess, configured by
the environment); the worker is a real worker process on fresh uuid topics.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from soundcheck.evaluation.harness import worker_env
from soundcheck.evaluation.produce import produce
from soundcheck.evaluation.simulator import Simulator
from soundcheck.oncall import read_decisions
from tests.workers import isolated, start_worker

pytestmark = pytest.mark.integration


def _cli(s, tmp_path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, **worker_env(s.kafka.bootstrap_servers, s.kafka.app_id, s.topics.__dict__, tmp_path / "cli-data")}
    return subprocess.run([sys.executable, "-m", "soundcheck", *args], env=env, capture_output=True, text=True, timeout=timeout)


def _messages_on(bootstrap: str, topic: str) -> int:
    async def count() -> int:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
        await c.start()
        try:
            parts = c.partitions_for_topic(topic) or set()
            if not parts:
                await c._client.force_metadata_update()
                parts = c.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            ends, begins = await c.end_offsets(tps), await c.beginning_offsets(tps)
            return sum(ends[tp] - begins[tp] for tp in tps)
        finally:
            await c.stop()

    return asyncio.run(count())


@pytest.fixture(scope="module")
def live(kafka_bootstrap, unique_name, tmp_path_factory):
    from soundcheck.settings import load_settings

    tmp = tmp_path_factory.mktemp("oncall")
    s = isolated(load_settings("development", environ={}), kafka_bootstrap, unique_name)
    worker = start_worker(s, tmp)
    try:
        worker.wait_ready()
        yield s, worker, tmp
    finally:
        worker.stop()


@pytest.mark.parametrize(
    "args, message",
    [
        (["silence", "add", "colour=red", "--duration", "1h"], "unknown label 'colour'"),
        (["silence", "add", "region=BR", "--duration=-5m"], "is negative"),
        (["silence", "add", "region=BR", "--duration", "soon"], "not like 90s"),
        (["silence", "add", "region=~(", "--duration", "1h"], "not a valid regular expression"),
        (["silence", "add", "region!=BR", "--duration", "1h"], "would mute everything"),
        (["silence", "add", "region=BR"], "either a duration"),
        (["silence", "add", "region=BR", "--end", "2001-01-01T00:00:00Z"], "end in the past"),
        (["silence", "expire", "no-such-silence"], "no silence with id 'no-such-silence'"),
        (["alerts", "tail", "--since", "yesterday-ish", "--timeout", "1"], "is not RFC 3339"),
        (["why", "zz-top"], "is not a fingerprint"),
        (["why", "deadbeefdeadbeef"], "no decision recorded for fingerprint 'deadbeefdeadbeef'"),
    ],
)
def test_bad_input_is_refused_before_anything_is_sent(live, args, message):
    s, worker, tmp = live
    before = _messages_on(s.kafka.bootstrap_servers, s.topics.control)
    done = _cli(s, tmp, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert _messages_on(s.kafka.bootstrap_servers, s.topics.control) == before


def test_a_silence_is_added_listed_applied_and_expired(live):
    s, worker, tmp = live
    start_ms = (int(time.time()) - 1000) * 1000  # silences are in event time: this one covers the replayed traffic
    add = _cli(s, tmp, "silence", "add", 'detector=~"behavior\\.fr.*"', "region!=ZZ", "--duration", "2h",
               "--start", str(start_ms), "--author", "oncall-test", "--comment", "fraud team is on it")
    assert add.returncode == 0, add.stderr
    sid = add.stdout.strip()
    assert len(sid) == 36 and "no worker has applied it" not in add.stderr  # the worker's table has it

    listed = _cli(s, tmp, "silence", "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(sid))
    assert "active" in row and "detector=~'behavior\\\\.fr.*'" in row and "region!=ZZ" in row and "oncall-test" in row
    doc = next(orjson.loads(line) for line in _cli(s, tmp, "silence", "list", "--json").stdout.splitlines()
               if orjson.loads(line)["id"] == sid)
    assert doc["state"] == "active" and doc["comment"] == "fraud team is on it"

    # traffic with a fraud farm: its alert is held back by the silence, the others go out
    sim = Simulator(seed=21, rate=100, duration_s=900, start_ms=start_ms)
    truth = asyncio.run(produce(sim, s, batch=50))
    assert any(i["name"] == "fraud_farm" for i in truth["scenarios"])
    worker.wait_for(lambda: worker.metric_sum('soundcheck_alert_outcomes_total{outcome="silenced"}') > 0, 180,
                    "the fraud alert to be silenced")
    tail = _cli(s, tmp, "alerts", "tail", "--from-beginning", "--json", "--timeout", "8")
    alerts = [orjson.loads(line) for line in tail.stdout.splitlines()]
    assert alerts and all(a["detector"] != "behavior.fraud" for a in alerts)

    # the decision log says why the fraud alert never went out: which silence held it
    decisions = asyncio.run(read_decisions(s, ""))
    held = next(d for d in decisions if d["decision"] == "silenced")
    assert held["detail"]["silence_id"] == sid and held["kind"] == "streaming_fraud"
    why = _cli(s, tmp, "why", held["fingerprint"][:10])
    assert why.returncode == 0, why.stderr
    assert held["fingerprint"] in why.stdout and f"silenced      silence {sid} (fraud team is on it)" in why.stdout
    sent = alerts[0]["fingerprint"]
    assert "notified" in _cli(s, tmp, "why", sent).stdout

    expire = _cli(s, tmp, "silence", "expire", sid)
    assert expire.returncode == 0 and expire.stdout.strip() == sid, expire.stderr
    row = next(line for line in _cli(s, tmp, "silence", "list").stdout.splitlines() if line.startswith(sid))
    assert "expired" in row
    again = _cli(s, tmp, "silence", "expire", sid)
    assert again.returncode == 0 and "already expired" in again.stderr


def test_alerts_tail_groups_notifications_under_their_incident(live):
    s, worker, tmp = live
    worker.wait_for(lambda: worker.metric_sum("soundcheck_alerts_total") > 0, 240, "some alerts")
    n = int(worker.metric_sum("soundcheck_alerts_total"))
    as_json = _cli(s, tmp, "alerts", "tail", "--from-beginning", "--json", "--count", str(n), "--timeout", "60")
    alerts = [orjson.loads(line) for line in as_json.stdout.splitlines()]
    assert len(alerts) == n and all({"fingerprint", "priority", "status"} <= set(a) for a in alerts)
    text = _cli(s, tmp, "alerts", "tail", "--from-beginning", "--count", str(n), "--timeout", "60").stdout.splitlines()
    notes = [line for line in text if line.startswith("  ")]
    heads = [line for line in text if line.startswith("incident ")]
    assert len(notes) == n and heads and "\033[" not in "".join(text)  # no colour when not a terminal
    for a in alerts:
        assert any(a["fingerprint"][:8] in line and a["priority"] in line for line in notes)
    # --since a time after everything: nothing; and the default (the end) waits for new ones only
    later = str(int(time.time() * 1000) + 3_600_000)
    assert _cli(s, tmp, "alerts", "tail", "--since", later, "--json", "--timeout", "3").stdout == ""
    assert _cli(s, tmp, "alerts", "tail", "--json", "--timeout", "3").stdout == ""
