"""Bytes per tracked user of the fraud detector's state: in memory, and in a snapshot.

``python -m benchmarks.memory [--users 100000] [--events-per-user 8]``

Per-user state is an expiring window held in memory (``EntityStore``: at most
``detection.fraud.max_users`` users per partition processor, least recently seen dropped first,
users idle for ``fraud.window_s`` of event time expired), made durable by the per-partition
snapshots; not a RocksDB table. This measures what one user costs:

* in memory: ``tracemalloc`` growth while the detector learns the users (the state, not the
  transient batch), divided by the users tracked;
* in a snapshot: the pickled bytes and the zlib-compressed snapshot bytes per user, and the
  time to encode and decode it (the event loop is busy meanwhile).
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from typing import Optional, Sequence

from soundcheck import snapshots
from soundcheck.contracts import UserBehaviorEvent
from soundcheck.detectors.behavior import FraudDetector
from soundcheck.pipeline import StreamProcessor
from soundcheck.settings import load_settings

T0 = 1_700_000_000_000
COUNTRIES = ("US", "GB", "DE", "BR", "JP", "MX", "FR", "IN")
EVENTS = ("play_start", "play_complete", "skip", "play_start", "play_complete", "search", "ad_impression", "payment_attempt")


def _events(n_users: int, per_user: int, seed: int = 1) -> list[list[UserBehaviorEvent]]:
    """Batches of realistic-ish events: each user plays a few tracks from one or two devices."""
    rng = random.Random(seed)
    out: list[list[UserBehaviorEvent]] = []
    batch: list[UserBehaviorEvent] = []
    span = 30 * 60_000  # half an hour of event time, inside the fraud window: every user stays tracked
    for i in range(n_users):
        uid, country = f"u-{i:08d}", COUNTRIES[i % len(COUNTRIES)]
        for j in range(per_user):
            et = EVENTS[j % len(EVENTS)]
            batch.append(UserBehaviorEvent(
                event_id=f"e-{i}-{j}", ts=T0 + rng.randrange(span), user_id=uid, session_id=f"s-{i}", event_type=et,
                device_id=f"d-{i:08d}-{rng.randrange(2)}", country=country, user_segment="premium",
                artist_id=f"ar-{rng.randrange(3000):05d}" if et == "play_start" else None,
                payment_method_id=f"pm-{i:08d}" if et == "payment_attempt" else None,
            ))
        if len(batch) >= 10_000:
            out.append(batch)
            batch = []
    if batch:
        out.append(batch)
    return out


def measure(n_users: int = 100_000, per_user: int = 8) -> dict[str, float]:
    settings = load_settings(environ={})
    settings = settings.replace(detection={"fraud": {"max_users": max(n_users, int(settings.detection["fraud"]["max_users"]))}})
    proc = StreamProcessor.create(settings, "behavior")
    proc.detectors = [d for d in proc.detectors if isinstance(d, FraudDetector)]
    fraud: FraudDetector = proc.detectors[0]
    gc.collect()
    tracemalloc.start()  # from before the events exist: the ids the state keeps are counted, the events are freed
    base = tracemalloc.get_traced_memory()[0]
    batches = _events(n_users, per_user)
    n_events = sum(len(b) for b in batches)
    started = time.perf_counter()
    for b in batches:
        fraud.process(b)
    learn_s = time.perf_counter() - started
    del b, batches
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    users = len(fraud.users)

    state = snapshots.capture(proc)
    started = time.perf_counter()
    blob = snapshots.encode_snapshot(state, stream="behavior", partition=0, last_offset=0, last_event_time=fraud.now, settings=settings)
    encode_s = time.perf_counter() - started
    pickled = len(__import__("zlib").decompress(snapshots.decode_header(blob)[1]))
    started = time.perf_counter()
    _, restored_state = snapshots.decode_snapshot(blob, settings)
    decode_s = time.perf_counter() - started
    fresh = StreamProcessor.create(settings, "behavior")
    restored = snapshots.restore(fresh, restored_state)
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
        "users_per_16mb_snapshot": 16 * 1024 * 1024 / (len(blob) / users),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--events-per-user", type=int, default=8)
    args = p.parse_args(argv)
    r = measure(args.users, args.events_per_user)
    print(f"fraud detector state, {r['users']:,} users tracked ({r['events']:,} events, learned in {r['learn_s']:.2f} s)")
    print(f"  in memory (tracemalloc)   {r['memory_bytes_per_user']:8.0f} bytes per user  "
          f"-> {r['memory_bytes_per_user'] * 1e6 / 2**30:.2f} GiB per million users")
    print(f"  pickled                   {r['pickle_bytes_per_user']:8.0f} bytes per user")
    print(f"  snapshot (zlib)           {r['snapshot_bytes_per_user']:8.0f} bytes per user  "
          f"({r['snapshot_bytes'] / 2**20:.1f} MiB; a 16 MiB snapshot holds about {r['users_per_16mb_snapshot']:,.0f} users)")
    print(f"  encode {r['encode_s']:.2f} s, decode {r['decode_s']:.2f} s "
          f"({r['encode_s'] / r['users'] * 1e6:.1f} / {r['decode_s'] / r['users'] * 1e6:.1f} us per user); "
          f"restored {r['restored_users']:,} users")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
