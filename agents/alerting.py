"""The alerting agent: anomalies -> classification, correlation, dedup -> the alerts topic.

State lives in changelogged Faust tables, co-partitioned with the anomalies topic (keyed by
region), so a restarted or rebalanced worker recovers it:

* ``soundcheck-dedup``, keyed by fingerprint: first and last seen, last notification,
  severity, occurrences. It expires on event time: the states of a region not seen for three
  repeat intervals are deleted while that region's anomalies are processed (so each tombstone
  goes to the right changelog partition). A Faust *windowed* table would not do here: in
  faust-streaming 0.15 windowed tables expire on the wall clock (``_del_old_keys`` compares with
  ``time.time()``), which wipes dedup state when recorded traffic is replayed.
* ``soundcheck-incidents``, keyed by region: the region's open incidents (bounded).

Per event (anomalies are few); nothing logged per event.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
import orjson

from soundcheck.alerting import alert_step, dedup_sweep_due, expired
from soundcheck.contracts import Rejection
from soundcheck.detectors.base import Anomaly

from .ingest import dead_letter

log = logging.getLogger(__name__)


def register(app: faust.App, ctx: Any) -> None:
    settings, m = ctx.settings, ctx.metrics
    w = settings.windows
    partitions = settings.kafka.partitions
    dedup = app.Table("soundcheck-dedup", default=dict, partitions=partitions)
    incidents = app.Table("soundcheck-incidents", default=dict, partitions=partitions)
    alerts_topic, anomalies_topic, dlq = ctx.topics["alerts"], ctx.topics["anomalies"], ctx.topics["dead_letter"]

    async def handle(anomaly: Anomaly) -> None:
        step = alert_step(anomaly, lambda fp: dedup[fp] or None, incidents[anomaly.region] or None, settings, ctx.graph,
                          int(time.time() * 1000))
        dedup[step.fingerprint] = step.dedup_state
        if dedup_sweep_due(step.region_state, anomaly.event_time, w.dedup_repeat_s * 1000):
            for fp in expired(list(dedup.items()), anomaly.region, anomaly.event_time, 3 * w.dedup_repeat_s * 1000):
                del dedup[fp]
        incidents[anomaly.region] = step.region_state
        m.anomalies_handled.inc()
        if step.alert is None:
            m.suppressed.labels(severity=step.severity).inc()
            return
        m.alerts.labels(severity=step.alert["severity"]).inc()
        await alerts_topic.send(key=step.fingerprint.encode(), value=orjson.dumps(step.alert))

    async def alerting(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await handle(Anomaly.from_json(event.value))
            except Exception as exc:  # never fatal: the anomaly goes to the dead letters
                m.anomalies_handled.inc()
                log.exception("agent soundcheck.alerting: anomaly at offset %s failed", event.message.offset)
                key, value = dead_letter(event, Rejection("processing_error", f"soundcheck.alerting: {type(exc).__name__}: {exc}"), "anomalies")
                await dlq.send(key=key, value=value)
                m.dead_letters.labels(topic=settings.topics.anomalies, reason="processing_error").inc()

    app.agent(anomalies_topic, name="soundcheck.alerting")(alerting)
