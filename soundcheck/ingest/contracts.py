"""The input contracts: JSON Schema files in ``schemas/`` and the Python records that match them.

The schema files are the single source of truth. Each record type is a :class:`msgspec.Struct`
generated from its file (:func:`record_type`): one field per property, the file's bounds,
lengths, patterns and enums as ``msgspec.Meta`` constraints, so msgspec validates while it
parses. A keyword the generator does not implement is an error at load time
(:class:`SchemaLoadError`): the records can never silently drift from the files. What msgspec
cannot express (or only slowly) is checked on the decoded records, cheaply: event time sent as
an RFC 3339 string (or an integral float), integral floats in integer fields, the names in a map
against their pattern (with a cache of names already matched), and the narrower bounds of some
entries of a map (``metrics.error_rate`` in 0..1 while any metric may reach 1e12).

What is accepted is what jsonschema accepts on the files (Draft 2020-12, date-time checked),
with three deliberate differences: an explicit null for an optional field means absent; a
number must be a finite double (JSON's ``1e400`` is ``impossible_value``); event time as an RFC
3339 string before 1970 is ``impossible_value``, as the integer form is. After decoding ``ts`` is
always an int (epoch ms), integer fields are ints, number fields floats.

A Kafka message value is one JSON object or a JSON array of them. :meth:`Contract.decode`
parses a whole array in one call; only when that fails is it parsed again element by element,
so each bad record gets its own :class:`Rejection` (with its index) and the good ones survive.

>>> c = load_contracts()["system"]
>>> recs, bad = c.decode(b'[{"ts": 1700000000000, "service": "cdn", "region": "BR", "metrics": {"error_rate": 0.01}},'
...                      b' {"ts": 1700000000000, "service": "cdn", "region": "BR", "metrics": {"error_rate": 7}}]',
...                      now_ms=1700000000000)
>>> recs[0].service, recs[0].metrics
('cdn', {'error_rate': 0.01})
>>> bad[0].index, bad[0].kind, bad[0].reason
(1, 'impossible_value', 'metrics.error_rate: 7 is above the maximum 1')
>>> recs, bad = c.decode(b'{"ts": "2023-11-14T22:13:20Z", "service": "cdn", "region": "BR", "metrics": {"cpu_percent": -1}}',
...                      now_ms=1700000000000)
>>> recs, bad[0].index, bad[0].kind, bad[0].reason
([], None, 'impossible_value', 'metrics.cpu_percent: -1 is below the minimum 0')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import repeat
from operator import attrgetter
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import msgspec
import orjson

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

#: The ways a record can be rejected; bounded, so they can be metric labels.
REJECTION_KINDS = ("invalid_json", "not_an_object", "schema", "impossible_value", "future_ts", "processing_error")

#: A rejected array element is kept (parsed, as :attr:`Rejection.item`) when its JSON text is at most this long.
ITEM_COPY_LIMIT = 64 * 1024
SHOWN = 60  # a value echoed in a reason is cut to this many characters

_IGNORED = {"$schema", "$id", "title", "description", "examples", "$comment"}
_BOUNDS = (("minimum", "ge"), ("exclusiveMinimum", "gt"), ("maximum", "le"), ("exclusiveMaximum", "lt"))
_STRING = (("minLength", "min_length"), ("maxLength", "max_length"), ("pattern", "pattern"))
# what jsonschema's date-time format accepts (rfc3339-validator, on the upper-cased string)
_RFC3339 = re.compile(
    r"([0-9]{4})-(0[1-9]|1[0-2])-([0-9]{2})T([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9])(?:\.([0-9]+))?"
    r"(?:Z|([+-])([01][0-9]|2[0-3]):([0-5][0-9]))$"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)


class ContractError(Exception):
    """One record breaks its contract; ``kind`` is one of :data:`REJECTION_KINDS`."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class SchemaLoadError(ValueError):
    """A schema file uses a keyword (or a combination) the record generator does not implement."""


def parse_ts(value: Any, path: str = "ts") -> int:
    """Event time as epoch milliseconds, from an integer or an RFC 3339 string with a zone.

    Strings are accepted exactly when jsonschema's ``date-time`` format accepts them (any number
    of fraction digits, kept to the millisecond; ``t`` and ``z`` in either case), and not before 1970.

    >>> parse_ts(1700000000000), parse_ts("2023-11-14T22:13:20Z"), parse_ts("2023-11-14T23:13:20.5+01:00")
    (1700000000000, 1700000000000, 1700000000500)
    >>> parse_ts(1.7e12), parse_ts("2023-11-14t22:13:20.123456z")
    (1700000000000, 1700000000123)
    """
    if isinstance(value, bool):
        raise ContractError("schema", f"{path}: expected epoch milliseconds or an RFC 3339 string, got {_show(value)}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not value.is_integer():
            raise ContractError("schema", f"{path}: epoch milliseconds must be an integer, got {_show(value)}")
        if value < 0:
            raise ContractError("impossible_value", f"{path}: negative epoch milliseconds {_show(value)}")
        return int(value)
    if isinstance(value, str):
        m = _RFC3339.match(value.upper())
        if m is None:
            raise ContractError("schema", f"{path}: {_show(value)} is not an RFC 3339 date-time with a time zone")
        year, month, day, hour, minute, second, frac, sign, off_h, off_m = m.groups()
        try:
            dt = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=timezone.utc)
        except ValueError:
            raise ContractError("schema", f"{path}: {_show(value)} is not an RFC 3339 date-time (no such day)") from None
        ms = (dt - _EPOCH) // _MS + (int(frac[:3].ljust(3, "0")) if frac else 0)
        if sign:
            offset = (int(off_h) * 60 + int(off_m)) * 60_000
            ms += -offset if sign == "+" else offset
        if ms < 0:
            raise ContractError("impossible_value", f"{path}: {_show(value)} is before 1970")
        return ms
    raise ContractError("schema", f"{path}: expected epoch milliseconds or an RFC 3339 string, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# From a schema file to a msgspec.Struct


@dataclass(frozen=True)
class _Field:
    """One property of a record schema, as msgspec sees it (``type``) and as we check it after."""

    name: str
    spec: dict[str, Any]
    type: Any
    required: bool
    role: str = "plain"  # "event_time" (int | float | str, to epoch ms), "integer" (int | float, to int), "map", "plain"
    entries: tuple[tuple[str, dict[str, Any]], ...] = ()  # map: keys whose bounds are narrower than the value type's
    key_type: Any = None  # map: the type of its keys
    value_type: Any = None  # map: the type of its values
    key_pattern: Optional[str] = None  # map: the pattern its keys match (checked after decoding)


def _keywords(spec: Any, allowed: set[str], where: str) -> None:
    if not isinstance(spec, dict):
        raise SchemaLoadError(f"{where}: expected a schema object, got {type(spec).__name__}")
    unknown = set(spec) - _IGNORED - allowed
    if unknown:
        raise SchemaLoadError(f"{where}: unsupported keywords {sorted(unknown)}")


def _meta(tp: Any, spec: dict[str, Any], names: tuple[tuple[str, str], ...], where: str) -> Any:
    kw = {arg: spec[key] for key, arg in names if key in spec}
    if not kw:
        return tp
    for key, arg in names:
        v = spec.get(key)
        if key == "pattern" and v is not None:
            try:
                re.compile(v)
            except (re.error, TypeError) as exc:
                raise SchemaLoadError(f"{where}: bad pattern {v!r}: {exc}") from None
        elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise SchemaLoadError(f"{where}: {key} must be a number, got {v!r}")
        elif v is not None and tp is int and not float(v).is_integer():
            raise SchemaLoadError(f"{where}: {key} of an integer must be integral, got {v!r}")
        elif v is not None and tp is int:
            kw[arg] = int(v)
    try:
        return Annotated[tp, msgspec.Meta(**kw)]
    except (TypeError, ValueError) as exc:
        raise SchemaLoadError(f"{where}: {exc}") from None


def _integer(spec: dict[str, Any], where: str) -> Any:
    """JSON Schema's integer: an int, or a float with no fraction (jsonschema accepts ``1.0``)."""
    return Union[_meta(int, spec, _BOUNDS, where), _meta(float, spec, _BOUNDS, where)]


def _scalar(spec: Any, where: str) -> tuple[Any, str]:
    _keywords(spec, {"type", "enum", "oneOf", *(k for k, _ in _BOUNDS), *(k for k, _ in _STRING)}, where)
    if "oneOf" in spec:  # only event time: integer epoch ms, or an RFC 3339 string
        branches = spec["oneOf"]
        if set(spec) - _IGNORED != {"oneOf"} or not isinstance(branches, list) or len(branches) != 2:
            raise SchemaLoadError(f"{where}: oneOf is only supported for event time (integer or date-time string)")
        ints = [b for b in branches if isinstance(b, dict) and b.get("type") == "integer"]
        strs = [b for b in branches if isinstance(b, dict) and {k: v for k, v in b.items() if k not in _IGNORED}
                == {"type": "string", "format": "date-time"}]
        if len(ints) != 1 or len(strs) != 1:
            raise SchemaLoadError(f"{where}: oneOf is only supported for event time (integer or date-time string)")
        _keywords(ints[0], {"type", *(k for k, _ in _BOUNDS)}, f"{where}.oneOf")
        return Union[_integer(ints[0], where), str], "event_time"
    typ = spec.get("type")
    if "enum" in spec:
        values = spec["enum"]
        if typ not in (None, "string") or not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise SchemaLoadError(f"{where}: only enums of strings are supported")
        if set(spec) - _IGNORED - {"type", "enum"}:
            raise SchemaLoadError(f"{where}: enum combined with other keywords")
        return Literal[tuple(values)], "plain"
    if typ == "string":
        _keywords(spec, {"type", *(k for k, _ in _STRING)}, where)
        return _meta(str, spec, _STRING, where), "plain"
    if typ == "number":
        _keywords(spec, {"type", *(k for k, _ in _BOUNDS)}, where)
        return _meta(float, spec, _BOUNDS, where), "plain"
    if typ == "integer":
        _keywords(spec, {"type", *(k for k, _ in _BOUNDS)}, where)
        return _integer(spec, where), "integer"
    raise SchemaLoadError(f"{where}: unsupported type {typ!r}")


def _within(inner: dict[str, Any], outer: dict[str, Any]) -> bool:
    """Whether every number ``inner`` allows is allowed by ``outer`` (both: type number with bounds)."""
    lo_i, lo_o = inner.get("minimum", inner.get("exclusiveMinimum")), outer.get("minimum", outer.get("exclusiveMinimum"))
    hi_i, hi_o = inner.get("maximum", inner.get("exclusiveMaximum")), outer.get("maximum", outer.get("exclusiveMaximum"))
    if lo_o is not None and (lo_i is None or lo_i < lo_o or (lo_i == lo_o and "exclusiveMinimum" in outer and "minimum" in inner)):
        return False
    if hi_o is not None and (hi_i is None or hi_i > hi_o or (hi_i == hi_o and "exclusiveMaximum" in outer and "maximum" in inner)):
        return False
    return True


def _field(name: str, spec: Any, required: bool, where: str) -> _Field:
    if not (isinstance(spec, dict) and spec.get("type") == "object"):
        tp, role = _scalar(spec, where)
        return _Field(name, spec, tp, required, role)
    # a map of names to numbers (system metrics): the value type holds every entry; the few
    # entries with narrower bounds (``properties``) are checked after decoding
    _keywords(spec, {"type", "minProperties", "maxProperties", "propertyNames", "additionalProperties", "properties"}, where)
    names = spec.get("propertyNames", {})
    _keywords(names, {"type", *(k for k, _ in _STRING)}, f"{where}.propertyNames")
    if names.get("type", "string") != "string":
        raise SchemaLoadError(f"{where}.propertyNames: names are strings")
    # the name pattern is checked after decoding, against a cache of accepted names: msgspec would
    # run the regex on every name of every record (~0.3 us each), while names repeat endlessly
    key_type = _meta(str, names, _STRING[:2], f"{where}.propertyNames")
    _meta(str, names, _STRING[2:], f"{where}.propertyNames")  # (a bad pattern fails here)
    values = spec.get("additionalProperties")
    if not isinstance(values, dict) or values.get("type") != "number":
        raise SchemaLoadError(f"{where}: a map needs additionalProperties of type number")
    value_type, _ = _scalar(values, f"{where}.additionalProperties")
    entries = []
    for key, sub in spec.get("properties", {}).items():
        _scalar(sub, f"{where}.{key}")
        if sub.get("type") != "number" or not _within(sub, values) or {"minimum", "exclusiveMinimum"} <= set(sub) \
                or {"maximum", "exclusiveMaximum"} <= set(sub):
            raise SchemaLoadError(f"{where}.{key}: must be a number within the bounds of additionalProperties (one bound a side)")
        entries.append((key, sub))
    tp = _meta(dict[key_type, value_type], {"minLength": spec.get("minProperties"), "maxLength": spec.get("maxProperties")},
               (("minLength", "min_length"), ("maxLength", "max_length")), where)
    return _Field(name, spec, tp, required, "map", tuple(entries), key_type, value_type, names.get("pattern"))


def _fields(schema: dict[str, Any], where: str) -> list[_Field]:
    """The fields of a record schema: the required ones first, each group in the file's order."""
    _keywords(schema, {"type", "properties", "required", "additionalProperties"}, where)
    props, required = schema.get("properties"), schema.get("required", [])
    if schema.get("type") != "object" or not isinstance(props, dict) or not props:
        raise SchemaLoadError(f"{where}: a record schema is an object with properties")
    if schema.get("additionalProperties", True) not in (True, False):
        raise SchemaLoadError(f"{where}: additionalProperties must be true or false")
    if not isinstance(required, list) or set(required) - set(props):
        raise SchemaLoadError(f"{where}: required names fields that are not properties")
    out = [_field(k, s, k in required, f"{where}.{k}") for k, s in props.items()]
    ts = [f for f in out if f.role == "event_time"]
    if [(f.name, f.required) for f in ts] != [("ts", True)]:
        raise SchemaLoadError(f"{where}: needs exactly one event time, the required property ts")
    return [f for f in out if f.required] + [f for f in out if not f.required]


def record_type(name: str, schema: dict[str, Any]) -> type[msgspec.Struct]:
    """The record type of one schema document: a Struct with exactly its properties.

    Optional properties default to None (an explicit JSON null means absent); unknown fields are
    refused when the schema says ``additionalProperties: false``. Instances are not tracked by
    the garbage collector (records hold strings, numbers and a map of numbers: no cycles).
    """
    where = schema.get("title", name) if isinstance(schema, dict) else name
    fields = _fields(schema, where)
    spec = [(f.name, f.type) if f.required else (f.name, Optional[f.type], None) for f in fields]
    return msgspec.defstruct(name, spec, module=__name__, forbid_unknown_fields=schema.get("additionalProperties") is False, gc=False)


def _read_schema(title: str, schema_dir: Path | None = None) -> dict[str, Any]:
    path = (schema_dir or SCHEMA_DIR) / f"{title}.schema.json"
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise SchemaLoadError(f"{path.name}: not valid JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Records: one Struct per topic, generated from its schema file (a test checks the names).
# Fields: ``ts`` is int epoch ms after decoding; numbers are float; integers int; ``metrics`` a dict.

AudioQualitySample = record_type("AudioQualitySample", _read_schema("audio_quality_metrics"))
UserBehaviorEvent = record_type("UserBehaviorEvent", _read_schema("user_behavior_events"))
SystemPerformanceSample = record_type("SystemPerformanceSample", _read_schema("system_performance_metrics"))

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
    # the offending array element as a Python value (dict, list, ...), when the message parsed, the
    # element's JSON text is at most ITEM_COPY_LIMIT bytes and orjson can encode it; else None
    item: Any = None


# ---------------------------------------------------------------------------------------------
# Reasons: where msgspec says it failed, what the schema asked, and the value as sent (cut short)

_UNKNOWN = "Object contains unknown field `"
_MISSING = "Object missing required field `"
_KEY_AT = "key` in `"
_PATH = re.compile(r"\.([^.\[]+)|\[([^\]]*)\]")
_BOUND = re.compile(r"Expected `(?:int|float)` (>=|<=|>|<) (\S+)$")
_LENGTH = re.compile(r"Expected `(str|object)` of length (>=|<=) (\d+)$")
_GOT = re.compile(r"Expected `[^`]*`, got `(\w+)`$")
_JSON_NAMES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
_OUT_OF_RANGE = ("Number out of range", "Integer value out of range")
_DECODE_FAILURES = (msgspec.DecodeError, UnicodeDecodeError)  # (msgspec.ValidationError is a DecodeError: catch it first)
_INT_ONLY = {int}
_HUGE = 1.7976931348623157e308  # the largest double: the bound of an unbounded side
_TS = attrgetter("ts")


def _shorten(text: str) -> str:
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def _name(key: str) -> str:
    """A field or entry name as it appears in a reason: as is, or quoted when it is odd or long."""
    return key if len(key) <= SHOWN and key.isprintable() and key.strip() == key and key else _show(key)


def _show(v: Any) -> str:
    """A Python value as JSON-like text, bounded (a 5 MB string costs no more than a short one)."""
    if isinstance(v, bool) or v is None:
        return orjson.dumps(v).decode()
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e16 else _shorten(repr(v))
    if isinstance(v, int):
        return _shorten(str(v)) if v.bit_length() < 14_000 else "a number of more than 4,000 digits"
    if isinstance(v, str):
        return _shorten(orjson.dumps(v[: SHOWN + 1]).decode())
    return type(v).__name__


def _echo(raw: Any) -> str:
    """A value's JSON text as sent, bounded."""
    view = memoryview(raw)
    text = view[: SHOWN * 4].tobytes().decode("utf-8", "replace")
    return _shorten(text + "..." if len(view) > SHOWN * 4 else text)


def _bound_violation(v: Any, spec: dict[str, Any]) -> Optional[str]:
    """Which bound of ``spec`` the number ``v`` breaks, in words; None when it keeps them all."""
    for s in spec.get("oneOf", ()):  # event time: the bounds of its integer branch
        if s.get("type") == "integer":
            spec = s
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    if "minimum" in spec and v < spec["minimum"]:
        return f"is below the minimum {_show(spec['minimum'])}"
    if "exclusiveMinimum" in spec and v <= spec["exclusiveMinimum"]:
        return f"must be above {_show(spec['exclusiveMinimum'])}"
    if "maximum" in spec and v > spec["maximum"]:
        return f"is above the maximum {_show(spec['maximum'])}"
    if "exclusiveMaximum" in spec and v >= spec["exclusiveMaximum"]:
        return f"must be below {_show(spec['exclusiveMaximum'])}"
    return None


def _describe(spec: dict[str, Any]) -> str:
    if "oneOf" in spec:
        return "epoch milliseconds or an RFC 3339 string"
    return str(spec.get("type", "value"))


def _reason(text: str, where: str, spec: dict[str, Any], raw: Any) -> tuple[str, str]:
    """Kind and reason for msgspec's complaint ``text`` about the value ``raw`` (JSON text, or None) at ``where``."""
    shown = _echo(raw) if raw is not None else "the value"
    if text in _OUT_OF_RANGE:
        return "impossible_value", f"{where}: {shown} is out of range (not a finite number)"
    m = _BOUND.match(text)
    if m:
        value = None
        if raw is not None and len(raw) <= 5000:
            try:
                value = msgspec.json.decode(raw)
            except (msgspec.MsgspecError, RecursionError):
                pass
        why = _bound_violation(value, spec) or f"must be {m[1]} {m[2]}"
        return "impossible_value", f"{where}: {shown} {why}"
    if "enum" in spec:
        return "schema", f"{where}: {shown} is not one of {', '.join(spec['enum'])}"
    m = _LENGTH.match(text)
    if m:
        what, op, n = m.groups()
        if what == "object":
            return "schema", f"{where}: needs at least {n} entries" if op == ">=" else f"{where}: more than {n} entries"
        if op == ">=":
            return "schema", f"{where}: must not be empty" if n == "1" else f"{where}: shorter than {n} characters"
        return "schema", f"{where}: longer than {n} characters"
    if text.startswith("Expected `str` matching regex"):
        return "schema", f"{where}: {shown} does not match {spec.get('pattern')}"
    m = _GOT.match(text)
    if m:
        got = _JSON_NAMES.get(m[1], m[1])
        return "schema", f"{where}: expected {_describe(spec)}, got {got}" + (f" {shown}" if got != "null" and raw is not None else "")
    return "schema", f"{where}: {_shorten(text)}"


def _item(raw: Any) -> Any:
    """A rejected array element as a Python value (the dead letter's "record"): when its JSON text is
    at most ITEM_COPY_LIMIT bytes and orjson can write it back (nesting, 64-bit integers); else None."""
    if len(raw) > ITEM_COPY_LIMIT:
        return None
    try:
        value = msgspec.json.decode(raw)
        orjson.dumps(value)
    except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError, TypeError):  # (orjson.JSONEncodeError is a TypeError)
        return None
    return value


_SCAN = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[\[\]{},]')


def _split_array(data: bytes) -> Optional[list[bytes]]:
    """The top-level elements of a JSON array, found without recursion (for arrays nesting deeper
    than the parser's recursion guard allows); None when the brackets do not add up."""
    depth, start, out = 0, 0, []
    for m in _SCAN.finditer(data):
        c = data[m.start()]
        if c == 0x22:  # a string
            continue
        if c in b"[{":
            depth += 1
            if depth == 1:
                if data[: m.start()].strip():
                    return None
                start = m.end()
        elif c in b"]}":
            depth -= 1
            if depth == 0:
                last = data[start : m.start()]
                if last.strip() or out:
                    out.append(last)
                return out if not data[m.end() :].strip() else None
            if depth < 0:
                return None
        elif depth == 1:  # a comma between elements
            out.append(data[start : m.start()])
            start = m.end()
    return None


class _MapCheck:
    """What msgspec leaves to check in a map field (system ``metrics``): entry names against the
    pattern (with a cache of accepted names), entries with narrower bounds than the value type."""

    KNOWN_LIMIT = 10_000  # accepted names remembered; past that, new names are matched each time

    def __init__(self, f: _Field) -> None:
        self.name = f.name
        self.get = attrgetter(f.name)
        self.pattern = f.key_pattern
        self.search = re.compile(f.key_pattern).search if f.key_pattern is not None else None
        self.known: set[str] = set()
        # the entries with narrower bounds (each checked exactly by check), and for the quick
        # tests the bounds narrower than the value type's, which msgspec has checked already:
        # (key, bound, whether the bound itself is out)
        self.entries = f.entries
        values = f.spec["additionalProperties"]
        self.tops: list[tuple[str, float, bool]] = []
        self.bottoms: list[tuple[str, float, bool]] = []
        for key, spec in f.entries:
            for side, bounds in (("max", self.tops), ("min", self.bottoms)):
                incl, excl = ("maximum", "exclusiveMaximum") if side == "max" else ("minimum", "exclusiveMinimum")
                own = spec.get(incl, spec.get(excl))
                outer = values.get(incl, values.get(excl))
                if own is not None and (own != outer or (excl in spec and excl not in values)):
                    bounds.append((key, own, excl in spec))

    def fine(self, maps: list[dict[str, float]]) -> bool:
        """Whether all these maps pass, in a few passes at C speed (False: look at each with :meth:`check`)."""
        if self.search is not None and not all(map(self.known.issuperset, maps)):
            return False
        for key, hi, out in self.tops:
            top = max(map(dict.get, maps, repeat(key), repeat(-_HUGE)))  # an absent entry counts as -inf
            if top > hi or (out and top == hi):
                return False
        for key, lo, out in self.bottoms:
            bottom = min(map(dict.get, maps, repeat(key), repeat(_HUGE)))
            if bottom < lo or (out and bottom == lo):
                return False
        return True

    def fine_one(self, entries: dict[str, float]) -> bool:
        """:meth:`fine` for one map."""
        if self.search is not None and not self.known.issuperset(entries):
            return False
        get = entries.get
        for key, hi, out in self.tops:
            v = get(key)
            if v is not None and (v > hi or (out and v == hi)):
                return False
        for key, lo, out in self.bottoms:
            v = get(key)
            if v is not None and (v < lo or (out and v == lo)):
                return False
        return True

    def check(self, entries: dict[str, float]) -> None:
        if self.search is not None:
            for key in entries:
                if key not in self.known:
                    if not self.search(key):
                        raise ContractError("schema", f"{self.name}: entry name {_show(key)} does not match {self.pattern}")
                    if len(self.known) < self.KNOWN_LIMIT:
                        self.known.add(key)
        for key, spec in self.entries:
            v = entries.get(key)
            why = None if v is None else _bound_violation(v, spec)
            if why:
                raise ContractError("impossible_value", f"{self.name}.{key}: {_show(v)} {why}")


# ---------------------------------------------------------------------------------------------
# Contracts


@dataclass(eq=False)
class Contract:
    """The contract of one input stream: decode a message value into records and rejections."""

    stream: str
    schema: dict[str, Any] = field(repr=False)
    record_type: type

    def __post_init__(self) -> None:
        where = self.schema.get("title", self.stream)
        fields = _fields(self.schema, where)
        names = set(getattr(self.record_type, "__struct_fields__", ()))
        if names != {f.name for f in fields}:
            raise SchemaLoadError(f"{where}: properties {sorted(names ^ {f.name for f in fields})} differ from {self.record_type.__name__}")
        self._fields = {f.name: f for f in fields}
        self._one = msgspec.json.Decoder(self.record_type)
        self._many = msgspec.json.Decoder(list[self.record_type])
        self._raw_list = msgspec.json.Decoder(list[msgspec.Raw])
        self._raw_map = msgspec.json.Decoder(dict[str, msgspec.Raw])
        self._integers = tuple(f.name for f in fields if f.role == "integer")
        self._integer_getters = tuple(attrgetter(n) for n in self._integers)
        self._maps = [_MapCheck(f) for f in fields if f.role == "map"]

    def decode(self, value: bytes | None, *, now_ms: int, max_future_ms: int = 300_000) -> tuple[list[Any], list[Rejection]]:
        """The records of one message value and one :class:`Rejection` per bad record (or for the
        whole message when it cannot be read). A record whose ``ts`` is more than ``max_future_ms``
        after ``now_ms`` is rejected as ``future_ts``. Records come in their order in the message."""
        if value is None:
            return [], [Rejection("invalid_json", "empty message value (tombstone)")]
        head = value[:1]
        array = head == b"["
        if not array and head != b"{" and head.isspace():
            array = bytes(value).lstrip()[:1] == b"["
        try:
            got = self._many.decode(value) if array else self._one.decode(value)
        except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError) as exc:
            return self._decode_slowly(value, array, exc, now_ms, max_future_ms)
        if not array:
            if self._fine(got, now_ms + max_future_ms):
                return [got], []
            return self._finish([got], [None], [], now_ms, max_future_ms, None)
        if self._all_fine(got, now_ms + max_future_ms):
            return got, []
        return self._finish(got, list(range(len(got))), [], now_ms, max_future_ms, lambda: self._raw_list.decode(value))

    # -- the checks msgspec cannot make --------------------------------------------------------

    def _fine(self, rec: Any, limit: int) -> bool:
        """One record, the usual case: ts an int and not too far ahead, no float in an integer
        field, map entries with known names and within their narrower bounds."""
        ts = rec.ts
        if ts.__class__ is not int or ts > limit:
            return False
        for get in self._integer_getters:
            if get(rec).__class__ is float:
                return False
        for m in self._maps:
            if not m.fine_one(m.get(rec)):
                return False
        return True

    def _all_fine(self, records: list[Any], limit: int) -> bool:
        """:meth:`_fine` for a whole array, in a few passes at C speed."""
        if not records:
            return True
        ts = list(map(_TS, records))
        if set(map(type, ts)) != _INT_ONLY or max(ts) > limit:
            return False
        for get in self._integer_getters:
            if float in set(map(type, map(get, records))):
                return False
        for m in self._maps:
            if not m.fine(list(map(m.get, records))):
                return False
        return True

    def _complete(self, rec: Any, now_ms: int, max_future_ms: int) -> None:
        """Finish one record: ts to epoch ms, integral floats to int, map entries; or raise ContractError."""
        ts = rec.ts
        if ts.__class__ is not int:
            rec.ts = ts = parse_ts(ts, "ts")
        if ts > now_ms + max_future_ms:
            raise ContractError(
                "future_ts", f"ts: {_show(ts)} is {_show((ts - now_ms) // 1000)} s in the future (limit {max_future_ms // 1000} s)"
            )
        for name in self._integers:
            v = getattr(rec, name)
            if v.__class__ is float:
                if not v.is_integer():
                    raise ContractError("schema", f"{name}: expected integer, got {_show(v)}")
                setattr(rec, name, int(v))
        for m in self._maps:
            m.check(m.get(rec))

    def _finish(self, records: list[Any], positions: list[Optional[int]], rejections: list[Rejection],
                now_ms: int, max_future_ms: int, raw_items: Any) -> tuple[list[Any], list[Rejection]]:
        """:meth:`_complete` each record; ``positions``: their indexes in the array (None: a single object);
        ``raw_items``: the array's elements as JSON text (or a function giving them), for the rejections."""
        good = []
        for rec, pos in zip(records, positions):
            try:
                self._complete(rec, now_ms, max_future_ms)
                good.append(rec)
            except ContractError as exc:
                item = None
                if pos is not None and raw_items is not None:
                    if callable(raw_items):
                        raw_items = raw_items()
                    item = _item(raw_items[pos])
                rejections.append(Rejection(exc.kind, exc.reason, pos, item))
        if len(rejections) > 1:
            rejections.sort(key=lambda r: r.index)
        return good, rejections

    # -- when msgspec refused the message -------------------------------------------------------

    def _decode_slowly(self, value: bytes, array: bool, exc: Exception, now_ms: int,
                       max_future_ms: int) -> tuple[list[Any], list[Rejection]]:
        if isinstance(exc, _DECODE_FAILURES) and not isinstance(exc, msgspec.ValidationError):
            if array:  # one element that is not JSON (a NaN a Python producer wrote, say) costs only itself
                items = _split_array(bytes(value))
                if items:
                    return self._decode_items(items, now_ms, max_future_ms)
            return [], [Rejection("invalid_json", f"not valid JSON: {_shorten(str(exc))}")]
        if not array:
            if isinstance(exc, RecursionError):  # cannot happen with these record types; bounded anyway
                return [], [Rejection("invalid_json", "nested too deeply")]
            kind, reason = self._explain(exc, value)
            return [], [Rejection(kind, reason)]
        # an array with at least one bad element: again, element by element
        try:
            items = self._raw_list.decode(value)
        except (*_DECODE_FAILURES, RecursionError) as err:  # an element is not JSON or nests too deeply
            items = _split_array(bytes(value))
            if not items:
                why = "nested too deeply" if isinstance(err, RecursionError) else _shorten(str(err))
                return [], [Rejection("invalid_json", f"not valid JSON: {why}")]
        return self._decode_items(items, now_ms, max_future_ms)

    def _decode_items(self, items: list[Any], now_ms: int, max_future_ms: int) -> tuple[list[Any], list[Rejection]]:
        """The elements of an array message (JSON text each) decoded one by one: an element that
        fails (not JSON, not UTF-8, nested too deeply, against the schema) is rejected with its index."""
        records, positions, rejections = [], [], []
        for i, raw in enumerate(items):
            try:
                text = bytes(raw)
                if not text.isascii():  # (a refused element's strings are not all read by the decoder)
                    text.decode("utf-8")
                records.append(self._one.decode(raw))
                positions.append(i)
            except msgspec.ValidationError as err:
                kind, reason = self._explain(err, raw)
                rejections.append(Rejection(kind, reason, i, _item(raw)))
            except (*_DECODE_FAILURES, RecursionError, UnicodeDecodeError) as err:
                why = "nested too deeply" if isinstance(err, RecursionError) else _shorten(str(err))
                rejections.append(Rejection("invalid_json", f"not valid JSON: {why}", i, None))
        return self._finish(records, positions, rejections, now_ms, max_future_ms, items)

    def _explain(self, exc: msgspec.ValidationError, raw: Any) -> tuple[str, str]:
        """Kind and reason for one element msgspec refused: the field path, what was wrong, the value (cut short)."""
        msg = str(exc)
        if msg.startswith(_UNKNOWN):  # (only top-level objects refuse unknown fields: no path follows)
            return "schema", f"{_name(msg[len(_UNKNOWN):-1])}: unknown field"
        text, sep, path = msg.rpartition(" - at `")
        text, path = (text, path[:-1]) if sep else (msg, "$")
        if text.startswith(_MISSING):
            return "schema", f"{text[len(_MISSING):-1]}: required field is missing"
        key_error = path.startswith(_KEY_AT)
        if key_error:
            path = path[len(_KEY_AT):]
        steps = [a or f"[{b}]" for a, b in _PATH.findall(path)]
        if not steps:
            m = _GOT.match(text)
            got = _JSON_NAMES.get(m[1], m[1]) if m else "a value"
            return "not_an_object", f"expected a JSON object, got {got}"
        name = steps[0]
        f = self._fields.get(name)
        if f is None:
            return "schema", f"{_name(name)}: {_shorten(text)}"
        try:
            parts = self._raw_map.decode(raw)
        except (msgspec.ValidationError, RecursionError):  # nested too deeply to look at: no value shown
            parts = {}
        except _DECODE_FAILURES as err:  # a single object that is not even JSON after the bad field
            return "invalid_json", f"not valid JSON: {_shorten(str(err))}"
        value, spec, where = parts.get(name), f.spec, name
        if f.role == "map" and (key_error or len(steps) > 1):  # about one entry of the map: which?
            key, entry = self._bad_entry(f, value, key_error) if value is not None else (None, None)
            if key_error:
                names = {"type": "string", **f.spec.get("propertyNames", {})}
                return _reason(text, f"{name}: entry name", names, None if key is None else msgspec.json.encode(key))
            spec = dict(f.entries).get(key, f.spec["additionalProperties"])
            value, where = entry, f"{name}.{_name(key)}" if key is not None else f"{name} entry"
        return _reason(text, where, spec, value)

    def _bad_entry(self, f: _Field, raw: Any, key_error: bool) -> tuple[Optional[str], Any]:
        """The first entry of the map ``raw`` whose name (``key_error``) or value breaks the map's types."""
        try:
            entries = self._raw_map.decode(raw)
        except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
            return None, None
        check_key, check_value = msgspec.json.Decoder(f.key_type), msgspec.json.Decoder(f.value_type)
        for key, v in entries.items():
            try:
                if key_error:
                    check_key.decode(msgspec.json.encode(key))
                else:
                    check_value.decode(v)
            except (msgspec.MsgspecError, RecursionError):
                return key, v
        return None, None


def load_contracts(schema_dir: Path | None = None) -> dict[str, Contract]:
    """The three input contracts by stream name (audio, behavior, system).

    The records are this module's types when the files are the ones they were generated from
    (the usual case); otherwise types generated from the files in ``schema_dir``."""
    out = {}
    for stream, (title, known) in RECORD_TYPES.items():
        schema = _read_schema(title, schema_dir)
        fresh = record_type(known.__name__, schema)
        same = msgspec.structs.fields(fresh) == msgspec.structs.fields(known) and (
            fresh.__struct_config__.forbid_unknown_fields == known.__struct_config__.forbid_unknown_fields
        )
        out[stream] = Contract(stream, schema, known if same else fresh)
    return out
