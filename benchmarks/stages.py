"""Per-record cost of each stage of the hot path, offline (no broker, no Faust), one core.

``python -m benchmarks.stages [--seconds 300] [--repeats 3]``

The simulator's traffic (all three streams, incidents included) is encoded once as Kafka message
values, single-record and 100-record arrays, then timed stage by stage, exactly as the worker
runs them:

* decode: :meth:`soundcheck.ingest.contracts.Contract.decode` of every message value;
* stage 1: :meth:`soundcheck.pipeline.IngestStage.process` (numpy columns, partial aggregates,
  fraud rows, the messages for the internal topics), per input partition batch;
* stage 2: :meth:`soundcheck.pipeline.DetectStage.on_message` on what stage 1 sent (merging,
  baselines, series, forecaster, fraud), per record of input.

Medians of ``--repeats`` runs, in ns per input record. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional, Sequence

import numpy as np

from soundcheck.detectors.stage2 import STREAMS
from soundcheck.pipeline import DetectStage, IngestStage, decode_internal
from soundcheck.settings import load_settings
from soundcheck.evaluation.simulator import Simulator, encode

T0 = 1_700_000_000_000
POLL_RECORDS = 5_000  # records per simulated getmany batch


def _messages(seconds: int, per_message: int) -> dict[str, list[bytes]]:
    sim = Simulator(seed=3, rate=300, duration_s=seconds, start_ms=T0)
    out: dict[str, list[bytes]] = {s: [] for s in STREAMS}
    for b in sim.ticks():
        if any(isinstance(r, (bytes, bytearray)) for r in b.records):
            continue  # malformed records: the dead-letter path is not the hot path
        out[b.stream].extend(encode(b, per_message))
    return out


def run_once(settings, messages: dict[str, list[bytes]]) -> dict[str, float]:
    now_ms = T0 + 10**9
    ingest = {s: IngestStage(settings, s) for s in STREAMS}
    detect = DetectStage(settings, idle_s=float("inf"))
    t_decode = t_stage1 = t_stage2 = 0.0
    n = 0
    per_stream = {}
    for stream, values in messages.items():
        ing = ingest[stream]
        pending = []
        count = 0
        sent = []
        start = time.perf_counter()
        decoded = []
        for v in values:
            recs, _ = ing.decode(v, now_ms)
            decoded.append(recs)
        t1 = time.perf_counter()
        t_decode += t1 - start
        batches = []
        for recs in decoded:
            pending.extend(recs)
            if len(pending) >= POLL_RECORDS:
                batches.append(pending)
                pending = []
        if pending:
            batches.append(pending)
        start = time.perf_counter()
        for recs in batches:
            sent += ing.process(0, recs, np.zeros(len(recs), dtype=np.int64), now=float("inf"))
            count += len(recs)
        sent += ing.flush()
        t2 = time.perf_counter()
        t_stage1 += t2 - start
        start = time.perf_counter()
        for m in sent:
            detect.on_message(decode_internal(m.value), now=0.0)
        t_stage2 += time.perf_counter() - start
        n += count
        per_stream[stream] = count
    return {"records": n, "decode_ns": t_decode / n * 1e9, "stage1_ns": t_stage1 / n * 1e9, "stage2_ns": t_stage2 / n * 1e9,
            **{f"records_{s}": c for s, c in per_stream.items()}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=300, help="seconds of simulated traffic (default 300)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    settings = load_settings(environ={})
    print(f"{'messages':<22}{'records':>9}{'decode':>10}{'stage 1':>10}{'stage 2':>10}{'total':>10}   ns per record (median of {args.repeats})")
    for label, per in (("single-record", 1), ("batched (100/message)", 100)):
        msgs = _messages(args.seconds, per)
        runs = [run_once(settings, msgs) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in ("decode_ns", "stage1_ns", "stage2_ns")}
        total = sum(med.values())
        print(f"{label:<22}{runs[0]['records']:>9,}{med['decode_ns']:>10,.0f}{med['stage1_ns']:>10,.0f}{med['stage2_ns']:>10,.0f}"
              f"{total:>10,.0f}")
    mix = runs[0]
    print(f"mix: audio {mix['records_audio']:,}, behaviour {mix['records_behavior']:,}, system {mix['records_system']:,} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
