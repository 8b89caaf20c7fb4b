"""Alerting: classification, correlation and dedup steps, the alert lifecycle, and mappings to
paging tools.

* :mod:`.classify`: business impact -> severity and priority;
* :mod:`.correlate`: correlation into incidents with a root cause, dedup, the alert record;
* :mod:`.engine`: the Alertmanager-style lifecycle (:class:`~.engine.AlertEngine`);
* :mod:`.interop`: the Alertmanager webhook and PagerDuty Events v2 mappings.
"""
