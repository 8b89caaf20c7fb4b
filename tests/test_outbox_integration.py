"""The alerting outbox on a real broker: a worker that takes on an anomalies partition whose
outbox holds notifications (its last owner died between putting them in the outbox and the
broker acknowledging them) sends the ones the alerts topic does not have, and only those.

The state is written as a dead worker leaves it: the outbox changelog holds two notifications
for partition 0, the alerts topic already has the first; one tick on anomalies partition 0 makes
the new worker take the partition on.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from soundcheck.kafka.admin import TABLES, read_latest, read_since
from soundcheck.settings import load_settings

from tests.workers import isolated, start_worker

pytestmark = pytest.mark.integration


def _note(fp: str, alert_id: str, now_ms: int) -> dict:
    return {"fingerprint": fp, "alert_id": alert_id, "status": "firing", "notification": "new", "severity": "major",
            "priority": "P2", "title": f"[P2] test {fp}", "emitted_at": now_ms - 2_000, "event_time": now_ms - 60_000}


async def _write_dead_owner_state(s, sent: dict, unsent: dict, now_ms: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka.bootstrap_servers)
    await producer.start()
    try:
        outbox = f"{s.kafka.app_id}-{TABLES[3]}-changelog"  # Faust's json key of str(partition)
        await producer.send_and_wait(outbox, key=b'"0"', value=orjson.dumps([sent, unsent]), partition=0)
        await producer.send_and_wait(s.topics.alerts, key=sent["fingerprint"].encode(), value=orjson.dumps(sent))
        tick = {"tick": "audio", "source": 0, "event_time": now_ms - 50_000}
        await producer.send_and_wait(s.topics.anomalies, value=orjson.dumps(tick), partition=0)
    finally:
        await producer.stop()


def test_a_worker_sends_what_its_dead_predecessor_left_in_the_outbox_once(kafka_bootstrap, unique_name, tmp_path):
    s = isolated(load_settings("development", environ={}), kafka_bootstrap, unique_name, app="soundcheck-outbox")
    now_ms = int(time.time() * 1000)
    sent, unsent = _note("fp-sent", "id-sent", now_ms), _note("fp-unsent", "id-unsent", now_ms)
    asyncio.run(_write_dead_owner_state(s, sent, unsent, now_ms))
    worker = start_worker(s, tmp_path)
    try:
        worker.wait_ready()

        def alert_ids() -> list[str]:
            return [orjson.loads(r.value)["alert_id"] for r in asyncio.run(read_since(kafka_bootstrap, s.topics.alerts, 0))]

        worker.wait_for(lambda: "id-unsent" in alert_ids(), timeout=90, what="the notification left in the outbox")
        time.sleep(3)  # anything sent twice would be there by now
        ids = alert_ids()
        outbox = asyncio.run(read_latest(kafka_bootstrap, f"{s.kafka.app_id}-{TABLES[3]}-changelog", timeout=30))
        log = worker.log_path.read_text(errors="replace")
    finally:
        worker.stop()
    assert sorted(ids) == ["id-sent", "id-unsent"], ids  # the one already there is not sent again
    assert orjson.loads(outbox[b'"0"']) is None  # emptied once acknowledged
    assert "2 notifications were being sent when its last owner stopped; 1 had reached" in log
