"""Versioned snapshots of one (stream, input partition)'s detector state: pure functions, no Kafka.

A snapshot is ``MAGIC``, a 4-byte big-endian header length, the header (JSON), then the state:
a zlib-compressed pickle. The header says what the state is and what it depends on:

* ``format``: :data:`FORMAT_VERSION`, bumped whenever the layout of the pickled state changes;
* ``soundcheck`` and ``river``: the versions that wrote it. River's ``EWMean``/``EWVar`` pickle
  their Rust state as opaque bytes, so a state written by another River version is refused
  (that is why River is pinned);
* ``state_schema``: a digest of the field names of the detector modules' dataclasses (baselines,
  windows, user counters ...), so a changed class is refused even if nobody bumped ``format``;
* ``stream``, ``partition``, ``created_at`` (wall ms), ``last_event_time`` (event ms),
  ``last_offset`` (the last input offset whose records are in the state), ``config_digest``.

:func:`decode_snapshot` raises :class:`SnapshotRejected` (with a short ``reason``) for anything
it will not restore: bad magic, corrupt bytes, another format or River version. The state is
unpickled with an allow-list of classes (soundcheck, River, numpy, a few builtins), so bytes
from the snapshot topic cannot name arbitrary callables.

>>> blob = encode_snapshot({"x": [1, 2]}, stream="audio", partition=3, last_offset=41, last_event_time=7)
>>> header, state = decode_snapshot(blob)
>>> header["stream"], header["partition"], header["last_offset"], state
('audio', 3, 41, {'x': [1, 2]})
"""

from __future__ import annotations

import copyreg
import dataclasses
import hashlib
import io
import pickle
import struct
import time
import zlib
from collections import OrderedDict
from contextvars import ContextVar
from importlib import metadata
from typing import Any, Optional

import orjson
import river

MAGIC = b"SCSNAP"
FORMAT_VERSION = 1
RIVER_VERSION = river.__version__
_LEN = struct.Struct(">I")
MAX_HEADER = 64 * 1024
DETECTOR_ATTRS = ("windows", "now", "columns", "untracked_metrics")  # plain state attributes of a detector
STORE_ATTRS = ("entities", "users")  # EntityStore attributes: their items are state, their bounds are config


def soundcheck_version() -> str:
    try:
        return metadata.version("soundcheck")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


class SnapshotRejected(ValueError):
    """A snapshot that will not be restored; ``reason`` is short and bounded (for logs)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple:  # raised in the fraud process, re-raised in the worker with its reason
        return type(self), (self.reason, self.detail)


def _state_classes() -> list[type]:
    """Every dataclass of the detector modules (the state is made of them, and of River's and
    numpy's objects, whose versions are pinned or irrelevant to the layout)."""
    import importlib
    import pkgutil

    from soundcheck import detectors

    out: list[type] = []
    for info in sorted(pkgutil.iter_modules(detectors.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{detectors.__name__}.{info.name}")
        out.extend(c for c in vars(mod).values()
                   if isinstance(c, type) and c.__module__ == mod.__name__ and dataclasses.is_dataclass(c))
    return sorted(out, key=lambda c: (c.__module__, c.__qualname__))


_SCHEMA: Optional[str] = None


def state_schema() -> str:
    """A digest of the detector dataclasses' field names: it changes when their layout does
    (conservative: a changed class that is not state also refuses the old snapshots)."""
    global _SCHEMA
    if _SCHEMA is None:
        parts = [f"{c.__module__}.{c.__qualname__}:{','.join(f.name for f in dataclasses.fields(c))}" for c in _state_classes()]
        _SCHEMA = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return _SCHEMA


def config_digest(settings: Any) -> str:
    """A digest of the settings sections the detectors read (a change is logged, not refused)."""
    raw = orjson.dumps({"detection": settings.detection, "windows": dataclasses.asdict(settings.windows)},
                       option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.sha256(raw).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# pickling: settings by reference, classes from an allow-list


_LOAD_SETTINGS: ContextVar[Any] = ContextVar("soundcheck_snapshot_settings", default=None)


def _current_settings() -> Any:
    """Unpickles the Settings reference a snapshot holds: the restoring worker's own settings."""
    settings = _LOAD_SETTINGS.get()
    if settings is None:
        raise pickle.UnpicklingError("this state refers to the settings: decode it with the worker's settings")
    return settings


def _reduce_settings(obj: Any) -> tuple:
    return _current_settings, ()


_SAFE_BUILTINS = frozenset({"set", "frozenset", "dict", "list", "tuple", "int", "float", "str", "bytes", "bytearray",
                            "complex", "bool", "slice", "range"})
_CLASS_MODULES = ("soundcheck.detectors.", "river.")  # classes (not functions) from these modules
_SAFE_GLOBALS = frozenset({
    ("collections", "OrderedDict"), ("collections", "deque"), ("soundcheck.snapshots", "_current_settings"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
})


class _Unpickler(pickle.Unpickler):
    """Only the classes detector state is made of: bytes from a topic must not name any callable."""

    def find_class(self, module: str, name: str) -> Any:
        if (module == "builtins" and name in _SAFE_BUILTINS) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(_CLASS_MODULES):
            obj = super().find_class(module, name)
            if isinstance(obj, type):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a snapshot")


def dumps_state(state: Any, level: int = 6) -> bytes:
    """zlib(pickle(state)); a :class:`Settings` object is pickled as a reference, not its contents."""
    from soundcheck.settings import Settings

    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=5)
    pickler.dispatch_table = {**copyreg.dispatch_table, Settings: _reduce_settings}
    pickler.dump(state)
    return zlib.compress(buf.getvalue(), level)


def loads_state(payload: bytes, settings: Any = None) -> Any:
    token = _LOAD_SETTINGS.set(settings)
    try:
        return _Unpickler(io.BytesIO(zlib.decompress(payload))).load()
    finally:
        _LOAD_SETTINGS.reset(token)


# ---------------------------------------------------------------------------------------------
# the format


def encode_snapshot(
    state: Any,
    *,
    stream: str,
    partition: int,
    last_offset: int,
    last_event_time: Optional[int],
    created_at: Optional[int] = None,
    settings: Any = None,
    level: int = 6,
) -> bytes:
    """The snapshot bytes of ``state`` (any picklable object; Settings objects go by reference)."""
    payload = dumps_state(state, level)
    header = {
        "format": FORMAT_VERSION,
        "soundcheck": soundcheck_version(),
        "river": RIVER_VERSION,
        "state_schema": state_schema(),
        "stream": stream,
        "partition": int(partition),
        "created_at": int(time.time() * 1000) if created_at is None else int(created_at),
        "last_event_time": last_event_time,
        "last_offset": int(last_offset),
        "config_digest": config_digest(settings) if settings is not None else None,
        "payload_bytes": len(payload),
        "payload_crc32": zlib.crc32(payload),
    }
    raw = orjson.dumps(header)
    return MAGIC + _LEN.pack(len(raw)) + raw + payload


def decode_header(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """The header and the (still compressed) payload; raises :class:`SnapshotRejected`."""
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < len(MAGIC) + _LEN.size:
        raise SnapshotRejected("corrupt", "too short")
    blob = bytes(blob)
    if not blob.startswith(MAGIC):
        raise SnapshotRejected("corrupt", "not a soundcheck snapshot")
    (n,) = _LEN.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if n > MAX_HEADER or start + n > len(blob):
        raise SnapshotRejected("corrupt", "header length")
    try:
        header = orjson.loads(blob[start : start + n])
    except orjson.JSONDecodeError as exc:
        raise SnapshotRejected("corrupt", f"header: {exc}") from None
    if not isinstance(header, dict):
        raise SnapshotRejected("corrupt", "header is not an object")
    return header, blob[start + n :]


def check_header(header: dict[str, Any]) -> None:
    """Refuse what this worker cannot restore faithfully."""
    if header.get("format") != FORMAT_VERSION:
        raise SnapshotRejected("format_version", f"snapshot format {header.get('format')!r}, this worker reads {FORMAT_VERSION}")
    if header.get("river") != RIVER_VERSION:
        raise SnapshotRejected("river_version", f"written with River {header.get('river')!r}, this worker has {RIVER_VERSION}")
    if header.get("state_schema") != state_schema():
        raise SnapshotRejected("state_schema", "the detector state classes changed since it was written")


def verify(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header, payload)`` of a snapshot this worker can restore, its payload still encoded;
    raises :class:`SnapshotRejected`."""
    header, payload = decode_header(blob)
    check_header(header)
    if len(payload) != header.get("payload_bytes") or zlib.crc32(payload) != header.get("payload_crc32"):
        raise SnapshotRejected("corrupt", "payload length or checksum")
    return header, payload


def decode_snapshot(blob: bytes, settings: Any = None) -> tuple[dict[str, Any], Any]:
    """``(header, state)``; raises :class:`SnapshotRejected` for a snapshot not to restore."""
    header, payload = verify(blob)
    try:
        state = loads_state(payload, settings)
    except Exception as exc:  # zlib.error, UnpicklingError, EOFError, AttributeError on a vanished class ...
        raise SnapshotRejected("corrupt", f"payload: {type(exc).__name__}: {exc}") from None
    return header, state


# ---------------------------------------------------------------------------------------------
# what of a StreamProcessor is state


def capture(proc: Any) -> dict[str, Any]:
    """The detector state of a :class:`soundcheck.pipeline.StreamProcessor` (references, not copies:
    encode it before the processor runs again)."""
    detectors: dict[str, dict[str, Any]] = {}
    for det in proc.detectors:
        d: dict[str, Any] = {}
        for attr in DETECTOR_ATTRS:
            if hasattr(det, attr):
                d[attr] = getattr(det, attr)
        for attr in STORE_ATTRS:
            store = getattr(det, attr, None)
            if store is not None:
                d[attr] = {"items": store._items, "evicted": store.evicted}
        detectors[det.name] = d
    return {"detectors": detectors, "progress": dict(getattr(proc, "_progress", {}))}


def restore(proc: Any, state: dict[str, Any]) -> int:
    """Load ``state`` (from :func:`capture`) into a fresh processor's detectors; returns the
    entities restored. Bounds come from the current settings: a store over its (new) limit loses
    its least recently seen entries; windows of another size or shape are not restored."""
    restored = 0
    saved = state.get("detectors", {})
    for det in proc.detectors:
        d = saved.get(det.name)
        if not d:
            continue
        windows = d.get("windows")
        mine = getattr(det, "windows", None)
        same_shape = (
            windows is not None and mine is not None and windows.size_ms == mine.size_ms
            and windows.n_features == mine.n_features and windows.lateness_ms == mine.lateness_ms
        )
        if same_shape:
            det.windows = windows
            if "columns" in d:  # the system detector's metric columns go with its windows
                det.columns = d["columns"]
                det.untracked_metrics = d.get("untracked_metrics", 0)
        if "now" in d:
            det.now = d["now"]
        for attr in STORE_ATTRS:
            store, saved_store = getattr(det, attr, None), d.get(attr)
            if store is None or saved_store is None:
                continue
            items: OrderedDict = saved_store["items"]
            while len(items) > store.max_entries:
                items.popitem(last=False)
            store._items = items
            store.evicted = saved_store.get("evicted", 0)
            restored += len(items)
    if hasattr(proc, "_progress"):
        proc._progress.update(state.get("progress", {}))
    return restored


# ---------------------------------------------------------------------------------------------
# stage 2: the detectors of one aggregates or fraud partition


def capture_stage(value: Any) -> dict[str, Any]:
    """The state of a stage-2 unit: a dict of :class:`~soundcheck.detectors.stage2.Stage2` by
    stream (an aggregates partition), or a :class:`~soundcheck.detectors.stage2.FraudStage`."""
    if isinstance(value, dict):
        return {"streams": {s: {**capture(st), "marks": dict(st.progress.marks), "done_until": st.done_until,
                                "sources": st.sources} for s, st in value.items()}}
    return {"fraud": {**capture(type("P", (), {"detectors": [value.detector]})()), "marks": dict(value.progress.marks),
                      "done_until": value.done_until, "pending": value.held_rows(), "offsets": dict(value.offsets),
                      "ordinals": dict(value.ordinals)}}


def restore_stage(value: Any, state: dict[str, Any]) -> int:
    """Load :func:`capture_stage` output into a fresh unit; returns the entities restored. Progress
    marks restart their idle clocks now."""
    now = time.time()
    if isinstance(value, dict):
        n = 0
        for s, saved in state.get("streams", {}).items():
            st = value.get(s)
            if st is None:
                continue
            n += restore(st, saved)
            st.progress.marks = {int(p): (int(c), now) for p, (c, _) in saved.get("marks", {}).items()}
            st.done_until = int(saved.get("done_until", st.done_until))
            st.sources = dict(saved.get("sources", {}))
        return n
    saved = state.get("fraud") or {}
    holder = type("P", (), {"detectors": [value.detector]})()
    n = restore(holder, saved)
    value.progress.marks = {int(p): (int(c), now) for p, (c, _) in saved.get("marks", {}).items()}
    value.done_until = int(saved.get("done_until", value.done_until))
    value.pending = list(saved.get("pending", []))  # counted again: the stored state is as of the last scoring
    value.counted_until = value.done_until
    value.offsets = {int(p): int(o) for p, o in saved.get("offsets", {}).items()}
    value.ordinals = {int(p): int(o) for p, o in saved.get("ordinals", {}).items()}  # (absent: whole offsets)
    return n
