"""Small Kafka administration helpers (aiokafka): create the topics the worker needs."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Mapping, Optional

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from soundcheck.settings import Settings

SNAPSHOT_SUFFIX = ".snapshots"
SNAPSHOT_MAX_BYTES = 16 * 1024 * 1024  # the largest snapshot (one partition's detector state, compressed)
SNAPSHOT_TOPIC_CONFIG = {
    "cleanup.policy": "compact",  # the latest snapshot per key ("stream:partition") is what counts
    "max.message.bytes": str(SNAPSHOT_MAX_BYTES + 64 * 1024),  # room for the record batch overhead
    "min.cleanable.dirty.ratio": "0.1",
    "segment.ms": str(3_600_000),  # roll hourly so old snapshots get compacted away
}


def snapshot_topic(settings: Settings) -> str:
    """The compacted topic of detector state snapshots: ``<app_id>.snapshots``."""
    return settings.kafka.app_id + SNAPSHOT_SUFFIX


TABLES = ("soundcheck-dedup", "soundcheck-incidents", "soundcheck-control", "soundcheck-outbox", "soundcheck-clock")  # the worker's Faust tables


def changelog_topics(settings: Settings) -> list[str]:
    """The Faust tables' changelog topics, created up front (compacted, as many partitions as the
    anomalies topic): a worker that had to create them itself has been seen to wait forever for
    one it had just created ("Ignoring missing topic ... -changelog")."""
    return [f"{settings.kafka.app_id}-{name}-changelog" for name in TABLES]


def worker_topics(settings: Settings) -> list[str]:
    t = settings.topics
    return [t.audio, t.behavior, t.system, t.alerts, t.dead_letter, t.anomalies, t.control, t.aggregates, t.fraud,
            t.decisions, snapshot_topic(settings), *changelog_topics(settings)]


def topic_config(name: str) -> dict[str, str]:
    """Per-topic configs of the topics we create (the snapshot topic is compacted)."""
    if name.endswith(SNAPSHOT_SUFFIX):
        return dict(SNAPSHOT_TOPIC_CONFIG)
    if name.endswith("-changelog"):
        return {"cleanup.policy": "compact"}
    return {}


async def ensure_topics_async(
    bootstrap: str, names: list[str], partitions: int, replication: int, timeout: float = 60.0,
    configs: Optional[Mapping[str, Mapping[str, str]]] = None, client: Optional[Mapping[str, Any]] = None,
) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created.

    ``configs`` gives topic configs by name (default: :func:`topic_config`, which makes any
    ``*.snapshots`` topic compacted with large messages). ``client``: connection options
    (``Settings.kafka_client()``: security protocol, SASL, TLS)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000), **(client or {}))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if missing:
            try:
                await admin.create_topics([
                    NewTopic(n, partitions, replication, topic_configs=dict((configs or {}).get(n) or topic_config(n)))
                    for n in missing
                ])
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
            settings.kafka.bootstrap_servers, worker_topics(settings), settings.kafka.partitions, settings.kafka.replication_factor,
            client=settings.kafka_client(),
        )
    )


async def topic_partitions(bootstrap: str, topic: str, timeout: float = 30.0, client: Optional[Mapping[str, Any]] = None) -> list[int]:
    """The partition numbers of ``topic`` (empty if it does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000), **(client or {}))
    await admin.start()
    try:
        for t in await admin.describe_topics([topic]):
            if (t.get("topic") or t.get("name")) == topic and not t.get("error_code"):
                return sorted(int(p.get("partition", p.get("partition_index", -1))) for p in t.get("partitions", []))
        return []
    finally:
        await admin.close()


async def read_latest(
    bootstrap: str, topic: str, keys: Optional[set[bytes]] = None, timeout: float = 60.0, max_bytes: int = SNAPSHOT_MAX_BYTES,
    client: Optional[Mapping[str, Any]] = None,
) -> dict[bytes, bytes]:
    """The latest value per key of a (compacted) topic, read from the beginning to the end
    offsets at the time of the call; only ``keys`` if given. A tombstone removes its key.
    Raises ``TimeoutError`` when the end is not reached within ``timeout`` s."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    parts = await topic_partitions(bootstrap, topic, timeout, client)
    if not parts:
        return {}
    fetch = max_bytes + 1024 * 1024
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
        max_partition_fetch_bytes=fetch, fetch_max_bytes=fetch, request_timeout_ms=int(max(timeout, 30) * 1000),
        **(client or {}),
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: dict[bytes, bytes] = {}
        async for r in _to_end(consumer, tps, topic, timeout):
            if keys is not None and r.key not in keys:
                continue
            if r.value is None:
                out.pop(r.key, None)
            else:
                out[r.key] = r.value
        return out
    finally:
        await consumer.stop()


async def _to_end(consumer: Any, tps: list, topic: str, timeout: float) -> AsyncIterator[Any]:
    """The records of ``tps`` from the consumer's positions to the end offsets as of the call.
    Raises ``TimeoutError`` when the end is not reached within ``timeout`` s."""
    from aiokafka import TopicPartition

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    end = await consumer.end_offsets(tps)
    pending = {tp for tp in tps if end[tp] > 0}
    while pending:
        for tp in list(pending):
            if await consumer.position(tp) >= end[tp]:
                pending.discard(tp)
        if not pending:
            break
        if loop.time() > deadline:
            raise TimeoutError(f"{topic} was not read to its end within {timeout} s")
        batch = await consumer.getmany(*pending, timeout_ms=200)
        for records in batch.values():
            for r in records:
                if r.offset < end[TopicPartition(r.topic, r.partition)]:
                    yield r


async def read_since(
    bootstrap: str, topic: str, since_ms: int, timeout: float = 60.0, client: Optional[Mapping[str, Any]] = None,
) -> list[Any]:
    """The records of every partition of ``topic`` with a broker timestamp at or after
    ``since_ms`` (epoch ms), up to the end offsets at the time of the call."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    parts = await topic_partitions(bootstrap, topic, timeout, client)
    if not parts:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                request_timeout_ms=int(max(timeout, 30) * 1000), **(client or {}))
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        found = await consumer.offsets_for_times({tp: max(0, int(since_ms)) for tp in tps})
        end = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, found[tp].offset if found.get(tp) is not None else end[tp])
        return [r async for r in _to_end(consumer, tps, topic, timeout)]
    finally:
        await consumer.stop()
