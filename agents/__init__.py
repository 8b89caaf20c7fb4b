"""Faust agents: thin wiring from topics to the domain code in :mod:`soundcheck`.

* :mod:`agents.ingest`: one agent per input topic: decode, dead-letter, detect, emit anomalies.
* :mod:`agents.alerting`: anomalies -> classification, correlation, dedup (Faust tables) -> alerts.
* :mod:`agents.web`: ``/metrics`` and ``/health``.
"""
