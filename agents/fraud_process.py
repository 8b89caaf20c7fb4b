"""The fraud stage in a process of its own, beside the worker's event loop.

The fraud stage scores a whole window of behaviour events when the window closes: at 15,000
events/s about 60,000 events and 10,000 users, most of a second of CPU. On the worker's event
loop that second held every region alert back: faust-streaming's consumer hands an agent one
message per turn of the loop, so the aggregates, anomalies and ticks of a region trickled in
between the fraud stage's steps, and a region alert came out only once the fraud stage had
finished (measured: the alerting clock had passed at 0.9 s, the alert came at 1.75 s, right after
the last fraud tick). Here the :class:`~soundcheck.detectors.stage2.FraudStage` of each fraud
partition lives in one child process (``spawn``, one worker of a ``ProcessPoolExecutor``): the
agent hands it the fraud message's bytes and awaits the anomalies, and the event loop goes on
with everything else meanwhile, on the machine's other core.

* **Same results.** The child runs the same ``FraudStage`` code on the same messages in the same
  order: every call waits for the one before it (the unit holder's lock, one worker process).
* **What the agents read** of a stage (``done_until``, ``late_events``, whether every input
  partition went quiet, the users tracked) is mirrored in its :class:`RemoteFraudStage` after
  every call.
* **Snapshots** are encoded and decoded in the child (no state crosses to the worker, only the
  blob, whose header the worker checks), and a restored one is sent to it before the
  partition's first message.
* **If the child dies** the fraud state is gone: the worker logs it and exits at once, as after a
  ``kill -9``; the offsets of the messages it had not finished are not committed, and the worker
  that takes over restores the last snapshots and reads the rest again. A child whose worker is
  gone exits within a second (it watches its parent).

``worker.fraud_process: false`` keeps the fraud stage on the event loop, in steps
(:func:`agents.detect.stepped`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from typing import Any, Optional

log = logging.getLogger(__name__)

# -- the child process ------------------------------------------------------------------------

_STAGES: dict[int, Any] = {}  # stage id -> FraudStage
_SETTINGS: Any = None


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # the worker is gone (a kill -9 leaves no one to stop us)
            os._exit(0)


def _init(settings: Any, parent: int) -> None:
    global _SETTINGS
    _SETTINGS = settings
    threading.Thread(target=_watch_parent, args=(parent,), name="soundcheck.fraud.parent", daemon=True).start()


def _stage(sid: int) -> Any:
    from soundcheck.detectors.stage2 import FraudStage

    st = _STAGES.get(sid)
    if st is None:
        st = _STAGES[sid] = FraudStage(_SETTINGS)
    return st


def _mirror(st: Any) -> tuple[int, int, bool, int]:
    return st.done_until, st.late_events, st.progress.all_quiet, st.n_users


def _call(sid: int, op: str, *args: Any) -> tuple[Any, Optional[tuple]]:
    """One operation on stage ``sid``; its result and the stage's mirrored fields."""
    if op == "ping":
        return os.getpid(), None
    if op == "drop":
        _STAGES.pop(sid, None)
        return None, None
    if op == "restore":  # a whole snapshot: checked and decoded here, not in the worker
        from soundcheck import snapshots
        from soundcheck.detectors.stage2 import FraudStage

        st = FraudStage(_SETTINGS)
        n = snapshots.restore_stage(st, snapshots.decode_snapshot(args[0], _SETTINGS)[1])
        _STAGES[sid] = st
        return n, _mirror(st)
    st = _stage(sid)
    if op == "message":
        from soundcheck.detectors.stage2 import rows_progress
        from soundcheck.pipeline import decode_internal

        doc = decode_internal(args[0])
        if doc["stream"] != "fraud":
            raise ValueError(f"a {doc['stream']!r} aggregates message on the fraud topic")
        found = st.add(doc["source"], doc.get("rows", []), rows_progress(doc), of=doc.get("of"), quiet=bool(doc.get("quiet")))
        return found, _mirror(st)
    if op == "advance":
        return st.advance(), _mirror(st)
    if op == "encode":
        from soundcheck import snapshots

        partition, last_offset, last_event_time = args
        blob = snapshots.encode_snapshot(snapshots.capture_stage(st), stream="fraud", partition=partition,
                                         last_offset=last_offset, last_event_time=last_event_time, settings=_SETTINGS)
        return blob, _mirror(st)
    raise ValueError(f"unknown fraud process operation {op!r}")


def _call_many(calls: list[tuple[int, str, tuple]]) -> list[tuple[bool, Any, Optional[tuple]]]:
    """Several :func:`_call` in one round trip, in order; each ``(ok, result or (exception type,
    message), stage fields)``: one failing call does not stop the next."""
    out: list[tuple[bool, Any, Optional[tuple]]] = []
    for sid, op, args in calls:
        try:
            result, fields = _call(sid, op, *args)
            out.append((True, result, fields))
        except Exception as exc:  # reported per call: the worker dead-letters that message only
            st = _STAGES.get(sid)
            out.append((False, (type(exc).__name__, str(exc)[:500]), _mirror(st) if st is not None else None))
    return out


# -- the worker's side ------------------------------------------------------------------------


class FraudProcessDied(RuntimeError):
    """The child process holding the fraud state is gone (its state with it)."""


class _Progress:
    __slots__ = ("all_quiet",)

    def __init__(self) -> None:
        self.all_quiet = False


class FraudProcess:
    """The child process and the stages in it (started on first use; :meth:`close` stops it)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self._pool: Optional[ProcessPoolExecutor] = None
        self._ids = itertools.count(1)

    @property
    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init, initargs=(self.settings, os.getpid()))
        return self._pool

    async def call(self, sid: int, op: str, *args: Any) -> tuple[Any, Optional[tuple]]:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, _call, sid, op, *args)
        except BrokenExecutor as exc:
            raise FraudProcessDied(f"the fraud process is gone ({type(exc).__name__}: {exc})") from exc

    async def call_many(self, calls: list[tuple[int, str, tuple]]) -> list[tuple[bool, Any, Optional[tuple]]]:
        """Several calls in one round trip (see :func:`_call_many`): a burst of fraud messages waits for
        one turn of the event loop, not one each."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, _call_many, calls)
        except BrokenExecutor as exc:
            raise FraudProcessDied(f"the fraud process is gone ({type(exc).__name__}: {exc})") from exc

    async def start(self) -> int:
        """Start the child now (it imports the detectors: a second or two); its pid."""
        pid, _ = await self.call(0, "ping")
        log.info("fraud stage runs in process %d", pid)
        return pid

    def stage(self) -> "RemoteFraudStage":
        return RemoteFraudStage(self, next(self._ids))

    def forget(self, sid: int) -> None:
        """Drop stage ``sid`` in the child, without waiting; nothing to do if the child is not running."""
        if self._pool is not None:
            try:
                self._pool.submit(_call, sid, "drop")
            except (BrokenExecutor, RuntimeError):  # the pool is shut down or gone: nothing to forget
                pass

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class RemoteFraudStage:
    """A :class:`~soundcheck.detectors.stage2.FraudStage` in the fraud process. Its methods are
    coroutines; the fields the agents read are the child's as of the last call."""

    def __init__(self, proc: FraudProcess, sid: int) -> None:
        self.proc, self.sid = proc, sid
        self.done_until = -(2**62)
        self.late_events = 0
        self.n_users = 0
        self.progress = _Progress()
        self._restore: Optional[bytes] = None

    def mirror(self, fields: Optional[tuple]) -> None:
        """Take the stage's fields as the child reports them after a call."""
        if fields is not None:
            self.done_until, self.late_events, self.progress.all_quiet, self.n_users = fields

    async def _call(self, op: str, *args: Any) -> Any:
        if self._restore is not None:
            state, self._restore = self._restore, None
            self.mirror((await self.proc.call(self.sid, "restore", state))[1])
        out, fields = await self.proc.call(self.sid, op, *args)
        self.mirror(fields)
        return out

    async def message(self, value: bytes) -> list:
        """One message of the fraud topic (its bytes: decoded in the child); the anomalies of the
        windows it completes."""
        return await self._call("message", value)

    async def advance(self) -> list:
        """Windows the idle rule lets go (see ``FraudStage.advance``); their anomalies."""
        return await self._call("advance")

    async def encode(self, partition: int, last_offset: int, last_event_time: Optional[int]) -> bytes:
        """The stage's snapshot (``soundcheck.snapshots.encode_snapshot``), encoded in the child."""
        return await self._call("encode", partition, last_offset, last_event_time)

    def restore(self, blob: bytes) -> None:
        """Take a snapshot (``soundcheck.snapshots.encode_snapshot`` output): sent to the child, which
        decodes it, before the next call (:meth:`sync` sends it now). A snapshot the child refuses
        raises :class:`~soundcheck.snapshots.SnapshotRejected` from that call."""
        self._restore = blob

    async def sync(self) -> None:
        """Send a pending restore now."""
        if self._restore is not None:
            await self._call("ping")

    def close(self) -> None:
        """Forget the stage in the child (the partition left this worker)."""
        self._restore = None
        self.proc.forget(self.sid)
