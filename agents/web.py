"""``/metrics`` (Prometheus exposition), ``/health`` and ``/incidents`` (the incident page, read-only
HTML: :mod:`soundcheck.alerting.page`) on the worker's Faust web server."""

from __future__ import annotations

from typing import Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST

from soundcheck.alerting.page import render_engine


def register(app: faust.App, ctx: Any) -> None:
    @app.page("/metrics")
    async def metrics(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.bytes(ctx.metrics.exposition(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/health")
    async def health(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        assigned = app.consumer.assignment() if app.consumer else set()
        ingest = ctx.ingest_service.consumer if getattr(ctx, "ingest_service", None) is not None else None
        inputs = len(ingest.assignment()) if ingest is not None else 0
        body = {
            "status": "ok",
            "app_id": ctx.settings.kafka.app_id,
            "assigned_partitions": len(assigned),  # Faust's: the internal topics and tables
            "input_partitions": inputs,  # the ingest consumer's: the input topics
            "rebalancing": bool(app.rebalancing),
            "ready": bool(assigned) and inputs > 0 and not app.rebalancing,
        }
        return web.json(body)

    @app.page("/incidents")
    async def incidents(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        """Open and recently resolved incidents of this worker's alerting partitions, with plots."""
        engine = getattr(ctx, "engine", None)
        if engine is None:
            return web.html("<!DOCTYPE html><title>Soundcheck incidents</title><p>The alert engine has not started yet.</p>",
                            status=503)
        return web.html(render_engine(engine, getattr(ctx, "history", None)))
