"""Cost of decoding and validating input records, in ns per record.

``python -m benchmarks.decode [--seconds S] [--repeats R]``. Not a test: it prints figures. The
simulator's valid records of each stream (no incident scenarios) are encoded two ways, as the
Kafka message values the worker reads: one JSON object per message, and JSON arrays of 100
records. Each row times :meth:`soundcheck.ingest.contracts.Contract.decode` (parse, validate, build the
records) over all messages, and plain ``orjson.loads`` over the very same bytes (parse only, no
validation, dicts instead of records) for scale; the median of R repeats.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Callable

import orjson

from soundcheck.ingest.contracts import load_contracts
from soundcheck.evaluation.simulator import Simulator

T0 = 1_700_000_000_000
STREAMS = ("audio", "behavior", "system")


def sample_records(seconds: int = 60, rate: float = 200.0) -> dict[str, list[dict]]:
    """The simulator's records by stream: ``seconds`` of event time at ``rate`` sessions per second."""
    sim = Simulator(seed=11, rate=rate, duration_s=seconds, start_ms=T0, plan=(), users_per_region=500)
    out: dict[str, list[dict]] = {s: [] for s in STREAMS}
    for batch in sim.ticks():
        out[batch.stream].extend(r for r in batch.records if isinstance(r, dict))
    return out


def messages(records: list[dict], per_message: int) -> list[bytes]:
    if per_message == 1:
        return [orjson.dumps(r) for r in records]
    return [orjson.dumps(records[i : i + per_message]) for i in range(0, len(records), per_message)]


def ns_per_record(fn: Callable[[bytes], object], values: list[bytes], n_records: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter_ns()
        for v in values:
            fn(v)
        runs.append((time.perf_counter_ns() - start) / n_records)
    return statistics.median(runs)


def measure(seconds: int = 60, repeats: int = 7) -> list[dict]:
    contracts = load_contracts()
    now_ms = T0 + seconds * 1000 + 60_000
    rows = []
    for stream, records in sample_records(seconds).items():
        decode = contracts[stream].decode
        for mode, per_message in (("object", 1), ("array100", 100)):
            values = messages(records, per_message)
            got, bad = [], []
            for v in values:  # every record valid: the figures are for the usual case
                recs, rej = decode(v, now_ms=now_ms)
                got.extend(recs)
                bad.extend(rej)
            assert len(got) == len(records) and not bad, (stream, mode, bad[:3])
            rows.append({
                "stream": stream,
                "mode": mode,
                "records": len(records),
                "soundcheck_ns": ns_per_record(lambda v: decode(v, now_ms=now_ms), values, len(records), repeats),
                "orjson_ns": ns_per_record(orjson.loads, values, len(records), repeats),
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="seconds of simulated traffic (default 60)")
    ap.add_argument("--repeats", type=int, default=7, help="timed passes per figure; the median is shown (default 7)")
    args = ap.parse_args(argv)
    rows = measure(args.seconds, args.repeats)
    print(f"{'stream':<9} {'messages':<9} {'records':>8} {'decode+validate':>16} {'orjson.loads':>13}   ratio")
    for r in rows:
        print(f"{r['stream']:<9} {r['mode']:<9} {r['records']:>8} {r['soundcheck_ns']:>13.0f} ns {r['orjson_ns']:>10.0f} ns"
              f"   {r['soundcheck_ns'] / r['orjson_ns']:.2f}x")
    print("ns per record, median of", args.repeats, "passes; orjson.loads parses only (no validation, dicts not records)")


if __name__ == "__main__":
    main()
