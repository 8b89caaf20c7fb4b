"""The same input gives the same notifications, however it is cut into messages and batches and
however fast it is read: event time decides, never the wall clock or the batch boundaries."""

from __future__ import annotations

import pytest

from soundcheck.pipeline import OfflinePipeline
from soundcheck.evaluation.simulator import Simulator

T0 = 1_700_000_000_000
PLAN = (("cdn_pop_degradation", 150, 120), ("fraud_farm", 120, 200), ("billing_error_spike", 200, 100),
        ("flapping_metric", 160, 150))
VOLATILE = ("alert_id", "emitted_at")  # a notification's own id and the wall clock it was sent at


def _replay(settings, *, per_message: int, poll_every_s: int, partitions: int) -> list[dict]:
    """The scenario produced second by second; the partitions read what is queued every ``poll_every_s``."""
    sim = Simulator(seed=9, rate=80, duration_s=330, start_ms=T0, plan=PLAN)
    pipe = OfflinePipeline(settings, partitions=partitions, keying="user", per_message=per_message, seed=partitions)
    pipe.now_ms = T0 + 10**7
    for sec in range(sim.duration_s):
        for b in sim.tick(T0 + sec * 1000):
            pipe.produce(b.stream, b.key, b.records)
        if (sec + 1) % poll_every_s == 0:
            pipe.poll()
    pipe.finish()
    # notifications of different scopes sent on one tick have no order between them (other keys,
    # other partitions of the alerts topic): compare them per scope, in order
    notes = [{k: v for k, v in a.items() if k not in VOLATILE} for a in pipe.alerts]
    for n in notes:
        # the users of a CDN PoP, device or segment window are estimated per input partition from
        # its region's users per record, so another partitioning estimates them a few percent
        # apart: compared are the severity and priority they lead to, not the figures
        if n["kind"] == "audio_quality_degradation" and n["entity"].keys() - {"region"} and "business_impact" in n:
            n["business_impact"] = {k: v for k, v in n["business_impact"].items()
                                    if k not in ("affected_users", "revenue_loss_per_hour", "score", "components")}
    by_scope: dict[str, list] = {}
    for n in notes:
        by_scope.setdefault(n.get("group", {}).get("incident_id") or n["fingerprint"], []).append(n)
    return sorted(by_scope.items())


@pytest.fixture(scope="module")
def module_settings():
    from soundcheck.settings import load_settings

    return load_settings("development", environ={})


@pytest.fixture(scope="module")
def live(module_settings):
    """Read as it arrives: every second, one record per message."""
    return _replay(module_settings, per_message=1, poll_every_s=1, partitions=3)


@pytest.mark.parametrize("per_message,poll_every_s,partitions", [
    (100, 1, 3),   # the same, batched by the producers
    (7, 13, 3),    # a backlog read in uneven slices
    (50, 330, 3),  # the whole backlog in one read
    (20, 5, 5),    # another partitioning
])
def test_a_replay_cut_differently_gives_the_same_notifications(module_settings, live, per_message, poll_every_s, partitions):
    notes = [n for _, ns in live for n in ns]
    assert any(n["status"] == "firing" for n in notes) and any(n["kind"] == "streaming_fraud" for n in notes)
    assert _replay(module_settings, per_message=per_message, poll_every_s=poll_every_s, partitions=partitions) == live
