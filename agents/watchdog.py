"""A watchdog for a Faust partition whose offset commit is stuck behind records never delivered.

Seen after a ``kill -9`` and a replacement worker (tests/test_crash_recovery.py, 3 runs of about
15 before the other crash fixes): Faust's consumer had read a partition of the anomalies topic up to offset 181 and its
agent had acknowledged 114-181, but offsets 92-113 were never handed to the agent (fetched
before the rebalance's seek to the committed offset, dropped with the stream buffer, then skipped
as already read). faust-streaming commits only up to the first offset not acknowledged, so the
partition's commit stayed at 92 for good: nothing lost while the worker lives, but the group's
lag never drains and every later restart re-reads everything since.

Every ``EVERY_S`` this looks at the partitions of Faust's consumer (its private state: the commit
offset, the acknowledged offsets). One whose first acknowledged offset is more than one past its
commit, unchanged for ``STUCK_S``, is sought back to the commit: the missing records are
delivered again, and so are the acknowledged ones after them, which the agents take as re-reads
(the alert engine and the stage-2 units recognise what they already hold). Logged, and counted
in ``soundcheck_partition_rewinds_total``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust

log = logging.getLogger(__name__)
EVERY_S = 5.0
STUCK_S = 15.0


def holes(consumer: Any) -> dict[Any, tuple[int, int]]:
    """Per partition of ``consumer`` (a Faust consumer) whose commit waits for offsets never
    acknowledged while later ones were: (commit offset, first acknowledged offset)."""
    out = {}
    for tp, acked in list(getattr(consumer, "_acked", {}).items()):
        committed = consumer._committed_offset.get(tp)
        if acked and committed is not None and min(acked) - committed > 1:
            out[tp] = (committed, min(acked))
    return out


def register(app: faust.App, ctx: Any) -> None:
    seen: dict[Any, tuple[tuple[int, int], float]] = {}  # partition -> (its hole, since when)

    async def watch() -> None:
        try:
            found = holes(app.consumer)
        except Exception as exc:  # faust-streaming's internals moved: the watchdog stands down, the worker goes on
            log.debug("soundcheck.watchdog: Faust's consumer state not read: %s: %s", type(exc).__name__, exc)
            return
        now = time.monotonic()
        for tp in list(seen):
            if tp not in found:
                del seen[tp]
        for tp, hole in found.items():
            if seen.get(tp, (None, 0.0))[0] != hole:
                seen[tp] = (hole, now)
                continue
            if now - seen[tp][1] < STUCK_S:
                continue
            committed, first = hole
            log.warning("soundcheck.watchdog: %s:%s: offsets %d-%d were never handed to the agent while %d on were "
                        "(its commit waited %.0f s); reading again from %d", tp.topic, tp.partition, committed, first - 1,
                        first, now - seen[tp][1], committed)
            await app.consumer.seek(tp, committed)
            ctx.metrics.partition_rewinds.labels(topic=tp.topic).inc()
            del seen[tp]

    app.timer(interval=EVERY_S, name="soundcheck.watchdog")(watch)
