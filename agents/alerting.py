"""The alerting agent: anomalies -> classification, correlation, dedup -> the alerts topic.

State lives in changelogged Faust tables, co-partitioned with the anomalies topic (keyed by
region), so a restarted or rebalanced worker recovers it:

* ``soundcheck-dedup``: a windowed (tumbling, event-time) table keyed by fingerprint; a window
  is one repeat interval and carries the state of the previous one forward;
* ``soundcheck-incidents``: the open incidents of each region.

Event time comes from the anomaly itself (``relative_to`` a holder set per event), never from
the wall clock, so a replay gives the same alerts as live traffic.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
import orjson

from soundcheck.alerting import alert_step
from soundcheck.detectors.base import Anomaly

log = logging.getLogger(__name__)


class _EventTime:
    """The event time (seconds) the windowed table reads for the anomaly being processed."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, event: Any = None) -> float:
        return self.seconds


def register(app: faust.App, ctx: Any) -> None:
    settings, m = ctx.settings, ctx.metrics
    w = settings.windows
    clock = _EventTime()
    dedup = (
        app.Table("soundcheck-dedup", default=dict, partitions=settings.kafka.partitions)
        .tumbling(w.dedup_repeat_s, expires=w.dedup_repeat_s * 3)
        .relative_to(clock)
    )
    incidents = app.Table("soundcheck-incidents", default=dict, partitions=settings.kafka.partitions)
    alerts_topic, anomalies_topic = ctx.topics["alerts"], ctx.topics["anomalies"]

    def lookup(fp: str) -> dict | None:
        state = dedup[fp].value()
        if not state:  # a new window: carry the previous window's state forward
            state = dedup.table._windowed_timestamp(fp, clock.seconds - w.dedup_repeat_s)
        return state or None

    async def alerting(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                anomaly = Anomaly.from_json(event.value)
            except Exception as exc:  # an internal topic; still never fatal
                log.error("agent soundcheck.alerting: unreadable anomaly at offset %s: %s", event.message.offset, exc)
                continue
            clock.seconds = anomaly.event_time / 1000.0
            fp, dstate, rstate, alert = alert_step(
                anomaly, lookup, incidents[anomaly.region] or None, settings, ctx.graph, int(time.time() * 1000)
            )
            dedup[fp] = dstate
            incidents[anomaly.region] = rstate
            m.anomalies_handled.inc()
            if alert is None:
                m.suppressed.labels(severity=dstate["severity"]).inc()
                continue
            m.alerts.labels(severity=alert["severity"]).inc()
            await alerts_topic.send(key=fp.encode(), value=orjson.dumps(alert))

    app.agent(anomalies_topic, name="soundcheck.alerting")(alerting)
