"""The on-call engineer's commands: ``soundcheck alerts tail``, ``soundcheck silence add|list|expire``
and ``soundcheck why FINGERPRINT``.

Both talk to Kafka only (the alerts topic, the control topic, and the changelog of the worker's
silence table), with the same connection settings as the worker (:mod:`soundcheck.kafka.security`).
The formatting and the parsing live in plain functions so they are tested without a broker.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Optional, TextIO

import orjson

from soundcheck.alerting import silences
from soundcheck.kafka.admin import TABLES
from soundcheck.settings import Settings

PRIORITY_COLORS = {"P0": "\033[1;31m", "P1": "\033[31m", "P2": "\033[33m", "P3": "\033[36m"}
RESOLVED_COLOR, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


# --------------------------------------------------------------------------- times


def parse_time(text: str, now_ms: Optional[int] = None, ago: bool = True) -> int:
    """``2026-12-01T06:00:00Z`` (RFC 3339, a time zone required), epoch milliseconds, or (``ago``) a
    duration ago (``10m``: ten minutes before now), as epoch milliseconds."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    s = text.strip()
    if s.isdigit():
        return int(s)
    if ago:
        try:
            return now - silences.parse_duration(s)
        except silences.SilenceError:
            pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise silences.SilenceError(f"time {text!r} is not RFC 3339 (2026-12-01T06:00:00Z), epoch ms"
                                    + (" or a duration ago like 10m" if ago else "")) from None
    if dt.tzinfo is None:
        raise silences.SilenceError(f"time {text!r} has no time zone (add Z or +01:00)")
    return int(dt.timestamp() * 1000)


def _clock(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# --------------------------------------------------------------------------- alerts tail


class TailFormatter:
    """One line per notification, grouped under its incident (a header line whenever the incident
    changes), coloured by priority; resolved notifications in green.

    >>> f = TailFormatter(color=False)
    >>> a = {"incident_id": "inc-1", "priority": "P1", "severity": "high", "status": "firing", "title": "CDN PoP slow",
    ...      "event_time": 0, "fingerprint": "abcdef0123", "notification": "new", "entity": {"cdn_pop": "gru1"},
    ...      "root_cause": {"node": "cdn", "entity": {"service": "cdn", "region": "BR"}, "confidence": 0.8}}
    >>> print(f.format(a))
    incident inc-1  root cause: region=BR service=cdn
      1970-01-01 00:00:00 P1 high     firing   CDN PoP slow  [abcdef01]
    >>> print(f.format({**a, "status": "resolved", "notification": "resolved"}))
      1970-01-01 00:00:00 P1 high     resolved CDN PoP slow  [abcdef01]
    """

    def __init__(self, color: bool = False, clock: Optional[Callable[[dict[str, Any]], str]] = None) -> None:
        self.color = color
        self.clock = clock or (lambda alert: _clock(int(alert.get("event_time", 0))))
        self.incident: Optional[str] = None

    def format(self, alert: dict[str, Any]) -> str:
        lines = []
        inc = alert.get("incident_id") or (alert.get("group") or {}).get("incident_id") or alert.get("fingerprint")
        if inc != self.incident:
            self.incident = inc
            root = alert.get("root_cause") or {}
            where = " ".join(f"{k}={v}" for k, v in sorted((root.get("entity") or {}).items()))
            head = f"incident {inc}" + (f"  root cause: {where}" if where else "")
            lines.append(f"{DIM}{head}{RESET}" if self.color else head)
        prio, status = alert.get("priority", "?"), alert.get("status", "firing")
        c0 = (RESOLVED_COLOR if status == "resolved" else PRIORITY_COLORS.get(prio, "")) if self.color else ""
        c1 = RESET if self.color and c0 else ""
        note = alert.get("notification", "new")
        note = "" if note in ("new", "resolved") else f" ({note})"
        fp = str(alert.get("fingerprint", ""))[:8]
        lines.append(f"  {self.clock(alert)} {c0}{prio} {alert.get('severity', '?'):<8} {status:<8}{c1} "
                     f"{alert.get('title', alert.get('kind', '?'))}{note}  [{fp}]")
        return "\n".join(lines)


async def tail_alerts(settings: Settings, *, start: str = "end", since_ms: Optional[int] = None, as_json: bool = False,
                      color: bool = False, count: Optional[int] = None, timeout: Optional[float] = None,
                      out: TextIO = sys.stdout, stop: Optional[asyncio.Event] = None,
                      formatter: Optional[TailFormatter] = None) -> int:
    """Follow the alerts topic from its end (``start="end"``), its beginning, or ``since_ms``;
    stop after ``count`` notifications, ``timeout`` seconds, or when ``stop`` is set. Returns how
    many were printed."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic = settings.topics.alerts
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", **settings.kafka_client())
    await consumer.start()
    shown = 0
    fmt = formatter or TailFormatter(color=color)
    try:
        parts = consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
        if not parts:
            raise SystemExit(f"soundcheck alerts tail: the topic {topic!r} does not exist on {settings.kafka.bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        if since_ms is not None:
            found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                consumer.seek(tp, found[tp].offset if found.get(tp) is not None else ends[tp])
        elif start == "beginning":
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (stop and stop.is_set()) and (deadline is None or time.monotonic() < deadline):
            batch = await consumer.getmany(timeout_ms=200)
            records = sorted((r for rs in batch.values() for r in rs), key=lambda r: (r.timestamp, r.partition, r.offset))
            for r in records:
                try:
                    alert = orjson.loads(r.value)
                except orjson.JSONDecodeError:
                    continue  # not ours to judge: the alerts topic is written by the worker only
                print(orjson.dumps(alert).decode() if as_json else fmt.format(alert), file=out, flush=True)
                shown += 1
                if count is not None and shown >= count:
                    return shown
    finally:
        await consumer.stop()
    return shown


async def _partitions(consumer: Any, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic) or set()


# --------------------------------------------------------------------------- silences


def control_changelog(settings: Settings) -> str:
    """The changelog topic of the worker's silence table (Faust table ``soundcheck-control``)."""
    return f"{settings.kafka.app_id}-{TABLES[2]}-changelog"


def _table_key(raw: Optional[bytes]) -> Optional[str]:
    if raw is None:
        return None
    try:
        key = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
    return key if isinstance(key, str) else raw.decode("utf-8", "replace")


async def read_silences(settings: Settings, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    """The worker's silence table as it stands: the changelog folded, latest value per id."""
    from soundcheck.kafka.admin import read_latest

    latest = await read_latest(settings.kafka.bootstrap_servers, control_changelog(settings), timeout=timeout,
                               client=settings.kafka_client())
    out: dict[str, dict[str, Any]] = {}
    for key, value in latest.items():
        sid = _table_key(key)
        try:
            doc = orjson.loads(value) if value else None
        except orjson.JSONDecodeError:
            continue
        if sid and isinstance(doc, dict) and "matchers" in doc:
            out[sid] = doc
    return out


async def send_control(settings: Settings, key: str, doc: dict[str, Any]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all", **settings.kafka_client())
    await producer.start()
    try:
        await producer.send_and_wait(settings.topics.control, orjson.dumps(doc), key=key.encode())
    finally:
        await producer.stop()


async def wait_for_table(settings: Settings, sid: str, condition: Callable[[Optional[dict[str, Any]]], bool],
                         wait_s: float) -> Optional[dict[str, Any]]:
    """Poll the worker's table until ``condition(silence)`` holds or ``wait_s`` pass; the last value seen."""
    deadline = time.monotonic() + wait_s
    while True:
        current = (await read_silences(settings)).get(sid)
        if condition(current) or time.monotonic() >= deadline:
            return current
        await asyncio.sleep(0.5)


def format_silences(table: dict[str, dict[str, Any]], now_ms: int, only: Optional[str] = None) -> str:
    """A table of silences: id, state, matchers, start, end, author, comment (newest first).

    >>> s = {"id": "s1", "matchers": [{"name": "region", "value": "BR", "isRegex": False, "isEqual": True}],
    ...      "starts_at": 0, "ends_at": 3_600_000, "author": "ana", "comment": "PoP upgrade"}
    >>> print(format_silences({"s1": s}, now_ms=60_000))
    ID  STATE   MATCHERS   STARTS               ENDS                 AUTHOR  COMMENT
    s1  active  region=BR  1970-01-01 00:00:00  1970-01-01 01:00:00  ana     PoP upgrade
    """
    rows = [("ID", "STATE", "MATCHERS", "STARTS", "ENDS", "AUTHOR", "COMMENT")]
    for s in sorted(table.values(), key=lambda s: (-s.get("created_at", 0), -s.get("starts_at", 0), s["id"])):
        st = silences.state(s, now_ms)
        if only and st != only:
            continue
        matchers = " ".join(str(m) for m in silences.matchers_of(s))
        ends = "never" if s.get("ends_at", 2**62) >= 2**62 else _clock(s["ends_at"])
        rows.append((s["id"], st, matchers, _clock(s.get("starts_at", 0)), ends, s.get("author", ""), s.get("comment", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# --------------------------------------------------------------------------- soundcheck why

_HEX = frozenset("0123456789abcdef")


async def read_decisions(settings: Settings, prefix: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every record of the decision log whose fingerprint starts with ``prefix``, in log order."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic = settings.topics.decisions
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", **settings.kafka_client())
    await consumer.start()
    out: list[dict[str, Any]] = []
    try:
        parts = consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
        if not parts:
            raise silences.SilenceError(f"there is no decision log: the topic {topic!r} does not exist (has a worker run?)")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        pending = {tp for tp in tps if end[tp] > 0}
        deadline = time.monotonic() + timeout
        key = prefix.encode()
        while pending:
            if time.monotonic() > deadline:
                raise silences.SilenceError(f"the decision log {topic!r} was not read to its end within {timeout:.0f} s")
            for tp, records in (await consumer.getmany(*pending, timeout_ms=300)).items():
                for r in records:
                    if r.offset < end[tp] and r.key is not None and r.key.startswith(key):
                        try:
                            out.append(orjson.loads(r.value))
                        except orjson.JSONDecodeError:
                            continue
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    return out


def _detail(d: dict[str, Any]) -> str:
    det = d.get("detail") or {}
    if d["decision"] == "silenced":
        return f"silence {det.get('silence_id')}" + (f" ({det['silence_comment']})" if det.get("silence_comment") else "")
    if d["decision"] == "inhibited":
        return f"by the incident's root cause {str(det.get('by_fingerprint'))[:8]} ({det.get('root_node')})"
    if d["decision"] == "released":
        return f"after being held by {det.get('held_by')}"
    if d["decision"] == "notified":
        return f"{d.get('priority')} {d.get('severity')} ({det.get('notification')}), group of {det.get('group_size')} in {det.get('incident_id')}"
    if d["decision"] == "grouped":
        return f"into {det.get('incident_id')}, {det.get('waiting')} waiting to be sent ({det.get('notification')})"
    if d["decision"] == "deduplicated":
        return f"occurrence {det.get('occurrences')}: {det.get('reason')}"
    if d["decision"] == "resolved":
        return ("notified" if det.get("notified") else f"not notified: {det.get('reason')}") + \
            (f" (while held by {det['while_held_by']})" if det.get("while_held_by") else "")
    return ", ".join(f"{k}={v}" for k, v in sorted(det.items()))


def format_history(decisions: list[dict[str, Any]]) -> str:
    """An alert's history from the decision log, one line per decision, grouped by fingerprint.

    >>> print(format_history([{"fingerprint": "6020df0bf7e9", "decision": "silenced", "event_time": 0,
    ...     "kind": "service_degradation", "entity": {"region": "BR"}, "detail": {"silence_id": "maint-1"}}]))
    6020df0bf7e9  service_degradation  region=BR
      1970-01-01 00:00:00  silenced      silence maint-1
    """
    lines: list[str] = []
    by_fp: dict[str, list[dict[str, Any]]] = {}
    for d in decisions:
        by_fp.setdefault(d["fingerprint"], []).append(d)
    for fp, items in by_fp.items():
        head = next((d for d in items if d.get("kind")), items[0])
        labels = " ".join(f"{k}={v}" for k, v in sorted((head.get("entity") or {}).items()))
        lines.append(f"{fp}  {head.get('kind') or '?'}  {labels}".rstrip())
        for d in sorted(items, key=lambda d: d.get("event_time", 0)):
            lines.append(f"  {_clock(int(d.get('event_time', 0)))}  {d['decision']:<12}  {_detail(d)}")
    return "\n".join(lines)


def cmd_why(args: argparse.Namespace, settings: Settings) -> int:
    fp = args.fingerprint.strip().lower()
    if len(fp) < 6 or not set(fp) <= _HEX:
        print(f"soundcheck why: {args.fingerprint!r} is not a fingerprint (hexadecimal, at least 6 characters, "
              "as `soundcheck alerts tail` shows them)", file=sys.stderr)
        return 2
    try:
        found = asyncio.run(read_decisions(settings, fp))
    except silences.SilenceError as exc:
        print(f"soundcheck why: {exc}", file=sys.stderr)
        return 2
    if not found:
        print(f"soundcheck why: no decision recorded for fingerprint {fp!r} in {settings.topics.decisions} "
              "(kept as long as the topic's retention, 7 days by default)", file=sys.stderr)
        return 2
    if args.json:
        for d in found:
            print(orjson.dumps(d).decode())
    else:
        print(format_history(found))
    return 0


# --------------------------------------------------------------------------- the commands


def cmd_alerts_tail(args: argparse.Namespace, settings: Settings) -> int:
    try:
        since = parse_time(args.since) if args.since else None
    except silences.SilenceError as exc:
        print(f"soundcheck alerts tail: {exc}", file=sys.stderr)
        return 2
    color = sys.stdout.isatty() and not args.no_color and not args.json
    try:
        asyncio.run(tail_alerts(settings, start="beginning" if args.from_beginning else "end", since_ms=since, as_json=args.json,
                                color=color, count=args.count, timeout=args.timeout))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_silence(args: argparse.Namespace, settings: Settings) -> int:
    name = f"soundcheck silence {args.silence_command}"
    try:
        if args.silence_command == "add":
            ends = parse_time(args.end, ago=False) if args.end else None
            starts = parse_time(args.start, ago=False) if args.start else None
            s = silences.new_silence(args.matchers, labels=silences.known_labels(settings), duration=args.duration,
                                     ends_at=ends, starts_at=starts, author=args.author, comment=args.comment)
            asyncio.run(send_control(settings, s["id"], {"action": "silence", "silence": s}))
            seen = asyncio.run(wait_for_table(settings, s["id"], lambda cur: cur is not None, args.wait))
            print(s["id"])
            if seen is None:
                print(f"{name}: sent to {settings.topics.control}; no worker has applied it within {args.wait:.0f} s "
                      "(is one running?). It applies when a worker reads it.", file=sys.stderr)
            return 0
        if args.silence_command == "list":
            table = asyncio.run(read_silences(settings))
            now = int(time.time() * 1000)
            if args.json:
                for s in table.values():
                    print(orjson.dumps({**s, "state": silences.state(s, now)}).decode())
            else:
                print(format_silences(table, now, only=args.state))
            return 0
        if args.silence_command == "expire":
            table = asyncio.run(read_silences(settings))
            now = int(time.time() * 1000)
            for sid in args.ids:
                if sid not in table:
                    raise silences.SilenceError(f"no silence with id {sid!r} (see `soundcheck silence list`)")
            for sid in args.ids:
                if silences.state(table[sid], now) == "expired":
                    print(f"{name}: {sid} has already expired", file=sys.stderr)
                    continue
                asyncio.run(send_control(settings, sid, {"action": "expire", "id": sid, "at": now}))
                seen = asyncio.run(wait_for_table(settings, sid, lambda cur: bool(cur and cur.get("expired_at")), args.wait))
                if not (seen and seen.get("expired_at")):
                    print(f"{name}: sent; no worker has applied it within {args.wait:.0f} s", file=sys.stderr)
                print(sid)
            return 0
    except silences.SilenceError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    return 2


def add_cli(sub: Any, settings_of: Callable[[argparse.Namespace], Settings]) -> None:
    a = sub.add_parser("alerts", help="follow the alerts topic live")
    asub = a.add_subparsers(dest="alerts_command", required=True)
    t = asub.add_parser("tail", help="one line per notification, grouped by incident, coloured by priority")
    t.add_argument("--from-beginning", action="store_true", help="start at the beginning of the topic (default: its end)")
    t.add_argument("--since", help="start at a time: RFC 3339, epoch ms, or a duration ago such as 30m")
    t.add_argument("--json", action="store_true", help="print each notification as one JSON line (for scripts)")
    t.add_argument("--no-color", action="store_true")
    t.add_argument("--count", type=int, help="stop after this many notifications")
    t.add_argument("--timeout", type=float, help="stop after this many seconds")
    t.set_defaults(func=lambda args: cmd_alerts_tail(args, settings_of(args)))

    w = sub.add_parser("why", help="an alert's history from the decision log: grouped, deduplicated, silenced, inhibited, released, resolved")
    w.add_argument("fingerprint", help="the alert's fingerprint, or its first characters (at least 6)")
    w.add_argument("--json", action="store_true", help="one JSON decision per line")
    w.set_defaults(func=lambda args: cmd_why(args, settings_of(args)))

    s = sub.add_parser("silence", help="add, list and expire silences (in the manner of amtool silence)")
    ssub = s.add_subparsers(dest="silence_command", required=True)
    add = ssub.add_parser("add", help="silence alerts matching all the matchers: region=BR kind=~'.*degradation' service!=cdn")
    add.add_argument("matchers", nargs="+", help="name=value, name!=value, name=~regex, name!~regex")
    add.add_argument("--duration", "-d", help="how long from the start: 90s, 30m, 2h, 1h30m, 1d")
    add.add_argument("--end", help="or when it ends: RFC 3339 (2026-12-01T06:00:00Z) or epoch ms")
    add.add_argument("--start", help="when it starts (default now): RFC 3339 or epoch ms")
    add.add_argument("--author", "-a", default=_user(), help="who adds it (default: $USER)")
    add.add_argument("--comment", "-c", default="", help="why")
    add.add_argument("--wait", type=float, default=10.0, help="seconds to wait for a worker to apply it (default 10)")
    lst = ssub.add_parser("list", help="the silences in the worker's table, active, pending and expired")
    lst.add_argument("--state", choices=("active", "pending", "expired"), help="only these")
    lst.add_argument("--json", action="store_true")
    exp = ssub.add_parser("expire", help="end silences now (they stay listed, expired)")
    exp.add_argument("ids", nargs="+")
    exp.add_argument("--wait", type=float, default=10.0)
    for p in (add, lst, exp):
        p.set_defaults(func=lambda args: cmd_silence(args, settings_of(args)))


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment
        return ""
