"""Silences: label matchers over a time range, in the manner of Alertmanager and ``amtool``.

A matcher is ``name=value``, ``name!=value``, ``name=~regex`` or ``name!~regex`` (the regex is
anchored at both ends, as in Alertmanager). Names are an alert's entity labels (``region``,
``cdn_pop``, ``service``, ...) or one of its fields ``kind``, ``severity``, ``priority``,
``detector``. A silence holds back every alert all of whose matchers match while
``starts_at <= event time < ends_at``.

>>> m = parse_matcher('region=~"BR|MX"')
>>> m.to_dict()
{'name': 'region', 'value': 'BR|MX', 'isRegex': True, 'isEqual': True}
>>> m.matches({"entity": {"region": "MX"}}), m.matches({"entity": {"region": "MXX"}})
(True, False)
>>> parse_matcher("colour=red", labels={"region"})
Traceback (most recent call last):
...
soundcheck.alerting.silences.SilenceError: unknown label 'colour' in matcher 'colour=red'; known labels: region
>>> parse_duration("1h30m"), parse_duration("45s")
(5400000, 45000)
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Mapping, Optional

ALERT_FIELDS = ("kind", "severity", "priority", "detector")
_MATCHER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|==|=)\s*(.*?)\s*$", re.S)
_DURATION = re.compile(r"(\d+)(ms|[smhdw])")
_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
MAX_DURATION_MS = 90 * 86_400_000  # a silence longer than this is almost certainly a mistake


class SilenceError(ValueError):
    """A silence or matcher that cannot be accepted; the message says why and what is allowed."""


def known_labels(settings: Any) -> set[str]:
    """The labels a matcher may name: the entity labels the detectors use, and the alert fields."""
    audio = (settings.detection.get("audio") or {}) if hasattr(settings, "detection") else {}
    dims = set(audio.get("dimensions") or ())
    return {"region", "service", "user_id", "cdn_pop", "device", *dims, *ALERT_FIELDS}


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> "re.Pattern[str]":
    return re.compile(f"(?:{pattern})", re.S)


@dataclass(frozen=True)
class Matcher:
    name: str
    value: str
    is_regex: bool = False
    is_equal: bool = True

    def __post_init__(self) -> None:
        if self.is_regex:
            try:
                _compiled(self.value)
            except re.error as exc:
                raise SilenceError(f"matcher {self}: {self.value!r} is not a valid regular expression ({exc})") from None

    def __str__(self) -> str:
        op = ("=~" if self.is_equal else "!~") if self.is_regex else ("=" if self.is_equal else "!=")
        return f"{self.name}{op}{self.value!r}" if self.is_regex else f"{self.name}{op}{self.value}"

    def matches(self, alert: Mapping[str, Any]) -> bool:
        have = alert.get(self.name) if self.name in ALERT_FIELDS else (alert.get("entity") or {}).get(self.name)
        have = "" if have is None else str(have)  # an absent label is the empty string, as in Alertmanager
        hit = _compiled(self.value).fullmatch(have) is not None if self.is_regex else have == self.value
        return hit == self.is_equal

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "isRegex": self.is_regex, "isEqual": self.is_equal}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "Matcher":
        if not isinstance(doc, Mapping) or not isinstance(doc.get("name"), str) or not isinstance(doc.get("value"), str):
            raise SilenceError(f"a matcher needs a string 'name' and 'value', got {doc!r}")
        return cls(doc["name"], doc["value"], bool(doc.get("isRegex", False)), bool(doc.get("isEqual", True)))


def parse_matcher(text: str, labels: Optional[Iterable[str]] = None) -> Matcher:
    """``name=value``, ``name!=value``, ``name=~regex``, ``name!~regex``; the value may be quoted."""
    m = _MATCHER.match(text)
    if not m:
        raise SilenceError(f"matcher {text!r} is not name=value, name!=value, name=~regex or name!~regex")
    name, op, value = m.groups()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    if labels is not None and name not in labels:
        raise SilenceError(f"unknown label {name!r} in matcher {text!r}; known labels: {', '.join(sorted(labels))}")
    if value == "" and op in ("=", "=="):
        raise SilenceError(f"matcher {text!r} has an empty value")
    return Matcher(name, value, is_regex=op in ("=~", "!~"), is_equal=op in ("=", "==", "=~"))


def parse_duration(text: str) -> int:
    """``90s``, ``30m``, ``2h``, ``1h30m``, ``1d``, ``1w`` in milliseconds; refuses anything else,
    zero and negative durations."""
    s = text.strip()
    if s.startswith("-"):
        raise SilenceError(f"duration {text!r} is negative")
    if not s or _DURATION.sub("", s) != "":
        raise SilenceError(f"duration {text!r} is not like 90s, 30m, 2h, 1h30m, 1d")
    ms = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(s))
    if ms <= 0:
        raise SilenceError(f"duration {text!r} is zero")
    return ms


def matchers_of(silence: Mapping[str, Any]) -> list[Matcher]:
    """A silence's matchers: a list of matcher objects, or (the older form) a mapping of equalities."""
    raw = silence.get("matchers")
    if isinstance(raw, Mapping):
        return [Matcher(str(k), str(v)) for k, v in raw.items()]
    if isinstance(raw, list):
        return [Matcher.from_dict(d) for d in raw]
    raise SilenceError("a silence needs 'matchers': a list of {name, value, isRegex, isEqual}")


def silence_matches(silence: Mapping[str, Any], alert: Mapping[str, Any], now: int) -> bool:
    """Is ``alert`` silenced by ``silence`` at event time ``now`` (ms)?

    >>> s = {"id": "maint-1", "matchers": {"region": "BR", "kind": "service_degradation"}, "starts_at": 0, "ends_at": 100}
    >>> silence_matches(s, {"entity": {"region": "BR", "service": "cdn"}, "kind": "service_degradation"}, 50)
    True
    >>> silence_matches(s, {"entity": {"region": "BR"}, "kind": "service_degradation"}, 150)
    False
    """
    if not (silence.get("starts_at", 0) <= now < silence.get("ends_at", 2**62)):
        return False
    if silence.get("expired_at") is not None and now >= silence["expired_at"]:
        return False
    return all(m.matches(alert) for m in matchers_of(silence))


def validate(doc: Mapping[str, Any], labels: Optional[Iterable[str]] = None,
             max_ms: Optional[int] = MAX_DURATION_MS) -> dict[str, Any]:
    """A silence as stored in the worker's table, checked: an ``id``, at least one matcher (and
    at least one that is not satisfied by the empty string, so that a silence cannot mute
    everything by accident), ``starts_at < ends_at``, at most MAX_DURATION_MS long."""
    if not isinstance(doc, Mapping):
        raise SilenceError("a silence is a JSON object")
    sid = doc.get("id")
    if not isinstance(sid, str) or not sid.strip() or len(sid) > 200:
        raise SilenceError("a silence needs an 'id' (a non-empty string of at most 200 characters)")
    matchers = matchers_of(doc)
    if not matchers:
        raise SilenceError("a silence needs at least one matcher")
    names = set(labels) if labels is not None else None
    for m in matchers:
        if names is not None and m.name not in names:
            raise SilenceError(f"unknown label {m.name!r} in matcher {m}; known labels: {', '.join(sorted(names))}")
    if all(m.matches({"entity": {}}) for m in matchers):
        raise SilenceError("these matchers match an alert with no labels at all: the silence would mute everything")
    try:
        starts, ends = int(doc.get("starts_at", 0)), int(doc.get("ends_at", 2**62))
    except (TypeError, ValueError):
        raise SilenceError("starts_at and ends_at are epoch milliseconds") from None
    if ends <= starts:
        raise SilenceError(f"the silence ends ({ends}) before it starts ({starts})")
    if max_ms is not None and ends - starts > max_ms and ends != 2**62:
        raise SilenceError(f"a silence lasts at most {max_ms // 86_400_000} days")
    out = {
        "id": sid, "matchers": [m.to_dict() for m in matchers], "starts_at": starts, "ends_at": ends,
        "author": str(doc.get("author", ""))[:200], "comment": str(doc.get("comment", ""))[:2000],
        "created_at": int(doc.get("created_at", 0) or 0),
    }
    if doc.get("expired_at") is not None:
        out["expired_at"] = int(doc["expired_at"])
    return out


def new_silence(matchers: list[str], *, labels: Iterable[str], duration: Optional[str] = None,
                ends_at: Optional[int] = None, starts_at: Optional[int] = None, author: str = "", comment: str = "",
                now_ms: Optional[int] = None) -> dict[str, Any]:
    """A silence from the command line's words; every check runs before anything is sent."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    labels = set(labels)
    parsed = [parse_matcher(t, labels) for t in matchers]
    if not parsed:
        raise SilenceError("give at least one matcher, e.g. region=BR or service=~\"cdn|edge\"")
    start = now if starts_at is None else int(starts_at)
    if (duration is None) == (ends_at is None):
        raise SilenceError("give either a duration (--duration 2h) or an end time (--end 2026-12-01T06:00:00Z)")
    end = start + parse_duration(duration) if duration is not None else int(ends_at)  # type: ignore[arg-type]
    if end <= now:
        raise SilenceError("the silence would end in the past")
    return validate({"id": str(uuid.uuid4()), "matchers": [m.to_dict() for m in parsed], "starts_at": start,
                     "ends_at": end, "author": author, "comment": comment, "created_at": now}, labels)


def state(silence: Mapping[str, Any], now_ms: int) -> str:
    """``active``, ``pending`` (starts later) or ``expired``."""
    if now_ms >= silence.get("ends_at", 2**62) or silence.get("expired_at") is not None:
        return "expired"
    return "pending" if now_ms < silence.get("starts_at", 0) else "active"
