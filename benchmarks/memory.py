"""Bytes per tracked user of the fraud detector's state: in memory, and in a snapshot.

``python -m benchmarks.memory [--users 100000] [--events-per-user 8]``

Per-user state is an expiring window held in memory (``FraudDetector.users``: at most
``detection.fraud.max_users`` users per fraud partition, least recently seen dropped first,
users idle for ``fraud.window_s`` of event time expired), made durable by the per-partition
snapshots; not a RocksDB table. This measures what one user costs:

* in memory: ``tracemalloc`` growth while the detector learns the users (the state, not the
  transient batch), divided by the users tracked;
* in a snapshot: the pickled bytes and the zlib-compressed snapshot bytes per user, and the
  time to encode and decode it (the event loop is busy meanwhile);
* the restore check: a fresh detector restored from the snapshot tracks the same users and
  finds the same anomalies as the original on the same later events;
* with ``--speed``, the time per event without tracemalloc (which slows every allocation).

The events are what the fraud stage feeds the detector (:class:`~soundcheck.detectors.stage2.FraudEvent`:
user and device already pseudonymised, ``"u_"`` and 20 hex digits), fed one 10 s event-time window
at a time, as :class:`~soundcheck.detectors.stage2.FraudStage` does.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import time
import tracemalloc
import zlib
from types import SimpleNamespace
from typing import Optional, Sequence

from soundcheck import snapshots
from soundcheck.detectors.behavior import FraudDetector
from soundcheck.detectors.stage2 import FraudEvent
from soundcheck.settings import load_settings

T0 = 1_700_000_000_000
WINDOW_MS = 10_000
COUNTRIES = ("US", "GB", "DE", "BR", "JP", "MX", "FR", "IN")
EVENTS = ("play_start", "play_complete", "skip", "play_start", "play_complete", "search", "ad_impression", "payment_attempt")


def _pseudonym(raw: str) -> str:
    return "u_" + hashlib.sha256(raw.encode()).hexdigest()[:20]


def _events(n_users: int, per_user: int, seed: int = 1, start_ms: int = T0,
            span_ms: int = 30 * 60_000) -> list[tuple[int, list[FraudEvent]]]:
    """``(window end, events)`` per 10 s window, in event-time order: each user plays a few tracks
    from one or two devices. The span (half an hour by default) is inside the fraud window, so
    every user stays tracked."""
    rng = random.Random(seed)
    rows: list[FraudEvent] = []
    for i in range(n_users):
        uid, country = _pseudonym(f"user-{i:08d}"), COUNTRIES[i % len(COUNTRIES)]
        devices = [_pseudonym(f"d-{i:08d}-{k}") for k in range(2)]
        for j in range(per_user):
            et = EVENTS[j % len(EVENTS)]
            rows.append(FraudEvent(
                ts=start_ms + rng.randrange(span_ms), user_id=uid, event_type=et, device_id=devices[rng.randrange(2)],
                country=country, user_segment="premium",
                artist_id=f"ar-{rng.randrange(3000):05d}" if et == "play_start" else None,
                payment_method_id=f"pm-{i:08d}" if et == "payment_attempt" else None,
            ))
    rows.sort()
    out: list[tuple[int, list[FraudEvent]]] = []
    lo = 0
    while lo < len(rows):
        end = rows[lo].ts - rows[lo].ts % WINDOW_MS + WINDOW_MS
        hi = lo
        while hi < len(rows) and rows[hi].ts < end:
            hi += 1
        out.append((end, rows[lo:hi]))
        lo = hi
    return out


def _farm(n_accounts: int, start_ms: int, seconds: int = 600) -> list[tuple[int, list[FraudEvent]]]:
    """A small farm after the learning half hour: accounts streaming one artist from many devices."""
    rng = random.Random(7)
    out = []
    for w in range(seconds * 1000 // WINDOW_MS):
        end = start_ms + (w + 1) * WINDOW_MS
        batch = []
        for a in range(n_accounts):
            for _ in range(2):
                ts = end - WINDOW_MS + rng.randrange(WINDOW_MS)
                batch.append(FraudEvent(ts, _pseudonym(f"farm-{a}"), "play_start", _pseudonym(f"farmdev-{a}-{rng.randrange(6)}"),
                                        "US" if rng.random() < 0.7 else "BR", "free", "ar-farm", None))
        batch.sort()
        out.append((end, batch))
    return out


def measure(n_users: int = 100_000, per_user: int = 8) -> dict[str, float]:
    settings = load_settings(environ={})
    settings = settings.replace(detection={"fraud": {"max_users": max(n_users, int(settings.detection["fraud"]["max_users"]))}})
    fraud = FraudDetector(settings)
    gc.collect()
    tracemalloc.start()  # from before the events exist: the ids the state keeps are counted, the events are freed
    base = tracemalloc.get_traced_memory()[0]
    batches = _events(n_users, per_user)
    n_events = sum(len(b) for _, b in batches)
    started = time.perf_counter()
    for end, b in batches:
        fraud.process(b, end)
    learn_s = time.perf_counter() - started
    del b, batches
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    users = len(fraud.users)

    state = snapshots.capture(SimpleNamespace(detectors=[fraud]))
    started = time.perf_counter()
    blob = snapshots.encode_snapshot(state, stream="fraud", partition=0, last_offset=0, last_event_time=fraud.now, settings=settings)
    encode_s = time.perf_counter() - started
    del state
    pickled = len(zlib.decompress(snapshots.decode_header(blob)[1]))
    started = time.perf_counter()
    _, restored_state = snapshots.decode_snapshot(blob, settings)
    decode_s = time.perf_counter() - started
    fresh = FraudDetector(settings)
    restored = snapshots.restore(SimpleNamespace(detectors=[fresh]), restored_state)
    del restored_state
    # the restore check: the same later events give the same anomalies from both
    later = _farm(20, fraud.now - fraud.now % WINDOW_MS)
    found = [[a.to_json() for end, b in later for a in det.process(b, end)] for det in (fraud, fresh)]
    return {
        "users": users,
        "events": n_events,
        "memory_bytes_per_user": held / users,
        "pickle_bytes_per_user": pickled / users,
        "snapshot_bytes_per_user": len(blob) / users,
        "snapshot_bytes": len(blob),
        "encode_s": encode_s,
        "decode_s": decode_s,
        "learn_s": learn_s,
        "restored_users": restored,
        "restored_len": len(fresh.users),
        "later_anomalies": len(found[0]),
        "restore_same": found[0] == found[1] and len(fresh.users) == len(fraud.users),
        "users_per_16mb_snapshot": 16 * 1024 * 1024 / (len(blob) / users),
    }


def speed(n_users: int = 100_000, per_user: int = 8) -> float:
    """Microseconds per event while the detector learns the users (no tracemalloc)."""
    settings = load_settings(environ={})
    settings = settings.replace(detection={"fraud": {"max_users": max(n_users, int(settings.detection["fraud"]["max_users"]))}})
    fraud = FraudDetector(settings)
    batches = _events(n_users, per_user)
    started = time.perf_counter()
    for end, b in batches:
        fraud.process(b, end)
    return (time.perf_counter() - started) / sum(len(b) for _, b in batches) * 1e6


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--events-per-user", type=int, default=8)
    p.add_argument("--speed", action="store_true", help="also time the learning without tracemalloc")
    args = p.parse_args(argv)
    if args.speed:
        print(f"learning without tracemalloc: {speed(args.users, args.events_per_user):.1f} us per event")
    r = measure(args.users, args.events_per_user)
    print(f"fraud detector state, {r['users']:,} users tracked ({r['events']:,} events, learned in {r['learn_s']:.2f} s "
          f"under tracemalloc)")
    print(f"  in memory (tracemalloc)   {r['memory_bytes_per_user']:8.0f} bytes per user  "
          f"-> {r['memory_bytes_per_user'] * 1e6 / 2**30:.2f} GiB per million users")
    print(f"  pickled                   {r['pickle_bytes_per_user']:8.0f} bytes per user")
    print(f"  snapshot (zlib)           {r['snapshot_bytes_per_user']:8.0f} bytes per user  "
          f"({r['snapshot_bytes'] / 2**20:.1f} MiB; a 16 MiB snapshot holds about {r['users_per_16mb_snapshot']:,.0f} users)")
    print(f"  encode {r['encode_s']:.2f} s, decode {r['decode_s']:.2f} s "
          f"({r['encode_s'] / r['users'] * 1e6:.1f} / {r['decode_s'] / r['users'] * 1e6:.1f} us per user)")
    print(f"  restore check: restored {r['restored_users']:,} users ({r['restored_len']:,} tracked); "
          f"{r['later_anomalies']} later anomalies, {'the same' if r['restore_same'] else 'DIFFERENT'} from the restored state")
    return 0 if r["restore_same"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
