"""Write a simulator run to Kafka (aiokafka), with progress on long runs."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from typing import Any, Callable, Optional

from aiokafka import AIOKafkaProducer

from soundcheck.settings import Settings
from soundcheck.evaluation.simulator import Simulator, encode


def _progress_printer(stream: Any) -> Callable[[str], None]:
    def show(line: str) -> None:
        print(line, file=stream, flush=True)

    return show


async def produce(
    sim: Simulator,
    settings: Settings,
    *,
    batch: int = 100,
    realtime: float = 0.0,
    seconds: Optional[range] = None,
    progress: Optional[Callable[[str], None]] = None,
    progress_every_s: float = 2.0,
    keying: str = "natural",
) -> dict[str, Any]:
    """Produce every tick of ``sim`` to the input topics; returns counts and the ground truth.

    ``batch``: records per message (1 = one JSON object per message). ``realtime``: ticks per
    wall second (0 = as fast as possible). ``seconds``: only these seconds of the run (to produce
    a run in parts; the simulator carries on where it stopped). ``keying``: how the producers key
    their messages (:func:`soundcheck.pipeline.route_key`): ``natural`` (default) keys by region
    (audio), user (behaviour) and service (system), so an entity's records stay on one partition;
    ``user`` and ``session`` key each record by its user or session; ``random`` sends no key.
    """
    from soundcheck.pipeline import route_key
    topics = settings.topics.inputs()
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        linger_ms=20,
        max_batch_size=1_048_576,
        max_request_size=8_388_608,
        acks=1,
        **settings.kafka_client(),
    )
    await producer.start()
    messages = 0
    started = last = time.monotonic()
    try:
        pending: list[asyncio.Future] = []
        span = seconds if seconds is not None else range(sim.duration_s)
        for n_sec, sec in enumerate(span):
            t = sim.start_ms + sec * 1000
            for b in sim.tick(t):
                if keying == "natural":
                    parts = [(b.key, b)]
                else:  # group the batch's records by the key their producer gives them (malformed ones: the batch's)
                    keyed: dict[tuple[bool, Optional[str]], list] = {}
                    for r in b.records:
                        raw = isinstance(r, (bytes, bytearray))
                        keyed.setdefault((raw, b.key if raw else route_key(b.stream, r, b.key, keying)), []).append(r)
                    parts = [(k, dataclasses.replace(b, records=recs)) for (_, k), recs in keyed.items()]
                for key, part in parts:
                    for value in encode(part, batch):
                        pending.append(await producer.send(topics[b.stream], value, key=None if key is None else key.encode()))
                        messages += 1
            if len(pending) > 5000:
                await asyncio.gather(*pending)
                pending.clear()
            if realtime:
                delay = started + (n_sec + 1) / realtime - time.monotonic()  # paced from the first second produced
                if delay > 0:
                    await asyncio.sleep(delay)
            now = time.monotonic()
            if progress and now - last >= progress_every_s:
                last = now
                n = sum(sim.produced.values())
                progress(
                    f"simulate: {sec + 1}/{sim.duration_s} s of event time, {n:,} events in {messages:,} messages, "
                    f"{n / (now - started):,.0f} events/s"
                )
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    elapsed = time.monotonic() - started
    truth = sim.ground_truth()
    truth.update({"messages": messages, "produce_seconds": round(elapsed, 2)})
    if progress:
        n = sum(sim.produced.values())
        progress(f"simulate: done: {n:,} valid and {sim.malformed} malformed records in {messages:,} messages, {elapsed:.1f} s")
    return truth


def stderr_progress() -> Callable[[str], None]:
    return _progress_printer(sys.stderr)
