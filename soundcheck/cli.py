"""The ``soundcheck`` command: worker, kafka, simulate, demo, bench, eval, alerts, silence, why, backtest."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import orjson

from soundcheck.kafka import local as kafka_local
from soundcheck.settings import SettingsError, load_settings


def _settings(args: argparse.Namespace):
    return load_settings(getattr(args, "env", None))


def cmd_worker(args: argparse.Namespace) -> int:
    import gc

    import faust

    from streams.app import create_app

    from soundcheck.kafka.admin import ensure_topics
    from soundcheck.kafka.security import ConnectError, check_connection, describe_connect_error
    from soundcheck.settings import DEVELOPMENT_PSEUDONYM_KEY

    settings = _settings(args)
    if settings.pseudonym_key == DEVELOPMENT_PSEUDONYM_KEY:
        print("soundcheck worker: SOUNDCHECK_PSEUDONYM_KEY is not set; user ids are hashed with a development key",
              file=sys.stderr)
    try:
        asyncio.run(check_connection(settings.kafka.bootstrap_servers, settings.kafka.security, settings.kafka_secrets))
        created = ensure_topics(settings)
    except Exception as exc:
        why = str(exc) if isinstance(exc, ConnectError) else describe_connect_error(
            exc, settings.kafka.security, settings.kafka.bootstrap_servers)
        print(f"soundcheck worker: {why}", file=sys.stderr)
        return 2
    if created:
        print(f"soundcheck worker: created topics {', '.join(created)}", file=sys.stderr)
    use_uvloop()
    app, _ = create_app(settings)
    level = {"warn": "warn", "warning": "warn", "info": "info", "debug": "debug", "error": "error"}.get(settings.worker.log_level, "info")
    worker = faust.Worker(app, loglevel=level, quiet=True)
    # what is built so far (modules, the app, its agents) lives as long as the process: out of the
    # garbage collector's full collections, which otherwise walk it every few seconds
    gc.freeze()
    worker.execute_from_commandline()
    return 0


def use_uvloop(environ: Optional[dict] = None) -> bool:
    """Run the worker on uvloop (1.2-1.5x less per-message overhead in Faust and aiokafka) unless
    ``SOUNDCHECK_UVLOOP=0``; returns whether it is in use."""
    import os

    if (os.environ if environ is None else environ).get("SOUNDCHECK_UVLOOP", "1").strip() in ("0", "false", "no"):
        return False
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a dependency; an install without it still runs
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def cmd_simulate(args: argparse.Namespace) -> int:
    import time

    from soundcheck.kafka.admin import ensure_topics
    from soundcheck.evaluation.produce import produce, stderr_progress
    from soundcheck.evaluation.simulator import Simulator

    settings = _settings(args)
    start_ms = int(time.time() * 1000) if args.realtime else (int(time.time()) - args.duration - 60) * 1000
    sim = Simulator(seed=args.seed, rate=args.rate, duration_s=args.duration, start_ms=start_ms, magnitude=args.magnitude)
    ensure_topics(settings)
    truth = asyncio.run(produce(sim, settings, batch=args.batch, realtime=args.realtime, progress=None if args.quiet else stderr_progress()))
    if args.truth:
        Path(args.truth).write_bytes(orjson.dumps(truth, option=orjson.OPT_INDENT_2))
        print(f"simulate: ground truth written to {args.truth}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from soundcheck.evaluation.demo import run_demo

    return run_demo(_settings(args), rate=args.rate, duration_s=args.duration, seed=args.seed, batch=args.batch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soundcheck", description="Real-time alerting for music-streaming telemetry on Kafka.")
    p.add_argument("--env", choices=("development", "staging", "production"), help="config/<env>.yaml (default: $SOUNDCHECK_ENV or development)")
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="run one worker of the consumer group (KAFKA_BOOTSTRAP_SERVERS, default: the local broker)")
    w.set_defaults(func=cmd_worker)

    s = sub.add_parser("simulate", help="produce realistic traffic with injected incidents to the input topics")
    s.add_argument("--rate", type=float, default=200.0, help="events per second of event time (default 200)")
    s.add_argument("--duration", type=int, default=900, help="seconds of event time (default 900)")
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--magnitude", type=float, default=1.0, help="scale of the injected incidents (default 1)")
    s.add_argument("--batch", type=int, default=100, help="records per Kafka message; 1 = one JSON object per message")
    s.add_argument("--realtime", type=float, default=0.0, help="simulated seconds per wall second (default 0: as fast as possible)")
    s.add_argument("--truth", help="write the ground truth (what was injected, where, when) to this JSON file")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_simulate)

    d = sub.add_parser("demo", help="local broker + worker + incident scenario; alerts live, then a summary")
    d.add_argument("--rate", type=float, default=200.0)
    d.add_argument("--duration", type=int, default=900)
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--batch", type=int, default=100)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="throughput of one worker vs a bare aiokafka consumer and a decode-only Faust app; alert latency")
    b.add_argument("--events", type=int, default=100_000, help="records of the throughput data set (default 100000)")
    b.add_argument("--runs", type=int, default=3, help="runs per mode; medians are reported (default 3)")
    b.add_argument("--partitions", type=int, default=6, help="partitions of every topic (default 6)")
    b.add_argument("--json", action="store_true", help="print the figures as one JSON object instead of the table")
    b.add_argument("--skip-latency", action="store_true", help="measure throughput only (the latency run takes about 6 minutes)")
    b.set_defaults(func=lambda a: __import__("benchmarks.throughput", fromlist=["main"]).main(a))

    e = sub.add_parser("eval", help="measure detection offline: NAB benchmark files, or the simulator's scenarios")
    esub = e.add_subparsers(dest="eval_command", required=True)
    en = esub.add_parser("nab", help="score NAB-format CSV files with the system-performance detector")
    en.add_argument("--data", required=True, help="a folder of NAB CSV files (timestamp,value), any depth")
    en.add_argument("--out", required=True, help="results folder: <category>/soundcheck_<file>.csv")
    en.add_argument("--windows", help="NAB labels JSON (combined_windows.json): also print the NAB scores")
    en.add_argument("--profiles", help="NAB scoring profiles JSON (default: the standard NAB weights)")
    en.add_argument("--nested", metavar="SETTING=V1,V2,...",
                    help="also choose this series-detector setting on three categories and score the fourth "
                         "(nested leave-one-category-out), e.g. z_min=2,2.25,2.5,2.75,3; needs --windows")
    en.set_defaults(func=lambda a: __import__("soundcheck.evaluation.nab", fromlist=["cli_main"]).cli_main(a))
    es = esub.add_parser("scenarios", help="run the simulator's scenarios through detection and alerting, no broker")
    es.add_argument("--seeds", default="1,2,3", help="simulator seeds: 1,2,3 or 100-119 (default 1,2,3); tune on 1-10, report on 100-119")
    es.add_argument("--world", choices=("default", "random"), default="default",
                    help="default: the simulator's fixed world; random: markets, rates, noise, keying and magnitudes drawn per seed")
    es.add_argument("--quiet-days", action="store_true", help="also run each seed's world for --quiet-duration with no incident")
    es.add_argument("--quiet-duration", type=int, default=3600, help="seconds of event time per quiet day (default 3600)")
    es.add_argument("--rate", type=float, default=150.0)
    es.add_argument("--duration", type=int, default=900)
    es.add_argument("--magnitude", type=float, default=1.0)
    es.add_argument("--broker", metavar="SEEDS",
                    help="also run these seeds (e.g. 100-102) through a real worker and broker (KAFKA_BOOTSTRAP_SERVERS, or the "
                         "local one, started for the run) and compare its notifications with the offline run's")
    es.add_argument("--partitions", type=int, default=6, help="partitions of every topic in the --broker runs (default 6)")
    es.add_argument("--json", help="also write the full report to this JSON file")
    es.set_defaults(func=lambda a: __import__("soundcheck.evaluation.scenarios", fromlist=["cli_main"]).cli_main(a))

    from soundcheck import oncall
    from soundcheck.evaluation import backtest

    oncall.add_cli(sub, _settings)
    backtest.add_cli(sub, _settings)
    kafka_local.add_cli(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"soundcheck: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
