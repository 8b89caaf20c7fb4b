"""A downstream consumer of the `alerts` topic: forwards alerts to PagerDuty or an Alertmanager webhook receiver.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python examples/pager_bridge.py alerts            # dry run: print JSON
    PAGERDUTY_ROUTING_KEY=... python examples/pager_bridge.py alerts \
        --pagerduty-url https://events.pagerduty.com/v2/enqueue                                # P0/P1 + resolves
    python examples/pager_bridge.py alerts --alertmanager-url http://receiver:5001/hook        # every alert

To PagerDuty go P0/P1 alerts (trigger) and every resolved alert (resolve, by fingerprint).
Offsets are committed after an alert is handled, so a crash re-sends rather than drops
(both targets deduplicate: PagerDuty on dedup_key, Alertmanager receivers on fingerprint).
The routing key is read from the environment and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request

from aiokafka import AIOKafkaConsumer

from soundcheck.alerting.interop import to_alertmanager_webhook, to_pagerduty_event

PAGE_PRIORITIES = ("P0", "P1")


def post_json(url: str, body: dict, timeout: float = 10.0) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:  # 4xx/5xx: report the status only (never the request body)
        return e.code


def outgoing(alert: dict, args: argparse.Namespace, routing_key: str) -> tuple[str | None, dict | None]:
    """(url or None for dry run, body) for this alert, or (None, None) to skip it."""
    if args.alertmanager_url:
        return (None if args.dry_run else args.alertmanager_url), to_alertmanager_webhook([alert], receiver=args.group_id)
    if alert["status"] != "resolved" and alert["priority"] not in PAGE_PRIORITIES:
        return None, None
    event = to_pagerduty_event(alert, routing_key=routing_key or "DRY-RUN")
    return (None if args.dry_run else args.pagerduty_url), event


async def run(args: argparse.Namespace) -> None:
    routing_key = os.environ.get("PAGERDUTY_ROUTING_KEY", "")
    if args.pagerduty_url and not args.dry_run and not routing_key:
        sys.exit("--pagerduty-url needs PAGERDUTY_ROUTING_KEY in the environment")
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        group_id=args.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        async for msg in consumer:
            try:
                alert = json.loads(msg.value)
                url, body = outgoing(alert, args, routing_key)
            except (ValueError, KeyError, TypeError) as e:
                print(f"skip offset {msg.partition}/{msg.offset}: {e}", file=sys.stderr)
                await consumer.commit()
                continue
            if body is not None:
                if url is None:  # dry run: show what would be sent, key redacted
                    shown = dict(body, routing_key="<redacted>") if "routing_key" in body else body
                    print(json.dumps(shown, ensure_ascii=False), flush=True)
                else:
                    status = await asyncio.to_thread(post_json, url, body)
                    print(f"{alert['fingerprint']} {alert['status']} -> HTTP {status}", flush=True)
                    if status >= 500 or status == 429:
                        raise RuntimeError(f"target answered {status}; stopping without committing")
            await consumer.commit()
    finally:
        await consumer.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("topic", nargs="?", default="alerts")
    p.add_argument("--group-id", default="pager-bridge")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--pagerduty-url", help="e.g. https://events.pagerduty.com/v2/enqueue")
    target.add_argument("--alertmanager-url", help="an Alertmanager webhook receiver's URL")
    p.add_argument("--dry-run", action="store_true", help="print the JSON instead of POSTing (the default without a URL)")
    args = p.parse_args(argv)
    args.dry_run = args.dry_run or not (args.pagerduty_url or args.alertmanager_url)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
