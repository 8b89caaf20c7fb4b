import functools
import json
import math
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from soundcheck.ingest.contracts import (
    RECORD_TYPES,
    REJECTION_KINDS,
    SCHEMA_DIR,
    AudioQualitySample,
    Contract,
    SchemaLoadError,
    SystemPerformanceSample,
    UserBehaviorEvent,
    load_contracts,
    parse_ts,
)
from soundcheck.evaluation.simulator import Simulator

NOW = 1_700_000_000_000
STREAMS = ("audio", "behavior", "system")
CONTRACTS = load_contracts()
SCHEMAS = {s: json.loads((SCHEMA_DIR / f"{t}.schema.json").read_text()) for s, (t, _) in RECORD_TYPES.items()}
VALIDATORS = {s: jsonschema.Draft202012Validator(SCHEMAS[s], format_checker=jsonschema.FormatChecker()) for s in STREAMS}
ANNOTATIONS = {"description", "title", "examples", "$comment"}
NO_FUTURE = {"now_ms": 10**4400, "max_future_ms": 0}  # beyond any event time JSON can hold: no future_ts


@functools.lru_cache(maxsize=None)
def _samples() -> dict:
    sim = Simulator(seed=5, rate=50, duration_s=11, start_ms=NOW - 60_000, users_per_region=20)
    out = {}
    for b in sim.ticks():
        out.setdefault(b.stream, b.records[0])
    return out


def sample(stream: str) -> dict:
    return dict(_samples()[stream])


# ---------------------------------------------------------------------------------------------
# The oracle: jsonschema on the schema files, with the contract's three deliberate differences


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer beyond the largest double
        return False


def _before_1970(ts: str) -> bool:
    try:
        return datetime.fromisoformat(ts.upper().removesuffix("\n")) < datetime(1970, 1, 1, tzinfo=timezone.utc)
    except OverflowError:  # (year 9999 and a negative offset: far after 1970)
        return False


def expected_ok(stream: str, rec) -> bool:
    """Whether the contract must accept ``rec`` (a parsed JSON value): what jsonschema says, except
    1. an explicit null for an optional field means absent;
    2. a number must be a finite double where the schema says number (JSON's 1e400, which Python's
       json reads as inf, or an integer beyond 1.8e308: impossible_value);
    3. event time as an RFC 3339 string before 1970 is refused (the integer form has minimum 0)."""
    schema = SCHEMAS[stream]
    if isinstance(rec, dict):
        optional = set(schema["properties"]) - set(schema["required"])
        rec = {k: v for k, v in rec.items() if not (v is None and k in optional)}
    if not VALIDATORS[stream].is_valid(rec):
        return False
    for k, v in rec.items():
        spec = schema["properties"][k]
        if spec.get("type") == "number" and not _finite(v):
            return False
        if spec.get("type") == "object" and not all(map(_finite, v.values())):
            return False
    return not (isinstance(rec["ts"], str) and _before_1970(rec["ts"]))


def _int(text: str):
    """An integer as Python's json reads it, or inf beyond the 4,300 digits Python converts (out of range, 2.)."""
    return int(text) if len(text.lstrip("-")) <= 4300 else (-math.inf if text.startswith("-") else math.inf)


class Raw(str):
    """JSON text to put in a message as is (1e400, very deep or very long values)."""


def enc(v) -> str:
    """JSON text of ``v``; unlike json.dumps it writes inf as 1e400 and passes :class:`Raw` through."""
    if isinstance(v, Raw):
        return str(v)
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("1e400" if v > 0 else "-1e400")
    if isinstance(v, (int, str)):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ",".join(map(enc, v)) + "]"
    return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + enc(x) for k, x in v.items()) + "}"


def check_message(stream: str, data: bytes) -> tuple[list, list]:
    """Decode ``data`` and compare each verdict with :func:`expected_ok` on the same bytes."""
    recs, bad = CONTRACTS[stream].decode(data, **NO_FUTURE)
    doc = json.loads(data, parse_int=_int)
    if isinstance(doc, list):
        verdicts = [expected_ok(stream, e) for e in doc]
        assert sorted(r.index for r in bad) == [i for i, ok in enumerate(verdicts) if not ok], (doc, bad)
        assert len(recs) == sum(verdicts)
        accepted = [e for e, ok in zip(doc, verdicts) if ok]
    else:
        ok = expected_ok(stream, doc)
        assert (len(recs), len(bad)) == ((1, 0) if ok else (0, 1)), (doc, bad)
        assert all(r.index is None for r in bad)
        accepted = [doc] if ok else []
    for r in bad:
        assert r.kind in REJECTION_KINDS and len(r.reason) <= 300, r
    integers = [k for k, s in SCHEMAS[stream]["properties"].items() if s.get("type") == "integer"]
    for rec, src in zip(recs, accepted):
        assert type(rec.ts) is int
        assert all(getattr(rec, k) is None or type(getattr(rec, k)) is int for k in integers)
        for k, v in src.items():
            if k != "ts" and v is not None:
                got = getattr(rec, k)
                assert got == v or float(got) == float(v), (k, got, v)
    return recs, bad


# ---------------------------------------------------------------------------------------------
# The records


@pytest.mark.parametrize("stream", STREAMS)
def test_records_have_exactly_the_schema_properties(stream):
    _, record_type = RECORD_TYPES[stream]
    assert issubclass(record_type, msgspec.Struct)
    assert {f.name for f in msgspec.structs.fields(record_type)} == set(SCHEMAS[stream]["properties"])
    optional = set(SCHEMAS[stream]["properties"]) - set(SCHEMAS[stream]["required"])
    assert {f.name for f in msgspec.structs.fields(record_type) if f.default is None} == optional


@pytest.mark.parametrize("stream", STREAMS)
def test_the_structs_carry_the_schema_constraints(stream):
    """msgspec's own JSON Schema of each generated Struct states the file's constraints."""
    schema = SCHEMAS[stream]
    ours = msgspec.json.schema(RECORD_TYPES[stream][1])
    ours = next(iter(ours["$defs"].values()))
    assert ours["required"] == [k for k in schema["properties"] if k in schema["required"]]
    assert ours["additionalProperties"] is schema["additionalProperties"]

    def bare(spec):
        spec = {k: v for k, v in spec.items() if k not in ANNOTATIONS and k != "default"}
        branches = [b for b in spec.get("anyOf", ()) if b != {"type": "null"}]
        return branches[0] if len(branches) == 1 else {**spec, "anyOf": branches} if branches else spec

    for name, spec in schema["properties"].items():
        got, want = bare(ours["properties"][name]), bare(spec)
        if "oneOf" in want:  # event time: an integer (or an integral float) with its bounds, or a string
            whole = next(b for b in want["oneOf"] if b["type"] == "integer")
            assert got["anyOf"] == [whole, {**whole, "type": "number"}, {"type": "string"}], name
        elif want.get("type") == "integer":  # an integer, or an integral float (checked after decoding)
            assert got["anyOf"] == [want, {**want, "type": "number"}], name
        elif "enum" in want:  # (msgspec lists the values sorted)
            assert got == {"enum": sorted(want["enum"])}, name
        elif want.get("type") == "object":  # the name pattern and the narrower entries are checked after decoding
            assert got == {k: v for k, v in want.items() if k not in ("propertyNames", "properties")}, name
        else:
            assert got == want, name


def test_records_are_built_and_read_like_before():
    e = UserBehaviorEvent(event_id="e", ts=1, user_id="u", session_id="s", event_type="skip", device_id="d",
                          country="US", user_segment="free", artist_id="ar-1")
    assert (e.ts, e.artist_id, e.listen_ms, e.amount) == (1, "ar-1", None, None)
    assert e == UserBehaviorEvent(**msgspec.structs.asdict(e))
    s = SystemPerformanceSample(ts=5, service="cdn", region="BR", metrics={"error_rate": 0.1})
    assert s.metrics["error_rate"] == 0.1 and s.instance is None
    with pytest.raises(TypeError):
        AudioQualitySample(event_id="x")  # required fields stay required


def test_every_schema_file_is_valid_json_schema():
    for path in Path(SCHEMA_DIR).glob("*.schema.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


@pytest.mark.parametrize("stream", STREAMS)
def test_simulated_records_pass_both_validators(stream):
    rec = sample(stream)
    jsonschema.validate(rec, SCHEMAS[stream])
    good, bad = CONTRACTS[stream].decode(orjson.dumps(rec), now_ms=NOW)
    assert len(good) == 1 and bad == []
    assert type(good[0]) is RECORD_TYPES[stream][1] and good[0].ts == rec["ts"]


# ---------------------------------------------------------------------------------------------
# The schema files stay the contract


def _schema_dir(tmp_path: Path, edit=None) -> Path:
    for p in SCHEMA_DIR.glob("*.schema.json"):
        shutil.copy(p, tmp_path / p.name)
    if edit:
        name, change = edit
        doc = json.loads((tmp_path / name).read_text())
        change(doc)
        (tmp_path / name).write_text(json.dumps(doc))
    return tmp_path


def test_a_changed_schema_file_changes_the_records(tmp_path):
    def tighten(doc):
        doc["properties"]["latency_ms"]["maximum"] = 500

    contracts = load_contracts(_schema_dir(tmp_path, ("audio_quality_metrics.schema.json", tighten)))
    assert contracts["audio"].record_type is not AudioQualitySample
    assert contracts["system"].record_type is SystemPerformanceSample  # unchanged file, same type
    value = orjson.dumps({**sample("audio"), "latency_ms": 600})
    assert CONTRACTS["audio"].decode(value, now_ms=NOW)[1] == []
    _, bad = contracts["audio"].decode(value, now_ms=NOW)
    assert (bad[0].kind, bad[0].reason) == ("impossible_value", "latency_ms: 600 is above the maximum 500")


@pytest.mark.parametrize(
    "name, change",
    [
        ("audio_quality_metrics.schema.json", lambda d: d["properties"]["latency_ms"].update(multipleOf=2)),
        ("audio_quality_metrics.schema.json", lambda d: d["properties"]["codec"].update(format="email")),
        ("audio_quality_metrics.schema.json", lambda d: d["properties"]["device"].update(enum=[1, 2])),
        ("audio_quality_metrics.schema.json", lambda d: d["properties"]["region"].update(oneOf=[{"type": "string"}, {"type": "integer"}])),
        ("audio_quality_metrics.schema.json", lambda d: d.update(additionalProperties={"type": "string"})),
        ("audio_quality_metrics.schema.json", lambda d: d["required"].append("nothing")),
        ("user_behavior_events.schema.json", lambda d: d["required"].remove("ts")),
        ("system_performance_metrics.schema.json", lambda d: d["properties"]["metrics"]["properties"]["error_rate"].update(maximum=2e12)),
        ("system_performance_metrics.schema.json", lambda d: d["properties"]["metrics"]["propertyNames"].update(pattern="([")),
    ],
)
def test_a_schema_the_generator_cannot_follow_is_a_load_error(tmp_path, name, change):
    with pytest.raises(SchemaLoadError):
        load_contracts(_schema_dir(tmp_path, (name, change)))


def test_a_record_type_that_does_not_match_its_schema_is_a_load_error():
    with pytest.raises(SchemaLoadError):
        Contract("audio", SCHEMAS["audio"], SystemPerformanceSample)


# ---------------------------------------------------------------------------------------------
# Decoding


def test_an_array_message_keeps_the_good_records_and_reports_each_bad_one_with_its_index():
    good = sample("audio")
    neg = {**good, "latency_ms": -1}
    missing = {k: v for k, v in good.items() if k != "region"}
    recs, bad = CONTRACTS["audio"].decode(orjson.dumps([good, neg, good, missing, 5]), now_ms=NOW)
    assert len(recs) == 2
    assert [(r.index, r.kind) for r in bad] == [(1, "impossible_value"), (3, "schema"), (4, "not_an_object")]
    assert bad[0].reason == "latency_ms: -1 is below the minimum 0"
    assert bad[1].reason == "region: required field is missing"
    assert bad[2].reason == "expected a JSON object, got integer"


def test_a_rejected_array_element_goes_to_the_dead_letter_as_json():
    """The dead letters of a message keep each rejected element under "record", and one copy of the original."""
    from soundcheck.ingest.deadletters import dead_letters

    good = sample("audio")
    elements = [good, {**good, "device": "tv"}, ["not", "an", "object"], {**good, "ts": NOW + 10**9}]
    raw = orjson.dumps(elements)
    _, bad = CONTRACTS["audio"].decode(raw, now_ms=NOW)
    assert [r.index for r in bad] == [1, 2, 3]
    letters = [orjson.loads(x) for x in dead_letters(topic="t", partition=0, offset=1, timestamp_ms=None, key=None,
                                                      value=raw, rejections=bad, stream="audio", now_ms=NOW)]
    assert [d["record"] for d in letters] == [elements[r.index] for r in bad]
    assert [d["original_value_b64"] is not None for d in letters] == [True, False, False]  # one copy per message
    assert [d["original_in"] for d in letters] == [None, {"index": 1}, {"index": 1}]
    _, bad = CONTRACTS["audio"].decode(orjson.dumps({**good, "device": "tv"}), now_ms=NOW)
    assert bad[0].index is None and bad[0].item is None  # a single object: the dead letter has the whole value


@pytest.mark.parametrize(
    "raw, kind",
    [
        (b"{not json", "invalid_json"),
        (b'{"latency_ms": NaN}', "invalid_json"),
        (b'"a string"', "not_an_object"),
        (None, "invalid_json"),
        (b"", "invalid_json"),
        (b"  ", "invalid_json"),
        (b"5", "not_an_object"),
        (b"null", "not_an_object"),
        (b"[{}, 1", "invalid_json"),
        (b'[{"a": 1}] x', "invalid_json"),
        (b'{"latency_ms": -1, "oops', "invalid_json"),  # refused at latency_ms, but not JSON at all
        (b'{"event_id": "\xff"}', "invalid_json"),
    ],
)
def test_unreadable_messages_are_rejected_whole(raw, kind):
    recs, bad = CONTRACTS["audio"].decode(raw, now_ms=NOW)
    assert recs == [] and len(bad) == 1 and bad[0].kind == kind and bad[0].index is None


def test_an_element_that_is_not_json_costs_only_itself():
    good = orjson.dumps(sample("audio"))
    for bad, kind in ((b"NaN", "invalid_json"), (b'{"latency_ms": NaN}', "invalid_json"), (b'"\xff"', "invalid_json"),
                      (b"{oops}", "invalid_json"), (b"[" * 5000 + b"]" * 5000, "not_an_object")):
        recs, rejected = CONTRACTS["audio"].decode(b"[" + good + b", " + bad + b", " + good + b"]", now_ms=NOW)
        assert len(recs) == 2 and [(r.index, r.kind) for r in rejected] == [(1, kind)], (bad, rejected)
    recs, rejected = CONTRACTS["audio"].decode(b'[{"latency_ms": -1}, "\xff"]', now_ms=NOW)
    assert recs == [] and [(r.index, r.kind) for r in rejected] == [(0, "impossible_value"), (1, "invalid_json")]


def test_whitespace_around_a_message_is_fine():
    rec = sample("audio")
    for value in (b" \n" + orjson.dumps(rec) + b"\n", b"\t[" + orjson.dumps(rec) + b"] "):
        recs, bad = CONTRACTS["audio"].decode(value, now_ms=NOW)
        assert len(recs) == 1 and bad == []


def test_far_future_event_time_is_rejected_and_rfc3339_is_accepted():
    rec = sample("system")
    future = {**rec, "ts": NOW + 3_600_000}
    _, bad = CONTRACTS["system"].decode(orjson.dumps(future), now_ms=NOW, max_future_ms=300_000)
    assert bad[0].kind == "future_ts" and bad[0].reason == "ts: 1700003600000 is 3600 s in the future (limit 300 s)"
    iso = {**rec, "ts": "2023-11-14T22:13:20+00:00"}
    good, bad = CONTRACTS["system"].decode(orjson.dumps(iso), now_ms=NOW)
    assert bad == [] and good[0].ts == 1_700_000_000_000
    for no_zone in ("2023-11-14T22:13:20", "2023-11-14", "20231114T221320Z"):
        _, bad = CONTRACTS["system"].decode(orjson.dumps({**rec, "ts": no_zone}), now_ms=NOW)
        assert "RFC 3339" in bad[0].reason


def test_event_time_in_an_array_is_converted_record_by_record():
    rec = sample("behavior")
    elements = [{**rec, "ts": NOW - 5}, {**rec, "ts": "2023-11-14T22:13:20.25Z"}, {**rec, "ts": 1.7e12},
                {**rec, "ts": 1.5}, {**rec, "ts": "1969-12-31T23:59:59Z"}, {**rec, "ts": NOW + 10**7}, {**rec, "ts": -1}]
    recs, bad = CONTRACTS["behavior"].decode(orjson.dumps(elements), now_ms=NOW)
    assert [r.ts for r in recs] == [NOW - 5, 1_700_000_000_250, 1_700_000_000_000]
    assert [(r.index, r.kind) for r in bad] == [(3, "schema"), (4, "impossible_value"), (5, "future_ts"), (6, "impossible_value")]
    assert bad[0].reason == "ts: epoch milliseconds must be an integer, got 1.5"
    assert bad[3].reason == "ts: -1 is below the minimum 0"


def test_integral_floats_are_integers():
    rec = {**sample("behavior"), "listen_ms": 1500.0, "track_duration_ms": 2e5}
    recs, bad = CONTRACTS["behavior"].decode(orjson.dumps(rec), now_ms=NOW)
    assert bad == [] and (recs[0].listen_ms, recs[0].track_duration_ms) == (1500, 200000)
    assert type(recs[0].listen_ms) is int
    _, bad = CONTRACTS["behavior"].decode(orjson.dumps({**rec, "listen_ms": 1.5}), now_ms=NOW)
    assert (bad[0].kind, bad[0].reason) == ("schema", "listen_ms: expected integer, got 1.5")
    _, bad = CONTRACTS["behavior"].decode(orjson.dumps({**rec, "track_duration_ms": 0}), now_ms=NOW)
    assert (bad[0].kind, bad[0].reason) == ("impossible_value", "track_duration_ms: 0 must be above 0")


def test_unknown_system_metrics_are_kept_and_bad_ones_rejected():
    rec = {**sample("system"), "metrics": {"queue_depth": 12, "error_rate": 0.01}}
    good, _ = CONTRACTS["system"].decode(orjson.dumps(rec), now_ms=NOW)
    assert good[0].metrics == {"queue_depth": 12, "error_rate": 0.01}
    for metrics, kind, reason in [
        ({"Bad Name": 1}, "schema", 'metrics: entry name "Bad Name" does not match ^[a-z0-9_]{1,64}$'),
        ({"error_rate": 1.5}, "impossible_value", "metrics.error_rate: 1.5 is above the maximum 1"),
        ({"cpu_percent": 100.5}, "impossible_value", "metrics.cpu_percent: 100.5 is above the maximum 100"),
        ({"memory_percent": -3}, "impossible_value", "metrics.memory_percent: -3 is below the minimum 0"),
        ({"queue_depth": 2e12}, "impossible_value", "metrics.queue_depth: 2000000000000.0 is above the maximum 1000000000000"),
        ({"queue_depth": "12"}, "schema", 'metrics.queue_depth: expected number, got string "12"'),
        ({}, "schema", "metrics: needs at least 1 entries"),
        ({f"m{i}": 1 for i in range(65)}, "schema", "metrics: more than 64 entries"),
    ]:
        for value in (orjson.dumps({**rec, "metrics": metrics}), orjson.dumps([rec, {**rec, "metrics": metrics}])):
            recs, bad = CONTRACTS["system"].decode(value, now_ms=NOW)
            assert [(r.kind, r.reason) for r in bad] == [(kind, reason)], metrics
            assert len(recs) == value.startswith(b"[")


@pytest.mark.parametrize(
    "change, kind, reason",
    [
        ({"event_id": ""}, "schema", "event_id: must not be empty"),
        ({"region": "B"}, "schema", "region: shorter than 2 characters"),
        ({"codec": "x" * 40}, "schema", "codec: longer than 32 characters"),
        ({"device": "tv"}, "schema", 'device: "tv" is not one of ios, android, web, desktop, car, speaker'),
        ({"device": 7}, "schema", "device: 7 is not one of ios, android, web, desktop, car, speaker"),
        ({"latency_ms": "slow"}, "schema", 'latency_ms: expected number, got string "slow"'),
        ({"latency_ms": None}, "schema", "latency_ms: expected number, got null"),
        ({"latency_ms": True}, "schema", "latency_ms: expected number, got boolean true"),
        ({"buffering_ratio": 1.7}, "impossible_value", "buffering_ratio: 1.7 is above the maximum 1"),
        ({"requested_bitrate_kbps": 0}, "impossible_value", "requested_bitrate_kbps: 0 must be above 0"),
        ({"ts": "yesterday"}, "schema", 'ts: "yesterday" is not an RFC 3339 date-time with a time zone'),
        ({"ts": [1]}, "schema", "ts: expected epoch milliseconds or an RFC 3339 string, got array [1]"),
        ({"surprise": 1}, "schema", "surprise: unknown field"),
        ({"codec": None}, None, None),  # an explicit null for an optional field means absent
    ],
)
def test_reasons_name_the_field_and_the_value(change, kind, reason):
    rec = {**sample("audio"), **change}
    recs, bad = CONTRACTS["audio"].decode(orjson.dumps(rec), now_ms=NOW)
    assert [(r.kind, r.reason) for r in bad] == ([(kind, reason)] if kind else [])
    recs, bad = CONTRACTS["audio"].decode(b"[" + enc(1e400).encode() + b", " + orjson.dumps(rec) + b"]", now_ms=NOW)
    assert [(r.kind, r.reason) for r in bad[1:]] == ([(kind, reason)] if kind else [])
    assert bad[0].kind == "not_an_object" and bad[0].index == 0


def test_a_number_beyond_the_largest_double_is_out_of_range():
    rec = sample("behavior")
    for value in ("1e400", "-1e400", "1" + "0" * 400):
        raw = orjson.dumps(rec)[:-1] + b',"amount":' + value.encode() + b"}"
        recs, bad = CONTRACTS["behavior"].decode(raw, now_ms=NOW)
        assert recs == [] and bad[0].kind == "impossible_value" and bad[0].reason.startswith("amount: ")
    raw = orjson.dumps(rec)[:-1] + b',"listen_ms":' + b"1" * 5000 + b"}"  # more digits than Python reads
    assert CONTRACTS["behavior"].decode(raw, now_ms=NOW)[1][0].kind == "impossible_value"


# ---------------------------------------------------------------------------------------------
# Hostile messages: bounded rejections, never RecursionError or MemoryError


def test_deep_nesting_and_huge_values_give_bounded_rejections():
    audio, system = sample("audio"), sample("system")
    deep, very_deep = Raw("[" * 1000 + "]" * 1000), Raw("[" * 100_000 + "]" * 100_000)
    big = "x" * 5_000_000
    cases = [  # (stream, message, whether it holds two good records around one bad one)
        ("audio", deep, False),
        ("audio", very_deep, False),
        ("audio", Raw("[" * 100_000), False),
        ("audio", Raw("{" * 1000), False),
        ("audio", [audio, deep, audio], True),
        ("audio", [audio, very_deep, audio], True),
        ("audio", {**audio, "latency_ms": deep}, False),
        ("audio", {**audio, "extra": very_deep}, False),
        ("audio", [audio, {**audio, "extra": very_deep}, audio], True),
        ("audio", [audio, {**audio, "latency_ms": very_deep}, audio], True),
        ("audio", {**audio, "event_id": big}, False),
        ("audio", {**audio, "codec": big}, False),
        ("audio", {**audio, "device": big}, False),
        ("audio", {**audio, big: 1}, False),
        ("audio", [audio, {**audio, "ts": big}, audio], True),
        ("audio", [audio, {**audio, "ts": "2023-11-14T22:13:20." + "1" * 1_000_000 + "Z"}, audio], False),  # valid!
        ("audio", big, False),
        ("system", {**system, "metrics": {big: 1}}, False),
        ("system", {**system, "metrics": {"a": deep}}, False),
        ("system", [system, {**system, "metrics": {"a": very_deep}}, system], True),
        ("system", {**system, "metrics": {"a": Raw("1" * 5000)}}, False),
    ]
    for stream, doc, neighbours in cases:
        recs, bad = CONTRACTS[stream].decode(enc(doc).encode(), now_ms=NOW)
        assert all(r.kind in REJECTION_KINDS and len(r.reason) <= 200 for r in bad), (stream, bad)
        assert all(r.item is None or len(orjson.dumps(r.item)) <= 64 * 1024 for r in bad)
        if neighbours:
            assert len(recs) == 2 and [r.index for r in bad] == [1], bad  # the good neighbours survive
        elif isinstance(doc, list):
            assert len(recs) == 3 and bad == []
        else:
            assert recs == [] and len(bad) == 1


def test_an_array_of_50000_records_with_one_bad_one():
    rec = sample("audio")
    elements = [rec] * 50_000
    elements[31_337] = {**rec, "buffering_ratio": 2}
    recs, bad = CONTRACTS["audio"].decode(orjson.dumps(elements), now_ms=NOW)
    assert len(recs) == 49_999
    assert [(r.index, r.kind, r.reason) for r in bad] == [(31_337, "impossible_value", "buffering_ratio: 2 is above the maximum 1")]


# ---------------------------------------------------------------------------------------------
# Property tests: the decoder accepts and refuses what jsonschema does (with the differences above)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**13) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@hsettings(max_examples=300, deadline=None)
@given(stream=st.sampled_from(STREAMS), field=st.text(max_size=12), value=json_values, drop=st.booleans())
def test_the_decoder_agrees_with_jsonschema_on_mutated_samples(stream, field, value, drop):
    """Mutate one field of a valid record; the decoder and jsonschema must accept or reject it alike."""
    rec = dict(sample(stream))
    keys = sorted(rec)
    name = keys[sum(map(ord, field)) % len(keys)] if field else field
    if drop and name in rec:
        del rec[name]
    else:
        rec[name] = value
    check_message(stream, orjson.dumps(rec))


@st.composite
def rfc3339(draw) -> str:
    """Date-times in and around RFC 3339: any case, fraction, offset; some days that do not exist."""
    year = draw(st.integers(1970, 2100) | st.integers(0, 9999))
    parts = [draw(st.integers(1, 12)), draw(st.integers(1, 31))] + [draw(st.integers(0, n)) for n in (23, 59, 59)]
    frac = draw(st.sampled_from(["", ".5", ".123", ".1234567", ".0001", ".999999", ".9999999"]))
    zone = draw(st.sampled_from(["Z", "z", "+00:00", "-05:30", "+23:59", "-23:59", "+01:00", "", "+24:00", "+0100"]))
    sep = draw(st.sampled_from(["T", "t", "T", " "]))
    text = f"{year:04d}-{parts[0]:02d}-{parts[1]:02d}{sep}{parts[2]:02d}:{parts[3]:02d}:{parts[4]:02d}{frac}{zone}"
    return text + draw(st.sampled_from(["", "", "", "\n", "x"]))


def _numbers(spec, integer: bool):
    lo = spec.get("minimum", spec.get("exclusiveMinimum", -1e15))
    hi = spec.get("maximum", spec.get("exclusiveMaximum", 1e15))
    whole = st.integers(math.ceil(lo), math.floor(hi))
    if integer:
        return whole | whole.filter(lambda v: abs(v) < 2**53).map(float)
    return whole | st.floats(lo, hi, exclude_min="exclusiveMinimum" in spec)


def _value(spec):
    if "oneOf" in spec:
        return st.integers(0, 2**64) | st.integers(0, 2 * NOW).map(float) | rfc3339()
    if "enum" in spec:
        return st.sampled_from(spec["enum"])
    t = spec["type"]
    if t == "string":
        lo, hi = spec.get("minLength", 0), min(spec.get("maxLength", 40), 40)
        if "pattern" in spec:
            return st.from_regex(spec["pattern"], fullmatch=True).filter(lambda s: lo <= len(s) <= spec.get("maxLength", 10**9))
        return st.text(min_size=lo, max_size=max(lo, hi))
    if t in ("number", "integer"):
        return _numbers(spec, t == "integer")
    names = st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True) | st.sampled_from(sorted(spec.get("properties", {})))
    values = _numbers(spec["additionalProperties"], False)

    def narrow(entries):
        return st.fixed_dictionaries(
            {k: _numbers(spec["properties"].get(k, spec["additionalProperties"]), False) for k in entries}
        )

    return st.dictionaries(names, values, min_size=1, max_size=8).flatmap(lambda d: narrow(d))


@functools.lru_cache(maxsize=None)
def _field_values(stream: str) -> dict:
    return {k: _value(s) for k, s in SCHEMAS[stream]["properties"].items()}


@st.composite
def records(draw, stream: str) -> dict:
    """A record as the schema describes it (some optional fields left out)."""
    schema = SCHEMAS[stream]
    rec = {}
    for name, values in _field_values(stream).items():
        if name in schema["required"] or draw(st.booleans()):
            rec[name] = draw(values)
    return rec


NASTY = st.sampled_from([
    None, True, False, 0, -1, -0.5, 0.0, -0.0, 1.0, 1.5, 7, 100, 101, 1e12, 1e12 + 1, 2e12, 10**13, 10**30,
    10**400, -(10**400), math.inf, -math.inf, 1.7e12, 1e300, 5e-324, "", "x", "ab", "abc", "tv", "web", "WEB",
    "US", "Bad Name", "abc\n", "cdn", "a" * 65, "a" * 300, "2023-11-14T22:13:20Z", "2023-11-14T22:13:20Z\n",
    "1969-12-31T23:59:59.999Z", "1970-01-01T00:00:00Z", "2023-02-29T00:00:00Z", "2024-02-29T00:00:00Z",
    "2023-11-14T22:13:60Z", "0000-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59", "\u0661\u0669\u0667\u0660-01-01T00:00:00Z",
    [], {}, [1], {"a": 1}, Raw("[" * 200 + "]" * 200), Raw('{"a":' * 100 + "1" + "}" * 100), Raw('"' + "y" * 70_000 + '"'),
    Raw("1" * 4301),
]) | json_values


@st.composite
def mutated(draw, stream: str):
    """A generated record with up to three mutations: a field dropped, set to a hostile value or
    null, an extra field, a changed metric; or not an object at all."""
    rec = draw(records(stream))
    props = sorted(SCHEMAS[stream]["properties"])
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "set", "set", "null", "extra", "metric", "whole"]))
        if op == "drop" and rec:
            del rec[draw(st.sampled_from(sorted(rec)))]
        elif op == "set":  # a hostile value, or one meant for another field
            other = SCHEMAS[stream]["properties"][draw(st.sampled_from(props))]
            rec[draw(st.sampled_from(props))] = draw(NASTY | _value(other))
        elif op == "null":
            rec[draw(st.sampled_from(props))] = None
        elif op == "extra":
            rec[draw(st.text(max_size=10) | st.sampled_from(props))] = draw(NASTY)
        elif op == "metric" and isinstance(rec.get("metrics"), dict):
            names = ["error_rate", "cpu_percent", "memory_percent", "queue_depth", "Bad Name", "ok\n", "x" * 65]
            key = draw(st.sampled_from(names) | st.text(max_size=5))
            rec["metrics"] = {**rec["metrics"], key: draw(NASTY | st.floats(0, 200))}
        elif op == "whole":
            return draw(NASTY)
    return rec


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), stream=st.sampled_from(STREAMS))
def test_the_decoder_agrees_with_jsonschema_on_single_objects(data, stream):
    rec = data.draw(records(stream) | mutated(stream))
    check_message(stream, enc(rec).encode())


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), stream=st.sampled_from(STREAMS))
def test_the_decoder_agrees_with_jsonschema_on_each_array_element(data, stream):
    elements = data.draw(st.lists(records(stream) | mutated(stream), max_size=6))
    check_message(stream, enc(elements).encode())


# ---------------------------------------------------------------------------------------------
# Event time


def test_parse_ts_rejects_booleans_and_fractions():
    for v in (True, 1.5, "yesterday", [1]):
        with pytest.raises(Exception):
            parse_ts(v)


@hsettings(max_examples=300, deadline=None)
@given(text=rfc3339())
def test_parse_ts_accepts_the_date_times_jsonschema_does(text):
    valid = jsonschema.FormatChecker().conforms(text, "date-time")
    try:
        ms = parse_ts(text)
    except Exception:
        ms = None
    if not valid or _before_1970(text):
        assert ms is None
    else:
        dt = datetime.fromisoformat(text.upper().removesuffix("\n"))
        assert ms == (dt - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)
