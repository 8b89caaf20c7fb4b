"""The worker's own observability assets against the metrics it really exports (no broker).

* every metric the Grafana dashboard (deploy/grafana/dashboards/soundcheck.json) and the Prometheus
  alert rules (deploy/prometheus/rules.yml) query is one :class:`soundcheck.metrics.WorkerMetrics`
  exports (with the suffixes prometheus-client exposes: ``_total``, ``_bucket``, ``_sum``, ...), or
  ``up`` of the worker's scrape job;
* the rules file, the dashboard, the provisioning files and docker-compose.yml are consistent
  (structure, mounted paths, job name, datasource uid); ``promtool check rules`` checks the rules and
  ``promtool test rules`` runs deploy/prometheus/rules.test.yml (required in CI, which fetches
  promtool; skipped only on a developer's machine without it);
* ``soundcheck_consumer_lag``: the lag computation, the gauge helpers, and the ingest service's
  reporting and revoking against a fake aiokafka consumer.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from soundcheck.metrics import WorkerMetrics, consumer_lags

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "soundcheck.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
GRAFANA_DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "soundcheck.yml"
COMPOSE = ROOT / "docker-compose.yml"

# -- exported metric names ---------------------------------------------------------------------

SUFFIXES = {  # the sample names of a metric family in the text format, by the family's # TYPE
    "counter": ("",),  # the TYPE line of a counter already carries _total
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name ``registry`` can expose: from the ``# TYPE`` lines (labelled metrics show no
    samples until a label set is used) and from the sample lines present."""
    names: set[str] = set()
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.update(name + s for s in SUFFIXES[kind])
            if kind == "counter" and name.endswith("_total"):
                names.add(name[: -len("_total")] + "_created")
            elif kind in ("histogram", "summary"):
                names.add(name + "_created")
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_names(WorkerMetrics(CollectorRegistry()).registry)


def test_the_exported_names_are_the_sample_names_prometheus_client_really_writes():
    """The suffix rules of exported_names against samples that exist (one label set each)."""
    m = WorkerMetrics(CollectorRegistry())
    m.events_in.labels(topic="t").inc()
    m.processing_latency.labels(stream="s").observe(0.1)
    m.consumer_lag.labels(topic="t", partition="0").set(3)
    samples = {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
               for line in generate_latest(m.registry).decode().splitlines() if line and not line.startswith("#")}
    assert {"soundcheck_events_in_total", "soundcheck_processing_latency_seconds_bucket", "soundcheck_processing_latency_seconds_sum",
            "soundcheck_processing_latency_seconds_count", "soundcheck_consumer_lag"} <= samples
    assert samples <= exported_names(WorkerMetrics(CollectorRegistry()).registry)


# -- metric names in PromQL --------------------------------------------------------------------

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time", "ceil",
    "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month", "day_of_week",
    "day_of_year", "days_in_month", "deg", "delta", "deriv", "double_exponential_smoothing", "exp", "floor",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
    "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "info", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time", "max_over_time", "min_over_time",
    "minute", "month", "pi", "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt",
    "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year",
}
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile",
    "limitk", "limit_ratio",
}
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "atan2",
    "start", "end", "inf", "nan",
}
LABEL_LISTS = r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)"
IDENT = r"(?<![\w.:$@])[a-zA-Z_:][a-zA-Z0-9_:]*"


def _strip_strings_and_comments(expr: str) -> str:
    expr = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    return re.sub(r"#[^\n]*", " ", expr)


def balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for c in _strip_strings_and_comments(expr):
        if c in "([{":
            stack.append(c)
        elif c in pairs:
            if not stack or stack.pop() != pairs[c]:
                return False
    return not stack


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a Grafana ``label_values(<expr>, <label>)``
    query: those of its selector). Raises on an unknown function."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*", expr, re.S)
    if m:
        expr = m.group(1)
    s = _strip_strings_and_comments(expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)  # range selectors and subqueries ($__rate_interval included)
    s = re.sub(LABEL_LISTS, r" \1 ", s)  # by (...), on (...), group_left (...): label names
    names: set[str] = set()
    for tok in re.finditer(IDENT, s):
        word = tok.group(0)
        called = s[tok.end():].lstrip().startswith("(")
        if word.lower() in KEYWORDS or word in AGGREGATIONS or word in FUNCTIONS:
            continue
        assert not called, f"unknown PromQL function {word!r} in {expr!r}"
        names.add(word)
    return names


@pytest.mark.parametrize("expr, names", [
    ('sum by (le, stream) (rate(x_seconds_bucket{a="b", c=~"$instance"}[$__rate_interval] offset 1h))', {"x_seconds_bucket"}),
    ("histogram_quantile(0.95, sum(rate(h_bucket[5m])) by (le))", {"h_bucket"}),
    ("a_total / on(instance) group_left(topic, reason) b_info * 1e3 > bool 0.5", {"a_total", "b_info"}),
    ("(sum(increase(c_total[15m])) or vector(0)) == 0 and on () sum(up{job=\"w\"}) > 0", {"c_total", "up"}),
    ("deriv(sum by (topic) (lag)[10m:1m]) > 0 unless ignoring (partition) d", {"lag", "d"}),
    ('label_replace(m{x="a(b"}, "dst", "$1", "src", "(.*)")  # a comment with words', {"m"}),
    ('label_values(up{job="soundcheck-worker"}, instance)', {"up"}),
    ("topk(3, sum without (instance) (e:recorded:rate5m))", {"e:recorded:rate5m"}),
])
def test_the_metric_name_extractor(expr, names):
    assert balanced(expr)
    assert metric_names(expr) == names


def test_the_metric_name_extractor_refuses_unknown_functions():
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        metric_names("rat(x_total[5m])")
    assert not balanced("sum(rate(x[5m])")
    assert not balanced("sum(rate(x[5m)))")


# -- the files ---------------------------------------------------------------------------------

def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _job() -> str:
    jobs = [c["job_name"] for c in _yaml(PROMETHEUS)["scrape_configs"]]
    assert len(jobs) == 1, jobs
    return jobs[0]


def _rules() -> list[dict]:
    return [r for g in _yaml(RULES)["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every panel target and every query variable of the dashboard."""
    d = json.loads(DASHBOARD.read_text())
    out = [(f"panel {p['title']!r} {t.get('refId')}", t["expr"]) for p in _panels(d) for t in p.get("targets", [])]
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", q))
    return out


def _panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels of a collapsed row
    return out


def _services() -> dict:
    return _yaml(COMPOSE)["services"]


def _mounts(service: str) -> dict[str, str]:
    """container path -> host path (relative to the repository) of a service's bind mounts."""
    out = {}
    for v in _services()[service].get("volumes", []):
        src, dst = v.split(":")[:2]
        out[dst] = src
    return out


def _used_names() -> list[tuple[str, str, set[str]]]:
    return ([(where, e, metric_names(e)) for where, e in _dashboard_exprs()]
            + [(f"rule {r['alert']}", r["expr"], metric_names(r["expr"])) for r in _rules()])


def test_every_metric_the_dashboard_and_the_rules_query_is_exported(exported):
    job = _job()
    for where, expr, names in _used_names():
        assert balanced(expr), f"{where}: unbalanced brackets in {expr!r}"
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            if name == "up":  # the scrape health of the worker's job, not of any other target
                assert all(f'job="{job}"' in sel for sel in re.findall(r"\bup\s*\{[^}]*\}", expr)) and re.search(
                    r"\bup\s*\{", expr), f"{where}: up without job=\"{job}\" in {expr!r}"
            else:
                assert name.startswith("soundcheck_"), f"{where}: {name!r} is neither up nor a soundcheck metric"
                assert name in exported, f"{where}: {name!r} is not exported by WorkerMetrics ({expr!r})"


def test_the_dashboard_and_the_rules_cover_what_they_are_for():
    dashboard = set().union(*(metric_names(e) for _, e in _dashboard_exprs()))
    assert {"soundcheck_events_in_total", "soundcheck_dead_letters_total", "soundcheck_anomalies_total",
            "soundcheck_alerts_total", "soundcheck_processing_latency_seconds_bucket", "soundcheck_consumer_lag",
            "soundcheck_tracked_entities"} <= dashboard
    by_alert = {r["alert"]: r["expr"] for r in _rules()}
    used = {a: metric_names(e) for a, e in by_alert.items()}
    assert any(n == {"up"} and re.search(r"==\s*0", by_alert[a]) for a, n in used.items()), "a worker-down rule"
    assert any("soundcheck_consumer_lag" in n and re.search(r"\b(deriv|increase|delta)\s*\(\s*soundcheck_consumer_lag\b", by_alert[a])
               for a, n in used.items()), "a lag-growing rule"
    assert any("soundcheck_consumer_lag" in n and n & {"soundcheck_events_in_total", "soundcheck_messages_in_total"}
               for n in used.values()), "a no-progress rule (no input read while behind)"
    assert any(n == {"soundcheck_events_in_total", "up"} or n == {"soundcheck_events_in_total"}
               for n in used.values()), "a no-events rule"
    assert any("soundcheck_dead_letters_total" in n for n in used.values()), "a dead-letter rate rule"


def test_the_rules_file_is_well_formed():
    doc = _yaml(RULES)
    assert set(doc) == {"groups"} and doc["groups"]
    alerts = []
    for g in doc["groups"]:
        assert isinstance(g["name"], str) and g["name"] and g["rules"], g
        assert set(g) <= {"name", "rules", "interval", "limit", "labels", "query_offset"}, g.keys()
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, r
            assert {"alert", "expr", "for", "labels", "annotations"} <= set(r), r
            assert "severity" in r["labels"] and {"summary", "description"} <= set(r["annotations"]), r
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", r["alert"]), r["alert"]
            assert isinstance(r["expr"], str) and r["expr"].strip() and balanced(r["expr"]), r["alert"]
            assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", str(r["for"])), (r["alert"], r["for"])
            assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
            assert r["annotations"]["summary"].strip() and r["annotations"]["description"].strip(), r["alert"]
            for text in r["annotations"].values():  # Go templates: balanced {{ }}
                assert text.count("{{") == text.count("}}"), (r["alert"], text)
            alerts.append(r["alert"])
    assert len(alerts) == len(set(alerts)), alerts


def _promtool() -> str:
    """promtool from $PROMTOOL (set by .ci/run, which takes it from Debian's prometheus package) or
    PATH. CI fails without it; a developer's run without it skips only these two checks."""
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run should have taken it from Debian's prometheus package")
        pytest.skip("promtool is not installed (.ci/run fetches it; or set PROMTOOL)")
    return promtool


def test_promtool_accepts_the_rules():
    res = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 6 rules found" in res.stdout, res.stdout


def test_the_rules_fire_when_they_should_and_not_before(tmp_path):
    """deploy/prometheus/rules.test.yml: made-up series through the rules, with the alerts expected
    at each time (a worker down for a minute, stuck while behind, 10% dead letters, a growing lag),
    and cases where they must stay quiet (not yet for long enough, idle but not behind, 0.5%)."""
    tests = RULES.with_name("rules.test.yml")
    res = subprocess.run(
        [_promtool(), "test", "rules", tests.name], cwd=tests.parent, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # and the test file is able to fail: a worker that never goes down must not satisfy it
    broken = tmp_path / "rules.test.yml"
    broken.write_text(tests.read_text().replace("'1x4 0x10'", "'1x14'"))
    shutil.copy(RULES, tmp_path / RULES.name)
    res = subprocess.run(
        [_promtool(), "test", "rules", broken.name], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0 and "SoundcheckWorkerDown" in res.stdout + res.stderr, res.stdout + res.stderr


def test_the_dashboard_is_valid():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    panels = _panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    uids = {"${datasource}", "$datasource", _datasource()["uid"]}
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["title"] and set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no target"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            ds = t.get("datasource", p.get("datasource"))
            assert ds["type"] == "prometheus" and ds["uid"] in uids, (p["title"], ds)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == _datasource()["uid"]
    used = re.findall(r"\$\{?(\w+)", json.dumps(d["panels"]))
    assert set(used) - {"__rate_interval", "__interval", "__range"} <= set(variables), used


def _datasource() -> dict:
    (ds,) = _yaml(GRAFANA_DATASOURCES)["datasources"]
    return ds


def test_docker_compose_mounts_files_that_exist_and_wires_the_stack():
    services = _services()
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name} mounts {src}, which does not exist"
    # Prometheus loads the rules file that is mounted, and scrapes the worker service
    prom = _mounts("prometheus")
    assert prom["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"
    rule_files = _yaml(PROMETHEUS)["rule_files"]
    assert rule_files and all(prom.get(f) == "./deploy/prometheus/rules.yml" for f in rule_files), (rule_files, prom)
    (target,) = _yaml(PROMETHEUS)["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target.split(":")[0] in services and f"{target.split(':')[1]}:" in " ".join(services["worker"]["ports"])
    # Grafana: provisioning in its directories, the dashboards directory where the provider reads
    graf = _mounts("grafana")
    assert services["grafana"]["image"].startswith("grafana/grafana-oss")
    assert graf["/etc/grafana/provisioning/datasources/prometheus.yml"] == "./deploy/grafana/provisioning/datasources/prometheus.yml"
    assert graf["/etc/grafana/provisioning/dashboards/soundcheck.yml"] == "./deploy/grafana/provisioning/dashboards/soundcheck.yml"
    (provider,) = _yaml(GRAFANA_DASHBOARDS)["providers"]
    assert provider["type"] == "file"
    dashboards_dir = graf[provider["options"]["path"]]
    assert (ROOT / dashboards_dir / DASHBOARD.name).samefile(DASHBOARD)
    ds = _datasource()
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", ds["url"]).groups()
    assert ds["type"] == "prometheus" and host in services and f"{port}:" in " ".join(services[host]["ports"])


# -- soundcheck_consumer_lag -------------------------------------------------------------------

def test_consumer_lags_is_highwater_minus_position_where_both_are_known():
    assert consumer_lags({"a": 100, "b": None, "c": 7, "d": 5, "e": 0}, {"a": 90, "b": 3, "c": 9, "e": 0}) == {"a": 10, "c": 0, "e": 0}
    assert consumer_lags({}, {"a": 1}) == {}


def _lag_samples(m: WorkerMetrics) -> dict[tuple[str, str], float]:
    return {(s.labels["topic"], s.labels["partition"]): s.value
            for f in m.registry.collect() if f.name == "soundcheck_consumer_lag" for s in f.samples}


def test_the_lag_gauge_is_set_and_removed_by_partition():
    from aiokafka import TopicPartition

    m = WorkerMetrics(CollectorRegistry())
    m.set_consumer_lag({TopicPartition("in", 0): 12, TopicPartition("in", 1): 0, ("other", 3): 5})
    assert _lag_samples(m) == {("in", "0"): 12, ("in", "1"): 0, ("other", "3"): 5}
    assert 'soundcheck_consumer_lag{partition="0",topic="in"} 12.0' in m.exposition().decode()
    m.remove_consumer_lag("in", 0)
    m.remove_consumer_lag("in", 7)  # never reported: nothing to do
    assert _lag_samples(m) == {("in", "1"): 0, ("other", "3"): 5}


class FakeConsumer:
    """The part of aiokafka's consumer that the lag uses (and commit, for the revoke)."""

    def __init__(self, highwaters: dict, positions: dict) -> None:
        self.highwaters, self.positions = highwaters, positions
        self.position_calls: list = []
        self.committed: dict = {}

    def assignment(self) -> set:
        return set(self.highwaters)

    def highwater(self, tp):
        return self.highwaters[tp]

    async def position(self, tp) -> int:
        self.position_calls.append(tp)
        if self.positions.get(tp) is None:  # being reset: aiokafka waits until it is valid
            await asyncio.sleep(3600)
        return self.positions[tp]

    async def commit(self, offsets: dict) -> None:
        self.committed.update(offsets)


async def test_input_lags_reads_next_offset_first_and_never_waits_for_a_position():
    from aiokafka import TopicPartition

    from agents.ingest import input_lags

    read, unfetched, quiet, resetting = (TopicPartition("in", p) for p in range(4))
    consumer = FakeConsumer({read: 100, unfetched: None, quiet: 50, resetting: 40}, {read: 1, quiet: 45})
    lags = await asyncio.wait_for(input_lags(consumer, {read: 90, unfetched: 3}), 2)
    assert lags == {read: 10, quiet: 5}
    assert set(consumer.position_calls) == {quiet, resetting}  # not for read (next_offset) nor unfetched (no highwater)


async def test_the_ingest_service_reports_the_lag_and_drops_a_revoked_partition(settings, tmp_path, monkeypatch):
    """agents.ingest.IngestService's own report_lag and on_revoked, on a fake consumer."""
    from aiokafka import TopicPartition

    import agents.ingest as ingest
    from streams.app import create_app

    monkeypatch.setenv("SOUNDCHECK_DATA_DIR", str(tmp_path))
    _, ctx = create_app(settings)
    services = []
    ingest.register(type("App", (), {"service": staticmethod(services.append)})(), ctx)
    (service_cls,) = services
    service = service_cls()
    topic, other = list(settings.topics.inputs().values())[:2]
    tp0, tp1, tp2 = TopicPartition(topic, 0), TopicPartition(topic, 1), TopicPartition(other, 0)
    service.consumer = FakeConsumer({tp0: 100, tp1: 20, tp2: None}, {tp1: 20})
    service.next_offset[tp0] = 60

    await service.report_lag()
    assert _lag_samples(ctx.metrics) == {(topic, "0"): 40, (topic, "1"): 0}

    service.consumer.highwaters[tp0] = 160
    await service.report_lag()  # within LAG_EVERY_S of the last report: nothing is done
    assert _lag_samples(ctx.metrics)[(topic, "0")] == 40
    service.last_lag -= ingest.LAG_EVERY_S
    await service.report_lag()
    assert _lag_samples(ctx.metrics)[(topic, "0")] == 100

    await service.on_revoked([tp0])
    assert _lag_samples(ctx.metrics) == {(topic, "1"): 0}
    assert tp0 in service.consumer.committed and tp0 not in service.next_offset  # the revoke itself did as before
    del service.consumer.highwaters[tp0]  # the new assignment
    service.last_lag -= ingest.LAG_EVERY_S
    await service.report_lag()
    assert _lag_samples(ctx.metrics) == {(topic, "1"): 0}
