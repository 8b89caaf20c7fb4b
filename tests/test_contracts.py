import functools
import json
from dataclasses import fields
from pathlib import Path

import jsonschema
import orjson
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from soundcheck.contracts import RECORD_TYPES, SCHEMA_DIR, load_contracts, parse_ts
from soundcheck.simulator import Simulator

NOW = 1_700_000_000_000
CONTRACTS = load_contracts()
SCHEMAS = {s: json.loads((SCHEMA_DIR / f"{t}.schema.json").read_text()) for s, (t, _) in RECORD_TYPES.items()}


@functools.lru_cache(maxsize=None)
def _samples() -> dict:
    sim = Simulator(seed=5, rate=50, duration_s=11, start_ms=NOW - 60_000, users_per_region=20)
    out = {}
    for b in sim.ticks():
        out.setdefault(b.stream, b.records[0])
    return out


def sample(stream: str) -> dict:
    return dict(_samples()[stream])


@pytest.mark.parametrize("stream", ["audio", "behavior", "system"])
def test_records_have_exactly_the_schema_properties(stream):
    _, record_type = RECORD_TYPES[stream]
    assert {f.name for f in fields(record_type)} == set(SCHEMAS[stream]["properties"])


def test_every_schema_file_is_valid_json_schema():
    for path in Path(SCHEMA_DIR).glob("*.schema.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


@pytest.mark.parametrize("stream", ["audio", "behavior", "system"])
def test_simulated_records_pass_both_validators(stream):
    rec = sample(stream)
    jsonschema.validate(rec, SCHEMAS[stream])
    good, bad = CONTRACTS[stream].decode(orjson.dumps(rec), now_ms=NOW)
    assert len(good) == 1 and bad == []


def test_an_array_message_keeps_the_good_records_and_reports_each_bad_one_with_its_index():
    good = sample("audio")
    neg = {**good, "latency_ms": -1}
    missing = {k: v for k, v in good.items() if k != "region"}
    recs, bad = CONTRACTS["audio"].decode(orjson.dumps([good, neg, good, missing, 5]), now_ms=NOW)
    assert len(recs) == 2
    assert [(r.index, r.kind) for r in bad] == [(1, "impossible_value"), (3, "schema"), (4, "not_an_object")]
    assert "latency_ms" in bad[0].reason and "region" in bad[1].reason


@pytest.mark.parametrize(
    "raw, kind",
    [
        (b"{not json", "invalid_json"),
        (b'{"latency_ms": NaN}', "invalid_json"),
        (b'"a string"', "not_an_object"),
        (None, "invalid_json"),
    ],
)
def test_unreadable_messages_are_rejected_whole(raw, kind):
    recs, bad = CONTRACTS["audio"].decode(raw, now_ms=NOW)
    assert recs == [] and len(bad) == 1 and bad[0].kind == kind and bad[0].index is None


def test_far_future_event_time_is_rejected_and_rfc3339_is_accepted():
    rec = sample("system")
    future = {**rec, "ts": NOW + 3_600_000}
    _, bad = CONTRACTS["system"].decode(orjson.dumps(future), now_ms=NOW, max_future_ms=300_000)
    assert bad[0].kind == "future_ts"
    iso = {**rec, "ts": "2023-11-14T22:13:20+00:00"}
    good, bad = CONTRACTS["system"].decode(orjson.dumps(iso), now_ms=NOW)
    assert bad == [] and good[0].ts == 1_700_000_000_000
    for no_zone in ("2023-11-14T22:13:20", "2023-11-14", "20231114T221320Z"):
        _, bad = CONTRACTS["system"].decode(orjson.dumps({**rec, "ts": no_zone}), now_ms=NOW)
        assert "RFC 3339" in bad[0].reason


def test_unknown_system_metrics_are_kept_and_bad_ones_rejected():
    rec = {**sample("system"), "metrics": {"queue_depth": 12, "error_rate": 0.01}}
    good, _ = CONTRACTS["system"].decode(orjson.dumps(rec), now_ms=NOW)
    assert good[0].metrics == {"queue_depth": 12, "error_rate": 0.01}
    _, bad = CONTRACTS["system"].decode(orjson.dumps({**rec, "metrics": {"Bad Name": 1}}), now_ms=NOW)
    assert bad[0].kind == "schema"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**13) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@hsettings(max_examples=300, deadline=None)
@given(stream=st.sampled_from(["audio", "behavior", "system"]), field=st.text(max_size=12), value=json_values, drop=st.booleans())
def test_the_fast_validator_agrees_with_jsonschema(stream, field, value, drop):
    """Mutate one field of a valid record; both validators must accept or reject it alike."""
    rec = dict(sample(stream))
    keys = sorted(rec)
    name = keys[sum(map(ord, field)) % len(keys)] if field else field
    if drop and name in rec:
        del rec[name]
    else:
        rec[name] = value
    ours_ok = not CONTRACTS[stream].decode(orjson.dumps(rec), now_ms=10**18, max_future_ms=10**18)[1]
    theirs_ok = jsonschema.Draft202012Validator(SCHEMAS[stream], format_checker=jsonschema.FormatChecker()).is_valid(rec)
    if ours_ok != theirs_ok:
        # the one deliberate difference: an explicit null for an optional field means absent
        assert value is None and name not in SCHEMAS[stream]["required"], (rec, ours_ok, theirs_ok)


def test_parse_ts_rejects_booleans_and_fractions():
    for v in (True, 1.5, "yesterday", [1]):
        with pytest.raises(Exception):
            parse_ts(v)
