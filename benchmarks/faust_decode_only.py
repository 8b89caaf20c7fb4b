"""A stock faust-streaming app that only decodes: the baseline of ``soundcheck bench``.

One :class:`faust.App` with default settings, subscribed to the three input topics with the raw
value serializer, and one agent per topic doing ``async for value in stream: orjson.loads(value)``
and counting the records (the elements of a JSON array, or 1). No validation, no detection, no
batching: what any faust-streaming consumer of these topics costs at the least.

Run as a process, like the worker, with the same environment as
:func:`soundcheck.evaluation.harness.worker_env` builds::

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 SOUNDCHECK__KAFKA__APP_ID=decode-1 \\
    SOUNDCHECK__TOPICS__AUDIO=... SOUNDCHECK__TOPICS__BEHAVIOR=... SOUNDCHECK__TOPICS__SYSTEM=... \\
    SOUNDCHECK__WORKER__WEB_PORT=6070 SOUNDCHECK_DATA_DIR=/tmp/decode python benchmarks/faust_decode_only.py

It serves ``/health`` (``assigned_partitions``, ``rebalancing``: the shape the worker's has, so
:meth:`soundcheck.evaluation.harness.WorkerProcess.wait_ready` works) and ``/metrics`` with
``faust_decode_only_records_total{topic="..."}``. Only faust and orjson are imported, so it runs
by path from anywhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import faust
import orjson

METRIC = "faust_decode_only_records_total"
ROLES = ("audio", "behavior", "system")


def create_app(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> faust.App:
    bootstrap = environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    app_id = environ.get("SOUNDCHECK__KAFKA__APP_ID", "faust-decode-only")
    data_dir = Path(environ.get("SOUNDCHECK_DATA_DIR") or "/tmp/faust-decode-only") / app_id
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=[f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip()],
        store="memory://",
        datadir=str(data_dir),
        consumer_auto_offset_reset="earliest",
        web_host="127.0.0.1",
        web_port=int(environ.get("SOUNDCHECK__WORKER__WEB_PORT", "6066")),
    )
    counts: dict[str, int] = {}
    for role in ROLES:
        name = environ.get(f"SOUNDCHECK__TOPICS__{role.upper()}", role)
        counts[name] = 0
        topic = app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

        def decode_agent(name: str = name):  # one closure per topic: its own counter key
            async def decode(stream: faust.StreamT) -> None:
                async for value in stream:
                    decoded = orjson.loads(value)
                    counts[name] += len(decoded) if isinstance(decoded, list) else 1

            return decode

        app.agent(topic, name=f"decode.{role}")(decode_agent())

    @app.page("/metrics")
    async def metrics(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        lines = [f"# TYPE {METRIC} counter"] + [f'{METRIC}{{topic="{t}"}} {n}' for t, n in counts.items()]
        return web.text("\n".join(lines) + "\n")

    @app.page("/health")
    async def health(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        assigned = app.consumer.assignment() if app.consumer else set()
        return web.json({"status": "ok", "app_id": app_id, "assigned_partitions": len(assigned),
                         "rebalancing": bool(app.rebalancing)})

    return app


def main() -> int:
    faust.Worker(create_app(), loglevel="warn", quiet=True).execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
