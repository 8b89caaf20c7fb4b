"""``soundcheck backtest``: recorded input through the whole pipeline offline, with two configurations.

The input is either the three input topics between two times (or from their beginning), read as
they are, or a JSON-lines file (the same format ``--save`` writes), one Kafka message per line::

    {"stream": "audio", "partition": 0, "offset": 17, "timestamp": 1700000000123, "value": <the message's JSON>}

(``"value_b64"`` instead of ``"value"`` for bytes that are not JSON; ``offset`` and ``timestamp``
are optional). Messages are replayed partition by partition in timestamp order through the code
the worker runs (:class:`soundcheck.pipeline.OfflinePipeline`: contracts, stage 1, stage 2,
classification, correlation, the alert lifecycle); event time decides everything, so a replay
gives what live traffic gave. Each configuration is the settings with a YAML file of overrides
and ``--set-b section.key=value`` pairs on top; the report compares the notifications: per
fingerprint (what it is, how many notifications, the first page's event time) with the alerts
only one side raised, and per priority.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import orjson
import yaml

from soundcheck.pipeline import STREAMS, OfflinePipeline
from soundcheck.settings import Settings, SettingsError

PAGE = ("P0", "P1")
REPLAY_STEP_MS = 1_000  # messages are handed to the pipeline a second of append time at a time


class BacktestError(ValueError):
    """The recorded input or the configurations cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Message:
    stream: str
    partition: int
    offset: int
    timestamp: int
    value: bytes


# --------------------------------------------------------------------------- input


def read_jsonl(path: Path) -> list[Message]:
    """The messages of a JSON-lines recording, checked line by line."""
    if not path.is_file():
        raise BacktestError(f"{path}: no such file")
    out: list[Message] = []
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise BacktestError(f"{path}:{n}: not a JSON line ({exc})") from None
            if not isinstance(doc, dict) or doc.get("stream") not in STREAMS:
                raise BacktestError(f"{path}:{n}: needs \"stream\" (one of {', '.join(STREAMS)})")
            if "value" in doc:
                value = orjson.dumps(doc["value"]) if not isinstance(doc["value"], str) else doc["value"].encode()
            elif isinstance(doc.get("value_b64"), str):
                try:
                    value = base64.b64decode(doc["value_b64"], validate=True)
                except ValueError:
                    raise BacktestError(f"{path}:{n}: value_b64 is not base64") from None
            else:
                raise BacktestError(f"{path}:{n}: needs \"value\" (the message's JSON) or \"value_b64\"")
            try:
                part, ts = int(doc.get("partition", 0)), int(doc.get("timestamp", 0))
                off = int(doc.get("offset", n))
            except (TypeError, ValueError):
                raise BacktestError(f"{path}:{n}: partition, offset and timestamp are integers") from None
            if part < 0:
                raise BacktestError(f"{path}:{n}: partition {part} is negative")
            out.append(Message(doc["stream"], part, off, ts, value))
    return out


def write_jsonl(messages: Iterable[Message], path: Path) -> int:
    n = 0
    with path.open("wb") as f:
        for m in messages:
            doc: dict[str, Any] = {"stream": m.stream, "partition": m.partition, "offset": m.offset, "timestamp": m.timestamp}
            try:
                doc["value"] = orjson.loads(m.value)
            except orjson.JSONDecodeError:
                doc["value_b64"] = base64.b64encode(m.value).decode()
            f.write(orjson.dumps(doc) + b"\n")
            n += 1
    return n


async def read_topics(settings: Settings, since_ms: Optional[int], until_ms: Optional[int], timeout: float = 300.0) -> list[Message]:
    """The input topics' messages appended in [since_ms, until_ms) (None: from the beginning, to
    the end offsets at the time of the call)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topics = {name: stream for stream, name in settings.topics.inputs().items()}
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20,
                                **settings.kafka_client())
    await consumer.start()
    out: list[Message] = []
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        if not tps:
            raise BacktestError(f"none of the input topics {sorted(topics)} exists on {settings.kafka.bootstrap_servers}")
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        if until_ms is not None:
            found = await consumer.offsets_for_times({tp: until_ms for tp in tps})
            end = {tp: (found[tp].offset if found.get(tp) is not None else end[tp]) for tp in tps}
        if since_ms is None:
            await consumer.seek_to_beginning(*tps)
        else:
            found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
            for tp in tps:
                consumer.seek(tp, found[tp].offset if found.get(tp) is not None else end[tp])
        pending = {tp for tp in tps if await consumer.position(tp) < end[tp]}
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise BacktestError(f"reading the input topics did not finish within {timeout:.0f} s")
            for tp, records in (await consumer.getmany(*pending, timeout_ms=500)).items():
                for r in records:
                    if r.offset < end[tp]:
                        out.append(Message(topics[tp.topic], tp.partition, r.offset, r.timestamp, r.value or b""))
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    return out


def record_simulation(sim: Any, per_message: int = 50, partitions: int = 3) -> list[Message]:
    """What a simulator run would leave on the input topics (keyed as it keys, appended at its event
    time), as a recording."""
    from soundcheck.evaluation.simulator import encode
    from soundcheck.ingest.partials import stable_partition

    out: list[Message] = []
    offsets: dict[tuple[str, int], int] = {}
    for sec in range(sim.duration_s):
        t = sim.start_ms + sec * 1000
        for b in sim.tick(t):
            part = stable_partition(b.key, partitions)
            for value in encode(b, per_message):
                off = offsets.get((b.stream, part), 0)
                offsets[(b.stream, part)] = off + 1
                out.append(Message(b.stream, part, off, t + 999, bytes(value)))
    return out


# --------------------------------------------------------------------------- replay


@dataclass
class Run:
    name: str
    alerts: list[dict[str, Any]] = field(default_factory=list)
    events_in: int = 0
    rejected: int = 0
    anomalies: int = 0


def replay(settings: Settings, messages: list[Message], name: str = "") -> Run:
    """The messages through the whole pipeline, a second of append time at a time, then the end."""
    if not messages:
        raise BacktestError("there is nothing to replay: no messages in the recording or the time range")
    partitions = max(m.partition for m in messages) + 1
    pipe = OfflinePipeline(settings, partitions=partitions)
    ordered = sorted(messages, key=lambda m: (m.timestamp, m.stream, m.partition, m.offset))
    i = 0
    while i < len(ordered):
        step_end = ordered[i].timestamp - ordered[i].timestamp % REPLAY_STEP_MS + REPLAY_STEP_MS
        j = i
        while j < len(ordered) and ordered[j].timestamp < step_end:
            m = ordered[j]
            pipe._enqueue(m.stream, m.partition, [m.value])
            j += 1
        pipe.poll(now_ms=step_end if ordered[i].timestamp > 0 else None)
        i = j
    pipe.now_ms = None
    pipe.finish()
    return Run(name, list(pipe.alerts), sum(pipe.events_in.values()), len(pipe.rejections), len(pipe.anomalies))


def configuration(base: Settings, overrides_file: Optional[str], pairs: Iterable[str]) -> Settings:
    """``base`` with a YAML file of overrides and ``section.key=value`` pairs (values parsed as YAML)."""
    over: dict[str, Any] = {}
    if overrides_file:
        path = Path(overrides_file)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise BacktestError(f"{path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise BacktestError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise BacktestError(f"{path}: must hold a mapping of sections, e.g. windows: {{dedup_repeat_s: 600}}")
        over = data
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        path_keys = [p for p in key.strip().split(".") if p]
        if not sep or len(path_keys) < 2:
            raise BacktestError(f"--set {pair!r}: expected section.key=value, e.g. windows.dedup_repeat_s=600")
        node = over
        for p in path_keys[:-1]:
            node = node.setdefault(p, {})
        node[path_keys[-1]] = yaml.safe_load(raw)
    try:
        return base.replace(**over) if over else base
    except SettingsError as exc:
        raise BacktestError(str(exc)) from None


# --------------------------------------------------------------------------- the comparison


def _by_fingerprint(alerts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for a in alerts:
        row = out.setdefault(a["fingerprint"], {"title": a.get("title", a.get("kind")), "notifications": 0, "pages": 0,
                                                "first": None, "first_page": None, "priority": None})
        row["notifications"] += 1
        if a.get("status") == "firing":
            row["priority"] = min(row["priority"] or "P9", a.get("priority") or "P9")  # the most urgent it reached
            row["first"] = a["event_time"] if row["first"] is None else min(row["first"], a["event_time"])
            if a.get("priority") in PAGE:
                row["pages"] += 1
                row["first_page"] = a["event_time"] if row["first_page"] is None else min(row["first_page"], a["event_time"])
    return out


def compare(a: Run, b: Run) -> dict[str, Any]:
    """What differs between two replays of the same input: per fingerprint, per priority, totals."""
    fa, fb = _by_fingerprint(a.alerts), _by_fingerprint(b.alerts)
    rows = []
    for fp in sorted(set(fa) | set(fb), key=lambda f: ((fa.get(f) or fb.get(f))["first"] or 0, f)):
        x, y = fa.get(fp), fb.get(fp)
        side = "both" if x and y else ("only " + (a.name if x else b.name))
        rows.append({"fingerprint": fp, "title": (x or y)["title"], "side": side,
                     a.name: x, b.name: y,
                     "same": x is not None and y is not None and (x["notifications"], x["priority"], x["first"]) ==
                     (y["notifications"], y["priority"], y["first"])})

    def by_priority(run: Run) -> dict[str, int]:
        out: dict[str, int] = {}
        for al in run.alerts:
            if al.get("status") == "firing":
                out[al.get("priority", "?")] = out.get(al.get("priority", "?"), 0) + 1
        return dict(sorted(out.items()))

    return {
        "runs": {r.name: {"notifications": len(r.alerts), "firing_by_priority": by_priority(r),
                          "pages": sum(1 for al in r.alerts if al.get("status") == "firing" and al.get("priority") in PAGE),
                          "events_in": r.events_in, "rejected": r.rejected, "anomalies": r.anomalies} for r in (a, b)},
        "fingerprints": rows,
        "only": {a.name: sum(1 for r in rows if r["side"] == f"only {a.name}"),
                 b.name: sum(1 for r in rows if r["side"] == f"only {b.name}")},
        "changed": sum(1 for r in rows if r["side"] == "both" and not r["same"]),
    }


def format_report(report: dict[str, Any], start_ms: int) -> str:
    names = list(report["runs"])
    lines = ["", f"{'':<24}" + "".join(f"{n:>14}" for n in names)]
    for key in ("events_in", "rejected", "anomalies", "notifications", "pages"):
        lines.append(f"{key:<24}" + "".join(f"{report['runs'][n][key]:>14,}" for n in names))
    prios = sorted({p for n in names for p in report["runs"][n]["firing_by_priority"]})
    for p in prios:
        lines.append(f"{'firing ' + p:<24}" + "".join(f"{report['runs'][n]['firing_by_priority'].get(p, 0):>14,}" for n in names))
    lines += ["", f"alerts: {len(report['fingerprints'])} fingerprints; only {names[0]}: {report['only'][names[0]]}; "
              f"only {names[1]}: {report['only'][names[1]]}; changed: {report['changed']}", ""]

    def cell(row: Optional[dict[str, Any]]) -> str:
        if row is None:
            return "-"
        t = "" if row["first"] is None else f" first t+{(row['first'] - start_ms) / 1000:.0f}s"
        page = "" if row["first_page"] is None else f" page t+{(row['first_page'] - start_ms) / 1000:.0f}s"
        return f"{row['notifications']} x {row['priority']}{t}{page}"

    for r in report["fingerprints"]:
        if r["side"] == "both" and r["same"]:
            continue
        mark = {"both": "~"}.get(r["side"], "+" if r["side"] == f"only {names[1]}" else "-")
        lines.append(f"{mark} {r['fingerprint'][:10]} {str(r['title'])[:60]:<60}  {names[0]}: {cell(r[names[0]])}  |  "
                     f"{names[1]}: {cell(r[names[1]])}")
    if not any(not (r["side"] == "both" and r["same"]) for r in report["fingerprints"]):
        lines.append("the two configurations raise the same notifications")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command


def cli_main(args: argparse.Namespace, settings: Settings) -> int:
    from soundcheck.oncall import parse_time
    from soundcheck.alerting.silences import SilenceError

    try:
        if bool(args.file) == bool(args.topics):
            raise BacktestError("give the input: --file RECORDING.jsonl or --topics (with --since/--until or --from-beginning)")
        a = configuration(settings, args.a, args.set_a or [])
        b = configuration(settings, args.b, args.set_b or [])
        if args.file:
            messages = read_jsonl(Path(args.file))
        else:
            try:
                since = None if args.from_beginning or not args.since else parse_time(args.since)
                until = parse_time(args.until) if args.until else None
            except SilenceError as exc:
                raise BacktestError(str(exc)) from None
            if since is not None and until is not None and until <= since:
                raise BacktestError("--until is not after --since")
            if since is None and not args.from_beginning:
                raise BacktestError("with --topics give --since TIME (RFC 3339, epoch ms or 30m) or --from-beginning")
            messages = asyncio.run(read_topics(settings, since, until))
        if args.save:
            n = write_jsonl(messages, Path(args.save))
            print(f"backtest: {n:,} messages saved to {args.save}", file=sys.stderr)
        print(f"backtest: replaying {len(messages):,} messages with configuration A ...", file=sys.stderr, flush=True)
        ra = replay(a, messages, "A")
        print("backtest: ... and with configuration B", file=sys.stderr, flush=True)
        rb = replay(b, messages, "B")
    except BacktestError as exc:
        print(f"soundcheck backtest: {exc}", file=sys.stderr)
        return 2
    report = compare(ra, rb)
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_report(report, min((m.timestamp for m in messages if m.timestamp > 0), default=0)))
    return 0


def add_cli(sub: Any, settings_of: Any) -> None:
    p = sub.add_parser("backtest", help="replay recorded input through the whole pipeline with two configurations and compare the notifications")
    src = p.add_argument_group("input")
    src.add_argument("--file", help="a JSON-lines recording (see --save)")
    src.add_argument("--topics", action="store_true", help="read the input topics of the settings' cluster")
    src.add_argument("--since", help="with --topics: from this append time (RFC 3339, epoch ms, or 30m ago)")
    src.add_argument("--until", help="with --topics: up to this append time (default: the end offsets now)")
    src.add_argument("--from-beginning", action="store_true", help="with --topics: from the beginning of the topics")
    src.add_argument("--save", help="also write the input read to this JSON-lines file, for later backtests")
    cfg = p.add_argument_group("configurations (each: the settings, then a YAML file of overrides, then --set pairs)")
    cfg.add_argument("--a", help="YAML overrides for configuration A (default: none, the settings as they are)")
    cfg.add_argument("--b", help="YAML overrides for configuration B")
    cfg.add_argument("--set-a", action="append", metavar="SECTION.KEY=VALUE")
    cfg.add_argument("--set-b", action="append", metavar="SECTION.KEY=VALUE", help="e.g. --set-b windows.dedup_repeat_s=600")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.set_defaults(func=lambda args: cli_main(args, settings_of(args)))
