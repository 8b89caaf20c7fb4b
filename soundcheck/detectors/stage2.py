"""Stage 2, per entity: merge the partial aggregates of every input partition, then detect.

A :class:`Stage2` holds the per-entity detectors of one stream (baselines, series, forecaster)
for the entities of one aggregates partition. Each input partition's stage 1 tells how far its
windows are closed (its *progress*); a window is complete, and detected on, once every active
input partition's progress has passed its end (:class:`SourceProgress`). An input partition that
has not advanced for ``idle_s`` of wall time (three windows: :func:`idle_after_s`) stops holding
the others back: wall time decides *when* to act on a quiet stream, never *what* a complete
window holds.

:class:`FraudStage` does the same for the fraud detector over the repartitioned behaviour events
(keyed by pseudonymised user): events are buffered until the progress passes them (stage 1 sends
them within a window, with its watermark), counted in event-time order, and a window's users are
scored once the progress passes its end, so that the outcome does not depend on how the events
were split into partitions, batches or messages.

No Kafka, no Faust: the worker's agents and the offline pipeline feed these the same way.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Any, Generator, NamedTuple, Optional, Sequence

from ..settings import Settings
from .base import Anomaly
from .behavior import STEP_RECORDS, BehaviorRateDetector, FraudDetector, drain
from .quality import AudioQualityDetector
from .system import SystemMetricsDetector

IDLE_PARTITION_S = 10.0  # the least wall time an input partition that has not advanced holds the watermark back (see idle_after_s)
STREAMS = ("audio", "behavior", "system")


class SourceProgress:
    """The progress (closed-until event time; for the fraud stage, :func:`rows_progress`) of each
    input partition of one stream.

    >>> sp = SourceProgress(idle_s=10)
    >>> sp.update(0, 20_000, now=0.0); sp.update(1, 10_000, now=0.0)
    >>> sp.watermark(now=5.0), sp.watermark(now=11.0)
    (10000, 20000)
    >>> sp.update(1, 30_000, now=12.0); sp.watermark(now=12.0)
    30000
    """

    #: the partitions whose latest message said their stage 1 went quiet (flushed every window);
    #: a class default for snapshots from before it
    quiet: frozenset = frozenset()

    def __init__(self, idle_s: float = IDLE_PARTITION_S) -> None:
        self.idle_s = idle_s
        self.marks: dict[int, tuple[int, float]] = {}  # input partition -> (closed until, wall time it last advanced)
        self.expected = 0  # the input topic's partition count, as stage 1 says it
        self.first_seen: Optional[float] = None

    def update(self, partition: int, closed_until: int, now: Optional[float] = None, of: Optional[int] = None,
               quiet: bool = False) -> None:
        now = time.time() if now is None else now
        self.quiet = self.quiet | {partition} if quiet else self.quiet - {partition}
        if of:
            self.expected = int(of)
        if self.first_seen is None:
            self.first_seen = now
        old = self.marks.get(partition)
        if old is None or closed_until > old[0]:
            self.marks[partition] = (closed_until, now)

    @property
    def all_quiet(self) -> bool:
        """Every partition that reported went quiet since its last records: all they had is in."""
        return bool(self.marks) and self.quiet >= self.marks.keys()

    def watermark(self, now: Optional[float] = None) -> Optional[int]:
        """The slowest active partition's progress (all idle: the furthest one's). Until every
        partition of the input topic has reported, nothing is complete (a backlog read starts
        with one partition's progress), unless they stay silent for ``idle_s`` (at most
        :data:`IDLE_PARTITION_S`: an input partition that never had a record never reports)."""
        if not self.marks:
            return None
        now = time.time() if now is None else now
        if len(self.marks) < self.expected and now - (self.first_seen or now) < min(self.idle_s, IDLE_PARTITION_S):
            return None
        active = [c for c, wall in self.marks.values() if now - wall < self.idle_s]
        if active:
            # a partition idle but ahead does not matter; one idle and behind is left out
            return min(active)
        return max(c for c, _ in self.marks.values())


def idle_after_s(settings: Settings) -> float:
    """How long (wall time) stage 2 waits on an input partition whose progress has not moved before
    leaving it out of the watermark: three windows, at least :data:`IDLE_PARTITION_S`.

    Stage 1 moves a partition's progress once per window (a caught-up partition too), so on live
    traffic every partition reports once a window, each a moment after the window closes. At one
    window (10 s), a partition that reported a little earlier last window than the others do now
    was taken for idle and its partials came after the window was evaluated: in a model with six
    partitions reporting 0-0.4 s after each close, about a fifth of them (dropped as late partials).
    """
    return max(IDLE_PARTITION_S, 3.0 * settings.windows.aggregate_s)


def make_detectors(settings: Settings, stream: str) -> list[Any]:
    topic = settings.topics.inputs()[stream]
    if stream == "audio":
        return [AudioQualityDetector(settings, topic)]
    if stream == "behavior":
        return [BehaviorRateDetector(settings, topic)]
    if stream == "system":
        return [SystemMetricsDetector(settings, topic)]
    raise ValueError(f"unknown stream {stream!r}; expected one of {STREAMS}")


def clock_ticks(done: dict[str, int], tick_ms: int, quiet_ms: int, quiet: frozenset = frozenset()) -> dict[str, int]:
    """The event time each stream of a stage-2 unit can tick the alerting clock to: what its
    detectors have evaluated (``done``: stream -> ``done_until``), in whole windows (``tick_ms``).

    A stream in ``quiet`` (every input partition's stage 1 went quiet and flushed its windows, and
    stage 2 has evaluated what they sent: ``SourceProgress.all_quiet``) ticks ``quiet_ms`` further
    on, so that the groups its last anomalies opened are sent without waiting for more input. Only
    that stream, and only then: a quiet tick claims event time nothing was evaluated in, and an
    anomaly of a window it claimed is taken late (at the next tick, in whatever group is open then;
    ARCHITECTURE.md, the alert lifecycle, says what giving it to every stream at once did).

    >>> clock_ticks({"audio": 400_000, "system": 390_000}, 10_000, 40_000, quiet=frozenset({"audio"}))
    {'audio': 440000, 'system': 390000}
    """
    out = {}
    for stream, t in done.items():
        if t <= -(2**61):
            continue
        if stream in quiet:
            t += quiet_ms
        out[stream] = t - t % tick_ms
    return out


class Stage2:
    """The per-entity detectors of one stream, fed partial aggregates (see the module doc)."""

    def __init__(self, settings: Settings, stream: str, idle_s: Optional[float] = None) -> None:
        self.settings = settings
        self.stream = stream
        self.detectors = make_detectors(settings, stream)
        self._by_name = {d.name: d for d in self.detectors}
        self.progress = SourceProgress(idle_after_s(settings) if idle_s is None else idle_s)
        self.done_until = -(2**62)  # windows ending at or before this are detected
        self.late_partials = 0
        self.duplicates = 0
        self.sources: dict[tuple, set[int]] = {}  # (detector, window start, key) -> input partitions merged

    def add(self, source_partition: int, partials: Sequence[Any], closed_until: Optional[int],
            now: Optional[float] = None, of: Optional[int] = None, quiet: bool = False) -> list[Anomaly]:
        """One input partition's partials and progress (``of``: the input topic's partition
        count; ``quiet``: its stage 1 went quiet and flushed); returns the anomalies of the windows
        that completed."""
        for p in partials:
            det = self._by_name.get(p.detector)
            if det is None:
                raise ValueError(f"stage 2 of {self.stream}: no detector {p.detector!r}")
            seen = self.sources.setdefault((p.detector, p.start, p.key), set())
            if source_partition in seen:  # sent again after a restart of its partition: the same sums
                self.duplicates += 1
                continue
            if det.add_partial(p):
                seen.add(source_partition)
            else:
                self.late_partials += 1
        if closed_until is not None:
            self.progress.update(source_partition, closed_until, now, of, quiet)
        return self.advance(now)

    def advance(self, now: Optional[float] = None) -> list[Anomaly]:
        wm = self.progress.watermark(now)
        if wm is None or wm <= self.done_until:
            return []
        self.done_until = wm
        out: list[Anomaly] = []
        for det in self.detectors:
            out.extend(det.evaluate(wm))
        self._forget(wm)
        return out

    def _forget(self, until: int) -> None:
        size = self.settings.windows.aggregate_s * 1000
        for k in [k for k in self.sources if k[1] + size <= until]:
            del self.sources[k]

    def flush(self) -> list[Anomaly]:
        """Close every open window now (the stream went quiet)."""
        ends = [a.end for d in self.detectors for a in d.windows._open.values()]
        if not ends:
            return []
        self.done_until = max(ends)
        out: list[Anomaly] = []
        for det in self.detectors:
            out.extend(det.evaluate(self.done_until))
        self._forget(self.done_until)
        return out

    def event_time(self, now: Optional[float] = None) -> Optional[int]:
        """How far this stream's windows are complete (the alerting clock's view of the stream)."""
        return self.progress.watermark(now)

    @property
    def open_windows(self) -> int:
        return sum(d.windows.open_count for d in self.detectors)

    def tracked(self) -> dict[str, int]:
        return {d.name: len(d.entities) for d in self.detectors}


class FraudEvent(NamedTuple):
    """A behaviour event as the fraud detector reads it (user and device pseudonymised)."""

    ts: int
    user_id: str
    event_type: str
    device_id: str
    country: str
    user_segment: str
    artist_id: Optional[str]
    payment_method_id: Optional[str]


def _order(row: Sequence[Any]) -> tuple:
    """A row's place in a window: by time, then by every field (no field is None in the key)."""
    return (row[0], row[1] or "", row[2] or "", row[3] or "", row[4] or "", row[5] or "", row[6] or "", row[7] or "")


def _sorted_steps(rows: list, chunk: int) -> Generator[None, None, list]:
    """``sorted(rows, key=_order)`` in steps: runs of ``chunk`` rows sorted one per step, then
    merged ``chunk`` rows per step (a window of a busy stream is tens of thousands of rows)."""
    if len(rows) <= chunk:
        return sorted(rows, key=_order)
    runs = []
    for lo in range(0, len(rows), chunk):
        runs.append(sorted(rows[lo:lo + chunk], key=_order))
        yield
    out: list = []
    merged = heapq.merge(*runs, key=_order)
    while True:
        part = list(itertools.islice(merged, chunk))
        out += part
        if len(part) < chunk:
            return out
        yield


def rows_progress(doc: dict[str, Any]) -> Optional[int]:
    """A fraud message's progress: its ``rows_until`` (stage 1 sends no more rows before it, but for
    records later than the lateness), else its ``closed_until`` (an older worker's, or a window's close).

    >>> rows_progress({"closed_until": 10_000, "rows_until": 13_500}), rows_progress({"closed_until": 10_000})
    (13500, 10000)
    """
    closed, rows = doc.get("closed_until"), doc.get("rows_until")
    return closed if rows is None else rows if closed is None else max(closed, rows)


_WHOLE = 2**62  # the ordinal of a row without one (an older worker's): its whole offset


class FraudStage:
    """The fraud detector over repartitioned behaviour events (see the module doc)."""

    name = "behavior.fraud"

    def __init__(self, settings: Settings, idle_s: Optional[float] = None) -> None:
        self.settings = settings
        self.detector = FraudDetector(settings, settings.topics.behavior)
        self.size_ms = settings.windows.aggregate_s * 1000
        self.progress = SourceProgress(idle_after_s(settings) if idle_s is None else idle_s)
        #: rows waiting for the progress to pass them, as tuples: a tuple of strings and numbers leaves the
        #: garbage collector's care at its first collection, a list never does (a busy window is tens of
        #: thousands of rows, and each full collection walked all of them: 0.1-0.25 s pauses)
        self.pending: list[tuple] = []
        self.done_until = -(2**62)  # the windows ending at or before this are scored (a window boundary)
        self.counted_until = -(2**62)  # the rows before this are counted (the progress when it last moved)
        self.counted: list[tuple] = []  # the counted rows of the window not scored yet (for snapshots)
        self.open_window: Optional[int] = None  # that window's start
        self.stragglers = False  # rows came in behind counted_until
        self.late_events = 0
        self.duplicates = 0
        self.offsets: dict[int, int] = {}  # input partition -> the highest source offset of a row taken
        self.ordinals: dict[int, int] = {}  # input partition -> the ordinal, within that offset, of the last row taken

    def add(self, source_partition: int, rows: Sequence[Sequence[Any]], progress: Optional[int],
            now: Optional[float] = None, of: Optional[int] = None, quiet: bool = False) -> list[Anomaly]:
        """The rows of one fraud message, and its source partition's progress (:func:`rows_progress`);
        the anomalies of the windows it completes."""
        return drain(self.add_steps(source_partition, rows, progress, now, of, quiet))

    def add_steps(self, source_partition: int, rows: Sequence[Sequence[Any]], progress: Optional[int],
                  now: Optional[float] = None, of: Optional[int] = None, quiet: bool = False) -> Generator[None, None, list[Anomaly]]:
        """:meth:`add` in steps (see :meth:`FraudDetector.process_steps`)."""
        top = (self.offsets.get(source_partition, -1), self.ordinals.get(source_partition, _WHOLE))
        for row in rows:
            if len(row) > 8 and (row[8], row[9] if len(row) > 9 else _WHOLE) <= top:  # read again after a restart of its partition
                self.duplicates += 1
            elif row[0] < self.done_until:
                self.late_events += 1
            else:
                self.pending.append(tuple(row[:8]))
                if row[0] < self.counted_until:
                    # after the progress had passed it (a partition read again, or a record later than
                    # the lateness in a window still open): counted at the next call, after the others
                    self.stragglers = True
        if rows and len(rows[-1]) > 8:
            newest = max(top, max((int(r[8]), int(r[9]) if len(r) > 9 else _WHOLE) for r in rows))
            self.offsets[source_partition], self.ordinals[source_partition] = newest
        if progress is not None:
            self.progress.update(source_partition, progress, now, of, quiet)
        return (yield from self.advance_steps(now))

    def advance(self, now: Optional[float] = None, until: Optional[int] = None) -> list[Anomaly]:
        """Score the windows the progress (or ``until``) has passed; their anomalies."""
        return drain(self.advance_steps(now, until))

    def advance_steps(self, now: Optional[float] = None, until: Optional[int] = None) -> Generator[None, None, list[Anomaly]]:
        """:meth:`advance` in steps (see :meth:`FraudDetector.process_steps`): the rows before the
        progress are counted in event-time order, and a window's users are scored once the progress
        passes its end. Stage 1 sends a window's rows as it reads them (:func:`rows_progress`), so
        by the window's end most of them are counted and only its last rows and the scoring remain."""
        wm = self.progress.watermark(now) if until is None else until
        if wm is None or (wm <= self.counted_until and not self.stragglers):
            return []
        self.stragglers = False
        # (rows behind counted_until, stragglers, are counted now even when wm went back: a partition
        # left out of the watermark as idle that reports again)
        self.counted_until = upto = max(self.counted_until, wm)
        ready: list = []
        later: list = []
        pending, chunk = self.pending, 8 * STEP_RECORDS
        for lo in range(0, len(pending), chunk):
            if lo:
                yield
            for r in pending[lo:lo + chunk]:
                (ready if r[0] < upto else later).append(r)
        self.pending = later
        out: list[Anomaly] = []
        if ready:
            ready = yield from _sorted_steps(ready, chunk)
            yield
        lo = 0
        while lo < len(ready):
            window = ready[lo][0] - ready[lo][0] % self.size_ms
            hi = lo
            while hi < len(ready) and ready[hi][0] < window + self.size_ms:
                hi += 1
            if self.open_window is not None and self.open_window < window:  # complete: rows of a later one are
                out.extend((yield from self._score(self.open_window)))
            yield from self.detector.count_steps(ready[lo:hi], at=window)
            self.counted.extend(ready[lo:hi])
            self.open_window = window
            lo = hi
        if self.open_window is not None and wm >= self.open_window + self.size_ms:
            out.extend((yield from self._score(self.open_window)))
        self.done_until = max(self.done_until, wm - wm % self.size_ms)
        return out

    def _score(self, window: int) -> Generator[None, None, list[Anomaly]]:
        out = yield from self.detector.evaluate_steps(window + self.size_ms)
        self.counted, self.open_window = [], None
        return out

    def flush(self) -> list[Anomaly]:
        tops = [r[0] for r in self.pending] + ([self.open_window] if self.open_window is not None else [])
        if not tops:
            return []
        top = max(tops)
        return self.advance(until=top - top % self.size_ms + self.size_ms)

    def held_rows(self) -> list[tuple]:
        """The rows a snapshot keeps: those not counted yet and those of the window not scored yet
        (the detector's stored state is as of its last scoring: a restored stage counts them again)."""
        return self.counted + self.pending

    @property
    def users(self) -> Any:
        return self.detector.users

    @property
    def n_users(self) -> int:
        return len(self.detector.users)
