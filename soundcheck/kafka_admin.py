"""Small Kafka administration helpers (aiokafka): create the topics the worker needs."""

from __future__ import annotations

import asyncio

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from .settings import Settings


def worker_topics(settings: Settings) -> list[str]:
    t = settings.topics
    return [t.audio, t.behavior, t.system, t.alerts, t.dead_letter, t.anomalies]


async def ensure_topics_async(bootstrap: str, names: list[str], partitions: int, replication: int, timeout: float = 60.0) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if missing:
            try:
                await admin.create_topics([NewTopic(n, partitions, replication) for n in missing])
            except TopicAlreadyExistsError:
                pass  # another worker won the race
            deadline = asyncio.get_running_loop().time() + timeout
            while not set(missing) <= set(await admin.list_topics()):
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"topics {missing} were not created within {timeout} s")
                await asyncio.sleep(0.1)
        return missing
    finally:
        await admin.close()


def ensure_topics(settings: Settings) -> list[str]:
    return asyncio.run(
        ensure_topics_async(
            settings.kafka.bootstrap_servers, worker_topics(settings), settings.kafka.partitions, settings.kafka.replication_factor
        )
    )
