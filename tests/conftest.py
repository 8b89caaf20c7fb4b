"""Shared fixtures. The real-broker fixtures (``kafka_bootstrap``, ``unique_name``) live in tests/broker.py."""

from __future__ import annotations

import pytest

from soundcheck.settings import Settings, load_settings

pytest_plugins = ["tests.broker"]


@pytest.fixture
def settings() -> Settings:
    """The development settings, independent of the caller's environment."""
    return load_settings("development", environ={})
