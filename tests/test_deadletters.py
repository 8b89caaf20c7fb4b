"""Dead letters are bounded and lossless, and a record our own code fails on costs only itself."""

from __future__ import annotations

import hashlib
import json

import jsonschema
import numpy as np
import orjson
import pytest

from soundcheck.ingest.contracts import SCHEMA_DIR, load_contracts
from soundcheck.ingest.deadletters import MAX_ORIGINAL, dead_letters
from soundcheck.evaluation.simulator import Simulator

NOW = 1_700_000_000_000
SCHEMA = json.loads((SCHEMA_DIR / "dead_letter.schema.json").read_text())


def _letters(stream: str, value: bytes) -> list[dict]:
    _, bad = load_contracts()[stream].decode(value, now_ms=NOW)
    out = [orjson.loads(x) for x in dead_letters(topic="t", partition=1, offset=9, timestamp_ms=None, key=b"k", value=value,
                                                  rejections=bad, stream=stream, now_ms=NOW)]
    for d in out:
        jsonschema.validate(d, SCHEMA)
    return out


def _behaviour(n: int) -> list[dict]:
    sim = Simulator(seed=3, rate=400, duration_s=max(2, n // 200), start_ms=NOW - 10**6, plan=())
    return [r for b in sim.ticks() if b.stream == "behavior" for r in b.records if isinstance(r, dict)][:n]


def test_a_large_array_on_the_wrong_topic_costs_a_small_multiple_of_its_size():
    records = _behaviour(5_000)
    value = orjson.dumps(records)  # behaviour events sent to the system topic: every record is bad
    letters = _letters("system", value)
    assert len(letters) == len(records)
    total = sum(len(orjson.dumps(d)) for d in letters)
    assert total < 4 * len(value), (total, len(value))
    assert sum(d["original_value_b64"] is not None for d in letters) == 1  # one copy of the original
    assert all(d["original_sha256"] == hashlib.sha256(value).hexdigest() for d in letters)


def test_a_huge_record_is_kept_truncated_with_its_size_and_hash():
    rec = {**_behaviour(1)[0], "error_code": "x" * 5_000_000}
    value = orjson.dumps(rec)
    (d,) = _letters("behavior", value)
    assert d["original_size"] == len(value) and d["original_truncated"] is True
    assert len(orjson.dumps(d)) < 1_000_000  # fits a topic with the default 1 MB limit
    kept = __import__("base64").b64decode(d["original_value_b64"])
    assert kept == value[:MAX_ORIGINAL] and d["original_sha256"] == hashlib.sha256(value).hexdigest()


@pytest.mark.parametrize("depth", [300, 1_000, 100_000])
def test_deep_nesting_is_a_bounded_rejection_and_a_dead_letter(depth):
    rec = {**_behaviour(1)[0]}
    nested = b"[" * depth + b"]" * depth
    value = orjson.dumps([rec])[:-1] + b"," + orjson.dumps(rec)[:-1] + b',"artist_id":' + nested + b"}]"
    letters = _letters("behavior", value)
    assert len(letters) == 1 and letters[0]["index"] == 1 and len(letters[0]["reason"]) < 300


def test_a_record_our_code_fails_on_is_set_apart_and_its_neighbours_go_on(settings, monkeypatch):
    from soundcheck.ingest import partials
    from soundcheck.pipeline import IngestStage

    ing = IngestStage(settings, "audio")
    sim = Simulator(seed=4, rate=100, duration_s=40, start_ms=NOW, plan=())
    recs = [r for b in sim.ticks() if b.stream == "audio" for r in load_contracts()["audio"].decode(orjson.dumps(b.records), now_ms=NOW + 10**8)[0]]
    poison = recs[17]
    original = partials.PartitionAggregator._add_audio

    def failing(self, records, offsets):
        if any(r is poison for r in records):
            raise ZeroDivisionError("a bug of ours")
        return original(self, records, offsets)

    monkeypatch.setattr(partials.PartitionAggregator, "_add_audio", failing)
    out, failed = ing.process_safely(0, recs, np.arange(len(recs)), now=float("inf"))
    assert [j for j, _ in failed] == [17] and "ZeroDivisionError" in failed[0][1]
    from soundcheck.pipeline import decode_internal

    sent = out + ing.flush()
    counted = sum(p.count for m in sent if m.topic == "aggregates" for p in decode_internal(m.value)["partials"]
                  if p.key[0] == "region")
    assert counted == len(recs) - 1  # every other record counted once, in its region's window
