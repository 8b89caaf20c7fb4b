"""Pytest plugin giving integration tests a real Kafka broker.

Enable it with ``pytest_plugins = ["tests.broker"]`` in ``tests/conftest.py``.

``kafka_bootstrap`` (session scope) resolves, in order:

1. ``$KAFKA_BOOTSTRAP_SERVERS`` if set (it must answer);
2. a :class:`soundcheck.kafka.local.LocalKafka` broker (jars from Maven Central
   via ``mvn``, run with ``java``), started once and stopped at session end;
3. an ``apache/kafka`` container through testcontainers, only if a Docker
   engine answers.

If none works the fixture fails (never skips) and says what was tried and why
each failed.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from soundcheck.kafka.local import KAFKA_VERSION, LocalKafka, broker_answers, free_port

_CONTAINER_START_TIMEOUT_S = 120.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: runs against a real Kafka broker")


def _docker_problem() -> str | None:
    """None if a Docker engine answers (as testcontainers will see it), else why not."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure means "no usable engine"
        return f"no Docker engine answers ({type(exc).__name__}: {exc})"
    return None


def _start_container() -> tuple[Any, str]:
    """Start ``apache/kafka`` in KRaft mode; the listener uses the same port inside and outside."""
    from testcontainers.core.container import DockerContainer

    port = free_port()
    container = (
        DockerContainer(f"apache/kafka:{KAFKA_VERSION}")
        .with_bind_ports(port, port)
        .with_envs(
            KAFKA_NODE_ID="1",
            KAFKA_PROCESS_ROLES="broker,controller",
            KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
            KAFKA_LISTENERS=f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://0.0.0.0:9093",
            KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://127.0.0.1:{port}",
            KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            KAFKA_INTER_BROKER_LISTENER_NAME="PLAINTEXT",
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
            KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
            KAFKA_NUM_PARTITIONS="1",
        )
    )
    container.start()
    bootstrap = f"127.0.0.1:{port}"
    if not _answers_soon(bootstrap, _CONTAINER_START_TIMEOUT_S):
        container.stop()
        raise RuntimeError(f"the container did not answer on {bootstrap} within {_CONTAINER_START_TIMEOUT_S:.0f} s")
    return container, bootstrap


def _answers_soon(bootstrap: str, timeout: float) -> bool:
    """Poll until the broker at ``bootstrap`` answers or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker_answers(bootstrap, timeout=5.0):
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``bootstrap.servers`` of a real Kafka broker shared by the whole session."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if env:
        if not broker_answers(env, timeout=15.0):
            pytest.fail(f"KAFKA_BOOTSTRAP_SERVERS={env} is set but no Kafka broker answers there", pytrace=False)
        yield env
        return

    tried = ["KAFKA_BOOTSTRAP_SERVERS: not set"]
    kafka = LocalKafka()
    try:
        bootstrap = kafka.start()
    except Exception as exc:
        kafka.stop()
        tried.append(f"local broker (soundcheck.kafka.local, needs mvn + java 17): {exc}")
    else:
        try:
            yield bootstrap
        finally:
            kafka.stop()
        return

    problem = _docker_problem()
    if problem is None:
        try:
            container, bootstrap = _start_container()
        except Exception as exc:
            tried.append(f"testcontainers apache/kafka:{KAFKA_VERSION}: {type(exc).__name__}: {exc}")
        else:
            try:
                yield bootstrap
            finally:
                container.stop()
            return
    else:
        tried.append(f"testcontainers apache/kafka:{KAFKA_VERSION}: {problem}")

    pytest.fail("no Kafka broker for the integration tests; tried:\n" + "\n".join(f"- {t}" for t in tried), False)


@pytest.fixture(scope="session")
def unique_name() -> Callable[..., str]:
    """A factory of unique topic / consumer-group names: ``unique_name("orders") -> "orders-1a2b3c4d5e"``."""

    def make(prefix: str = "test") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    return make
