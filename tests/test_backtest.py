"""``soundcheck backtest``: recorded input replayed through the whole pipeline with two configurations."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from soundcheck.evaluation import backtest as bt
from soundcheck.evaluation.simulator import Simulator
from soundcheck.pipeline import run_simulation

START = 1_700_000_000_000


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    sim = Simulator(seed=21, rate=80, duration_s=600, start_ms=START)
    messages = bt.record_simulation(sim, per_message=50, partitions=3)
    path = tmp_path_factory.mktemp("backtest") / "recording.jsonl"
    assert bt.write_jsonl(messages, path) == len(messages)
    return path, messages


def test_a_replay_gives_what_the_pipeline_gives_and_the_same_configuration_changes_nothing(settings, recording):
    path, messages = recording
    a = bt.replay(settings, bt.read_jsonl(path), "A")
    live = run_simulation(settings, Simulator(seed=21, rate=80, duration_s=600, start_ms=START), partitions=3)
    assert sorted((x["fingerprint"], x["status"]) for x in a.alerts) == sorted((x["fingerprint"], x["status"]) for x in live.alerts)
    assert a.alerts and a.events_in == sum(live.events_in.values())
    report = bt.compare(a, bt.replay(settings, messages, "B"))
    assert report["changed"] == 0 and report["only"] == {"A": 0, "B": 0}
    assert "the two configurations raise the same notifications" in bt.format_report(report, START)


def test_a_changed_configuration_shows_what_it_changes(settings, recording):
    _, messages = recording
    a = bt.replay(settings, messages, "A")
    b = bt.replay(bt.configuration(settings, None, ["alerting.inhibit.enabled=false", "windows.dedup_repeat_s=60"]), messages, "B")
    report = bt.compare(a, b)
    assert report["runs"]["B"]["notifications"] > report["runs"]["A"]["notifications"]
    assert report["only"]["B"] > 0 and report["only"]["A"] == 0  # inhibited children now page on their own
    text = bt.format_report(report, START)
    only_b = [r for r in report["fingerprints"] if r["side"] == "only B"]
    assert all(f"+ {r['fingerprint'][:10]}" in text for r in only_b)
    assert "firing P0" in text and "pages" in text


@pytest.mark.parametrize(
    "lines, message",
    [
        (b'{"stream": "audio", "value": {}}\nnot json\n', ":2: not a JSON line"),
        (b'{"stream": "video", "value": {}}\n', ':1: needs "stream"'),
        (b'{"stream": "audio"}\n', ':1: needs "value"'),
        (b'{"stream": "audio", "value_b64": "%%%"}\n', "not base64"),
        (b'{"stream": "audio", "partition": -1, "value": {}}\n', "is negative"),
        (b"", "nothing to replay"),
    ],
)
def test_a_bad_recording_is_refused_with_its_line(settings, tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(lines)
    with pytest.raises(bt.BacktestError, match=message):
        bt.replay(settings, bt.read_jsonl(path))


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soundcheck", "backtest", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_the_command_refuses_bad_arguments_clearly(tmp_path):
    cases = [
        ([], "give the input"),
        (["--file", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--file", "x.jsonl", "--set-b", "dedup_repeat_s=60"], "expected section.key=value"),
        (["--file", "x.jsonl", "--set-b", "windows.nonsense=1"], "unknown keys in windows"),
        (["--topics"], "--since"),
        (["--topics", "--since", "10m", "--until", "20m"], "--until is not after --since"),
    ]
    for args, message in cases:
        done = _cli(*args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


@pytest.mark.integration
def test_a_backtest_of_the_topics_gives_what_the_worker_sent(kafka_bootstrap, unique_name, tmp_path, settings):
    """Event time decides everything: replaying the input topics offline gives the firing
    notifications the real worker sent for them (fingerprint and priority), and --json compares two
    configurations."""
    from soundcheck.evaluation.harness import read_topic, worker_env
    from soundcheck.evaluation.produce import produce
    from tests.workers import isolated, start_worker

    s = isolated(settings, kafka_bootstrap, unique_name)
    worker = start_worker(s, tmp_path)
    try:
        worker.wait_ready()
        sim = Simulator(seed=21, rate=80, duration_s=600, start_ms=(int(time.time()) - 700) * 1000)
        truth = asyncio.run(produce(sim, s, batch=50))
        valid = sum(truth["produced_valid"].values())
        worker.wait_for(lambda: worker.metric_sum("soundcheck_events_in_total") >= valid, 300, "every record read")
        worker.wait_for(lambda: worker.metric_sum("soundcheck_anomalies_total") > 0, 180, "anomalies")
        worker.wait_settled(timeout=180, what="the last windows alerted")
        n = worker.metric_sum("soundcheck_alerts_total")
        sent = [orjson.loads(r.value) for r in asyncio.run(read_topic(s.kafka.bootstrap_servers, s.topics.alerts,
                                                                       until=lambda r: len(r) >= n, timeout=60))]
    finally:
        worker.stop()
    env = worker_env(s.kafka.bootstrap_servers, s.kafka.app_id, s.topics.__dict__, tmp_path / "cli")
    saved = tmp_path / "saved.jsonl"
    done = _cli("--topics", "--from-beginning", "--save", str(saved), "--set-b", "windows.dedup_repeat_s=60", "--json", env=env)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["runs"]["A"]["events_in"] == valid and report["runs"]["A"]["rejected"] == truth["produced_malformed"]
    messages = bt.read_jsonl(saved)
    replayed = bt.replay(s, messages, "A")
    firing = lambda alerts: sorted((a["fingerprint"], a["priority"]) for a in alerts if a["status"] == "firing")  # noqa: E731
    assert firing(replayed.alerts) == firing(sent) and firing(sent)
    # the replay's end lets event time run on until everything resolves; the worker has seen no later traffic yet
    resolved = lambda alerts: {a["fingerprint"] for a in alerts if a["status"] == "resolved"}  # noqa: E731
    assert resolved(sent) <= resolved(replayed.alerts)
    assert report["runs"]["B"]["notifications"] >= report["runs"]["A"]["notifications"] == len(replayed.alerts)
