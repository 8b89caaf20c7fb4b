"""Integration tests of the Maven-fetched local Kafka broker (soundcheck.kafka.local)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from soundcheck.kafka import local as kafka_local
from soundcheck.kafka.local import LocalKafka, broker_answers, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _pid_alive(pid: int) -> bool:
    return kafka_local._pid_is_broker(pid)


def _wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` s pass; return its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="soundcheck")
    kafka_local.add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


@pytest.mark.asyncio
async def test_produce_and_consume_100_messages(kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    topic, group = unique_name("roundtrip"), unique_name("group")
    sent = [f"message-{i}".encode() for i in range(100)]

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, value) for value in sent])
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=group, auto_offset_reset="earliest")
    await consumer.start()
    received: list[bytes] = []
    deadline = asyncio.get_running_loop().time() + 60
    try:
        while len(received) < len(sent) and asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            received.extend(record.value for records in batches.values() for record in records)
    finally:
        await consumer.stop()

    assert received == sent  # one partition: order is kept too


def test_second_local_kafka_starts_answers_and_stops() -> None:
    kafka = LocalKafka()
    try:
        bootstrap = kafka.start()
        assert bootstrap == kafka.bootstrap == f"127.0.0.1:{kafka.port}"
        assert kafka.is_running()
        assert broker_answers(bootstrap)
        pid, data_dir = kafka.pid, kafka.data_dir
        assert pid is not None and _pid_alive(pid)
        assert kafka.log_path.is_file()
    finally:
        kafka.stop()
    assert not kafka.is_running()
    assert not _pid_alive(pid)
    assert not data_dir.exists()  # temp data dir removed by stop()
    assert not broker_answers(bootstrap, timeout=2.0)


def test_detached_broker_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # share the already fetched jars instead of fetching them again into tmp_path
    jars_root = kafka_local.ensure_jars(quiet=True).parent
    monkeypatch.setenv("SOUNDCHECK_CACHE_DIR", str(tmp_path))
    (tmp_path / jars_root.name).symlink_to(jars_root, target_is_directory=True)

    port = free_port()
    pid: int | None = None
    try:
        assert kafka_local.status_detached() is None
        assert _cli("kafka", "status") == 1

        pythonpath = os.environ.get("PYTHONPATH")
        # start it from another Python process, which exits: the broker must outlive it
        started = subprocess.run(
            [sys.executable, "-c",
             "import argparse, sys\n"
             "from soundcheck.kafka import local as kafka_local\n"
             "parser = argparse.ArgumentParser()\n"
             "kafka_local.add_cli(parser.add_subparsers(required=True))\n"
             "args = parser.parse_args(sys.argv[1:])\n"
             "sys.exit(args.func(args))\n",
             "kafka", "start", "--port", str(port)],
            cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), pythonpath]))},
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        state = kafka_local.status_detached()
        pid = state["pid"] if state else None
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == f"127.0.0.1:{port}"
        assert "soundcheck kafka stop" in started.stderr

        assert state is not None and state["answering"]
        assert state["bootstrap"] == f"127.0.0.1:{port}"
        assert Path(state["log"]).is_file()
        assert (tmp_path / "broker" / "state.json").is_file()
        assert pid is not None and _pid_alive(pid)

        assert kafka_local.start_detached()["pid"] == pid  # reuses the running broker
        capsys.readouterr()
        assert _cli("kafka", "status") == 0
        assert f"127.0.0.1:{port}" in capsys.readouterr().out

        assert kafka_local.stop_detached() is True
        assert _wait_for(lambda: not _pid_alive(pid), timeout=10)
        assert kafka_local.status_detached() is None
        assert kafka_local.stop_detached() is False
        assert _cli("kafka", "status") == 1
    finally:
        kafka_local.stop_detached()
        if pid is not None and _pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)
