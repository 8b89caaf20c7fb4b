"""Hostile input through the real worker and the real broker.

Ten thousand hostile messages (invalid JSON, empty values, tombstones, bytes that are not UTF-8,
JSON of the wrong type, missing fields, wrong types, out-of-range values, unknown enum values,
deep nesting, a 900 KB string, records of one topic sent to another, arrays mixing good and bad
records, arrays of tens of thousands of records with one bad) are interleaved with valid traffic
on the three input topics. Each message states, by construction, which of its records are bad
(``None``: the whole message) and how many are valid. After the worker has read everything:

1. the worker is still alive (and never had to re-read a batch);
2. the dead-letter topic holds exactly one dead letter per bad record, identified by its source
   topic, partition, offset and array index, and nothing else;
3. the worker counted (``soundcheck_events_in_total``, per topic) exactly the valid records sent;
4. the dead-letter topic's bytes stay within a small multiple of the hostile input's bytes (in
   total, and per message once a fixed envelope per dead letter is allowed for).

A second test sends single compressed messages of 50,000 records, one bad, whose records fall in
windows still open (so the worker forwards them all: 50,000 fraud rows, or 50,000 entities'
partial aggregates) and makes the same checks. The figures are printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import jsonschema
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from soundcheck.evaluation.harness import WorkerProcess
from soundcheck.evaluation.simulator import Simulator, encode
from soundcheck.ingest.contracts import SCHEMA_DIR
from soundcheck.ingest.deadletters import MAX_ORIGINAL
from soundcheck.kafka.admin import topic_partitions

from tests.workers import isolated, start_worker

pytestmark = pytest.mark.integration

STREAMS = ("audio", "behavior", "system")
SCHEMA_FILES = {"audio": "audio_quality_metrics", "behavior": "user_behavior_events", "system": "system_performance_metrics"}
REQUIRED = {s: json.loads((SCHEMA_DIR / f"{f}.schema.json").read_text())["required"] for s, f in SCHEMA_FILES.items()}
DEAD_LETTER_SCHEMA = json.loads((SCHEMA_DIR / "dead_letter.schema.json").read_text())
TEXT_FIELD = {"audio": "codec", "behavior": "error_code", "system": "instance"}  # an optional string with a short maxLength
TOPIC_MAX_BYTES = 1_048_588  # the broker's default message.max.bytes: the topics are created without a limit of their own
HOSTILE_MESSAGES = 10_000
DEEP = 1_000  # nesting levels
HUGE = 900_000  # characters of the huge strings
PER_LETTER_BYTES = 1024  # the fixed part of one dead letter (fields, hash, reason) is below this
REWOUND = "a batch could not be sent"  # what the worker logs when it has to read a batch again


@dataclass
class Message:
    """One Kafka message to send and what the worker must make of it."""

    stream: str  # the input topic it goes to
    value: Optional[bytes]
    key: Optional[bytes] = None
    bad: dict[Optional[int], str] = field(default_factory=dict)  # array index (None: the whole message) -> expected error_kind
    valid: int = 0  # valid records in it
    kind: str = "valid"  # what sort of message (for the figures)
    packed: bool = False  # sent gzip-compressed (a large array that fits the topic only compressed)
    topic: str = ""  # where it landed
    partition: int = -1
    offset: int = -1


def _dumps(v: Any) -> bytes:
    return orjson.dumps(v)


def _deep_list(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def _with_raw(rec: dict, name: str, raw: bytes) -> bytes:
    """``rec`` as JSON with field ``name`` set to the JSON text ``raw`` (for what orjson will not write: 1e400, NaN)."""
    return _dumps({**rec, name: "\x00raw\x00"}).replace(b'"\\u0000raw\\u0000"', raw)


class Hostile:
    """Builds the messages: valid traffic from the simulator, and hostile messages of many kinds."""

    def __init__(self, seed: int, now_ms: int) -> None:
        self.rng = random.Random(seed)
        self.now_ms = now_ms
        sim = Simulator(seed=seed, rate=40, duration_s=90, start_ms=now_ms - 200_000, plan=())
        self.sim_batches = list(sim.ticks())
        self.pool = {s: [r for b in self.sim_batches if b.stream == s for r in b.records] for s in STREAMS}
        self.serial = 0

    # -- records ----------------------------------------------------------------------------

    def record(self, stream: str) -> dict:
        """A fresh valid record of ``stream`` (a simulator record with a new id)."""
        self.serial += 1
        rec = dict(self.rng.choice(self.pool[stream]))
        if "event_id" in rec:
            rec["event_id"] = f"h-{self.serial}"
        return rec

    def other_stream(self, stream: str) -> str:
        return self.rng.choice([s for s in STREAMS if s != stream])

    def bad_record(self, stream: str) -> tuple[bytes, str]:
        """One bad record of ``stream`` as JSON text, and the error_kind the worker must give it."""
        rng, r = self.rng, self.record(stream)
        gone = rng.choice(REQUIRED[stream])
        common: list[Callable[[], tuple[bytes, str]]] = [
            lambda: (_dumps({k: v for k, v in r.items() if k != gone}), "schema"),
            lambda: (_dumps({**r, "zz_unknown": 1}), "schema"),
            lambda: (_dumps({**r, "ts": True}), "schema"),
            lambda: (_dumps({**r, "ts": "yesterday"}), "schema"),
            lambda: (_dumps({**r, "ts": 1.5e12 + 0.5}), "schema"),
            lambda: (_dumps({**r, "ts": -5}), "impossible_value"),
            lambda: (_dumps({**r, "ts": self.now_ms + 86_400_000}), "future_ts"),
            lambda: (_dumps(self.record(self.other_stream(stream))), "schema"),  # a record of another topic
            lambda: (rng.choice([b"5", b'"x"', b"null", b"true", b"-2.5"]), "not_an_object"),
        ]
        own: dict[str, list[Callable[[], tuple[bytes, str]]]] = {
            "audio": [
                lambda: (_dumps({**r, "latency_ms": -12.5}), "impossible_value"),
                lambda: (_with_raw(r, "latency_ms", b"1e400"), "impossible_value"),
                lambda: (_dumps({**r, "buffering_ratio": 1.7}), "impossible_value"),
                lambda: (_dumps({**r, "requested_bitrate_kbps": 0}), "impossible_value"),
                lambda: (_dumps({**r, "device": "toaster"}), "schema"),
                lambda: (_dumps({**r, "network": "pigeon"}), "schema"),
                lambda: (_dumps({**r, "latency_ms": "fast"}), "schema"),
                lambda: (_dumps({**r, "region": "X"}), "schema"),
                lambda: (_dumps({**r, "user_id": 12345}), "schema"),
            ],
            "behavior": [
                lambda: (_dumps({**r, "event_type": "hack"}), "schema"),
                lambda: (_dumps({**r, "amount": -1}), "impossible_value"),
                lambda: (_with_raw(r, "amount", b"1e400"), "impossible_value"),
                lambda: (_dumps({**r, "listen_ms": 1.5}), "schema"),
                lambda: (_dumps({**r, "listen_ms": -5}), "impossible_value"),
                lambda: (_dumps({**r, "currency": "EURO"}), "schema"),
                lambda: (_dumps({**r, "track_duration_ms": 0}), "impossible_value"),
                lambda: (_dumps({**r, "user_segment": "vip"}), "schema"),
                lambda: (_dumps({**r, "user_id": ""}), "schema"),
            ],
            "system": [
                lambda: (_dumps({**r, "metrics": {**r["metrics"], "error_rate": 7}}), "impossible_value"),
                lambda: (_dumps({**r, "metrics": {**r["metrics"], "cpu_percent": -1}}), "impossible_value"),
                lambda: (_dumps({**r, "metrics": {}}), "schema"),
                lambda: (_dumps({**r, "metrics": []}), "schema"),
                lambda: (_dumps({**r, "metrics": {"BAD NAME": 1}}), "schema"),
                lambda: (_dumps({**r, "service": "Bad Service!"}), "schema"),
                lambda: (_with_raw(r, "metrics", b'{"latency_p95_ms":1e400}'), "impossible_value"),
                lambda: (_dumps({**r, "metrics": {"latency_p95_ms": 2e12}}), "impossible_value"),
                lambda: (_dumps({**r, "metrics": {"cpu_percent": "high"}}), "schema"),
            ],
        }
        return rng.choice(common + own[stream])()

    # -- messages ---------------------------------------------------------------------------

    def key(self) -> Optional[bytes]:
        return None if self.rng.random() < 0.2 else f"k-{self.rng.randrange(1000)}".encode()

    def single(self, stream: str) -> Message:
        value, kind = self.bad_record(stream)
        return Message(stream, value, self.key(), {None: kind}, kind="bad record")

    def unreadable(self, stream: str) -> Message:
        """A message that cannot be read at all: one dead letter for the whole message."""
        rng, r = self.rng, self.record(stream)
        text = _dumps(r)
        nan = {"audio": ("latency_ms", b"NaN"), "behavior": ("amount", b"NaN"), "system": ("metrics", b'{"cpu_percent":NaN}')}[stream]
        choices: list[tuple[str, Callable[[], Optional[bytes]], str]] = [
            ("truncated JSON", lambda: text[: rng.randrange(1, len(text) - 1)], "invalid_json"),
            ("trailing comma", lambda: text[:-1] + b",}", "invalid_json"),
            ("NaN", lambda: _with_raw(r, *nan), "invalid_json"),
            ("byte order mark", lambda: b"\xef\xbb\xbf" + text, "invalid_json"),
            ("garbage", lambda: rng.choice([b"not json", b"{'single': 'quotes'}", b"\x00\x01\x02\x03", b"<xml/>", b"}{"]), "invalid_json"),
            ("truncated array", lambda: b"[" + text + b",", "invalid_json"),
            ("array then garbage", lambda: _dumps([r, r]) + b"x", "invalid_json"),
            ("empty value", lambda: b"", "invalid_json"),
            ("tombstone", lambda: None, "invalid_json"),
            ("null key and value", lambda: None, "invalid_json"),
            ("not UTF-8", lambda: b"\xff\xfe" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "invalid_json"),
            ("not UTF-8 in a string", lambda: text.replace(b'"ts"', b'"t\xffs"', 1), "invalid_json"),
            ("JSON number", lambda: rng.choice([b"42", b"3.14", b"-1", b"1e400"]), "not_an_object"),
            ("JSON string", lambda: b'"hello"', "not_an_object"),
            ("JSON null", lambda: b"null", "not_an_object"),
            ("JSON boolean", lambda: b"true", "not_an_object"),
        ]
        label, make, kind = rng.choice(choices)
        value = make()
        key = None if label == "null key and value" else self.key() if label != "tombstone" else b"k-tombstone"
        return Message(stream, value, key, {None: kind}, kind=label)

    def broken_element(self, stream: str) -> Message:
        """An array whose brackets add up but one element is not JSON (or not UTF-8): that element
        alone is dead-lettered, by its index, and its neighbours are counted."""
        rng, r = self.rng, self.record(stream)
        nan = {"audio": ("latency_ms", b"NaN"), "behavior": ("amount", b"NaN"), "system": ("metrics", b'{"cpu_percent":NaN}')}[stream]
        label, element = rng.choice([
            ("with a NaN", _with_raw(r, *nan)),
            ("with a trailing comma", _dumps(r)[:-1] + b",}"),
            ("not UTF-8", _dumps(r).replace(b'"ts"', b'"t\xfes"', 1)),
            ("of bare words", b"{nope}"),
        ])
        n = rng.randrange(1, 8)
        at = rng.randrange(n + 1)
        items = [_dumps(self.record(stream)) for _ in range(n)]
        items.insert(at, element)
        return Message(stream, b"[" + b",".join(items) + b"]", self.key(), {at: "invalid_json"}, n, kind=f"array, one element {label}")

    def mixed_array(self, stream: str) -> Message:
        """An array of good and bad records: the good ones counted, each bad one dead-lettered."""
        n = self.rng.randrange(2, 20)
        bad_at = set(self.rng.sample(range(n), self.rng.randrange(1, max(2, n // 2))))
        items, bad, valid = [], {}, 0
        for i in range(n):
            if i in bad_at:
                text, kind = self.bad_record(stream)
                bad[i] = kind
            else:
                text, valid = _dumps(self.record(stream)), valid + 1
            items.append(text)
        return Message(stream, b"[" + b",".join(items) + b"]", self.key(), bad, valid, kind="mixed array")

    def wrong_topic(self, stream: str) -> Message:
        """Records of another topic, alone or as an array: every one is bad."""
        other = self.other_stream(stream)
        if self.rng.random() < 0.3:
            return Message(stream, _dumps(self.record(other)), self.key(), {None: "schema"}, kind="wrong topic")
        n = self.rng.randrange(2, 12)
        return Message(stream, _dumps([self.record(other) for _ in range(n)]), self.key(), {i: "schema" for i in range(n)},
                       kind="wrong topic array")

    def deep(self, stream: str) -> list[Message]:
        r = self.record(stream)
        inner = _dumps({**r, TEXT_FIELD[stream]: "\x00raw\x00"}).replace(b'"\\u0000raw\\u0000"', _deep_list(DEEP))
        return [
            Message(stream, _deep_list(DEEP), self.key(), {0: "not_an_object"}, kind="deep array"),
            Message(stream, b'{"a":' * DEEP + b"1" + b"}" * DEEP, self.key(), {None: "schema"}, kind="deep object"),
            Message(stream, b"[" + _dumps(self.record(stream)) + b"," + inner + b"]", self.key(), {1: "schema"}, 1,
                    kind="deep field in an array"),
            Message(stream, b"[" + _dumps(self.record(stream)) + b"," + _deep_list(DEEP) + b"]", self.key(), {1: "not_an_object"}, 1,
                    kind="deep element in an array"),
        ]

    def huge(self, stream: str) -> list[Message]:
        """A 900 KB string where at most 128 characters are allowed: alone, and in an array after a good record."""
        rec = {**self.record(stream), TEXT_FIELD[stream]: "x" * HUGE}
        return [
            Message(stream, _dumps(rec), self.key(), {None: "schema"}, kind="huge string"),
            Message(stream, _dumps([self.record(stream), rec]), self.key(), {1: "schema"}, 1, kind="huge string in an array"),
        ]

    def odd_but_valid(self, stream: str) -> Message:
        """Valid records in unusual forms: counted, never dead-lettered."""
        rng, r = self.rng, self.record(stream)
        iso = datetime.fromtimestamp(r["ts"] / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"
        choices = [
            lambda: (_dumps({**r, "ts": iso}), 1),  # event time as RFC 3339
            lambda: (_dumps({**r, "ts": float(r["ts"])}), 1),  # an integral float
            lambda: (b" \n\t" + _dumps([r, self.record(stream)]), 2),  # white space before the array
            lambda: (_dumps({**r, TEXT_FIELD[stream]: None}), 1),  # explicit null for an optional field
            lambda: (b"[]", 0),  # an empty array: nothing to count, nothing to dead-letter
        ]
        value, n = rng.choice(choices)()
        return Message(stream, value, self.key(), {}, n, kind="odd but valid")

    def big_array(self, stream: str, n: int, bad_index: int, packed: bool, records: Optional[Callable[[int], dict]] = None) -> Message:
        make = records or (lambda i: self.record(stream))
        items = [_dumps(make(i)) for i in range(n)]
        items[bad_index], kind = self.bad_record(stream)
        value = b"[" + b",".join(items) + b"]"
        return Message(stream, value, self.key(), {bad_index: kind}, n - 1, kind=f"big array ({n:,} records)", packed=packed)

    def valid_traffic(self) -> list[Message]:
        """The simulator's run, as arrays of 1 to 50 records per message, keyed like :func:`produce` keys them."""
        out = []
        for b in self.sim_batches:
            per = self.rng.choice([1, 5, 50])
            for value in encode(b, per):
                n = len(orjson.loads(value)) if value.startswith(b"[") else 1
                out.append(Message(b.stream, value, b.key.encode(), {}, n))
        return out

    def hostile(self, n: int) -> list[Message]:
        out: list[Message] = []
        for stream in STREAMS:
            out += self.deep(stream) + self.huge(stream)
        makers = [(self.single, 35), (self.unreadable, 27), (self.mixed_array, 20), (self.wrong_topic, 10), (self.broken_element, 3)]
        while len(out) < n:
            make = self.rng.choices([m for m, _ in makers], weights=[w for _, w in makers])[0]
            out.append(make(self.rng.choice(STREAMS)))
        return out


# -- Kafka --------------------------------------------------------------------------------------


async def _send(bootstrap: str, topics: dict[str, str], messages: list[Message]) -> None:
    """Send ``messages`` in their order (the compressed ones through a gzip producer) and note where each landed."""
    common = dict(bootstrap_servers=bootstrap, acks="all", linger_ms=10, max_batch_size=256 * 1024, max_request_size=32 * 1024 * 1024)
    plain, packed = AIOKafkaProducer(**common), AIOKafkaProducer(compression_type="gzip", **common)
    await plain.start()
    await packed.start()
    try:
        pending = []
        for m in messages:
            producer = packed if m.packed else plain
            if m.key is None and m.value is None:  # (send() refuses it; Kafka does not)
                batch = producer.create_batch()
                batch.append(key=None, value=None, timestamp=None)
                partitions = sorted(await producer.partitions_for(topics[m.stream]))
                sent = await producer.send_batch(batch, topics[m.stream], partition=partitions[len(pending) % len(partitions)])
            else:
                sent = await producer.send(topics[m.stream], m.value, key=m.key)
            pending.append((m, sent))
            if len(pending) >= 2000:
                await _land(pending)
        await _land(pending)
    finally:
        await plain.stop()
        await packed.stop()


async def _land(pending: list) -> None:
    for m, fut in pending:
        meta = await fut
        m.topic, m.partition, m.offset = meta.topic, meta.partition, meta.offset
    pending.clear()


async def _read_all(bootstrap: str, topic: str, timeout: float = 120.0) -> list[Any]:
    """Every record of ``topic`` up to its end offsets at the time of the call."""
    parts = await topic_partitions(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=16 * 1024 * 1024)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            assert time.monotonic() < deadline, f"{topic} was not read to its end within {timeout} s"
            for records in (await consumer.getmany(*tps, timeout_ms=500)).values():
                out += [r for r in records if r.offset < end[TopicPartition(r.topic, r.partition)]]
        return out
    finally:
        await consumer.stop()


def _by_topic(worker: WorkerProcess, metric: str) -> dict[str, float]:
    """``{topic: value}`` of a metric labelled by topic (summed over its other labels)."""
    out: dict[str, float] = {}
    for name, value in worker.metrics().items():
        if name.startswith(metric + "{"):
            topic = name.split('topic="', 1)[1].split('"', 1)[0]
            out[topic] = out.get(topic, 0.0) + value
    return out


def _wait_drained(worker: WorkerProcess, valid: int, bad: int, timeout: float) -> None:
    """Until the worker has counted ``valid`` records and ``bad`` dead letters; fails at once if it
    had to read a batch again (at least once: dead letters would be duplicated)."""

    def done() -> bool:
        log = worker.log_path.read_text(errors="replace")
        assert REWOUND not in log, f"the worker could not send a batch and reads it again (over and over?):\n{worker.log_tail(60)}"
        return worker.metric_sum("soundcheck_events_in_total") >= valid and worker.metric_sum("soundcheck_dead_letters_total") >= bad

    worker.wait_for(done, timeout=timeout, what=f"{valid:,} valid records and {bad:,} dead letters")
    time.sleep(3.0)  # a moment more: anything counted twice would show now


def _check(worker: WorkerProcess, topics: dict[str, str], dlq_topic: str, bootstrap: str, messages: list[Message],
           title: str, byte_factor: float) -> None:
    """The four checks of the module doc, with the figures printed."""
    expected = {(m.topic, m.partition, m.offset, i): (m, kind) for m in messages for i, kind in m.bad.items()}
    valid_sent = {topics[s]: sum(m.valid for m in messages if m.stream == s) for s in STREAMS}
    messages_sent = {topics[s]: sum(1 for m in messages if m.stream == s) for s in STREAMS}
    _wait_drained(worker, sum(valid_sent.values()), len(expected), timeout=240)

    # (1) alive, answering, and never had to read a batch again
    assert worker.proc is not None and worker.proc.poll() is None, f"the worker died:\n{worker.log_tail()}"
    assert worker.health() is not None, "the worker no longer answers /health"
    assert REWOUND not in worker.log_path.read_text(errors="replace")

    # (2) one dead letter per bad record, nothing else
    letters = asyncio.run(_read_all(bootstrap, dlq_topic))
    validator = jsonschema.Draft202012Validator(DEAD_LETTER_SCHEMA)
    found: dict[tuple, int] = {}
    wrong: list[str] = []
    holders: dict[tuple, list[Optional[int]]] = {}
    for r in letters:
        d = orjson.loads(r.value)
        validator.validate(d)
        ident = (d["source_topic"], d["partition"], d["offset"], d["index"])
        found[ident] = found.get(ident, 0) + 1
        if ident not in expected:
            continue
        m, kind = expected[ident]
        original = m.value if m.value is not None else b""
        problems = [
            d["error_kind"] != kind and f"error_kind {d['error_kind']} (expected {kind}: {d['reason']})",
            d["stream"] != m.stream and f"stream {d['stream']}",
            d["original_size"] != len(original) and f"original_size {d['original_size']} != {len(original)}",
            d["original_sha256"] != hashlib.sha256(original).hexdigest() and "original_sha256 differs",
            r.key != m.key and f"key {r.key!r} != {m.key!r}",
        ]
        if d["original_in"] is None:  # the one holding the original bytes
            holders.setdefault(ident[:3], []).append(d["index"])
            if base64.b64decode(d["original_value_b64"]) != original[:MAX_ORIGINAL]:
                problems.append("original_value_b64 is not the original")
        elif d["original_in"]["index"] != min(m.bad, key=lambda i: -1 if i is None else i):
            problems.append(f"original_in {d['original_in']} does not point to the first dead letter of the message")
        wrong += [f"{m.kind} {ident}: {p}" for p in problems if p]
    missing = sorted(set(expected) - set(found), key=str)
    extra = sorted(set(found) - set(expected), key=str)
    twice = sorted((k for k, n in found.items() if n > 1), key=str)
    several_copies = [k for k, idx in holders.items() if len(idx) != 1]

    # (3) every valid record counted once, per topic; every message read once
    counted = _by_topic(worker, "soundcheck_events_in_total")
    read = _by_topic(worker, "soundcheck_messages_in_total")
    dead_metric = worker.metric_sum("soundcheck_dead_letters_total")
    dead_failures = worker.metric_sum("soundcheck_dead_letter_failures_total")

    # (4) bounded dead letters
    hostile = [m for m in messages if m.bad]
    hostile_bytes = sum(len(m.value or b"") for m in hostile)
    dlq_bytes = sum(len(r.value) + len(r.key or b"") for r in letters)
    per_message: dict[tuple, list[int]] = {}  # source (topic, partition, offset) -> [dead letters, their bytes]
    for r in letters:
        d = orjson.loads(r.value)
        acc = per_message.setdefault((d["source_topic"], d["partition"], d["offset"]), [0, 0])
        acc[0], acc[1] = acc[0] + 1, acc[1] + len(r.value) + len(r.key or b"")
    small = [m for m in hostile if len(m.value or b"") < 64 * 1024]
    small_in = sum(len(m.value or b"") for m in small)
    small_out = sum(per_message.get((m.topic, m.partition, m.offset), [0, 0])[1] for m in small)
    # a dead letter has a fixed part (its fields, the SHA-256, the reason): each message's dead letters
    # stay within byte_factor times its size plus that fixed part, 1 KiB, per dead letter
    over = [(m.kind, len(m.value or b""), n, size) for m in hostile
            for n, size in [per_message.get((m.topic, m.partition, m.offset), [0, 0])]
            if size > byte_factor * len(m.value or b"") + PER_LETTER_BYTES * n]
    excess = max(((size - byte_factor * len(m.value or b"")) / n for m in hostile
                  for n, size in [per_message.get((m.topic, m.partition, m.offset), [0, 0])] if n), default=0.0)
    kinds: dict[str, int] = {}
    for m in hostile:
        kinds[m.kind] = kinds.get(m.kind, 0) + 1

    print(f"\n--- {title} ---")
    print(f"messages sent: {len(messages):,} ({len(hostile):,} hostile, {sum(len(m.value or b'') for m in messages):,} bytes)")
    print("hostile messages by kind: " + ", ".join(f"{k} {n:,}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print(f"bad records sent: {len(expected):,}; dead letters found: {len(letters):,} ({len(found):,} distinct, "
          f"{len(missing)} missing, {len(extra)} unexpected, {len(twice)} more than once, {len(wrong)} with wrong fields); "
          f"dead-letter metric {dead_metric:,.0f}, write failures {dead_failures:,.0f}")
    for s in STREAMS:
        t = topics[s]
        print(f"{s}: valid records sent {valid_sent[t]:,}, counted {counted.get(t, 0):,.0f}; messages sent {messages_sent[t]:,}, "
              f"read {read.get(t, 0):,.0f}")
    print(f"dead-letter bytes {dlq_bytes:,} vs hostile input bytes {hostile_bytes:,}: {dlq_bytes / max(1, hostile_bytes):.2f}x "
          f"(bound {byte_factor}x); messages under 64 KiB: {small_out:,} vs {small_in:,} bytes; "
          f"largest excess over {byte_factor}x per dead letter {excess:,.0f} bytes (bound {PER_LETTER_BYTES:,})")

    assert not missing, f"{len(missing)} bad records were not dead-lettered, e.g. {[(expected[k][0].kind, k) for k in missing[:5]]}"
    assert not extra, f"{len(extra)} dead letters for no bad record, e.g. {extra[:5]}"
    assert not twice, f"{len(twice)} bad records were dead-lettered more than once, e.g. {twice[:5]}"
    assert not wrong, f"{len(wrong)} dead letters say the wrong thing, e.g. {wrong[:10]}"
    assert not several_copies, f"messages whose original is not held by exactly one dead letter: {several_copies[:5]}"
    assert len(letters) == len(expected) == dead_metric and dead_failures == 0
    assert {t: counted.get(t, 0) for t in valid_sent} == valid_sent, "the valid records were not each counted exactly once"
    assert {t: read.get(t, 0) for t in messages_sent} == messages_sent
    assert dlq_bytes <= byte_factor * hostile_bytes
    assert not over, f"{len(over)} messages whose dead letters are too large (kind, bytes in, dead letters, bytes out): {over[:5]}"


# -- the tests ----------------------------------------------------------------------------------


@pytest.fixture
def worker_for(kafka_bootstrap, unique_name, tmp_path, settings):
    """``worker_for(name)``: fresh uuid topics and a ready worker on them; stopped at the end."""
    started: list[WorkerProcess] = []

    def make(app: str):
        s = isolated(settings, kafka_bootstrap, unique_name, app)
        w = start_worker(s, tmp_path)
        started.append(w)
        w.wait_ready()
        return s, w

    yield make
    for w in started:
        w.stop()


def test_ten_thousand_hostile_messages_among_valid_traffic(worker_for, kafka_bootstrap):
    """Every bad record dead-lettered exactly once, every valid record counted exactly once, the worker alive."""
    s, worker = worker_for("soundcheck-hostile")
    gen = Hostile(seed=1234, now_ms=int(time.time() * 1000))
    hostile = gen.hostile(HOSTILE_MESSAGES)
    odd = [gen.odd_but_valid(gen.rng.choice(STREAMS)) for _ in range(300)]
    big = [
        gen.big_array("behavior", 6_000, 4_321, packed=False, records=lambda i: {
            "event_id": f"e{i}", "ts": gen.now_ms - 100_000 - i, "user_id": f"u{i % 1500}", "session_id": f"s{i % 1500}",
            "event_type": "login", "device_id": f"d{i % 1500}", "country": "US", "user_segment": "free"}),
        gen.big_array("audio", 20_000, 12_345, packed=True),
        gen.big_array("system", 50_000, 49_999, packed=True, records=lambda i: {
            "ts": gen.now_ms - 100_000 - i % 60_000, "service": f"svc{i % 40}", "region": "DE", "instance": f"svc{i % 40}-{i % 3}",
            "metrics": {"latency_p95_ms": 50 + i % 97, "error_rate": (i % 13) / 1000, "cpu_percent": 30 + i % 40}}),
    ]
    messages = hostile + odd + big + gen.valid_traffic()
    gen.rng.shuffle(messages)
    assert sum(1 for m in messages if m.bad) >= HOSTILE_MESSAGES
    assert all(len(m.value or b"") < TOPIC_MAX_BYTES for m in messages if not m.packed)

    started = time.monotonic()
    asyncio.run(_send(kafka_bootstrap, s.topics.inputs(), messages))
    print(f"\nsent {len(messages):,} messages in {time.monotonic() - started:.1f} s")
    _check(worker, s.topics.inputs(), s.topics.dead_letter, kafka_bootstrap, messages, "hostile mix", byte_factor=3.0)
    print(f"wall time from the first message sent: {time.monotonic() - started:.1f} s")
    assert worker.stop() == 0, f"the worker did not stop cleanly:\n{worker.log_tail()}"


def _fifty_thousand(gen: Hostile, case: str) -> Message:
    """One compressed message of 50,000 records in windows still open, one of them bad."""
    ts = lambda i: gen.now_ms - 60_000 + i % 500 * 100  # noqa: E731
    if case == "behaviour events of 5,000 users":  # 50,000 rows for the fraud topic
        return gen.big_array("behavior", 50_000, 31_337, packed=True, records=lambda i: {
            "event_id": f"e{i}", "ts": ts(i), "user_id": f"u{i % 5_000}", "session_id": f"s{i % 5_000}", "event_type": "play_start",
            "device_id": f"d{i % 5_000}", "country": "BR", "user_segment": "premium", "track_id": f"t{i % 700}", "artist_id": f"a{i % 90}"})
    base = gen.record("audio")  # audio samples from 50,000 CDN PoPs: 50,000 entities' partial aggregates
    return gen.big_array("audio", 50_000, 31_337, packed=True, records=lambda i: {**base, "event_id": f"e{i}", "ts": ts(i),
                                                                                    "cdn_pop": f"pop-{i}"})


@pytest.mark.parametrize("case", ["behaviour events of 5,000 users", "audio samples from 50,000 CDN PoPs"])
def test_a_compressed_array_of_fifty_thousand_records_with_one_bad(worker_for, kafka_bootstrap, case):
    """One message holding 50,000 valid records but one (it fits the topic once compressed): 49,999
    counted, one dead letter, and the worker goes on with the traffic after it."""
    s, worker = worker_for("soundcheck-hostile-big")
    gen = Hostile(seed=99, now_ms=int(time.time() * 1000))
    big = _fifty_thousand(gen, case)
    after = [gen.mixed_array(big.stream) for _ in range(20)] + [gen.unreadable(st) for st in STREAMS]
    messages = [big] + after + gen.valid_traffic()[:200]  # first: its records fall in windows still open

    started = time.monotonic()
    asyncio.run(_send(kafka_bootstrap, s.topics.inputs(), messages))
    _check(worker, s.topics.inputs(), s.topics.dead_letter, kafka_bootstrap, messages, f"50,000 {case} in one message",
           byte_factor=3.0)
    print(f"wall time from the first message sent: {time.monotonic() - started:.1f} s")
    assert worker.stop() == 0, f"the worker did not stop cleanly:\n{worker.log_tail()}"
