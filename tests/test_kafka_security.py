"""Kafka security settings: SASL (PLAIN, SCRAM) and TLS options reach every client; secrets never show.

The integration tests run their own local broker with a SASL_PLAINTEXT listener (users are
created at format time: PLAIN from the JAAS config, SCRAM in the metadata log), whatever
``KAFKA_BOOTSTRAP_SERVERS`` says, because an existing cluster's users are not ours to make.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from soundcheck.evaluation.harness import WorkerProcess, worker_env
from soundcheck.evaluation.produce import produce
from soundcheck.evaluation.simulator import Simulator
from soundcheck.kafka.admin import ensure_topics_async, worker_topics
from soundcheck.kafka.local import LocalKafka
from soundcheck.kafka.security import PASSWORD_ENV, ConnectError, check_connection, client_options
from soundcheck.settings import SettingsError, load_settings

USER, PASSWORD = "soundcheck-svc", "s3cret-Pa55word"
SASL_ENV = {
    "SOUNDCHECK__KAFKA__SECURITY__PROTOCOL": "SASL_PLAINTEXT",
    "SOUNDCHECK__KAFKA__SECURITY__SASL_USERNAME": USER,
}


# --------------------------------------------------------------------------- settings


def test_sasl_settings_reach_the_client_options_and_the_password_never_shows():
    s = load_settings("development", environ={**SASL_ENV, "SOUNDCHECK__KAFKA__SECURITY__SASL_MECHANISM": "scram-sha-512",
                                               PASSWORD_ENV: PASSWORD})
    opts = s.kafka_client()
    assert opts == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                    "sasl_plain_username": USER, "sasl_plain_password": PASSWORD}
    for shown in (repr(s), str(s), repr(s.kafka), str(s.to_dict()), repr(s.replace(topics={"alerts": "x"}))):
        assert PASSWORD not in shown
    assert s.replace(topics={"alerts": "x"}).kafka_client() == opts  # a copy keeps the secret


def test_the_password_can_come_from_a_file(tmp_path):
    secret = tmp_path / "kafka-password"
    secret.write_text(PASSWORD + "\n")
    s = load_settings("development", environ={**SASL_ENV, "SOUNDCHECK__KAFKA__SECURITY__SASL_PASSWORD_FILE": str(secret)})
    assert s.kafka_client()["sasl_plain_password"] == PASSWORD


def test_plaintext_is_the_default():
    assert load_settings("development", environ={}).kafka_client() == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize(
    "env, message",
    [
        (SASL_ENV, PASSWORD_ENV),  # no password anywhere: say which variable to set
        ({"SOUNDCHECK__KAFKA__SECURITY__PROTOCOL": "SASL_SSL", PASSWORD_ENV: "x"}, "sasl_username"),
        ({**SASL_ENV, "SOUNDCHECK__KAFKA__SECURITY__SASL_PASSWORD_FILE": "/nonexistent/pw"}, "cannot be read"),
        ({"SOUNDCHECK__KAFKA__SECURITY__PROTOCOL": "TLS"}, "not one of"),
        ({**SASL_ENV, PASSWORD_ENV: "x", "SOUNDCHECK__KAFKA__SECURITY__SASL_MECHANISM": "GSSAPI"}, "sasl_mechanism"),
        ({"SOUNDCHECK__KAFKA__SECURITY__PASSWORD": "x"}, "unknown keys in kafka.security"),
        ({"SOUNDCHECK__KAFKA__SECURITY__PROTOCOL": "SSL", "SOUNDCHECK__KAFKA__SECURITY__SSL_CAFILE": "/nonexistent/ca.pem"},
         "is not a file"),
    ],
)
def test_incomplete_security_settings_are_a_clear_error(env, message):
    with pytest.raises(SettingsError, match=message):
        load_settings("development", environ=env)


def test_tls_settings_build_a_verifying_context():
    opts = client_options({"protocol": "SASL_SSL", "sasl_username": "u", "ssl_check_hostname": False}, {"sasl_password": "p"})
    assert opts["security_protocol"] == "SASL_SSL" and opts["ssl_context"].check_hostname is False
    import ssl

    assert opts["ssl_context"].verify_mode == ssl.CERT_REQUIRED


# --------------------------------------------------------------------------- a broker with SASL


@pytest.fixture(scope="module")
def sasl_broker():
    kafka = LocalKafka(sasl_users={USER: PASSWORD})
    try:
        kafka.start()
    except Exception as exc:  # never a skip: the test needs this broker
        kafka.stop()
        pytest.fail(f"the local broker with a SASL listener did not start: {exc}", pytrace=False)
    yield kafka
    kafka.stop()


@pytest.mark.integration
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_each_mechanism_connects_and_a_wrong_password_is_refused_clearly(sasl_broker, mechanism):
    spec = {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism, "sasl_username": USER}
    asyncio.run(check_connection(sasl_broker.sasl_bootstrap, spec, {"sasl_password": PASSWORD}))
    with pytest.raises(ConnectError) as err:
        asyncio.run(check_connection(sasl_broker.sasl_bootstrap, spec, {"sasl_password": "not-the-password"}))
    text = str(err.value)
    assert f"refused to authenticate user {USER!r} with SASL_PLAINTEXT/{mechanism}" in text
    assert PASSWORD_ENV in text and "not-the-password" not in text


@pytest.mark.integration
def test_the_worker_runs_over_sasl_scram(sasl_broker, settings, tmp_path):
    app = f"sasl-{uuid.uuid4().hex[:8]}"
    topics = {role: f"{name}-{app}" for role, name in settings.topics.__dict__.items()}
    env = {**SASL_ENV, "SOUNDCHECK__KAFKA__SECURITY__SASL_MECHANISM": "SCRAM-SHA-256", PASSWORD_ENV: PASSWORD}
    s = load_settings("development", environ=env).replace(
        kafka={"bootstrap_servers": sasl_broker.sasl_bootstrap, "app_id": app}, topics=topics)
    asyncio.run(ensure_topics_async(s.kafka.bootstrap_servers, worker_topics(s), s.kafka.partitions, 1, client=s.kafka_client()))
    worker = WorkerProcess(
        worker_env(sasl_broker.sasl_bootstrap, app, topics, tmp_path / "data",
                   {**env, "SOUNDCHECK__KAFKA__PARTITIONS": str(s.kafka.partitions)}),
        tmp_path / "worker.log",
    ).start()
    try:
        worker.wait_ready(timeout=90)
        sim = Simulator(seed=5, rate=50, duration_s=60, start_ms=(int(time.time()) - 120) * 1000)
        asyncio.run(produce(sim, s, batch=10))
        sent = sum(sim.produced.values())
        assert sent > 0
        worker.wait_for(lambda: worker.metric_sum("soundcheck_events_in_total") >= sent, 90, f"{sent} events counted over SASL")
        assert worker.metric_sum("soundcheck_events_in_total") == sent
    finally:
        worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert PASSWORD not in log


@pytest.mark.integration
def test_the_worker_stops_with_a_clear_message_on_a_wrong_password(sasl_broker, tmp_path):
    env = {**os.environ, **SASL_ENV, "SOUNDCHECK__KAFKA__SECURITY__SASL_MECHANISM": "SCRAM-SHA-256",
           PASSWORD_ENV: "wrong-pa55word", "KAFKA_BOOTSTRAP_SERVERS": sasl_broker.sasl_bootstrap,
           "SOUNDCHECK_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "soundcheck", "worker"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"refused to authenticate user {USER!r} with SASL_PLAINTEXT/SCRAM-SHA-256" in done.stderr
    assert "wrong-pa55word" not in done.stdout + done.stderr
