"""The fraud stage in its own process (agents.fraud_process): the same anomalies and snapshots as
on the event loop, a loud stop when the process dies, and no process left behind a killed worker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import orjson
import pytest

from agents.fraud_process import FraudProcess, FraudProcessDied
from soundcheck import snapshots
from soundcheck.detectors.stage2 import FraudStage
from tests.test_fraud_state import T0, MIN, farm_and_listeners, rows_of


def _messages(events) -> list[bytes]:
    """The fraud topic's messages of two input partitions (each window's rows split between them)."""
    out = []
    for end, rows in rows_of(events):
        for source in (0, 1):
            out.append(orjson.dumps({"stream": "fraud", "source": source, "rows": rows[source::2], "closed_until": end}))
    return out


def _in_process(settings, messages: list[bytes], stage: FraudStage | None = None) -> tuple[FraudStage, list[dict]]:
    stage = stage or FraudStage(settings)
    found = []
    for value in messages:
        doc = orjson.loads(value)
        found += [a.to_json() for a in stage.add(doc["source"], doc["rows"], doc["closed_until"])]
    return stage, found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_the_fraud_stage_in_its_own_process_finds_what_it_finds_on_the_event_loop(settings):
    events, farm, _ = farm_and_listeners(seed=21, minutes=50)
    half = T0 + 25 * MIN
    first, second = _messages([e for e in events if e.ts < half]), _messages([e for e in events if e.ts >= half])
    local, local_found = _in_process(settings, first)
    blob_local = snapshots.encode_snapshot(snapshots.capture_stage(local), stream="fraud", partition=3, last_offset=9,
                                           last_event_time=local.done_until, settings=settings)
    local, later = _in_process(settings, second, local)
    assert local_found and later, "the farm is found in both halves"
    assert {orjson.loads(a)["entity"]["user_id"] for a in local_found + later} <= farm

    async def remote() -> tuple[list, list, bytes, list, int, int]:
        proc = FraudProcess(settings)
        try:
            assert await proc.start() != os.getpid()
            stage = proc.stage()
            found = []
            for value in first:
                found += [a.to_json() for a in await stage.message(value)]
            blob = await stage.encode(3, 9, stage.done_until)
            rest = [a.to_json() for value in second for a in await stage.message(value)]
            # a stage restored from the child's snapshot goes on as the original did
            restored = proc.stage()
            restored.restore(blob)
            await restored.sync()
            # a snapshot the child cannot decode is refused with its reason, and the stage goes on
            refused = proc.stage()
            refused.restore(blob[:-20] + bytes(20))
            with pytest.raises(snapshots.SnapshotRejected) as err:
                await refused.sync()
            assert err.value.reason == "corrupt"
            n_restored = restored.n_users
            again = [a.to_json() for value in second for a in await restored.message(value)]
            assert again == rest
            return found, rest, blob, again, n_restored, stage.done_until
        finally:
            proc.close()

    found, rest, blob, again, n_restored, done_until = asyncio.run(remote())
    assert found == local_found and rest == later
    assert done_until == local.done_until
    assert n_restored > 0
    # the snapshot encoded in the child holds what the one encoded here holds
    assert snapshots.decode_snapshot(blob, settings)[0]["last_offset"] == 9
    assert _in_process(settings, second, _restored(settings, blob))[1] == _in_process(settings, second, _restored(settings, blob_local))[1]


def _restored(settings, blob: bytes) -> FraudStage:
    stage = FraudStage(settings)
    snapshots.restore_stage(stage, snapshots.decode_snapshot(blob, settings)[1])
    return stage


def test_a_bad_message_fails_alone_and_the_stage_goes_on(settings):
    events, _, _ = farm_and_listeners(seed=4, minutes=20)
    messages = _messages(events)

    async def remote() -> tuple[list, int]:
        proc = FraudProcess(settings)
        try:
            stage = proc.stage()
            errors = []
            for bad in (b"{not json", orjson.dumps({"stream": "audio", "source": 0, "partials": []})):
                with pytest.raises(Exception) as err:
                    await stage.message(bad)
                errors.append(str(err.value))
            found = [a.to_json() for value in messages for a in await stage.message(value)]
            return errors, found
        finally:
            proc.close()

    errors, found = asyncio.run(remote())
    assert "aggregates message on the fraud topic" in errors[1]
    assert found == _in_process(settings, messages)[1] and found


def test_a_dead_fraud_process_is_reported_not_taken_for_a_bad_message(settings):
    async def remote() -> None:
        proc = FraudProcess(settings)
        try:
            pid = await proc.start()
            stage = proc.stage()
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(FraudProcessDied):
                await stage.message(orjson.dumps({"stream": "fraud", "source": 0, "rows": [], "closed_until": T0}))
        finally:
            proc.close()

    asyncio.run(remote())


CHILD = """
import asyncio, sys
from agents.fraud_process import FraudProcess
from soundcheck.settings import load_settings
proc = FraudProcess(load_settings("development", environ={}))
print(asyncio.run(proc.start()), flush=True)
import time; time.sleep(120)
"""


def test_the_fraud_process_does_not_outlive_a_killed_worker():
    parent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the fraud process outlived its worker"
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.parametrize("in_child", [True, False], ids=["fraud_process", "event_loop"])
def test_the_fraud_agent_sends_the_stage_s_anomalies_and_ticks_with_either_setting(settings, tmp_path, monkeypatch, in_child):
    """The fraud agent's message handler (agents.detect, reached through the snapshot keeper's replay
    hook, as catch-up after a crash uses it) with the stage in the child and on the event loop:
    the anomalies are the stage's own, the late rows are counted, the alerting clock ticks."""
    from prometheus_client import CollectorRegistry

    from streams.app import create_app

    monkeypatch.setenv("SOUNDCHECK_DATA_DIR", str(tmp_path))
    s = settings.replace(worker={"fraud_process": in_child})
    app, ctx = create_app(s, CollectorRegistry())
    assert (ctx.fraud_process is not None) == in_child
    sent: list[dict] = []

    async def capture(key=None, value=None, partition=None, **kw):
        sent.append({**orjson.loads(value), "to": partition})

    ctx.topics["anomalies"].send = capture
    events, farm, _ = farm_and_listeners(seed=21, minutes=30)
    messages = _messages(events)
    late = orjson.dumps({"stream": "fraud", "source": 0, "rows": rows_of(events)[0][1][:3], "closed_until": None})

    async def run() -> None:
        try:
            for offset, value in enumerate(messages + [late]):
                await ctx.snapshots.replay("fraud", 2, offset, value)
            await ctx.snapshots.replay("fraud", 2, 0, messages[0])  # read again: skipped
        finally:
            if ctx.fraud_process is not None:
                ctx.fraud_process.close()

    asyncio.run(run())
    found = [{k: v for k, v in d.items() if k != "to"} for d in sent if "tick" not in d]
    local, local_found = _in_process(settings, messages)
    assert found == [orjson.loads(a) for a in local_found] and found
    assert {d["entity"]["user_id"] for d in found} <= farm
    ticks = [d["event_time"] for d in sent if d.get("tick") == "fraud" and d["source"] == 2 and d["to"] == 0]
    assert len(ticks) * s.kafka.partitions == sum("tick" in d for d in sent)  # to every anomalies partition
    assert len(ticks) > 1 and all(a < b for a, b in zip(ticks, ticks[1:]))
    assert ctx.metrics.value("soundcheck_late_events_total", stream="fraud") == local.late_events + 3
    assert ctx.processors["fraud"].offsets[2] == len(messages)


def test_the_fraud_agent_hands_a_batch_to_the_child_in_one_round_trip_with_the_same_outcome(settings, tmp_path, monkeypatch):
    """The fraud agent takes the messages waiting for it as one batch (agents.detect.handle_remote):
    one call to the child for all of them, the anomalies and late rows of handling them one by
    one, a message read again skipped, and a message the child fails on reported alone, its
    neighbours handled."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from streams.app import create_app

    monkeypatch.setenv("SOUNDCHECK_DATA_DIR", str(tmp_path))
    app, ctx = create_app(settings.replace(worker={"fraud_process": True}), CollectorRegistry())
    sent: list[dict] = []

    async def capture(key=None, value=None, partition=None, **kw):
        sent.append(orjson.loads(value))

    ctx.topics["anomalies"].send = capture
    events, farm, _ = farm_and_listeners(seed=21, minutes=30)
    messages = _messages(events)
    late = orjson.dumps({"stream": "fraud", "source": 0, "rows": rows_of(events)[0][1][:3], "closed_until": None})
    bad = b'{"stream": "fraud", "source": 0, "rows": [[1, 2'  # cut short: the child cannot decode it
    values = messages[:40] + [bad] + messages[40:] + [late]
    batch = lambda lo, hi: [SimpleNamespace(value=v, message=SimpleNamespace(partition=3, offset=o, topic="fraud"))
                            for o, v in enumerate(values[lo:hi], lo)]
    calls = []

    async def run() -> list:
        real = ctx.fraud_process.call_many

        async def counted(todo):
            calls.append(len(todo))
            return await real(todo)

        ctx.fraud_process.call_many = counted
        try:
            failed = await ctx.fraud_batch(batch(0, 60))
            failed += await ctx.fraud_batch(batch(50, len(values)))  # 50-59 read again: skipped
            return failed
        finally:
            ctx.fraud_process.close()

    failed = asyncio.run(run())
    assert calls == [60, len(values) - 60]
    assert [ev.message.offset for ev, _ in failed] == [40] and failed[0][1].startswith("JSONDecodeError")
    found = [d for d in sent if "tick" not in d]
    local, local_found = _in_process(settings, messages)
    assert found == [orjson.loads(a) for a in local_found] and {d["entity"]["user_id"] for d in found} <= farm
    assert ctx.metrics.value("soundcheck_late_events_total", stream="fraud") == local.late_events + 3
    assert ctx.processors["fraud"].offsets[3] == len(values) - 1
    assert any(d.get("tick") == "fraud" for d in sent)
