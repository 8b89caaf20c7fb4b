"""The incident page: the window history (bounded, out of the snapshots, no effect on detection),
the renderer (escaped, self-contained, one plot per signal with its band and firing marker), and
the page served by a real worker during a scenario, loaded in headless Chromium.

The Chromium test never skips: without Debian's ``chromium`` it fails and says how to install it
(``.ci/run`` does on a fresh machine).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from soundcheck.alerting.page import plot_svg, render_engine, render_incidents
from soundcheck.detectors import history as history_module
from soundcheck.detectors.history import Point, SeriesHistory, labels_of

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking"]
T0 = 1_760_000_000_000


# ---------------------------------------------------------------------------------------------
# the window history


def test_history_keeps_the_last_hour_per_series_and_a_bounded_number_of_series():
    h = SeriesHistory(span_s=3600, step_s=10, max_series=3)
    assert h.max_points == 361
    for i in range(1000):  # 1000 windows of 10 s: only the last hour stays
        h.recorder("system.baseline", ("search", "US"), T0 + i * 10_000)("latency_ms", float(i), 1.0, 0.0, 2.0)
    pts = h.points("system.baseline", {"service": "search", "region": "US"}, "latency_ms")
    assert len(pts) == 361 and pts[-1].observed == 999.0 and pts[0].observed == 639.0
    assert all(b.start - a.start == 10_000 for a, b in zip(pts, pts[1:]))
    assert h.nbytes() == 361 * 20  # 20 bytes a point
    # the same window again replaces its point; an older one is ignored; non-finite values are not kept
    last = T0 + 999 * 10_000
    h.record("system.baseline", labels_of("system.baseline", ("search", "US")), "latency_ms", last, 5.0, 1.0, 0.0, 2.0)
    h.record("system.baseline", labels_of("system.baseline", ("search", "US")), "latency_ms", T0, 7.0, 1.0, 0.0, 2.0)
    h.record("system.baseline", labels_of("system.baseline", ("search", "US")), "latency_ms", last + 10_000, float("nan"), 1.0, 0.0, 2.0)
    pts = h.points("system.baseline", {"service": "search", "region": "US"}, "latency_ms")
    assert len(pts) == 361 and pts[-1] == Point(last, 5.0, 1.0, 0.0, 2.0)
    # at most max_series series: the least recently fed goes first
    for metric in ("a", "b", "c"):
        h.recorder("behavior.rates", "DE", T0)(metric, 0.1, 0.1, 0.0, 0.2)
    assert len(h) == 3 and h.evicted == 1
    assert h.points("system.baseline", {"service": "search", "region": "US"}, "latency_ms") == []
    h.recorder("behavior.rates", "DE", T0 + 10_000)("a", 0.1, 0.1, 0.0, 0.2)  # "a" is now the most recent
    h.recorder("behavior.rates", "FR", T0)("a", 0.1, 0.1, 0.0, 0.2)
    assert h.points("behavior.rates", {"region": "DE"}, "b") == [] and len(h.points("behavior.rates", {"region": "DE"}, "a")) == 2


def test_history_series_are_found_by_the_labels_of_the_alerts():
    assert labels_of("audio.baseline", ("cdn_pop", "de-b2", "DE")) == (("cdn_pop", "de-b2"), ("region", "DE"))
    assert labels_of("audio.baseline", ("region", "DE", "")) == (("region", "DE"),)
    assert labels_of("system.baseline", ("search", "US")) == (("region", "US"), ("service", "search"))
    h = SeriesHistory()
    h.recorder("audio.baseline", ("cdn_pop", "de-b2", "DE"), T0)("buffering_ratio", 0.2, 0.02, 0.0, 0.05)
    h.recorder("behavior.rates", "DE", T0)("skip_rate", 0.5, 0.2, 0.1, 0.3)
    assert h.find("audio.baseline", {"region": "DE", "cdn_pop": "de-b2"}, "buffering_ratio")[0] == (("cdn_pop", "de-b2"), ("region", "DE"))
    assert h.find("audio.baseline", {"region": "DE"}, "buffering_ratio") is None  # the region's own series, not a PoP's
    # a behaviour rate's series is per region; its alerts also name the service the rate points at
    assert len(h.points("behavior.rates", {"region": "DE", "service": "client_experience"}, "skip_rate")) == 1


def test_history_is_not_snapshot_state():
    # the detector modules' dataclasses make up the snapshot schema: the history adds none
    assert not any(dataclasses.is_dataclass(v) for v in vars(history_module).values() if isinstance(v, type))


@pytest.fixture(scope="module")
def offline_run():
    """A short scenario through the offline pipeline twice: without and with a history attached."""
    from soundcheck.evaluation.simulator import Simulator
    from soundcheck.pipeline import OfflinePipeline
    from soundcheck.settings import load_settings

    settings = load_settings("development", environ={})
    runs = []
    for with_history in (False, True):
        sim = Simulator(seed=21, rate=60, duration_s=480, start_ms=T0)
        pipe = OfflinePipeline(settings)
        h = SeriesHistory(step_s=settings.windows.aggregate_s) if with_history else None
        for d in pipe.detect:
            for st in d.stages.values():
                for det in st.detectors:
                    det.history = h
        pipe.now_ms = T0 + 10**7
        for sec in range(sim.duration_s):
            for b in sim.tick(T0 + sec * 1000):
                pipe.produce(b.stream, b.key, b.records)
            pipe.poll()
        runs.append((sim, pipe, h))
    return runs


def test_feeding_the_history_changes_no_detection_result(offline_run):
    (_, plain, _), (_, fed, h) = offline_run
    assert plain.anomalies and len(h) > 100
    assert [a.to_json() for a in fed.anomalies] == [a.to_json() for a in plain.anomalies]
    volatile = ("alert_id", "emitted_at")
    strip = lambda alerts: [{k: v for k, v in a.items() if k not in volatile} for a in alerts]  # noqa: E731
    assert strip(fed.alerts) == strip(plain.alerts)


def test_the_offline_page_shows_the_cdn_incident_with_plots(offline_run):
    sim, pipe, h = offline_run[1]
    cdn = next(sc for sc in sim.scenarios if sc.name == "cdn_pop_degradation")
    page = render_engine(pipe.engine, h)
    root_rows = re.findall(r'<tr class="root-cause">(.*?)</tr>', page)
    assert any(cdn.details["cdn_pop"] in row and "<b>cdn</b>" in row for row in root_rows), root_rows
    assert page.count('<polyline class="value"') > 0 and page.count('class="band"') > 0
    assert page.count('class="marker fired"') > 0


# ---------------------------------------------------------------------------------------------
# the renderer


def _state(now: int):
    evil = '<script>alert("x")</script>'
    root_fp, child_fp, old_fp = "a" * 24, "b" * 24, "c" * 24
    bi = {"score": 0.7, "revenue_loss_per_hour": 52000.0, "affected_users": 1234,
          "components": {"revenue": 1.0, "user_experience": 0.3, "compliance": 0.0}, "drivers": ["revenue"]}

    def alert(fp, title, entity, detector, metric, prio="P1", sev="high"):
        return {"fingerprint": fp, "title": title, "entity": entity, "detector": detector, "priority": prio,
                "severity": sev, "business_impact": bi, "summary": f"{metric} rose & stayed up",
                "signals": [{"metric": metric, "observed": 0.3, "expected": 0.02, "score": 9.0, "limit": None, "since": now - 300_000},
                            {"metric": "packet_loss", "observed": 0.05, "expected": 0.01, "score": 6.0, "limit": 0.03, "since": now - 290_000}]}

    root_entity = {"region": "DE", "cdn_pop": f"de-{evil}"}
    dedup = {
        root_fp: {"status": "firing", "first_seen": now - 300_000, "last_seen": now, "occurrences": 31, "sent": True,
                  "last_alert": alert(root_fp, f"[P1] audio quality degradation: DE, {evil}", root_entity, "audio.baseline", "buffering_ratio")},
        child_fp: {"status": "resolved", "first_seen": now - 280_000, "last_seen": now - 100_000, "ends_at": now - 100_000,
                   "occurrences": 5, "sent": True,
                   "last_alert": alert(child_fp, "[P2] audio quality degradation: DE", {"region": "DE"}, "audio.baseline",
                                       "buffering_ratio", "P2", "medium")},
        old_fp: {"status": "resolved", "first_seen": now - 9_000_000, "last_seen": now - 8_000_000, "ends_at": now - 8_000_000,
                 "occurrences": 5, "sent": True,
                 "last_alert": alert(old_fp, "[P3] long gone", {"region": "FR"}, "system.baseline", "error_rate", "P3", "low")},
    }
    members = {
        root_fp: {"node": "cdn", "kind": "audio_quality_degradation", "entity": root_entity, "first_seen": now - 300_000,
                  "signals": ["buffering_ratio", "packet_loss"]},
        child_fp: {"node": "audio_streaming", "kind": "audio_quality_degradation", "entity": {"region": "DE"},
                   "first_seen": now - 280_000, "signals": ["buffering_ratio", "packet_loss"]},
    }
    rc = {"node": "cdn", "fingerprint": root_fp, "entity": root_entity, "confidence": 1.0,
          "evidence": [{"fingerprint": fp, "node": m["node"], "kind": m["kind"], "first_seen": m["first_seen"],
                        "signals": m["signals"]} for fp, m in members.items()]}
    scopes = {
        "DE": {"now": now, "open": {root_fp: now}, "held": {root_fp: {"by": "silence:maint-1", "since": now - 10_000}},
               "incidents": [{"incident_id": "inc-de1", "region": "DE", "scope": "DE", "started_at": now - 300_000,
                              "last_seen": now, "members": members, "dropped_members": 0, "root_cause": rc}]},
        "FR": {"now": now - 5_000, "incidents": [{"incident_id": "inc-fr-old", "region": "FR", "scope": "FR",
                                                   "started_at": now - 9_000_000, "last_seen": now - 8_000_000,
                                                   "members": {old_fp: {"node": "search", "kind": "service_degradation",
                                                                        "entity": {"region": "FR"}, "first_seen": now - 9_000_000,
                                                                        "signals": ["error_rate"]}},
                                                   "root_cause": None}]},
    }
    silences = [
        {"id": "maint-1", "matchers": [{"name": "cdn_pop", "value": "de-.*", "isRegex": True, "isEqual": True}],
         "starts_at": now - 60_000, "ends_at": now + 3_600_000, "author": "oncall", "comment": f"planned {evil}"},
        {"id": "old-silence", "matchers": {"region": "FR"}, "starts_at": now - 9_000_000, "ends_at": now - 8_000_000},
    ]
    return dedup, scopes, silences, root_fp, child_fp, evil


def test_the_page_lists_open_and_recent_incidents_with_a_plot_per_signal():
    now = T0 + 3_600_000
    dedup, scopes, silences, root_fp, child_fp, evil = _state(now)
    h = SeriesHistory()
    for i in range(360):
        t = now - 3_600_000 + i * 10_000
        v = 0.3 if t >= now - 310_000 else 0.02
        h.recorder("audio.baseline", ("cdn_pop", f"de-{evil}", "DE"), t)("buffering_ratio", v, 0.02, 0.01, 0.03)
    page = render_incidents(dedup, scopes, silences, h, now, generated_at=now / 1000)
    # the open incident, its root cause and evidence, both members (the resolved one too), its impact
    assert 'data-incident-id="inc-de1"' in page and "inc-fr-old" not in page  # resolved over an hour ago: gone
    assert '<tr class="root-cause">' in page and "confidence 1 " in page and "Root-cause evidence" in page
    assert f'data-fingerprint="{root_fp}"' in page and f'data-fingerprint="{child_fp}"' in page
    assert "52,000/h" in page and "1,234 users affected" in page
    assert "held: silence:maint-1" in page
    # the active silence with its matchers; not the expired one
    assert "maint-1" in page and "cdn_pop=~&#x27;de-.*&#x27;" in page and "old-silence" not in page
    # one plot per member signal; the series with history has its band, value line and firing marker
    assert page.count("<svg") == 4
    assert page.count('<polyline class="value"') == 1 and page.count('<polygon class="band"') == 1
    assert 'class="marker fired"' in page and 'class="marker resolved"' not in page  # the resolved member has no history
    assert page.count("no window history on this worker") == 3
    # escaped everywhere; nothing external, no script
    assert evil not in page and "&lt;script&gt;" in page
    assert "<script" not in page.lower()
    for needle in ("src=", "href=", "<link", "@import", "url("):
        assert needle not in page
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"] * 4  # the SVG namespace only


def test_the_page_without_incidents_says_so():
    page = render_incidents({}, {}, [], SeriesHistory(), T0, generated_at=T0 / 1000)
    assert "No open incident" in page and "None active." in page and "<svg" not in page


def test_a_plot_marks_where_the_signal_fired_and_resolved():
    pts = [(T0 + i * 10_000, 1.0 + (i >= 30) * 5, 1.0, 0.5, 1.5) for i in range(60)]
    svg = plot_svg(pts, start=T0, end=T0 + 600_000, fired_at=T0 + 300_000, resolved_at=T0 + 550_000, title="a <b>")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert 'class="marker fired"' in svg and 'class="marker resolved"' in svg and "a &lt;b&gt;" in svg
    assert len(re.search(r'<polyline class="value" points="([^"]+)"', svg).group(1).split()) == 60


# ---------------------------------------------------------------------------------------------
# the page served by a real worker, in headless Chromium


def _browser(playwright):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: the incident page test needs Debian's chromium. "
                    "Run .ci/run (it installs it on a fresh machine) or `apt-get install chromium`.")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


@pytest.mark.integration
def test_the_worker_serves_the_incident_page_in_headless_chromium(kafka_bootstrap, unique_name, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - the test extra installs it
        pytest.fail("the playwright package is missing: pip install -e '.[test]' (make install)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: the incident page test needs Debian's chromium. "
                    "Run .ci/run (it installs it on a fresh machine) or `apt-get install chromium`.")
    from soundcheck.evaluation.produce import produce
    from soundcheck.evaluation.simulator import Simulator
    from soundcheck.settings import load_settings

    from tests.workers import isolated, start_worker

    s = isolated(load_settings("development", environ={}), kafka_bootstrap, unique_name)
    worker = start_worker(s, tmp_path)
    try:
        worker.wait_ready()
        sim = Simulator(seed=21, rate=100, duration_s=600, start_ms=(int(time.time()) - 700) * 1000)
        asyncio.run(produce(sim, s, batch=50))
        cdn = next(sc for sc in sim.scenarios if sc.name == "cdn_pop_degradation")
        pop = cdn.details["cdn_pop"]
        payment = next(sc for sc in sim.scenarios if sc.name == "billing_error_spike")

        def page_has_both() -> bool:
            try:
                page = _get(worker.web_port, "/incidents")
            except OSError:
                return False
            rows = re.findall(r'<tr class="root-cause">(.*?)</tr>', page)
            return any(pop in r for r in rows) and any("payment_gateway" in r and payment.region in r for r in rows)

        worker.wait_for(page_has_both, timeout=240, what="the CDN PoP and payment incidents on /incidents")
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/incidents", timeout=5) as r:
            assert r.headers.get_content_type() == "text/html"

        shot = tmp_path / "incident-page.png"
        with sync_playwright() as p:
            browser = _browser(p)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1600})
                requests: list[str] = []
                page.on("request", lambda req: requests.append(req.url))
                response = page.goto(f"http://127.0.0.1:{worker.web_port}/incidents", wait_until="load")
                assert response is not None and response.ok
                assert page.title() == "Soundcheck incidents"
                # the injected CDN PoP degradation, with the PoP as its root cause
                cdn_incident = page.locator("section.incident", has=page.locator("tr.root-cause", has_text=pop))
                assert cdn_incident.count() >= 1
                root_text = cdn_incident.first.locator("tr.root-cause").inner_text()
                assert "cdn" in root_text and pop in root_text and cdn.region in root_text, root_text
                # the payment incident, its root cause the payment gateway
                pay_incident = page.locator("section.incident",
                                            has=page.locator("tr.root-cause", has_text=f"region={payment.region}, service=payment_gateway"))
                assert pay_incident.count() >= 1
                assert pay_incident.first.locator(".badge.P0").count() >= 1
                # plots: one per member signal, drawn with a value line and a band
                assert page.locator("svg.plot").count() > 0
                assert cdn_incident.first.locator("svg.plot polyline.value").count() > 0
                assert page.locator("svg.plot polygon.band").count() > 0
                assert page.locator("svg.plot line.marker.fired").count() > 0
                page.screenshot(path=str(shot))
                # nothing was requested from anywhere but the worker (no CDN, no external resource)
                origin = f"http://127.0.0.1:{worker.web_port}/"
                assert requests and all(u.startswith(origin) for u in requests), requests
            finally:
                browser.close()
        assert shot.stat().st_size > 10_000
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "incident-page.png")
    except BaseException:
        print(worker.log_tail(60))
        raise
    finally:
        worker.stop()
