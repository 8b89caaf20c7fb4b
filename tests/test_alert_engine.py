"""The alert lifecycle (soundcheck.alerting.engine) on hand-made anomalies, with dicts for the tables."""

import pytest

from soundcheck.alerting.engine import AlertEngine
from soundcheck.alerting.correlate import ServiceGraph, fingerprint
from soundcheck.detectors.base import Anomaly
from soundcheck.detectors.baseline import Signal

S = 1000


def anomaly(t, node="cdn", entity=None, kind="service_degradation", value=0.08, region="BR", detector="system.baseline"):
    entity = entity or {"service": node, "region": region}
    return Anomaly(kind, detector, entity, region, node, [Signal("error_rate", value, 0.001, 40.0, 0.01, t)], 0.9, t, t - 10 * S,
                   "system_performance_metrics")


@pytest.fixture
def engine(settings):
    return AlertEngine(settings, ServiceGraph(settings.services), {}, {}, {})


def run(engine, events):
    """events: (t, anomaly or None): an anomaly is followed by a tick at its time, as in the worker."""
    out = []
    for t, a in events:
        if a is not None:
            out += engine.on_anomaly(a, t)
        out += engine.on_tick("BR", t, t)
    return out


def test_first_notification_waits_for_the_group_then_fires_once_and_resolves(engine, settings):
    w = settings.windows
    events = [(t * S, anomaly(t * S)) for t in range(0, 200, 10)]  # 200 s of anomalies
    events += [(t * S, None) for t in range(200, 200 + w.resolve_after_s + 20, 10)]  # then quiet
    out = run(engine, events)
    assert [n["notification"] for n in out] == ["new", "resolved"]
    assert out[0]["emitted_at"] >= w.group_wait_s * S  # held for the group wait (event time)
    assert out[1]["status"] == "resolved" and out[1]["ends_at"] == 190 * S and out[1]["fingerprint"] == out[0]["fingerprint"]


def test_escalation_goes_out_at_the_group_interval_and_a_new_episode_after_resolve(engine, settings):
    w = settings.windows
    out = run(engine, [(0, anomaly(0, value=0.02))] + [(t * S, None) for t in range(10, 40, 10)])
    assert [n["notification"] for n in out] == ["new"]
    sev0 = out[0]["severity"]
    later = run(engine, [(40 * S, anomaly(40 * S, value=0.9))] + [(t * S, None) for t in range(50, 130, 10)])
    assert [n["notification"] for n in later] == ["escalated"] and later[0]["severity"] != sev0
    quiet = run(engine, [(t * S, None) for t in range(130, 40 + w.resolve_after_s + 30, 10)])
    assert [n["notification"] for n in quiet] == ["resolved"]
    again = run(engine, [(400 * S, anomaly(400 * S))] + [(t * S, None) for t in range(410, 450, 10)])
    assert [n["notification"] for n in again] == ["new"] and again[0]["starts_at"] == 400 * S


def test_a_flapping_signal_stays_one_alert(engine):
    events = []
    for t in range(0, 600, 10):
        events.append((t * S, anomaly(t * S) if (t // 30) % 2 == 0 else None))
    out = run(engine, events)
    assert [n["notification"] for n in out] == ["new"]


def test_the_root_alert_inhibits_the_children_it_explains_until_it_resolves(engine, settings):
    pop = {"region": "BR", "cdn_pop": "gru1"}
    region = {"region": "BR"}
    events = []
    for t in range(0, 100, 10):
        events.append((t * S, anomaly(t * S, node="cdn", entity=pop, kind="audio_quality_degradation", detector="audio.baseline")))
        events.append((t * S, anomaly(t * S, node="audio_streaming", entity=region, kind="audio_quality_degradation", detector="audio.baseline")))
    out = run(engine, events)
    assert [n["entity"] for n in out] == [pop]
    assert engine.stats["inhibited"] == 1
    assert out[0]["related"]  # the child is listed under the root
    # the root recovers, the region keeps degrading: the child is released, saying what held it
    events = [(t * S, anomaly(t * S, node="audio_streaming", entity=region, kind="audio_quality_degradation", detector="audio.baseline"))
              for t in range(100, 100 + settings.windows.resolve_after_s + 40, 10)]
    out = run(engine, events)
    kinds = [(n["notification"], n["entity"]) for n in out]
    assert ("resolved", pop) in kinds and ("released", region) in kinds
    released = next(n for n in out if n["notification"] == "released")
    assert released["released_from"]["by"].startswith("inhibited_by:")


def test_one_tick_that_jumps_far_gives_what_ticking_window_by_window_gives(settings):
    """A worker that restarted (or reads a backlog) ticks in bursts: the root still resolves, and
    releases the child it held, before that child resolves, as when the clock moves window by window."""
    pop = {"region": "BR", "cdn_pop": "gru1"}
    region = {"region": "BR"}
    events = []
    for t in range(0, 100, 10):  # both degrade, then the root recovers and the child goes on a while
        events.append((t * S, anomaly(t * S, node="cdn", entity=pop, kind="audio_quality_degradation", detector="audio.baseline")))
    for t in range(0, 150, 10):
        events.append((t * S, anomaly(t * S, node="audio_streaming", entity=region, kind="audio_quality_degradation", detector="audio.baseline")))
    events.sort(key=lambda e: e[0])
    end = (150 + settings.windows.resolve_after_s + 60) * S

    def notifications(jump):
        eng = AlertEngine(settings, ServiceGraph(settings.services), {}, {}, {})
        out = run(eng, events)
        ticks = [end] if jump else range(150 * S, end + 1, 10 * S)
        for t in ticks:
            out += eng.on_tick("BR", t, t)
        return [(n["notification"], n["entity"]) for n in out]

    stepped, jumped = notifications(False), notifications(True)
    assert ("released", region) in stepped and ("resolved", region) in stepped
    assert stepped.index(("released", region)) < stepped.index(("resolved", region))
    assert jumped == stepped


def test_a_silence_holds_matching_alerts_and_releases_them_when_it_ends(settings):
    control = {"maint": {"id": "maint", "matchers": {"region": "BR", "service": "cdn"}, "starts_at": 0, "ends_at": 120 * S}}
    engine = AlertEngine(settings, ServiceGraph(settings.services), {}, {}, control)
    out = run(engine, [(t * S, anomaly(t * S)) for t in range(0, 200, 10)])
    assert [n["notification"] for n in out] == ["released"]
    assert out[0]["released_from"]["by"] == "silence:maint" and out[0]["released_from"]["released_at"] >= 120 * S
    assert engine.stats["silenced"] == 1


def test_silences_from_config_apply_too(settings):
    s = settings.replace(alerting={"silences": [{"id": "cfg", "matchers": {"kind": "service_degradation"}, "starts_at": 0, "ends_at": 10**13}]})
    engine = AlertEngine(s, ServiceGraph(s.services), {}, {}, {})
    assert run(engine, [(t * S, anomaly(t * S)) for t in range(0, 100, 10)]) == []
    assert engine.stats["silenced"] == 1


def test_state_survives_a_restart_of_the_engine(engine, settings):
    """The tables are all the state: a new engine on the same tables neither forgets nor re-fires."""
    out = run(engine, [(t * S, anomaly(t * S)) for t in range(0, 60, 10)])
    assert [n["notification"] for n in out] == ["new"]
    restarted = AlertEngine(settings, ServiceGraph(settings.services), engine.dedup, engine.scopes, {})
    assert run(restarted, [(t * S, anomaly(t * S)) for t in range(60, 120, 10)]) == []


def test_without_a_group_wait_the_first_notification_goes_out_with_the_anomaly(settings):
    s = settings.replace(windows={"group_wait_s": 0})
    engine = AlertEngine(s, ServiceGraph(s.services), {}, {}, {})
    assert engine.on_anomaly(anomaly(10 * S), 10 * S) == []  # it waits for the clock (a tick) to pass it
    first = engine.on_tick("BR", 10 * S, 10 * S)
    assert [n["notification"] for n in first] == ["new"]
    engine.on_anomaly(anomaly(20 * S), 20 * S)
    assert engine.on_tick("BR", 20 * S, 20 * S) == []  # the same episode: once
    later = run(engine, [(t * S, anomaly(t * S)) for t in range(30, 100, 10)])
    assert [n["notification"] for n in later if n["notification"] == "new"] == []


def test_anomalies_arriving_in_any_order_before_a_tick_give_the_same_notifications(settings):
    def notes(order):
        engine = AlertEngine(settings, ServiceGraph(settings.services), {}, {}, {})
        events = [anomaly(t * S, node=node, region="BR") for t in range(0, 120, 10) for node in ("cdn", "audio_streaming")]
        out = []
        for i in range(0, len(events), 8):  # arrive in batches, shuffled within each
            chunk = events[i:i + 8]
            for a in (chunk if order == "forward" else chunk[::-1]):
                out += engine.on_anomaly(a, 0)
            out += engine.on_tick("BR", max(a.event_time for a in chunk), 0)
        for t in range(130, 400, 10):
            out += engine.on_tick("BR", t * S, 0)
        return [{k: v for k, v in n.items() if k not in ("alert_id", "emitted_at")} for n in out]

    forward = notes("forward")
    assert forward and forward == notes("backward")


def test_every_decision_is_logged_with_what_it_depended_on(settings):
    """The decision log: grouped, notified, deduplicated, silenced (which silence), released, resolved."""
    import json

    import jsonschema

    from soundcheck.ingest.contracts import SCHEMA_DIR

    schema = json.loads((SCHEMA_DIR / "decision.schema.json").read_text())
    control = {"maint": {"id": "maint", "matchers": {"region": "BR", "service": "cdn"}, "starts_at": 0, "ends_at": 120 * S,
                         "comment": "PoP upgrade"}}
    engine = AlertEngine(settings, ServiceGraph(settings.services), {}, {}, control)
    run(engine, [(t * S, anomaly(t * S)) for t in range(0, 200, 10)])
    run(engine, [(t * S, None) for t in range(200, 200 + settings.windows.resolve_after_s + 20, 10)])
    log = engine.drain_decisions()
    assert engine.drain_decisions() == []  # drained
    kinds = [d["decision"] for d in log]
    assert {"grouped", "silenced", "deduplicated", "released", "resolved"} <= set(kinds), kinds
    silenced = next(d for d in log if d["decision"] == "silenced")
    assert silenced["detail"]["silence_id"] == "maint" and silenced["detail"]["silence_comment"] == "PoP upgrade"
    assert kinds.index("silenced") < kinds.index("released") < kinds.index("resolved")
    assert next(d for d in log if d["decision"] == "resolved")["detail"]["notified"] is True
    for d in log:
        jsonschema.validate({**d, "decided_at": 0}, schema)


def test_an_alert_notified_then_silenced_still_gets_its_resolved_notice(settings):
    """Alertmanager issue 226: the pager opened an incident; when the problem ends while silenced it
    must hear so, unless alerting.send_resolved_when_silenced is off."""
    for on in (True, False):
        s = settings.replace(alerting={"send_resolved_when_silenced": on})
        control = {}
        engine = AlertEngine(s, ServiceGraph(s.services), {}, {}, control)
        out = run(engine, [(t * S, anomaly(t * S)) for t in range(0, 100, 10)])
        assert [n["notification"] for n in out] == ["new"]
        # a silence from now on; the alert fires on (repeats are held), then stops
        control["later"] = {"id": "later", "matchers": {"region": "BR"}, "starts_at": 100 * S, "ends_at": 10**13}
        out = run(engine, [(t * S, anomaly(t * S)) for t in range(100, 2000, 10)])
        out += run(engine, [(t * S, None) for t in range(2000, 2000 + s.windows.resolve_after_s + 20, 10)])
        assert [n["status"] for n in out].count("resolved") == (1 if on else 0), (on, [n["notification"] for n in out])


def test_a_config_silence_gets_the_same_checks_as_one_from_the_control_topic(settings):
    from soundcheck.settings import SettingsError

    for bad, message in (({"id": "x", "matchers": {}}, "at least one matcher"),
                         ({"id": "x", "matchers": {"colour": "red"}}, "unknown label 'colour'"),
                         ({"id": "x", "matchers": [{"name": "region", "value": "(", "isRegex": True}]}, "not a valid regular")):
        s = settings.replace(alerting={"silences": [bad]})
        with pytest.raises(SettingsError, match=message):
            AlertEngine(s, ServiceGraph(s.services), {}, {}, {})


def test_an_expired_silence_is_expired_even_before_it_would_have_started():
    from soundcheck.alerting import silences

    s = {"id": "later", "matchers": {"region": "BR"}, "starts_at": 1_000, "ends_at": 2_000, "expired_at": 500}
    assert silences.state(s, 600) == "expired"
    assert not silences.silence_matches(s, {"entity": {"region": "BR"}}, 1_500)


def test_a_copy_of_an_anomaly_sent_again_after_a_restart_is_counted_once(settings):
    """A stage 2 that restarted sends its last windows' anomalies again, and a copy may differ
    in its score or values: one finding per fingerprint and window, whether the copy comes while
    the first waits for its tick or just after it was taken."""
    def occurrences(copies):
        engine = AlertEngine(settings, ServiceGraph(settings.services), {}, {}, {})
        out = []
        for t in range(0, 100, 10):
            out += engine.on_anomaly(anomaly(t * S, value=0.08), t * S - 5 * S)
            for _ in range(copies):  # the copy, with another value
                out += engine.on_anomaly(anomaly(t * S, value=0.09), t * S - 5 * S)
            out += engine.on_tick("BR", t * S, t * S)
            for _ in range(copies):  # and one after its tick
                out += engine.on_anomaly(anomaly(t * S, value=0.07), t * S)
        return next(iter(engine.dedup.values()))["occurrences"], [n["notification"] for n in out]

    assert occurrences(1) == occurrences(0) == (10, ["new"])


def test_a_notification_id_names_its_decision(settings):
    """The same decision taken again (a replay) gives the same alert_id; another decision another."""
    def ids():
        engine = AlertEngine(settings, ServiceGraph(settings.services), {}, {}, {})
        out = run(engine, [(t * S, anomaly(t * S)) for t in range(0, 100, 10)] + [(t * S, None) for t in range(100, 300, 10)])
        return [n["alert_id"] for n in out]

    first = ids()
    assert len(first) == 2 and len(set(first)) == 2  # new, resolved
    assert ids() == first


def fraud(t, user, artists, device):
    links = [f"artist:{a}" for a in artists] + [f"device:{device}", "country:SE"]
    return Anomaly("streaming_fraud", "behavior.fraud", {"user_id": user}, "SE", "streaming_fraud",
                   [Signal("fraud_probability", 0.97, 0.5, 9.0, None, t)], 0.97, t, t - 60 * S, "user_behavior_events",
                   sampled_users=1, details={"links": links, "top_artists": artists}, scope="fraud")


def farm_run(settings, accounts, batches, silence=None, gap_s=40, until_s=300):
    """Fraud anomalies of ``accounts`` in ``batches`` (lists of account indexes), ``gap_s`` apart
    (longer than the group wait: each batch is a group of its own), each account seen again every
    10 s until ``until_s``; then event time runs on until everything resolves."""
    engine = AlertEngine(settings, ServiceGraph(settings.services), {}, {}, silence or {})
    out, seen = [], []
    t = 0
    for batch in batches:
        seen += batch
        for t2 in range(t, t + gap_s, 10):
            for i in seen:
                user, artists, device = accounts[i]
                out += engine.on_anomaly(fraud(t2 * S, user, artists, device), 0)
            out += engine.on_tick("fraud", t2 * S, 0)
        t += gap_s
    for t2 in range(t, until_s, 10):
        for i in seen:
            user, artists, device = accounts[i]
            out += engine.on_anomaly(fraud(t2 * S, user, artists, device), 0)
        out += engine.on_tick("fraud", t2 * S, 0)
    for t2 in range(until_s, until_s + 1200, 10):
        out += engine.on_tick("fraud", t2 * S, 0)
    return engine, [n for n in out if n["kind"] == "streaming_fraud"]


ACCOUNTS = [("u1", ["own-1", "zz-farm"], "d1"), ("u2", ["zz-farm"], "d2"), ("u3", ["zz-farm", "bb-x"], "d3")]
FARM_FP = fingerprint("streaming_fraud", "behavior.fraud", {"fraud_farm": "artist:zz-farm"})


def test_a_fraud_farm_is_one_notification_named_by_what_ties_it_whatever_the_order(settings):
    """The farm's fingerprint comes from the artist its first accounts share, not from which
    account's anomaly came first (u1 plays its own artist most): a replay that sees them in another
    order or other groups names the same farm; accounts that join later update it."""
    for batches in ([[0, 1], [2]], [[2, 1], [0]], [[1, 0, 2]]):
        engine, notes = farm_run(settings, ACCOUNTS, batches)
        assert {n["fingerprint"] for n in notes} == {FARM_FP}, batches
        assert {n["entity"]["fraud_farm"] for n in notes} == {"artist:zz-farm"}
        firing = [n for n in notes if n["status"] == "firing"]
        assert [n["notification"] for n in firing] == ["new"] + ["updated"] * (len(batches) - 1), batches
        assert {e["user_id"] for e in firing[-1]["details"]["accounts"]} == {"u1", "u2", "u3"}
        assert firing[-1]["details"]["account_count"] == 3 and "artist zz-farm" in firing[-1]["title"]
        assert firing[-1]["details"]["links"][0] == "artist:zz-farm" and "artist:own-1" not in firing[-1]["details"]["links"]
        assert [n["status"] for n in notes].count("resolved") == 1
        # soundcheck why FARM: the farm's own decisions are logged under its fingerprint
        assert [d["decision"] for d in engine.decisions if d["fingerprint"] == FARM_FP].count("notified") == len(firing)


def test_a_farm_account_silenced_later_resolves_with_its_farm_not_on_its_own(settings):
    """An account whose repeat falls under a silence after the farm went out: no resolved notice
    for an account alert that never fired, the farm still resolves once, and nothing is left."""
    silence = {"s1": {"id": "s1", "matchers": {"kind": "streaming_fraud"}, "starts_at": 100 * S, "ends_at": 10_000 * S,
                      "comment": "fraud team"}}
    engine, notes = farm_run(settings, ACCOUNTS, [[0, 1]], silence=silence, until_s=settings.windows.dedup_repeat_s + 100)
    assert {n["fingerprint"] for n in notes} == {FARM_FP}, [(n["entity"], n["status"]) for n in notes]
    assert any(d["decision"] == "silenced" for d in engine.decisions)  # the repeats were held by the silence
    assert [n["status"] for n in notes] == ["firing", "resolved"]
    assert not engine.scopes["fraud"].get("farms")



def test_anomalies_that_arrive_after_the_clock_are_taken_at_the_next_tick_in_event_time_order(settings):
    """Late anomalies (the clock moved on while the input paused) do not depend on the order they
    arrive in: they wait for the next tick and are taken then, oldest first. Taken at once, the
    farm's incident (and so its notification) followed whichever account came first."""
    def notes(order):
        engine = AlertEngine(settings, ServiceGraph(settings.services), {}, {}, {})
        engine.on_anomaly(anomaly(0, node="cdn", region="fraud"), 0)
        out = engine.on_tick("fraud", 100 * S, 0)  # the clock is at 100 s
        late = [fraud(t * S, user, artists, device) for t in (60, 70, 80) for user, artists, device in ACCOUNTS]
        taken = []
        for a in (late if order == "forward" else late[::-1]):
            taken += engine.on_anomaly(a, 0)
        assert taken == [], "a late anomaly waits for the next tick"
        for t in range(110, 400, 10):
            out += engine.on_tick("fraud", t * S, 0)
        return [{k: v for k, v in n.items() if k not in ("alert_id", "emitted_at")} for n in out]

    forward = notes("forward")
    farm = [n for n in forward if n["kind"] == "streaming_fraud"]
    assert farm and farm[0]["details"]["account_count"] == 3, "the late accounts were notified, as one farm"
    assert forward == notes("backward")
    # without a group wait too: a late anomaly goes out at the next tick, not on arrival
    s = settings.replace(windows={"group_wait_s": 0})
    engine = AlertEngine(s, ServiceGraph(s.services), {}, {}, {})
    engine.on_anomaly(anomaly(0, node="cdn"), 0)
    engine.on_tick("BR", 100 * S, 0)
    assert engine.on_anomaly(anomaly(60 * S, node="payment_gateway"), 0) == []
    assert [n["entity"]["service"] for n in engine.on_tick("BR", 110 * S, 0) if n["status"] == "firing"] == ["payment_gateway"]
