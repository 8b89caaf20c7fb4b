"""How every Kafka client of the project authenticates: ``kafka.security`` in the settings.

One place turns the settings into client options, so the worker's Faust app, its own aiokafka
consumer and producers, the admin client and the tools all connect the same way::

    kafka:
      security:
        protocol: SASL_SSL              # PLAINTEXT (default) | SSL | SASL_PLAINTEXT | SASL_SSL
        sasl_mechanism: SCRAM-SHA-512   # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
        sasl_username: soundcheck
        sasl_password_file: /run/secrets/kafka-password   # or $SOUNDCHECK_KAFKA_SASL_PASSWORD
        ssl_cafile: /etc/kafka/ca.pem   # TLS: the CA that signed the brokers' certificates
        ssl_certfile: ""                # TLS client certificate (mutual TLS), optional
        ssl_keyfile: ""                 # its key; $SOUNDCHECK_KAFKA_SSL_KEY_PASSWORD if encrypted
        ssl_check_hostname: true

Secrets are never part of the YAML: the SASL password comes from ``$SOUNDCHECK_KAFKA_SASL_PASSWORD``
or the file ``sasl_password_file`` names, and is kept out of every ``repr``, log line and error.

>>> opts = client_options({"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
...                        "sasl_username": "alice"}, {"sasl_password": "pw"})
>>> sorted(opts)
['sasl_mechanism', 'sasl_plain_password', 'sasl_plain_username', 'security_protocol']
>>> client_options({}, {})
{'security_protocol': 'PLAINTEXT'}
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Mapping, Optional

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
PASSWORD_ENV = "SOUNDCHECK_KAFKA_SASL_PASSWORD"
KEY_PASSWORD_ENV = "SOUNDCHECK_KAFKA_SSL_KEY_PASSWORD"

DEFAULTS: dict[str, Any] = {
    "protocol": "PLAINTEXT",
    "sasl_mechanism": "PLAIN",
    "sasl_username": "",
    "sasl_password_file": "",
    "ssl_cafile": "",
    "ssl_certfile": "",
    "ssl_keyfile": "",
    "ssl_check_hostname": True,
}


class SecurityError(ValueError):
    """``kafka.security`` is incomplete or contradictory; the message names the key or variable to set."""


def normalise(spec: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``kafka.security`` with defaults filled in; unknown keys and bad values are refused."""
    spec = dict(spec or {})
    unknown = set(spec) - set(DEFAULTS)
    if unknown:
        raise SecurityError(f"config: unknown keys in kafka.security: {sorted(unknown)} (known: {sorted(DEFAULTS)})")
    out = {**DEFAULTS, **{k: v for k, v in spec.items() if v is not None}}
    out["protocol"] = str(out["protocol"]).upper()
    out["sasl_mechanism"] = str(out["sasl_mechanism"]).upper()
    if out["protocol"] not in PROTOCOLS:
        raise SecurityError(f"config: kafka.security.protocol={out['protocol']!r} is not one of {PROTOCOLS}")
    if out["sasl_mechanism"] not in MECHANISMS:
        raise SecurityError(f"config: kafka.security.sasl_mechanism={out['sasl_mechanism']!r} is not one of {MECHANISMS}")
    if not isinstance(out["ssl_check_hostname"], bool):
        raise SecurityError("config: kafka.security.ssl_check_hostname must be true or false")
    for key in ("sasl_username", "sasl_password_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        out[key] = str(out[key] or "")
    return out


def read_secrets(spec: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """The secrets ``spec`` needs, from the environment or the files it names; checks that the
    settings are complete (a SASL protocol needs a user name and a password, files must exist)."""
    spec = normalise(spec)
    secrets: dict[str, str] = {}
    protocol = spec["protocol"]
    if protocol.startswith("SASL_"):
        if not spec["sasl_username"]:
            raise SecurityError(f"config: kafka.security.protocol={protocol} needs kafka.security.sasl_username")
        password = environ.get(PASSWORD_ENV, "")
        if not password and spec["sasl_password_file"]:
            path = Path(spec["sasl_password_file"])
            try:
                password = path.read_text().rstrip("\r\n")
            except OSError as exc:
                raise SecurityError(f"config: kafka.security.sasl_password_file {path} cannot be read: {exc.strerror}") from None
        if not password:
            raise SecurityError(
                f"config: kafka.security.protocol={protocol} needs a password: set {PASSWORD_ENV} "
                "or kafka.security.sasl_password_file"
            )
        secrets["sasl_password"] = password
    if protocol in ("SSL", "SASL_SSL"):
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if spec[key] and not Path(spec[key]).is_file():
                raise SecurityError(f"config: kafka.security.{key} {spec[key]} is not a file")
        if bool(spec["ssl_certfile"]) != bool(spec["ssl_keyfile"]):
            raise SecurityError("config: kafka.security.ssl_certfile and ssl_keyfile go together (mutual TLS)")
        if environ.get(KEY_PASSWORD_ENV):
            secrets["ssl_key_password"] = environ[KEY_PASSWORD_ENV]
    return secrets


def ssl_context(spec: Mapping[str, Any], secrets: Mapping[str, str]) -> Optional[ssl.SSLContext]:
    """The TLS context for an SSL protocol (None otherwise): the system's CAs unless ``ssl_cafile``."""
    spec = normalise(spec)
    if spec["protocol"] not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(cafile=spec["ssl_cafile"] or None)
    context.check_hostname = spec["ssl_check_hostname"]
    if spec["ssl_certfile"]:
        context.load_cert_chain(spec["ssl_certfile"], spec["ssl_keyfile"], password=secrets.get("ssl_key_password"))
    return context


def client_options(spec: Optional[Mapping[str, Any]], secrets: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (consumer, producer, admin, client)."""
    spec = normalise(spec)
    opts: dict[str, Any] = {"security_protocol": spec["protocol"]}
    if spec["protocol"].startswith("SASL_"):
        opts.update(
            sasl_mechanism=spec["sasl_mechanism"], sasl_plain_username=spec["sasl_username"],
            sasl_plain_password=secrets.get("sasl_password", ""),
        )
    context = ssl_context(spec, secrets)
    if context is not None:
        opts["ssl_context"] = context
    return opts


def faust_credentials(spec: Optional[Mapping[str, Any]], secrets: Mapping[str, str]) -> Any:
    """``broker_credentials`` for ``faust.App`` (None for PLAINTEXT)."""
    import faust

    spec = normalise(spec)
    context = ssl_context(spec, secrets)
    if spec["protocol"].startswith("SASL_"):
        return faust.SASLCredentials(
            username=spec["sasl_username"], password=secrets.get("sasl_password", ""),
            mechanism=spec["sasl_mechanism"], ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def describe_connect_error(exc: BaseException, spec: Optional[Mapping[str, Any]], bootstrap: str) -> str:
    """One clear sentence for a failure to connect, saying what to check; never holds a secret."""
    spec = normalise(spec)
    name, text = type(exc).__name__, str(exc)
    protocol, mechanism, user = spec["protocol"], spec["sasl_mechanism"], spec["sasl_username"]
    lowered = f"{name} {text}".lower()
    if "authentication" in lowered or "sasl" in lowered:
        return (
            f"Kafka at {bootstrap} refused to authenticate user {user!r} with {protocol}/{mechanism}: {name}: {text}; "
            f"check the user name, the password ({PASSWORD_ENV} or kafka.security.sasl_password_file) "
            "and that the broker enables this mechanism"
        )
    if "ssl" in lowered or "certificate" in lowered:
        return f"TLS to Kafka at {bootstrap} failed ({protocol}): {name}: {text}; check kafka.security.ssl_cafile and the broker's certificate"
    return (
        f"cannot reach Kafka at {bootstrap} ({protocol}): {name}: {text}; start a local broker with "
        "'soundcheck kafka start' or set KAFKA_BOOTSTRAP_SERVERS"
    )



class ConnectError(RuntimeError):
    """A Kafka broker could not be reached or refused our credentials; the message says which and what to check."""


async def check_connection(bootstrap: str, spec: Optional[Mapping[str, Any]], secrets: Mapping[str, str],
                           timeout: float = 15.0) -> None:
    """Connect to the bootstrap servers one by one (TLS and SASL included) until one accepts;
    raises :class:`ConnectError` with the broker's own reason (aiokafka's clients only log
    an authentication failure and then report "Unable to bootstrap")."""
    import asyncio

    from aiokafka.conn import create_conn

    opts = client_options(spec, secrets)
    last: Optional[BaseException] = None
    for server in [s.strip() for s in bootstrap.split(",") if s.strip()]:
        host, _, port = server.rpartition(":")
        try:
            conn = await asyncio.wait_for(
                create_conn(host.strip("[]"), int(port), client_id="soundcheck-preflight",
                            request_timeout_ms=int(timeout * 1000), **opts),
                timeout,
            )
        except (Exception, asyncio.TimeoutError) as exc:  # noqa: BLE001 - every failure is explained
            last = exc
            continue
        conn.close()
        return
    raise ConnectError(describe_connect_error(last or OSError("no bootstrap server given"), spec, bootstrap))
