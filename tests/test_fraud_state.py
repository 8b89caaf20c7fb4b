"""The fraud detector's packed per-user state: same detection, bounded, small, snapshot-safe."""

from __future__ import annotations

import hashlib
import pickle
import random
from types import SimpleNamespace

import orjson
import pytest

from soundcheck import snapshots
from soundcheck.detectors import behavior
from soundcheck.detectors.behavior import FraudDetector, FraudState, _h64
from soundcheck.detectors.stage2 import FraudEvent, FraudStage
from tests.test_detectors import feed, simulate

T0 = 1_700_000_000_000
MIN = 60_000
HOUR = 3_600_000
WINDOW = 10_000


def pseudonym(raw: str) -> str:
    return "u_" + hashlib.sha256(raw.encode()).hexdigest()[:20]


def listener(user: str, start: int, minutes: int, plays_per_hour: float, *, rng: random.Random, devices=("d0",),
             countries=("US",), artists=("ar-1", "ar-2", "ar-3", "ar-4", "ar-5"), completion=0.7, methods=(),
             segment="premium") -> list[FraudEvent]:
    """A user's events: plays (some completed) at a steady rate, payments now and then."""
    out = []
    uid = pseudonym(user)
    t = start
    end = start + minutes * MIN
    step = HOUR / plays_per_hour
    k = 0
    while t < end:
        dev, country = pseudonym(f"{user}-{devices[k % len(devices)]}"), countries[k % len(countries)]
        artist = artists[rng.randrange(len(artists))]
        out.append(FraudEvent(int(t), uid, "play_start", dev, country, segment, artist, None))
        if rng.random() < completion:
            out.append(FraudEvent(int(t) + 1000, uid, "play_complete", dev, country, segment, artist, None))
        if methods and k % 3 == 0:
            out.append(FraudEvent(int(t) + 2000, uid, "payment_attempt", dev, country, segment, None,
                                  methods[(k // 3) % len(methods)]))
        t += step * rng.uniform(0.8, 1.2)
        k += 1
    return out


def windows(events: list[FraudEvent]) -> list[tuple[int, list[FraudEvent]]]:
    """Event-time order, one 10 s window at a time (as the fraud stage feeds the detector)."""
    events = sorted(events, key=lambda r: tuple("" if v is None else v for v in r))
    out: dict[int, list[FraudEvent]] = {}
    for r in events:
        out.setdefault(r.ts - r.ts % WINDOW + WINDOW, []).append(r)
    return sorted(out.items())


def run(det: FraudDetector, events: list[FraudEvent]) -> list:
    return [a for end, batch in windows(events) for a in det.process(batch, end)]


def farm_and_listeners(seed: int = 3, farm: int = 6, normal: int = 60, minutes: int = 40) -> tuple[list, set, set]:
    rng = random.Random(seed)
    events: list[FraudEvent] = []
    accounts = {f"farm-{i}" for i in range(farm)}
    for a in sorted(accounts):
        events += listener(a, T0 + rng.randrange(5 * MIN), minutes, 400, rng=rng, devices=[f"fd{j}" for j in range(6)],
                           countries=("US", "US", "BR"), artists=("ar-farm",), completion=0.05, segment="free")
    listeners = {f"user-{i}" for i in range(normal)}
    for u in sorted(listeners):
        events += listener(u, T0 + rng.randrange(10 * MIN), minutes, rng.choice([8, 15, 25]), rng=rng,
                           devices=("phone", "laptop")[: rng.randrange(1, 3)], methods=("pm-1",) if rng.random() < 0.3 else ())
    return events, {pseudonym(a) for a in accounts}, {pseudonym(u) for u in listeners}


@pytest.fixture
def small(settings):
    return settings.replace(detection={"fraud": {"max_users": 50}})


# ---------------------------------------------------------------------------------------------
# detection


def test_the_farm_is_flagged_and_no_ordinary_listener(settings):
    events, farm, listeners = farm_and_listeners()
    found = run(FraudDetector(settings), events)
    flagged = {a.entity["user_id"] for a in found}
    assert flagged == farm
    a = found[0]
    assert a.details["fraud_probability"] >= 0.7 and a.signals and a.region == "US"
    assert a.details["top_artists"] == ["ar-farm"] and a.details["user_segment"] == "free"
    assert a.details["countries"] == ["BR", "US"]
    # the links join the farm: its artist by id, devices by the hex of their hash, countries by code
    assert "artist:ar-farm" in a.details["links"] and "country:US" in a.details["links"]
    devices = [x for x in a.details["links"] if x.startswith("device:")]
    assert len(devices) == 6 and all(len(x) == len("device:") + 16 for x in devices)


def test_the_simulated_farm_through_decoded_records(settings):
    """The contract records of the simulator (raw user and device ids), as test_detectors feeds them."""
    sim = simulate(plan=(("fraud_farm", 60, 300),), duration=400)
    farm = set(sim.scenarios[0].details["accounts"])
    flagged = {a.entity["user_id"] for a in feed(FraudDetector(settings), sim, "behavior")}
    assert flagged and flagged <= farm and len(flagged) >= len(farm) * 0.8


def test_devices_countries_and_payment_methods_are_reasons_on_their_own(settings):
    rng = random.Random(1)
    det = FraudDetector(settings)
    events = listener("traveller", T0, 50, 20, rng=rng, devices=("a", "b", "c", "d", "e"), countries=("US", "BR", "DE"),
                      methods=tuple(f"pm-{i}" for i in range(7)))
    found = run(det, events)
    assert found and {a.entity["user_id"] for a in found} == {pseudonym("traveller")}
    a = found[-1]
    reasons = {s.metric for s in a.signals}
    assert reasons == {"distinct_devices", "distinct_countries", "payment_method_changes"}
    f = a.details["features"]
    assert f["devices"] == 5 and f["countries"] == 3 and f["streams_per_hour"] < 50
    # more payment methods than are kept: the score is the one of all of them (the reason saturates)
    assert f["payment_method_changes"] >= 4
    exact = det.probability({**f, "payment_method_changes": 6})[0]
    assert a.score == exact >= 0.7
    assert sorted(x for x in a.details["links"] if x.startswith("country:")) == ["country:BR", "country:DE", "country:US"]


def test_a_shared_device_links_two_accounts(settings):
    rng = random.Random(2)
    events = []
    for user in ("a", "b"):
        events += [e._replace(device_id=pseudonym("shared-box") if i % 2 else e.device_id)
                   for i, e in enumerate(listener(user, T0, 20, 400, rng=rng, devices=("x", "y", "z", "w", "v"),
                                                  artists=(f"ar-{user}",), completion=0.0))]
    found = run(FraudDetector(settings), events)
    links = {a.entity["user_id"]: set(a.details["links"]) for a in found}
    assert set(links) == {pseudonym("a"), pseudonym("b")}
    shared = links[pseudonym("a")] & links[pseudonym("b")]
    assert f"device:{_h64(pseudonym('shared-box')):016x}" in shared


def test_the_window_slides_plays_and_devices_leave_it(settings):
    det = FraudDetector(settings)
    rng = random.Random(4)
    burst = listener("bursty", T0, 10, 600, rng=rng, devices=("a", "b", "c", "d", "e", "f"), completion=0.0)
    assert run(det, burst)  # 100 plays in 10 minutes from 6 devices
    later = listener("bursty", T0 + 70 * MIN, 30, 15, rng=rng, devices=("a",))
    found = run(det, later + listener("other", T0 + 70 * MIN, 30, 15, rng=rng))
    assert found == []
    u = det.users.load([pseudonym("bursty")], det.now)[pseudonym("bursty")]
    f = det.features(u, det.now)
    assert f["devices"] == 1 and f["plays"] <= 10


def test_same_events_same_anomalies(settings):
    events, _, _ = farm_and_listeners(seed=5)
    a = [x.to_json() for x in run(FraudDetector(settings), events)]
    b = [x.to_json() for x in run(FraudDetector(settings), events)]
    assert a == b and a


def test_a_user_active_for_a_day_keeps_exact_counts_across_the_stamp_wrap(settings):
    """Last-seen stamps are 16 bits of event seconds: they wrap every 18 hours."""
    det = FraudDetector(settings)
    uid = pseudonym("night-owl")
    rng = random.Random(6)
    seen: list[tuple[int, str]] = []
    for minute in range(0, 26 * 60, 7):
        ts = T0 + minute * MIN + rng.randrange(1000, 50_000)
        device = f"dev-{minute // 50}"  # a new device every 50 minutes
        seen.append((ts, device))
        det.process([FraudEvent(ts, uid, "play_start", device, "US", "free", "ar-1", None)], ts - ts % WINDOW + WINDOW)
        if minute % 91 == 0:
            u = det.users.load([uid], det.now)[uid]
            f = det.features(u, det.now)
            expected = {d for t, d in seen if t >= det.now - det.window_ms}
            assert f["devices"] == min(len(expected), 6)
    assert len(det.users) == 1


# ---------------------------------------------------------------------------------------------
# bounds


def test_bounded_by_max_users_least_recently_seen_go_first(small):
    det = FraudDetector(small)
    users = [pseudonym(f"user-{i}") for i in range(80)]

    def touch(i: int, ts: int) -> None:
        det.process([FraudEvent(ts, users[i], "play_start", "d", "US", "free", "ar-1", None)], ts - ts % WINDOW + WINDOW)

    for i in range(50):
        touch(i, T0 + i * 1000)
    touch(0, T0 + 60_000)  # user 0 is recent again: user 1 is now the least recently seen
    touch(50, T0 + 61_000)
    assert len(det.users) == 50 and det.users.evicted == 1
    assert _h64(users[0]) in set(det.users.keys()) and _h64(users[1]) not in set(det.users.keys())
    for i in range(51, 80):
        touch(i, T0 + 70_000 + i * 1000)
    assert len(det.users) == 50 and det.users.evicted == 30
    assert set(det.users.keys()) == {_h64(u) for u in [users[0]] + users[31:80]}


def test_a_batch_with_more_new_users_than_room_keeps_the_most_recent(small):
    det = FraudDetector(small)
    batch = [FraudEvent(T0 + i, pseudonym(f"user-{i}"), "play_start", "d", "US", "free", "ar-1", None) for i in range(120)]
    det.process(batch, T0 + WINDOW)
    assert len(det.users) == 50 and det.users.evicted == 70
    assert set(det.users.keys()) == {_h64(pseudonym(f"user-{i}")) for i in range(70, 120)}


def test_the_simulated_stream_is_bounded(small):
    det = FraudDetector(small)
    feed(det, simulate(plan=(), duration=30), "behavior")
    assert len(det.users) == 50 and det.users.evicted > 0


def test_idle_users_expire_after_the_window(settings):
    det = FraudDetector(settings)
    rng = random.Random(7)
    run(det, listener("early", T0, 5, 30, rng=rng) + listener("later", T0 + 30 * MIN, 5, 30, rng=rng))
    assert len(det.users) == 2
    run(det, listener("now", T0 + 65 * MIN, 2, 30, rng=rng))  # "early" was last seen over an hour ago
    assert len(det.users) == 2 and _h64(pseudonym("early")) not in set(det.users.keys())
    run(det, listener("now", T0 + 100 * MIN, 2, 30, rng=rng))
    assert set(det.users.keys()) == {_h64(pseudonym("now"))}
    assert det.users.evicted == 0


def test_per_user_state_fits_300_bytes(settings):
    det = FraudDetector(settings)
    rng = random.Random(8)
    events = []
    for i in range(3000):
        events += listener(f"user-{i}", T0 + rng.randrange(20 * MIN), 6, 20, rng=rng, devices=("a", "b"),
                           methods=("pm",), artists=tuple(f"ar-{rng.randrange(500)}" for _ in range(3)))
    run(det, events)
    st = det.users.state
    assert len(det.users) == 3000
    arrays = st.rows.nbytes + st.keys_.nbytes + st.slots.nbytes + st.free.nbytes
    assert arrays / len(det.users) <= 260
    assert len(st.artist_names) <= 500 and len(st.countries) == 2


def test_the_shared_artist_ids_are_swept_of_the_unreferenced(settings, monkeypatch):
    monkeypatch.setattr(behavior, "ARTIST_NAMES_MIN", 20)
    det = FraudDetector(settings)
    rng = random.Random(9)
    events = []
    for i in range(40):  # 320 artists, each user keeps its top 3
        events += listener(f"user-{i}", T0, 10, 120, rng=rng, artists=tuple(f"ar-{i}-{j}" for j in range(8)))
    st = det.users.state
    st.artist_gc_at = 20
    found = run(det, events)
    live = {int(h) for h in st.column("art")[st.slots].ravel() if h}
    assert 40 <= len(live) <= 120 and len(st.artist_names) < 320
    assert live <= set(st.artist_names)  # every artist a user refers to keeps its id
    assert all(a.details["top_artists"][0].startswith("ar-") for a in found)


# ---------------------------------------------------------------------------------------------
# snapshots


def test_a_pickle_round_trip_gives_the_same_later_anomalies(settings):
    events, _, _ = farm_and_listeners(seed=11, minutes=50)
    events.sort(key=lambda r: r.ts)
    half = T0 + 25 * MIN
    det = FraudDetector(settings)
    run(det, [e for e in events if e.ts < half])
    clone = pickle.loads(pickle.dumps(det))
    assert len(clone.users) == len(det.users) and clone.now == det.now
    rest = [e for e in events if e.ts >= half]
    a = [x.to_json() for x in run(det, rest)]
    b = [x.to_json() for x in run(clone, rest)]
    assert a == b and a
    assert dict(det.users._items) == dict(clone.users._items)


def rows_of(events: list[FraudEvent]) -> list[tuple[int, list[list]]]:
    return [(end, [list(e) for e in batch]) for end, batch in windows(events)]


def test_a_snapshot_of_the_fraud_stage_restores_the_same_detection(settings):
    events, farm, _ = farm_and_listeners(seed=12, minutes=50)
    half = T0 + 25 * MIN
    stage = FraudStage(settings)
    for end, rows in rows_of([e for e in events if e.ts < half]):
        stage.add(0, rows, end, now=0.0)
    blob = snapshots.encode_snapshot(snapshots.capture_stage(stage), stream="fraud", partition=0, last_offset=0,
                                     last_event_time=stage.detector.now, settings=settings)
    _, state = snapshots.decode_snapshot(blob, settings)
    fresh = FraudStage(settings)
    assert snapshots.restore_stage(fresh, state) == len(stage.users) > 0
    assert len(fresh.users) == len(stage.users) and fresh.detector.now == stage.detector.now
    found = {id(stage): [], id(fresh): []}
    for end, rows in rows_of([e for e in events if e.ts >= half]):
        for s in (stage, fresh):
            found[id(s)].extend(a.to_json() for a in s.add(0, rows, end, now=0.0))
    assert found[id(stage)] == found[id(fresh)] and found[id(stage)]
    assert dict(stage.users._items) == dict(fresh.users._items)


def test_restoring_into_fewer_max_users_keeps_the_most_recent(settings, small):
    det = FraudDetector(settings)
    users = [pseudonym(f"user-{i}") for i in range(80)]
    det.process([FraudEvent(T0 + i * 100, u, "play_start", "d", "US", "free", "ar-1", None) for i, u in enumerate(users)],
                T0 + WINDOW)
    _, state = snapshots.decode_snapshot(snapshots.encode_snapshot(
        snapshots.capture(SimpleNamespace(detectors=[det])), stream="fraud", partition=0, last_offset=0,
        last_event_time=det.now, settings=settings), settings)
    fresh = FraudDetector(small)
    assert snapshots.restore(SimpleNamespace(detectors=[fresh]), state) == 50
    assert len(fresh.users) == 50 and set(fresh.users.keys()) == {_h64(u) for u in users[30:]}
    fresh.process([FraudEvent(T0 + 20_000, pseudonym("new"), "play_start", "d", "US", "free", "ar-1", None)], T0 + 30_000)
    assert len(fresh.users) == 50


def test_a_snapshot_restores_into_other_limits(settings):
    """Another max_devices (or window) changes the row layout: the users are carried over."""
    events, farm, _ = farm_and_listeners(seed=13, minutes=20)
    det = FraudDetector(settings)
    run(det, events)
    state = snapshots.capture(SimpleNamespace(detectors=[det]))
    other = FraudDetector(settings.replace(detection={"fraud": {"max_devices": 2, "window_s": 1800}}))
    snapshots.restore(SimpleNamespace(detectors=[other]), state)
    assert isinstance(other.users._items, FraudState) and other.users._items.layout == other.layout
    assert len(other.users) == len(det.users)
    u = other.users.load([next(iter(farm))], other.now)[next(iter(farm))]
    f = other.features(u, other.now)
    assert f["devices"] == 4 and f["plays"] > 0  # at most twice max_devices now
    later = [e._replace(ts=e.ts + 20 * MIN) for e in events]
    assert {a.entity["user_id"] for a in run(other, later)} == farm


def test_a_huge_message_is_split_into_internal_messages_that_fit_and_none_of_its_rows_is_lost(settings):
    """50,000 behaviour events of one user in one input message (one offset): the fraud rows go in
    several internal messages under the broker's 1 MB default, and the fraud stage takes every row
    once; the same message read again (a restart) is recognised row by row as already taken."""
    import numpy as np

    from soundcheck.ingest.contracts import load_contracts
    from soundcheck.pipeline import MAX_INTERNAL_BYTES, IngestStage, decode_internal
    import orjson

    base = {"ts": T0, "user_id": "u-one", "session_id": "s-1", "device_id": "d-1", "country": "US",
            "user_segment": "free", "event_type": "play_start", "track_id": "tr-1", "artist_id": "ar-1"}
    value = orjson.dumps([{**base, "event_id": f"b-{i}", "ts": T0 + i % 5_000} for i in range(50_000)])
    records, bad = load_contracts()["behavior"].decode(value, now_ms=T0 + 10**7)
    assert len(records) == 50_000 and not bad
    ing = IngestStage(settings, "behavior")
    out = ing.process(0, records, np.full(len(records), 7, dtype=np.int64), now=T0 / 1000)
    fraud = [m for m in out if m.topic == "fraud" and decode_internal(m.value)["rows"]]
    assert len(fraud) > 1 and all(len(m.value) <= MAX_INTERNAL_BYTES for m in out)
    stages: dict[int, FraudStage] = {}
    for again in (False, True):
        for m in fraud:
            doc = decode_internal(m.value)
            stage = stages.setdefault(m.partition, FraudStage(settings))
            stage.add(doc["source"], doc["rows"], None)
        taken = sum(len(s.pending) for s in stages.values())
        duplicates = sum(s.duplicates for s in stages.values())
        assert (taken, duplicates) == (50_000, 50_000 if again else 0)


def _fraud_stage_fed(settings, out):
    """A fraud stage fed the fraud messages among stage 1's ``out`` (the rows only, no progress)."""
    from soundcheck.pipeline import decode_internal

    stage = FraudStage(settings)
    for m in out:
        if m.topic == "fraud":
            doc = decode_internal(m.value)
            stage.add(doc["source"], doc["rows"], None)
    return stage


def test_a_batch_retried_record_by_record_keeps_every_fraud_row(settings, monkeypatch):
    """One array message (one offset) whose batch fails in our code is retried record by record:
    its records keep their positions within the message, so the fraud stage takes each once."""
    import numpy as np
    import orjson

    from soundcheck.ingest import partials
    from soundcheck.ingest.contracts import load_contracts
    from soundcheck.pipeline import IngestStage

    base = {"ts": T0, "user_id": "u-one", "session_id": "s-1", "device_id": "d-1", "country": "US",
            "user_segment": "free", "event_type": "play_start", "track_id": "tr-1", "artist_id": "ar-1"}
    records, _ = load_contracts()["behavior"].decode(
        orjson.dumps([{**base, "event_id": f"b-{i}", "ts": T0 + i} for i in range(20)]), now_ms=T0 + 10**7)
    original = partials.PartitionAggregator.add

    def failing(self, recs, offsets=None):
        if len(recs) > 1:
            raise ZeroDivisionError("a bug of ours that only a whole batch meets")
        return original(self, recs, offsets)

    monkeypatch.setattr(partials.PartitionAggregator, "add", failing)
    ing = IngestStage(settings, "behavior")
    out, failed = ing.process_safely(0, records, np.full(20, 3, dtype=np.int64), now=T0 / 1000)
    assert failed == []
    out += ing.flush()  # the rows go out with the partition's progress
    stage = _fraud_stage_fed(settings, out)
    assert (len(stage.pending), stage.duplicates) == (20, 0)


def test_a_batch_that_fails_after_its_rows_were_held_holds_them_once(settings, monkeypatch):
    """A failure past the point where stage 1 holds the batch's fraud rows (closing windows, say)
    undoes that too: the record-by-record retry holds each row once, not twice."""
    import numpy as np
    import orjson

    from soundcheck.ingest import partials
    from soundcheck.ingest.contracts import load_contracts
    from soundcheck.pipeline import IngestStage

    base = {"ts": T0, "user_id": "u-one", "session_id": "s-1", "device_id": "d-1", "country": "US",
            "user_segment": "free", "event_type": "play_start", "track_id": "tr-1", "artist_id": "ar-1"}
    records, _ = load_contracts()["behavior"].decode(
        orjson.dumps([{**base, "event_id": f"b-{i}", "ts": T0 + i} for i in range(20)]), now_ms=T0 + 10**7)
    original = partials.PartitionAggregator.advance
    calls = []

    def failing(self, watermark):
        calls.append(watermark)
        if len(calls) == 1:
            raise ZeroDivisionError("a bug of ours met after the rows were held")
        return original(self, watermark)

    monkeypatch.setattr(partials.PartitionAggregator, "advance", failing)
    ing = IngestStage(settings, "behavior")
    out, failed = ing.process_safely(0, records, np.full(20, 3, dtype=np.int64), now=T0 / 1000)
    assert failed == [] and len(calls) > 1
    out += ing.flush()
    stage = _fraud_stage_fed(settings, out)
    assert (len(stage.pending), stage.duplicates) == (20, 0)


def test_an_id_that_is_both_a_device_and_a_payment_method_or_an_artist_keeps_each_meaning(settings):
    """Ids of different kinds share no cache: a payment method whose id is also a device's gets its
    32-bit hash (a 64-bit one does not fit its place: the batch failed), and an artist whose id is
    also a device's keeps its name in the top artists."""
    det = FraudDetector(settings)
    uid = pseudonym("both")
    batch = [FraudEvent(T0 + i * 1000, uid, "play_start", "x-1", "US", "free", "x-1", None) for i in range(300)]
    batch.append(FraudEvent(T0 + 300_000, uid, "payment_attempt", "x-1", "US", "free", None, "x-1"))
    found = det.process(batch, T0 + 310_000)
    assert [a.details["top_artists"] for a in found] == [["x-1"]]  # 300 plays in 5 minutes, one artist: flagged
    row, c = det.users.state[_h64(uid)], behavior._codec(det.layout)
    assert row[c.pay] == (_h64("x-1") >> 32) and row[c.dev] == _h64("x-1")


# ---------------------------------------------------------------------------------------------
# counting a window as its rows complete (stage 1 sends them within the window, with rows_until)


def _slices(rows: list[list], k: int) -> list[tuple[list[list], int]]:
    """``rows`` (one window, in event-time order) in ``k`` consecutive slices, each with a progress
    mark at most the next slice's first event time (nothing before it comes later)."""
    cut = [len(rows) * i // k for i in range(k + 1)]
    out = []
    for i in range(k):
        part = rows[cut[i]:cut[i + 1]]
        if part:
            out.append((part, rows[cut[i + 1]][0] if cut[i + 1] < len(rows) else part[-1][0] + 1))
    return out


def test_a_window_counted_as_its_rows_complete_scores_as_the_window_counted_at_its_end(settings):
    """Rows sent within their window with the partition's watermark are counted at once (only the
    scoring waits for the window's end): the same anomalies and the same stored users as a stage
    fed each window whole at its close; a snapshot taken within a window (counted rows not yet
    scored) restores into a stage that goes on to the same anomalies and users."""
    events, farm, _ = farm_and_listeners(seed=14, minutes=30)
    whole, piecewise = FraudStage(settings), FraudStage(settings)
    found = {id(whole): [], id(piecewise): []}
    restored, counted_early = None, 0
    for n, (end, rows) in enumerate(rows_of(events)):
        found[id(whole)] += [a.to_json() for a in whole.add(0, rows, end, now=0.0)]
        for part, mark in _slices(rows, 4):
            for st in (piecewise, restored):
                if st is not None:
                    found.setdefault(id(st), []).extend(a.to_json() for a in st.add(0, part, min(mark, end - 1), now=0.0))
            counted_early += bool(piecewise.detector.live)
            if n == 40 and restored is None:  # a snapshot within a window: counted rows wait in the detector
                assert piecewise.counted and piecewise.detector.live and not piecewise.pending
                blob = snapshots.encode_snapshot(snapshots.capture_stage(piecewise), stream="fraud", partition=0,
                                                 last_offset=0, last_event_time=piecewise.done_until, settings=settings)
                restored = FraudStage(settings)
                snapshots.restore_stage(restored, snapshots.decode_snapshot(blob, settings)[1])
                assert len(restored.pending) == len(piecewise.counted) and not restored.detector.live
                found[id(restored)] = list(found[id(piecewise)])
        for st in (piecewise, restored):  # the window's end
            if st is not None:
                found[id(st)] += [a.to_json() for a in st.add(0, [], end, now=0.0)]
    assert counted_early > 100 and found[id(whole)] and {a["entity"]["user_id"] for a in map(orjson.loads, found[id(whole)])} == farm
    assert found[id(piecewise)] == found[id(whole)] == found[id(restored)]
    assert dict(piecewise.users._items) == dict(whole.users._items) == dict(restored.users._items)
    assert whole.late_events == piecewise.late_events == restored.late_events == 0


def test_a_row_behind_the_progress_in_a_window_still_open_is_counted_not_lost(settings):
    """A record later than the lateness (or a partition read again) can bring a row the progress has
    passed while its window is open: it is counted with the next rows, not dropped as late."""
    stage = FraudStage(settings)
    user = lambda i: FraudEvent(T0 + i * 100, pseudonym(f"u{i}"), "play_start", "d", "US", "free", "ar-1", None)
    stage.add(0, [list(user(i)) for i in range(10)], T0 + 2_000, now=0.0)
    assert len(stage.detector.live) == 10 and stage.counted_until == T0 + 2_000
    stage.add(0, [list(user(5))[:1] + [pseudonym("straggler")] + list(user(5))[2:]], T0 + 2_000, now=0.0)
    assert (len(stage.detector.live), len(stage.pending), stage.stragglers) == (11, 0, False)  # counted at once
    stage.add(0, [], T0 + WINDOW, now=0.0)  # the window's end: scored with the rest
    assert (stage.late_events, len(stage.pending), len(stage.users)) == (0, 0, 11)
    stage.add(0, [list(user(1))], T0 + WINDOW, now=0.0)  # its window scored: late now
    assert stage.late_events == 1


def test_stage_1_sends_behaviour_rows_within_the_window_with_its_watermark(settings):
    import numpy as np

    from soundcheck.ingest.contracts import load_contracts
    from soundcheck.pipeline import IngestStage, decode_internal

    base = {"ts": T0, "user_id": "u-one", "session_id": "s-1", "device_id": "d-1", "country": "US",
            "user_segment": "free", "event_type": "play_start", "track_id": "tr-1", "artist_id": "ar-1"}
    lateness = settings.windows.allowed_lateness_s * 1000

    def sends(rows_every_s):
        ing = IngestStage(settings, "behavior", rows_every_s=rows_every_s)
        out = []
        for sec in range(8):  # 8 s of a 10-s window, one batch a second, read as it happens
            recs, _ = load_contracts()["behavior"].decode(orjson.dumps(
                [{**base, "event_id": f"b-{sec}-{i}", "ts": T0 + sec * 1000 + i} for i in range(3)]), now_ms=T0 + 10**7)
            msgs = ing.process(0, recs, np.full(3, sec, dtype=np.int64), now=(T0 + sec * 1000) / 1000)
            out.append([decode_internal(m.value) for m in msgs if m.topic == "fraud"])
        return out

    every = sends(0.5)  # each batch's rows go out at once (a second apart), the watermark with them
    assert [len(d) for d in every] == [1] * 8 and all(len(d[0]["rows"]) == 3 for d in every)
    assert [d[0]["rows_until"] for d in every] == [T0 + sec * 1000 + 2 - lateness for sec in range(8)]
    # the window [T0, T0 + 10 s) is open throughout (the one before closes when the watermark passes T0)
    assert [d[0]["closed_until"] for d in every] == [T0 - WINDOW] * 5 + [T0] * 3
    held = sends(None)  # only when a window closes: at the first batch, and when the watermark passes T0
    assert [len(d) for d in held] == [1, 0, 0, 0, 0, 1, 0, 0] and [len(d[0]["rows"]) for d in held if d] == [3, 15]


def test_a_user_back_after_half_a_day_with_nothing_scored_between_counts_only_its_new_devices(settings):
    """The fraud stage loads a user as of the window it counts (not as of the last window it scored:
    after a gap with no traffic at all, that one is hours old): a user whose items are older than the
    window and the 16-bit stamps' half range starts afresh, as when the window was fed whole."""
    uid = pseudonym("returning")
    play = lambda t, dev: [t, uid, "play_start", pseudonym(dev), "US", "free", "ar-1", None]
    for st in (FraudStage(settings), None):
        det = st.detector if st is not None else FraudDetector(settings)
        for start, devices in ((T0, ("old-1", "old-2")), (T0 + 12 * HOUR, ("new-1",))):
            rows = [play(start + i * 1000, devices[i % len(devices)]) for i in range(4)]
            if st is not None:
                st.add(0, rows[:2], start + 1500, now=0.0)  # within the window, then its end
                st.add(0, rows[2:], start + WINDOW, now=0.0)
            else:
                det.process(rows, start + WINDOW)
        u = det.users.load([uid], det.now)[uid]
        assert det.features(u, det.now)["devices"] == 1
