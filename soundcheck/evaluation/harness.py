"""Run a real worker process and read topics, for the demo, the tests and the benchmark."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import orjson
from aiokafka import AIOKafkaConsumer

from soundcheck.kafka.local import free_port


class WorkerProcess:
    """``python -m soundcheck worker`` as a child process, with its own web port and data dir."""

    def __init__(self, env: Mapping[str, str], log_path: Path, web_port: Optional[int] = None) -> None:
        self.web_port = web_port or free_port()
        self.env = {**os.environ, **env, "SOUNDCHECK__WORKER__WEB_PORT": str(self.web_port)}
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "WorkerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "soundcheck", "worker"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def _get(self, path: str, timeout: float = 2.0) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=timeout) as r:
            return r.read()

    def health(self) -> Optional[dict[str, Any]]:
        try:
            return orjson.loads(self._get("/health"))
        except Exception:
            return None

    def metrics(self) -> dict[str, float]:
        """The worker's Prometheus samples, as ``{'name{label="v"}': value}``."""
        out: dict[str, float] = {}
        for line in self._get("/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric_sum(self, prefix: str) -> float:
        try:
            return sum(v for k, v in self.metrics().items() if k == prefix or k.startswith(prefix + "{"))
        except Exception:
            return -1.0

    def drained(self, m: Optional[dict[str, float]] = None) -> bool:
        """No window open in stage 1, every message between the stages (partials, fraud rows,
        event-time ticks) read by the next, and every anomaly stage 2 emitted taken in by the
        alerting stage (one worker: its own counters say what it sent and read). ``m``: the
        worker's metrics if already fetched; a worker that does not answer is not drained."""
        try:
            m = self.metrics() if m is None else m
        except Exception:
            return False
        total = lambda prefix: sum(v for k, v in m.items() if k.startswith(prefix))  # noqa: E731
        kinds = {k.split('kind="', 1)[1].split('"', 1)[0] for k in m if k.startswith("soundcheck_internal_sent_total{")}
        in_flight = [kind for kind in kinds if total(f'soundcheck_internal_read_total{{kind="{kind}"}}')
                     < total(f'soundcheck_internal_sent_total{{kind="{kind}"}}')]
        return (total("soundcheck_open_windows") == 0 and not in_flight
                and total("soundcheck_anomalies_handled_total") >= total("soundcheck_anomalies_total"))

    def wait_settled(self, timeout: float, quiet_s: float = 3.0, what: str = "the worker to settle") -> None:
        """Wait until :meth:`drained` holds and nothing the worker counts (records read, anomalies,
        alerts, decisions) has changed for ``quiet_s``: stage 1's windows being closed does not mean
        stage 2 has read their partials, nor that the alerting clock's last ticks were acted on."""
        keys = ("soundcheck_events_in_total", "soundcheck_anomalies_total", "soundcheck_anomalies_handled_total",
                "soundcheck_alerts_total", "soundcheck_decisions_total")
        last: Optional[tuple] = None
        since = time.monotonic()

        def settled() -> bool:
            nonlocal last, since
            try:
                m = self.metrics()
            except Exception:
                return False
            now = tuple(sum(v for k, v in m.items() if k == key or k.startswith(key + "{")) for key in keys) + (self.drained(m),)
            if now != last:
                last, since = now, time.monotonic()
            return bool(now[-1]) and time.monotonic() - since >= quiet_s

        self.wait_for(settled, timeout=timeout, what=what)

    def wait_ready(self, timeout: float = 90.0, poll_s: float = 0.25) -> dict[str, Any]:
        """Wait until the worker answers and has partitions assigned (``ready`` in its /health)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with code {self.proc.returncode}; its log:\n{self.log_tail()}")
            h = self.health()
            if h and h.get("ready", h.get("assigned_partitions", 0) > 0 and not h.get("rebalancing")):
                return h
            time.sleep(poll_s)
        raise TimeoutError(f"the worker was not ready within {timeout} s; its log:\n{self.log_tail()}")

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with code {self.proc.returncode} while waiting for {what}:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}; worker log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


def worker_env(bootstrap: str, app_id: str, topics: Mapping[str, str], data_dir: Path, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "SOUNDCHECK__KAFKA__APP_ID": app_id,
        "SOUNDCHECK_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    }
    for role, name in topics.items():
        env[f"SOUNDCHECK__TOPICS__{role.upper()}"] = name
    env.update(extra or {})
    return env


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[list[Any]], bool],
    timeout: float,
    on_record: Optional[Callable[[Any], None]] = None,
    stop: Optional[asyncio.Event] = None,
    client: Optional[Mapping[str, Any]] = None,
) -> list[Any]:
    """Read ``topic`` from the beginning until ``until(records)`` holds, ``stop`` is set or the timeout."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None, **(client or {})
    )
    await consumer.start()
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(out) and not (stop and stop.is_set()):
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    out.append(r)
                    if on_record:
                        on_record(r)
    finally:
        await consumer.stop()
    return out
