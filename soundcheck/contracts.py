"""The input contracts: JSON Schema files in ``schemas/`` and the Python records that match them.

The schema files are the single source of truth: :func:`compile_schema` turns one into a fast
validator (only the keywords the files use; an unknown keyword is an error at load time, so the
validator can never silently drift from the file). A Kafka message value is one JSON object or a
JSON array of them; :meth:`Contract.decode` returns the good records and one
:class:`Rejection` per bad one, so one bad record never loses the good ones.

>>> c = load_contracts()["system"]
>>> recs, bad = c.decode(b'[{"ts": 1700000000000, "service": "cdn", "region": "BR", "metrics": {"error_rate": 0.01}},'
...                      b' {"ts": 1700000000000, "service": "cdn", "region": "BR", "metrics": {"error_rate": 7}}]',
...                      now_ms=1700000000000)
>>> recs[0].service, recs[0].metrics
('cdn', {'error_rate': 0.01})
>>> bad[0].index, bad[0].kind, bad[0].reason
(1, 'impossible_value', 'metrics.error_rate: 7 is above the maximum 1')
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import orjson

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

#: The ways a record can be rejected; bounded, so they can be metric labels.
REJECTION_KINDS = ("invalid_json", "not_an_object", "schema", "impossible_value", "future_ts", "processing_error")

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_IGNORED = {"$schema", "$id", "title", "description", "examples", "$comment"}
_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "boolean": lambda v: isinstance(v, bool),
}


class ContractError(Exception):
    """One record breaks its contract; ``kind`` is one of :data:`REJECTION_KINDS`."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class SchemaLoadError(ValueError):
    """A schema file uses a keyword the validator does not implement."""


Check = Callable[[Any, str], Any]  # (value, path) -> normalised value, or raises ContractError


def parse_ts(value: Any, path: str = "ts") -> int:
    """Event time as epoch milliseconds, from an integer or an RFC 3339 string with a zone.

    >>> parse_ts(1700000000000), parse_ts("2023-11-14T22:13:20Z"), parse_ts("2023-11-14T23:13:20.5+01:00")
    (1700000000000, 1700000000000, 1700000000500)
    """
    if isinstance(value, bool):
        raise ContractError("schema", f"{path}: expected epoch milliseconds or an RFC 3339 string, got {value!r}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not value.is_integer():
            raise ContractError("schema", f"{path}: epoch milliseconds must be an integer, got {value!r}")
        if value < 0:
            raise ContractError("impossible_value", f"{path}: negative epoch milliseconds {value!r}")
        return int(value)
    if isinstance(value, str):
        if not _RFC3339.match(value):
            raise ContractError("schema", f"{path}: {_short(value)} is not an RFC 3339 date-time with a time zone")
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise ContractError("schema", f"{path}: {value!r} is not an RFC 3339 date-time") from None
        if dt.tzinfo is None:
            raise ContractError("schema", f"{path}: {value!r} has no time zone")
        ms = int(round(dt.timestamp() * 1000))
        if ms < 0:
            raise ContractError("impossible_value", f"{path}: {value!r} is before 1970")
        return ms
    raise ContractError("schema", f"{path}: expected epoch milliseconds or an RFC 3339 string, got {type(value).__name__}")


def _compile(schema: dict[str, Any], name: str) -> Check:
    unknown = set(schema) - _IGNORED - {
        "type", "enum", "minimum", "maximum", "exclusiveMinimum", "minLength", "maxLength", "pattern",
        "oneOf", "format", "properties", "required", "additionalProperties", "minProperties",
        "maxProperties", "propertyNames",
    }
    if unknown:
        raise SchemaLoadError(f"schema {name}: unsupported keywords {sorted(unknown)}")
    if "oneOf" in schema:  # only event time uses it: integer epoch ms or an RFC 3339 string
        formats = {(s.get("type"), s.get("format")) for s in schema["oneOf"]}
        if formats != {("integer", None), ("string", "date-time")}:
            raise SchemaLoadError(f"schema {name}: oneOf is only supported for event time")
        return lambda v, p: parse_ts(v, p)
    steps: list[Check] = []
    typ = schema.get("type")
    if typ is not None:
        is_type = _TYPES[typ]

        def check_type(v: Any, p: str) -> Any:
            if not is_type(v):
                raise ContractError("schema", f"{p}: expected {typ}, got {type(v).__name__} {_short(v)}")
            return v

        steps.append(check_type)
    if "enum" in schema:
        allowed = frozenset(schema["enum"])
        shown = ", ".join(map(str, schema["enum"]))

        def check_enum(v: Any, p: str) -> Any:
            if isinstance(v, (list, dict)) or isinstance(v, bool) or v not in allowed:
                raise ContractError("schema", f"{p}: {_short(v)} is not one of {shown}")
            return v

        steps.append(check_enum)
    if typ in ("number", "integer"):
        lo, hi, xlo = schema.get("minimum"), schema.get("maximum"), schema.get("exclusiveMinimum")

        def check_range(v: Any, p: str) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                raise ContractError("impossible_value", f"{p}: {v} is not a finite number")
            if lo is not None and v < lo:
                raise ContractError("impossible_value", f"{p}: {v} is below the minimum {lo}")
            if xlo is not None and v <= xlo:
                raise ContractError("impossible_value", f"{p}: {v} must be above {xlo}")
            if hi is not None and v > hi:
                raise ContractError("impossible_value", f"{p}: {v} is above the maximum {hi}")
            return v

        steps.append(check_range)
    if typ == "string":
        lo_len, hi_len = schema.get("minLength", 0), schema.get("maxLength")
        rx = re.compile(schema["pattern"]) if "pattern" in schema else None

        def check_string(v: str, p: str) -> Any:
            if len(v) < lo_len:
                raise ContractError("schema", f"{p}: must not be empty" if lo_len == 1 else f"{p}: shorter than {lo_len}")
            if hi_len is not None and len(v) > hi_len:
                raise ContractError("schema", f"{p}: longer than {hi_len} characters")
            if rx is not None and not rx.search(v):
                raise ContractError("schema", f"{p}: {_short(v)} does not match {rx.pattern}")
            return v

        steps.append(check_string)
    if typ == "object":
        steps.append(_compile_object(schema, name))

    def check(v: Any, p: str) -> Any:
        for step in steps:
            v = step(v, p)
        return v

    return check


def _compile_object(schema: dict[str, Any], name: str) -> Check:
    props = {k: _compile(s, f"{name}.{k}") for k, s in schema.get("properties", {}).items()}
    required = tuple(schema.get("required", ()))
    extra = schema.get("additionalProperties", True)
    extra_check = _compile(extra, f"{name}.*") if isinstance(extra, dict) else None
    names = schema.get("propertyNames")
    name_check = _compile({"type": "string", **names}, f"{name}.<name>") if names else None
    min_p, max_p = schema.get("minProperties", 0), schema.get("maxProperties")

    def check_object(obj: dict[str, Any], p: str) -> dict[str, Any]:
        prefix = f"{p}." if p else ""
        for key in required:
            if key not in obj:
                raise ContractError("schema", f"{prefix}{key}: required field is missing")
        if len(obj) < min_p:
            raise ContractError("schema", f"{p or 'record'}: needs at least {min_p} entries")
        if max_p is not None and len(obj) > max_p:
            raise ContractError("schema", f"{p or 'record'}: more than {max_p} entries")
        out = {}
        for key, value in obj.items():
            sub = props.get(key)
            if sub is None:
                if extra is False:
                    raise ContractError("schema", f"{prefix}{key}: unknown field")
                if name_check is not None:
                    name_check(key, f"{prefix}{key}")
                if extra_check is not None:
                    value = extra_check(value, f"{prefix}{key}")
            elif value is None and key not in required:
                continue  # an explicit null for an optional field means absent
            else:
                value = sub(value, f"{prefix}{key}")
            out[key] = value
        return out

    return check_object


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def compile_schema(schema: dict[str, Any]) -> Check:
    """A validator for one schema document: ``check(obj, "") -> normalised obj``."""
    return _compile(schema, schema.get("title", "schema"))


# ---------------------------------------------------------------------------------------------
# Records: one dataclass per topic, with exactly the schema's properties (a test checks this).


@dataclass(slots=True)
class AudioQualitySample:
    event_id: str
    ts: int
    session_id: str
    user_id: str
    track_id: str
    region: str
    cdn_pop: str
    device: str
    network: str
    user_segment: str
    bitrate_kbps: float
    requested_bitrate_kbps: float
    latency_ms: float
    buffering_ratio: float
    buffer_health_percent: float
    packet_loss_percent: float
    cdn_hit_rate: Optional[float] = None
    codec: Optional[str] = None


@dataclass(slots=True)
class UserBehaviorEvent:
    event_id: str
    ts: int
    user_id: str
    session_id: str
    event_type: str
    device_id: str
    country: str
    user_segment: str
    track_id: Optional[str] = None
    artist_id: Optional[str] = None
    ip_hash: Optional[str] = None
    listen_ms: Optional[int] = None
    track_duration_ms: Optional[int] = None
    amount: Optional[float] = None
    currency: Optional[str] = None
    error_code: Optional[str] = None
    payment_method_id: Optional[str] = None


@dataclass(slots=True)
class SystemPerformanceSample:
    ts: int
    service: str
    region: str
    metrics: dict[str, float]
    instance: Optional[str] = None


RECORD_TYPES = {
    "audio": ("audio_quality_metrics", AudioQualitySample),
    "behavior": ("user_behavior_events", UserBehaviorEvent),
    "system": ("system_performance_metrics", SystemPerformanceSample),
}


@dataclass(slots=True)
class Rejection:
    """One record (or a whole message) that could not be read, with a readable reason."""

    kind: str
    reason: str
    index: Optional[int] = None  # position in a JSON array message; None for the whole message
    item: Any = None  # the offending element, when the message parsed


@dataclass
class Contract:
    """The contract of one input stream: decode a message value into records and rejections."""

    stream: str
    schema: dict[str, Any]
    record_type: type
    check: Check = field(repr=False)

    def decode(self, value: bytes | None, *, now_ms: int, max_future_ms: int = 300_000) -> tuple[list[Any], list[Rejection]]:
        if value is None:
            return [], [Rejection("invalid_json", "empty message value (tombstone)")]
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            return [], [Rejection("invalid_json", f"not valid JSON: {exc}")]
        if isinstance(doc, dict):
            items, indexed = [doc], False
        elif isinstance(doc, list):
            items, indexed = doc, True
        else:
            return [], [Rejection("not_an_object", f"expected a JSON object or an array of objects, got {type(doc).__name__}")]
        records: list[Any] = []
        rejections: list[Rejection] = []
        limit = now_ms + max_future_ms
        make = self.record_type
        check = self.check
        for i, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise ContractError("not_an_object", f"expected a JSON object, got {type(item).__name__}")
                rec = check(item, "")
                if rec["ts"] > limit:
                    raise ContractError(
                        "future_ts", f"ts: {rec['ts']} is {(rec['ts'] - now_ms) / 1000:.0f} s in the future (limit {max_future_ms // 1000} s)"
                    )
                records.append(make(**rec))
            except ContractError as exc:
                rejections.append(Rejection(exc.kind, exc.reason, i if indexed else None, item))
        return records, rejections


def load_contracts(schema_dir: Path | None = None) -> dict[str, Contract]:
    """The three input contracts by stream name (audio, behavior, system)."""
    out = {}
    for stream, (title, record_type) in RECORD_TYPES.items():
        path = (schema_dir or SCHEMA_DIR) / f"{title}.schema.json"
        schema = orjson.loads(path.read_bytes())
        names = {f.name for f in fields(record_type)}
        if names != set(schema["properties"]):
            raise SchemaLoadError(f"{path.name}: properties {sorted(set(schema['properties']) ^ names)} differ from {record_type.__name__}")
        out[stream] = Contract(stream, schema, record_type, compile_schema(schema))
    return out
