"""Helpers for the tests that run real worker processes: isolated topics and a worker per test."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable, Mapping, Optional

from soundcheck.evaluation.harness import WorkerProcess, worker_env
from soundcheck.kafka.admin import ensure_topics_async, worker_topics
from soundcheck.settings import Settings


def isolated(settings: Settings, bootstrap: str, unique_name: Callable[[str], str], app: str = "soundcheck-test") -> Settings:
    """Settings with fresh uuid topics and consumer group on ``bootstrap``; the topics are created."""
    topics = {role: unique_name(name) for role, name in settings.topics.__dict__.items()}
    s = settings.replace(kafka={"bootstrap_servers": bootstrap, "app_id": unique_name(app)}, topics=topics)
    asyncio.run(ensure_topics_async(bootstrap, worker_topics(s), s.kafka.partitions, 1))
    return s


def start_worker(s: Settings, tmp_path: Path, name: str = "worker", data: Optional[str] = None,
                 extra: Optional[Mapping[str, str]] = None) -> WorkerProcess:
    """A worker process for ``s``; workers given the same ``data`` name share a data dir."""
    extra = {"SOUNDCHECK__KAFKA__PARTITIONS": str(s.kafka.partitions), **(extra or {})}
    env = worker_env(s.kafka.bootstrap_servers, s.kafka.app_id, s.topics.__dict__, tmp_path / f"{data or name}-data", extra)
    return WorkerProcess(env, tmp_path / f"{name}.log").start()
