"""Dead letters: what the dead-letter topic holds for the records that could not be read.

One dead letter per rejected record (``schemas/dead_letter.schema.json``), and together the dead
letters of one message hold at most one copy of its original bytes: the first (lowest index) holds
them, the others point to it (``original_in``). A message larger than ``max_original`` bytes is
kept truncated, with its full size and SHA-256, so a dead letter always fits the topic and is never
lost; the rejected record itself (``record``) is kept only when small. So the dead letters of any
input stay within a small multiple of its size, whatever it holds.

>>> from soundcheck.ingest.contracts import Rejection
>>> bad = [Rejection("schema", "a: required field is missing", 0, {"b": 1}), Rejection("schema", "a: missing", 1, None)]
>>> letters = dead_letters(topic="t", partition=0, offset=7, timestamp_ms=None, key=b"k", value=b'[{"b":1},{}]',
...                        rejections=bad, stream="audio", now_ms=0)
>>> import orjson; first, second = (orjson.loads(x) for x in letters)
>>> first["original_value"], first["original_in"], second["original_value_b64"], second["original_in"]
('[{"b":1},{}]', None, None, {'index': 0})
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Optional, Sequence

import orjson

MAX_ORIGINAL = 256 * 1024  # original bytes one dead letter keeps (base64 grows them by 4/3; the topic's default limit is 1 MB)
TEXT_COPY_LIMIT = 64 * 1024  # the original is also given as text when it is UTF-8 and this small
SCHEMA_VERSION = "1.1"


def dead_letters(*, topic: str, partition: int, offset: int, timestamp_ms: Optional[int], key: Optional[bytes],
                 value: Optional[bytes], rejections: Sequence[Any], stream: str, now_ms: int,
                 max_original: int = MAX_ORIGINAL, keep_original: bool = True) -> list[bytes]:
    """The dead letters of one message (``rejections``: its :class:`~soundcheck.ingest.contracts.Rejection`
    list); ``keep_original=False`` keeps only the size and hash of the input (production option)."""
    value = value if value is not None else b""
    kept = value[:max_original] if keep_original else b""
    text: Optional[str] = None
    if keep_original and len(kept) <= TEXT_COPY_LIMIT:
        try:
            text = kept.decode("utf-8")
        except UnicodeDecodeError:
            pass
    common = {
        "source_topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp": timestamp_ms,
        "key": key.decode("utf-8", "replace")[:256] if key else None,
        "stream": stream,
        "original_size": len(value),
        "original_sha256": hashlib.sha256(value).hexdigest(),
        "original_truncated": keep_original and len(kept) < len(value),
        "dead_lettered_at": now_ms,
        "schema_version": SCHEMA_VERSION,
    }
    out: list[bytes] = []
    holder: Optional[int] = None
    for r in sorted(rejections, key=lambda r: -1 if r.index is None else r.index):
        first = holder is None
        if first:
            holder = r.index if r.index is not None else -1
        record = {
            **common,
            "error_kind": r.kind,
            "reason": r.reason,
            "index": r.index,
            "record": r.item if r.index is not None else None,
            "original_value_b64": base64.b64encode(kept).decode() if first and keep_original else None,
            "original_value": text if first else None,
            "original_in": None if first else {"index": holder if holder >= 0 else None},
        }
        try:
            out.append(orjson.dumps(record, default=str))
        except (TypeError, orjson.JSONEncodeError):  # a record orjson cannot write (nested too deep): its bytes are in the original
            record["record"] = None
            out.append(orjson.dumps(record, default=str))
    return out
