"""One frozen settings object, built from ``config/<env>.yaml`` plus the environment.

Nothing reads configuration at import time: the CLI builds a :class:`Settings` with
:func:`load_settings` and passes it explicitly to everything that needs it; tests build
their own.

Environment variables:

* ``SOUNDCHECK_ENV``: development (default), staging or production.
* ``SOUNDCHECK_CONFIG_DIR``: where the YAML files live (default: ``config/`` of the project).
* ``KAFKA_BOOTSTRAP_SERVERS``: the Kafka cluster (overrides ``kafka.bootstrap_servers``).
* ``SOUNDCHECK_INSTANCE_ID``: this worker's static group membership id (``worker.instance_id``).
* ``SOUNDCHECK_KAFKA_SASL_PASSWORD`` / ``SOUNDCHECK_KAFKA_SSL_KEY_PASSWORD``: Kafka secrets for
  ``kafka.security`` (see :mod:`soundcheck.kafka.security`; never logged).
* ``SOUNDCHECK_PSEUDONYM_KEY``: the secret key for pseudonymising user ids (never logged);
  required outside development, where a fixed development key stands in.
* ``SOUNDCHECK__SECTION__KEY=value``: override any key; the value is parsed as YAML.

>>> s = load_settings(env="development", environ={"SOUNDCHECK__TOPICS__ALERTS": "my-alerts"})
>>> s.topics.alerts, s.topics.audio
('my-alerts', 'audio_quality_metrics')
>>> s.classification["weights"]["revenue"]
0.4
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

ENVIRONMENTS = ("development", "staging", "production")
PROJECT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
#: used outside production when SOUNDCHECK_PSEUDONYM_KEY is unset: stable, but not secret
DEVELOPMENT_PSEUDONYM_KEY = b"soundcheck-development-key"


class SettingsError(ValueError):
    """The configuration is missing, malformed or contradictory."""


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    app_id: str
    partitions: int
    replication_factor: int
    auto_offset_reset: str
    #: how clients authenticate (soundcheck.kafka.security); secrets live in Settings.kafka_secrets
    security: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicSettings:
    audio: str
    behavior: str
    system: str
    alerts: str
    dead_letter: str
    anomalies: str
    control: str
    aggregates: str
    fraud: str
    decisions: str

    def inputs(self) -> dict[str, str]:
        """The three input topics by stream name."""
        return {"audio": self.audio, "behavior": self.behavior, "system": self.system}


@dataclass(frozen=True)
class WorkerSettings:
    batch_size: int
    batch_within_s: float
    stream_buffer_maxsize: int
    web_host: str
    web_port: int
    max_future_skew_s: float
    log_level: str
    instance_id: str
    session_timeout_s: float
    fraud_process: bool


@dataclass(frozen=True)
class WindowSettings:
    aggregate_s: int
    allowed_lateness_s: int
    dedup_repeat_s: int
    correlation_s: int
    entity_idle_s: int
    resolve_after_s: int
    group_wait_s: int
    group_interval_s: int


@dataclass(frozen=True)
class Settings:
    env: str
    kafka: KafkaSettings
    topics: TopicSettings
    worker: WorkerSettings
    windows: WindowSettings
    detection: Mapping[str, Any]
    metrics: Mapping[str, Any]
    classification: Mapping[str, Any]
    services: Mapping[str, Any]
    runbooks: Mapping[str, Any]
    privacy: Mapping[str, Any]
    alerting: Mapping[str, Any]
    pseudonym_key: bytes = field(default=b"", repr=False)
    kafka_secrets: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # the key never shows, whatever prints the settings
        return f"Settings(env={self.env!r}, bootstrap={self.kafka.bootstrap_servers!r}, app_id={self.kafka.app_id!r})"

    def metric_spec(self, name: str) -> Mapping[str, Any]:
        """How to read a metric: its bad direction, how much users feel it, its service node."""
        return self.metrics.get(name) or self.metrics["default"]

    def kafka_client(self) -> dict[str, Any]:
        """Keyword arguments that make any aiokafka client connect as ``kafka.security`` says."""
        from soundcheck.kafka.security import client_options

        return client_options(self.kafka.security, self.kafka_secrets)

    def replace(self, **sections: Any) -> "Settings":
        """A copy with whole sections or nested keys replaced: ``replace(topics={"alerts": "x"})``
        (``kafka_secrets=`` replaces the Kafka secrets)."""
        secrets = sections.pop("kafka_secrets", self.kafka_secrets)
        raw = self.to_dict()
        _merge(raw, sections)
        return _build(raw, self.env, self.pseudonym_key, secrets)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("env", "pseudonym_key", "kafka_secrets"):
                continue
            value = getattr(self, f.name)
            if hasattr(value, "__dataclass_fields__"):
                value = {g.name: getattr(value, g.name) for g in fields(value)}
            out[f.name] = copy.deepcopy(dict(value))
        return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _read_yaml(config_dir: Path, env: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if env in seen:
        raise SettingsError(f"config: 'extends' loops through {' -> '.join(seen + (env,))}")
    path = config_dir / f"{env}.yaml"
    if not path.is_file():
        raise SettingsError(f"config: no file {path} for environment {env!r}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"config: {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"config: {path} must hold a mapping at the top")
    parent = data.pop("extends", None)
    if parent:
        return _merge(_read_yaml(config_dir, parent, seen + (env,)), data)
    return data


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith("SOUNDCHECK__"):
            continue
        path = [p.lower() for p in name[len("SOUNDCHECK__"):].split("__") if p]
        if not path:
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        try:
            node[path[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise SettingsError(f"environment: {name} does not parse: {exc}") from exc
    return out


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError(f"{value!r} is not true or false")


def _section(cls: type, raw: Mapping[str, Any], name: str) -> Any:
    data = raw.get(name)
    if not isinstance(data, Mapping):
        raise SettingsError(f"config: section {name!r} is missing")
    kwargs = {}
    for f in fields(cls):
        if f.type == "Mapping[str, Any]":  # a nested section, optional
            value = data.get(f.name) or {}
            if not isinstance(value, Mapping):
                raise SettingsError(f"config: {name}.{f.name} must be a mapping")
            kwargs[f.name] = dict(value)
            continue
        if f.name not in data:
            raise SettingsError(f"config: {name}.{f.name} is missing")
        value = data[f.name]
        try:
            kwargs[f.name] = {"int": int, "float": float, "str": str, "bool": _boolean}[f.type](value)
        except (KeyError, TypeError, ValueError) as exc:
            raise SettingsError(f"config: {name}.{f.name}={value!r} is not a {f.type}") from exc
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise SettingsError(f"config: unknown keys in {name}: {sorted(unknown)}")
    return cls(**kwargs)


def _check_acyclic(deps: Mapping[str, list[str]]) -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: tuple[str, ...]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            raise SettingsError(f"config: the service map has a cycle: {' -> '.join(path + (node,))}")
        state[node] = 1
        for dep in deps.get(node, []):
            visit(dep, path + (node,))
        state[node] = 2

    for node in deps:
        visit(node, ())


def _build(raw: dict[str, Any], env: str, key: bytes, kafka_secrets: Mapping[str, str]) -> Settings:
    from soundcheck.kafka.security import SecurityError, normalise

    for name in ("detection", "metrics", "classification", "services", "runbooks", "privacy", "alerting"):
        if not isinstance(raw.get(name), Mapping):
            raise SettingsError(f"config: section {name!r} is missing")
    if "default" not in raw["metrics"]:
        raise SettingsError("config: metrics.default is missing")
    weights = raw["classification"].get("weights", {})
    if abs(sum(weights.values()) - 1.0) > 1e-6:
        raise SettingsError(f"config: classification.weights must add up to 1, got {weights}")
    for svc, spec in raw["services"].items():
        for dep in spec.get("dependencies", []):
            if dep not in raw["services"]:
                raise SettingsError(f"config: services.{svc} depends on unknown service {dep!r}")
    _check_acyclic({svc: spec.get("dependencies", []) for svc, spec in raw["services"].items()})
    kafka = _section(KafkaSettings, raw, "kafka")
    try:
        kafka = KafkaSettings(**{**kafka.__dict__, "security": normalise(kafka.security)})
    except SecurityError as exc:
        raise SettingsError(str(exc)) from None
    settings = Settings(
        env=env,
        kafka=kafka,
        topics=_section(TopicSettings, raw, "topics"),
        worker=_section(WorkerSettings, raw, "worker"),
        windows=_section(WindowSettings, raw, "windows"),
        detection=raw["detection"],
        metrics=raw["metrics"],
        classification=raw["classification"],
        services=raw["services"],
        runbooks=raw["runbooks"],
        privacy=raw["privacy"],
        alerting=raw["alerting"],
        pseudonym_key=key,
        kafka_secrets=dict(kafka_secrets),
    )
    if settings.windows.aggregate_s <= 0:
        raise SettingsError("config: windows.aggregate_s must be positive")
    return settings


def load_settings(
    env: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_dir: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings for ``env`` from YAML, then the environment, then ``overrides``."""
    environ = os.environ if environ is None else environ
    env = env or environ.get("SOUNDCHECK_ENV", "development")
    if env not in ENVIRONMENTS:
        raise SettingsError(f"SOUNDCHECK_ENV must be one of {ENVIRONMENTS}, got {env!r}")
    cdir = Path(config_dir or environ.get("SOUNDCHECK_CONFIG_DIR") or PROJECT_CONFIG_DIR)
    raw = _read_yaml(cdir, env)
    _merge(raw, _env_overrides(environ))
    if environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        raw.setdefault("kafka", {})["bootstrap_servers"] = environ["KAFKA_BOOTSTRAP_SERVERS"]
    if environ.get("SOUNDCHECK_INSTANCE_ID"):
        raw.setdefault("worker", {})["instance_id"] = environ["SOUNDCHECK_INSTANCE_ID"]
    if overrides:
        _merge(raw, overrides)
    key = environ.get("SOUNDCHECK_PSEUDONYM_KEY", "").encode()
    if not key and raw.get("privacy", {}).get("pseudonymize_user_ids", True):
        if env != "development":
            raise SettingsError(f"SOUNDCHECK_PSEUDONYM_KEY must be set in {env} (user ids in alerts are keyed hashes)")
        key = DEVELOPMENT_PSEUDONYM_KEY
    from soundcheck.kafka.security import SecurityError, read_secrets

    try:
        kafka_secrets = read_secrets((raw.get("kafka") or {}).get("security") or {}, environ)
    except SecurityError as exc:
        raise SettingsError(str(exc)) from None
    return _build(raw, env, key, kafka_secrets)
