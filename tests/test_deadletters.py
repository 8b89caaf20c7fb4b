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


# ---------------------------------------------------------------------------------------------
# Fuzz: hostile values of every kind, alone or among valid records, through the decoder and the
# dead-letter path. Every bad record gets exactly one dead letter, every good one survives, and
# the dead letters of a message hold at most one copy of it.

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa: E402

_AUDIO = [r for b in Simulator(seed=8, rate=200, duration_s=3, start_ms=NOW - 10**6, plan=()).ticks()
          if b.stream == "audio" for r in b.records if isinstance(r, dict)]


def _nest(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _with(rec: dict, field: str, raw: bytes) -> bytes:
    """``rec`` as JSON with ``field`` set to the raw JSON text ``raw`` (which orjson may refuse to write)."""
    text = orjson.dumps({**rec, field: 0})
    marker = b'"' + field.encode() + b'":0'
    assert marker in text
    return text.replace(marker, b'"' + field.encode() + b'":' + raw, 1)


_HOSTILE = st.one_of(  # (JSON text of one element, kind) - each certainly invalid for the audio topic
    st.integers(2, 100_000).map(lambda d: ("deep", _nest(d))),  # (depth 1, `[]`, is an empty batch)
    st.tuples(st.integers(1, 50_000), st.sampled_from(["latency_ms", "event_id", "extra"])).map(
        lambda t: ("deep field", _with(_AUDIO[0], t[1], _nest(t[0])))),
    st.integers(0, 2_000_000).map(lambda n: ("huge ts", _with(_AUDIO[1], "ts", orjson.dumps("9" * n)))),
    st.sampled_from([b"1e400", b"-1e400", b"NaN", b"Infinity", b"-1", b"2", b'"fast"', b"true", b"null", b"{}"]).map(
        lambda raw: ("bad number", _with(_AUDIO[2], "buffering_ratio", raw))),
    st.sampled_from(["ts", "region", "event_id", "latency_ms"]).map(
        lambda f: ("missing", orjson.dumps({k: v for k, v in _AUDIO[3].items() if k != f}))),
    st.sampled_from([b"1", b'"x"', b"null", b"true", b"[{}]", b'"' + b"y" * 100_000 + b'"']).map(lambda raw: ("not an object", raw)),
    st.just(("wrong topic", orjson.dumps(_behaviour(1)[0]))),
)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(layout=st.lists(st.one_of(st.integers(0, len(_AUDIO) - 1), _HOSTILE), min_size=1, max_size=12),
       as_array=st.booleans())
def test_fuzz_every_bad_record_is_dead_lettered_once_and_every_good_one_survives(layout, as_array):
    if not as_array:
        layout = layout[:1]
    parts = [orjson.dumps(_AUDIO[x]) if isinstance(x, int) else x[1] for x in layout]
    value = b"[" + b",".join(parts) + b"]" if as_array else parts[0]
    hostile = [i for i, x in enumerate(layout) if not isinstance(x, int)]
    good, bad = load_contracts()["audio"].decode(value, now_ms=NOW)
    letters = _letters_for("audio", value, bad)
    assert len(good) == len(layout) - len(hostile)
    assert [g.event_id for g in good] == [_AUDIO[x]["event_id"] for x in layout if isinstance(x, int)]
    if as_array:
        assert sorted(d["index"] for d in letters) == hostile  # each bad element once, by its index
    else:
        assert len(letters) == len(hostile)
    assert all(len(d["reason"]) <= 300 for d in letters)
    assert sum(d["original_value_b64"] is not None for d in letters) <= 1  # one copy of the original at most
    # (text, base64 and the element itself: under 4x, plus a fixed envelope per letter)
    assert sum(len(orjson.dumps(d)) for d in letters) <= 4 * len(value) + 2_000 * len(letters)


@hsettings(max_examples=200, deadline=None)
@given(value=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_fuzz_arbitrary_bytes_never_raise_and_are_accounted_for(value):
    good, bad = load_contracts()["audio"].decode(value, now_ms=NOW)
    letters = _letters_for("audio", value, bad)
    assert len(letters) == len(bad) and (good or bad)  # nothing vanishes: a record is kept or dead-lettered
    assert sum(d["original_value_b64"] is not None for d in letters) <= 1


def _letters_for(stream: str, value: bytes, bad) -> list[dict]:
    out = [orjson.loads(x) for x in dead_letters(topic="t", partition=1, offset=9, timestamp_ms=None, key=None, value=value,
                                                  rejections=bad, stream=stream, now_ms=NOW)]
    for d in out:
        jsonschema.validate(d, SCHEMA)
    return out
