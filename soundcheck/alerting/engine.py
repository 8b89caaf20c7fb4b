"""The alert lifecycle, Alertmanager-style, over two key-value stores.

:class:`AlertEngine` turns anomalies and event-time ticks into notifications. It keeps its state
in two mutable mappings: ``dedup`` (fingerprint -> lifecycle state) and ``scopes`` (correlation
scope, usually a region -> incidents, firing fingerprints, notification groups, held alerts).
Offline they are dicts; in the worker they are changelogged Faust tables, so a restarted or
rebalanced worker neither forgets open alerts nor notifies them again. ``control`` maps silence
ids to silences (the worker fills it from the ``soundcheck.control`` topic).

What happens to an anomaly:

1. classification, correlation into an incident of its scope, dedup (new / repeat after the
   repeat interval / escalated on a severity rise) -- :func:`soundcheck.alerting.alert_step`;
2. a notification joins its incident's group: the first notification of a group waits
   ``group_wait_s`` of event time for its siblings, later ones go out at most every
   ``group_interval_s``;
3. at send time, an alert matched by an active silence, or explained by its incident's root
   cause (inhibition: the incident's root alert speaks for the children it explains), is held
   back and counted; when the silence ends or the root resolves while it still fires, it is sent
   with ``released_from`` saying what held it;
4. a fingerprint with no anomaly for ``resolve_after_s`` (keep-firing-for: a flapping signal
   stays one firing alert) is resolved: a ``status: resolved`` notification with ``ends_at``.

A fraud farm (streaming-fraud accounts that share an artist, a device or a country, one
incident by :func:`soundcheck.alerting.correlate.correlate_step`) is one notification, not one per
account: its fingerprint names what ties it (:func:`farm_tie`, usually ``artist:<id>``), it lists
the accounts (at most ``MAX_FARM_ACCOUNTS``, and how many there are) and the links two or more of
them share, goes out again (``notification: updated``) when accounts join or its severity rises,
and resolves once its last account has, silenced or not. Its decisions are logged under its own
fingerprint too (``soundcheck why``).
"""

from __future__ import annotations

import copy
import uuid
from collections import Counter
from typing import Any, Mapping, MutableMapping, Optional

import orjson

from soundcheck.alerting.correlate import ServiceGraph, alert_step, dedup_sweep_due, expired, fingerprint
from soundcheck.alerting.classify import SEVERITY_RANK
from soundcheck.alerting.silences import SilenceError, known_labels, silence_matches, validate
from soundcheck.detectors.base import Anomaly
from soundcheck.settings import Settings, SettingsError

def _order(doc: Mapping[str, Any]) -> tuple:
    """The order anomalies of one event time are taken in: stable whatever their arrival."""
    return (doc["event_time"], doc["detector"], doc["kind"], sorted(doc["entity"].items()), doc["window_start"])


def _identity(doc: Mapping[str, Any]) -> tuple:
    """What makes two anomalies one: the same fingerprint's finding on the same window (a copy
    sent again after a restart may differ in its score or details)."""
    return (doc["kind"], doc["detector"], sorted(doc["entity"].items()), doc["event_time"])


MAX_HELD = 200  # held-back fingerprints remembered per scope
MAX_PENDING = 100  # alerts waiting in one group
MAX_UNDRAINED = 100_000  # decisions kept when nobody drains them
_ALERT_IDS = uuid.UUID("0d5e0b6a-3c1f-5b7e-9a43-5f0c1d2e8b71")  # the namespace of notification ids


def notification_id(alert: Mapping[str, Any], now: int) -> str:
    """A notification's ``alert_id``: a name-based UUID of what was decided (fingerprint, status,
    kind of notification, severity, occurrences, event time of the decision). The same decision
    taken again -- a worker replaying its input after a crash -- gets the same id, so the worker
    (and any receiver) recognises a notification already sent; different decisions get different
    ids.

    >>> a = {"fingerprint": "f1", "status": "firing", "notification": "new", "severity": "major", "occurrences": 3}
    >>> notification_id(a, 60_000) == notification_id(dict(a), 60_000), notification_id(a, 60_000) == notification_id(a, 70_000)
    (True, False)
    """
    key = "|".join(str(alert.get(k)) for k in ("fingerprint", "status", "notification", "severity", "occurrences"))
    return str(uuid.uuid5(_ALERT_IDS, f"{key}|{int(now)}"))


MAX_CLOCK_STEPS = 720  # windows a tick walks through one by one (two hours of 10 s windows); a longer gap jumps
MAX_FARM_ACCOUNTS = 4 * 32  # accounts a farm's notification lists; more are counted (details.account_count)
MAX_FARM_LINKS = 256  # distinct links a farm counts to tell which its accounts share


def farm_tie(alerts: list[Mapping[str, Any]]) -> Optional[str]:
    """What names a fraud farm: the link (``artist:<id>``, ``device:<hash>``) most of its first
    accounts share, countries only when nothing else is shared; among equals the one earliest in
    an account's list (its most played artist), then by text. It
    depends only on which accounts the farm's first notification lists, not on the order their
    anomalies arrived in (the incident id does), so a replay of the same input names the farm as
    the worker did. A farm is named once: if its first notification lists one account alone (the
    others came more than a group wait later), that account's most played artist names it.

    >>> farm_tie([{"details": {"links": ["artist:a9", "device:1", "country:SE"]}},
    ...           {"details": {"links": ["artist:a9", "device:2", "country:SE"]}}])
    'artist:a9'
    """
    counts: dict[str, int] = {}
    rank: dict[str, int] = {}  # a link's best place in an account's list (its most played artist first)
    for a in alerts:
        for i, link in enumerate(dict.fromkeys((a.get("details") or {}).get("links") or ())):
            counts[link] = counts.get(link, 0) + 1
            rank[link] = min(rank.get(link, i), i)
    if not counts:
        return None
    return min(counts, key=lambda x: (x.startswith("country:"), -counts[x], rank[x], x))


class AlertEngine:
    """See the module doc. ``emitted_at`` arguments are the wall clock (epoch ms) of the caller."""

    def __init__(
        self,
        settings: Settings,
        graph: ServiceGraph,
        dedup: MutableMapping[str, Any],
        scopes: MutableMapping[str, Any],
        control: Optional[Mapping[str, Any]] = None,
    ) -> None:
        w, cfg = settings.windows, settings.alerting
        self.settings = settings
        self.graph = graph
        self.dedup = dedup
        self.scopes = scopes
        self.control = control if control is not None else {}
        self.resolve_after = w.resolve_after_s * 1000
        self.group_wait = w.group_wait_s * 1000
        self.step = max(1, int(w.aggregate_s)) * 1000  # the clock moves window by window (see _advance_to)
        self.group_interval = w.group_interval_s * 1000
        self.repeat = w.dedup_repeat_s * 1000
        self.inhibit = bool(cfg["inhibit"]["enabled"])
        self.inhibit_confidence = float(cfg["inhibit"]["min_confidence"])
        labels = known_labels(settings)
        try:  # the config's own silences pass the checks the control topic's do (a typo must not mute everything)
            self.static_silences = [validate(s, labels, max_ms=None) for s in cfg.get("silences", [])]
        except SilenceError as exc:
            raise SettingsError(f"config: alerting.silences: {exc}") from None
        self.notify_info = bool(cfg.get("notify_info", False))
        self.stats: Counter[str] = Counter()  # bounded keys: suppressed, info, silenced, inhibited, released, resolved
        self.send_resolved_when_silenced = bool(cfg.get("send_resolved_when_silenced", True))
        #: the decisions taken since the caller last drained them (:meth:`drain_decisions`): the
        #: decision log, one record per decision and fingerprint (see schemas/decision.schema.json)
        self.decisions: list[dict[str, Any]] = []

    def drain_decisions(self) -> list[dict[str, Any]]:
        out, self.decisions = self.decisions, []
        return out

    def _decide(self, decision: str, fp: str, now: int, alert: Optional[Mapping[str, Any]] = None, **detail: Any) -> None:
        a = alert or {}
        if len(self.decisions) >= MAX_UNDRAINED:  # nobody drains (an offline run): keep the newest
            del self.decisions[: MAX_UNDRAINED // 2]
        self.decisions.append({
            "fingerprint": fp, "decision": decision, "event_time": int(now), "kind": a.get("kind"),
            "entity": a.get("entity"), "priority": a.get("priority"), "severity": a.get("severity"),
            "incident_id": a.get("incident_id"), "detail": detail,
        })

    # -- inputs --------------------------------------------------------------------------------

    def on_anomaly(self, anomaly: Anomaly, emitted_at: int) -> list[dict[str, Any]]:
        """Take one anomaly in. Anomalies of different partitions arrive out of event-time order,
        so they never move the clock: the anomaly waits in its scope's inbox until a tick passes
        its event time, and is then taken in event-time order (:meth:`on_tick`), so that the same
        anomalies give the same notifications however they were interleaved and batched. One
        that arrives after the clock has passed it (late: its stream's clock moved on while the
        input paused, or a source counted as silent) waits too, for the next tick that moves the
        clock, and is taken then, at the clock's time, in event-time order with the others that
        came late: taken at once, late anomalies would be taken in the order they happened to
        arrive in, which differs between a worker and its replacement after a crash."""
        scope = anomaly.scope or anomaly.region
        st = self._scope(scope)
        if self._taken(anomaly):
            return []  # read again after a restart: the tables already hold it (they run ahead of the committed offset)
        doc = orjson.loads(anomaly.to_json())
        key = _identity(doc)
        if any(_identity(a) == key for a in st.get("inbox", [])):
            return []  # the same (its fingerprint's finding on the same window), still waiting for its tick
        st.setdefault("inbox", []).append(doc)
        self.scopes[scope] = st
        return []

    def on_tick(self, scope: str, event_time: int, emitted_at: int) -> list[dict[str, Any]]:
        """Event time has reached ``event_time`` for ``scope``: take the waiting anomalies up to it in
        event-time order, moving the clock to each one's time first; then resolve, flush and release
        what is due."""
        st = self.scopes.get(scope)
        if not st or event_time <= st.get("now", 0):
            return []
        st = copy.deepcopy(dict(st))
        out: list[dict[str, Any]] = []
        inbox = st.pop("inbox", [])
        ready = sorted((a for a in inbox if a["event_time"] <= event_time), key=_order)
        st["inbox"] = [a for a in inbox if a["event_time"] > event_time]
        for doc in ready:
            if doc["event_time"] > st.get("now", 0):
                out += self._advance_to(scope, st, doc["event_time"], emitted_at)
            anomaly = Anomaly.from_json(doc)
            if self._taken(anomaly):
                continue  # a second copy of one taken just before (sent again by a stage 2 that restarted)
            out += self._take(anomaly, scope, st, emitted_at)
        out += self._advance_to(scope, st, event_time, emitted_at)
        self.scopes[scope] = st
        return out

    def _advance_to(self, scope: str, st: dict[str, Any], target: int, emitted_at: int) -> list[dict[str, Any]]:
        """Move the clock to ``target`` through every window end in between, resolving, flushing
        and releasing at each: what is due at 510 s happens before what is due at 520 s however far
        one tick jumps (a worker that restarted, or reads a backlog, ticks in bursts; a replay ticks
        window by window), so a root resolves, and the children it held are released, before those
        children resolve. At most ``MAX_CLOCK_STEPS`` steps; a longer gap (a stream silent for
        hours) jumps."""
        out: list[dict[str, Any]] = []
        now = st.get("now", 0)
        if now > 0 and target - now > self.step:
            t = (now // self.step + 1) * self.step
            for _ in range(MAX_CLOCK_STEPS):
                if t >= target:
                    break
                st["now"] = t
                out += self._advance(scope, st, emitted_at)
                t += self.step
        st["now"] = target
        out += self._advance(scope, st, emitted_at)
        return out

    def _take(self, anomaly: Anomaly, scope: str, st: dict[str, Any], emitted_at: int) -> list[dict[str, Any]]:
        """Classify, correlate and dedup one anomaly into ``st`` (changed in place)."""
        step = alert_step(anomaly, self._get_dedup, st, self.settings, self.graph, emitted_at)
        new_state = dict(step.region_state)
        st.clear()
        st.update(new_state)
        state = step.dedup_state
        state["scope"] = scope
        st.setdefault("open", {})[step.fingerprint] = anomaly.event_time
        if step.alert is not None and step.alert["severity"] == "info" and not self.notify_info:
            self.stats["info"] += 1  # context only: counted, kept in the dedup state, not sent
            state["last_alert"] = step.alert
            self._decide("info", step.fingerprint, anomaly.event_time, step.alert,
                         reason="severity info: kept as context, not notified (alerting.notify_info is off)")
        elif step.alert is not None:
            if not state.get("sent"):  # nothing of this episode has gone out yet: it is still news
                step.alert["notification"] = "new"
            state["last_alert"] = step.alert
            inc = step.alert.get("incident_id") or step.fingerprint
            group = st.setdefault("pending", {}).setdefault(inc, {"first": anomaly.event_time, "flushed_at": None, "alerts": {}})
            if len(group["alerts"]) < MAX_PENDING or step.fingerprint in group["alerts"]:
                group["alerts"][step.fingerprint] = step.alert
                self._decide("grouped", step.fingerprint, anomaly.event_time, step.alert, incident_id=inc,
                             waiting=len(group["alerts"]), notification=step.alert.get("notification"))
            if group["flushed_at"] is None and not group["alerts"]:
                group["first"] = anomaly.event_time
        else:
            self.stats["suppressed"] += 1
            self._decide("deduplicated", step.fingerprint, anomaly.event_time, state.get("last_alert"),
                         occurrences=state.get("occurrences"), last_notified=state.get("last_notified"),
                         reason="already notified; repeated only after windows.dedup_repeat_s or on escalation")
            if state.get("last_alert"):  # keep the record current for a later release or resolve
                state["last_alert"] = {**state["last_alert"], "last_seen": state["last_seen"], "occurrences": state["occurrences"]}
        self.dedup[step.fingerprint] = state
        st.setdefault("now", 0)
        if step.alert is not None and self.group_wait == 0 and (step.alert["severity"] != "info" or self.notify_info):
            # no group wait: a new incident's first notification goes out with the anomaly itself
            inc = step.alert.get("incident_id") or step.fingerprint
            group = st["pending"][inc]
            if group["flushed_at"] is None and group["alerts"]:
                batch = list(group["alerts"].items())
                group["alerts"] = {}
                group["flushed_at"] = anomaly.event_time
                return self._send(st, inc, batch, max(st["now"], anomaly.event_time), emitted_at)
        return []

    # -- internals ------------------------------------------------------------------------------

    def _taken(self, anomaly: Anomaly) -> bool:
        """Already counted: a fingerprint's anomalies come from one stage-2 partition, one per
        window, in event-time order, so one not after its fingerprint's ``last_seen`` is a replay."""
        state = self.dedup.get(fingerprint(anomaly.kind, anomaly.detector, anomaly.entity))
        return bool(state) and anomaly.event_time <= state.get("last_seen", -(2**62))

    def _get_dedup(self, fp: str) -> Optional[dict[str, Any]]:
        state = self.dedup.get(fp)
        return dict(state) if state else None

    def _scope(self, scope: str) -> dict[str, Any]:
        st = self.scopes.get(scope)
        return copy.deepcopy(dict(st)) if st else {}

    def _silences(self) -> list[Mapping[str, Any]]:
        return self.static_silences + [s for s in self.control.values() if s]

    def _advance(self, scope: str, st: dict[str, Any], emitted_at: int) -> list[dict[str, Any]]:
        now = st["now"]
        out: list[dict[str, Any]] = []
        # send the groups that are due (before resolving: when the clock jumps, as in a replay
        # where one stream runs ahead, what fired is still sent before it resolves)
        for inc, group in list(st.get("pending", {}).items()):
            if not group["alerts"]:
                if group["flushed_at"] is not None and now - group["flushed_at"] > self.repeat * 3:
                    del st["pending"][inc]
                continue
            due = (now - group["first"] >= self.group_wait) if group["flushed_at"] is None else (now - group["flushed_at"] >= self.group_interval)
            if not due:
                continue
            batch = list(group["alerts"].items())
            group["alerts"] = {}
            group["flushed_at"] = now
            out.extend(self._send(st, inc, batch, now, emitted_at))
        # resolve what has been quiet for resolve_after (keep-firing-for)
        for fp, last in list(st.get("open", {}).items()):
            if now - last < self.resolve_after:
                continue
            del st["open"][fp]
            state = self._get_dedup(fp)
            if not state or state.get("status") == "resolved":
                continue
            state["status"] = "resolved"
            state["ends_at"] = last
            self.dedup[fp] = state
            for group in st.get("pending", {}).values():
                group["alerts"].pop(fp, None)
            held = st.get("held", {}).pop(fp, None)
            silenced = bool(held) and str(held.get("by", "")).startswith("silence:")
            if state.get("farm"):  # an account of a farm (held later or not): the farm resolves once, with its last account
                note = self._farm_resolved(st, fp, state["farm"], last, now, emitted_at)
                if note is not None:
                    out.append(note)
                    self.stats["resolved"] += 1
                self._decide("resolved", fp, now, state.get("last_alert"), ends_at=last, notified=note is not None,
                             farm=note["fingerprint"] if note else None)
                if note is not None:
                    self._decide("resolved", note["fingerprint"], now, note, ends_at=last, notified=True, last_account=fp)
                continue
            # only what was sent is resolved; a silenced one too (the pager closes its incident) if so configured
            if state.get("last_alert") and state.get("sent") and (not held or (silenced and self.send_resolved_when_silenced)):
                out.append(self._resolved(state, last, now, emitted_at))
                self.stats["resolved"] += 1
                self._decide("resolved", fp, now, state.get("last_alert"), ends_at=last, notified=True,
                             while_held_by=held.get("by") if held else None)
            else:
                self._decide("resolved", fp, now, state.get("last_alert"), ends_at=last, notified=False,
                             reason="never notified" if not state.get("sent") else f"held by {held.get('by') if held else '?'}")
        # release held alerts whose silence ended or whose inhibiting root resolved
        for fp, hold in list(st.get("held", {}).items()):
            state = self._get_dedup(fp)
            if not state or state.get("status") == "resolved" or fp not in st.get("open", {}):
                del st["held"][fp]
                continue
            if self._still_held(hold, state.get("last_alert") or {}, now, st["open"][fp]):
                continue
            del st["held"][fp]
            if state.get("farm"):  # the farm's notification already lists the account
                self._decide("released", fp, now, state.get("last_alert"), held_by=hold.get("by"), since=hold.get("since"),
                             notified=False, farm=state["farm"])
                continue
            state["sent"] = True
            self.dedup[fp] = state
            alert = {**state["last_alert"], "notification": "released", "emitted_at": emitted_at,
                     "released_from": {**hold, "released_at": now}}
            alert["alert_id"] = notification_id(alert, now)
            out.append(alert)
            self.stats["released"] += 1
            self._decide("released", fp, now, alert, held_by=hold.get("by"), since=hold.get("since"))
        # forget dedup states of this scope not seen for a long time (event time)
        if dedup_sweep_due(st, now, self.repeat):
            for fp in expired(list(self.dedup.items()), scope, now, 3 * self.repeat):
                if fp not in st.get("open", {}):
                    del self.dedup[fp]
        return out

    def _still_held(self, hold: Mapping[str, Any], alert: Mapping[str, Any], now: int, last_seen: int) -> bool:
        by = hold["by"]
        if by.startswith("silence:"):
            sid = by.split(":", 1)[1]
            return any(s.get("id") == sid and silence_matches(s, alert, now) for s in self._silences())
        root = self._get_dedup(by.split(":", 1)[1])
        if root and root.get("status") != "resolved":
            return True
        # the root recovered: the child speaks for itself only if it went on after the root ended
        return last_seen <= (root or {}).get("ends_at", 0)

    def _send(self, st: dict[str, Any], inc: str, batch: list[tuple[str, dict[str, Any]]], now: int, emitted_at: int) -> list[dict[str, Any]]:
        incident = next((i for i in st.get("incidents", []) if i["incident_id"] == inc), None)
        root_fp = None
        if self.inhibit and incident and len(incident["members"]) > 1:
            rc = incident.get("root_cause") or {}
            if rc.get("confidence", 0) >= self.inhibit_confidence:
                root_fp = rc.get("fingerprint")
        out = []
        farm_members: list[tuple[str, dict[str, Any]]] = []
        silences = self._silences()
        for fp, alert in batch:
            silence = next((s for s in silences if silence_matches(s, alert, now)), None)
            if silence is not None:
                self._hold(st, fp, f"silence:{silence.get('id', '?')}", now)
                self.stats["silenced"] += 1
                self._decide("silenced", fp, now, alert, silence_id=silence.get("id", "?"),
                             silence_comment=silence.get("comment", ""), silence_ends_at=silence.get("ends_at"))
                continue
            member = (incident or {}).get("members", {}).get(fp)
            root_member = (incident or {}).get("members", {}).get(root_fp or "")
            if root_fp and fp != root_fp and member and root_member and member["node"] != root_member["node"] and fp in st.get("open", {}) \
                    and root_fp in st.get("open", {}):
                self._hold(st, fp, f"inhibited_by:{root_fp}", now)
                self.stats["inhibited"] += 1
                self._decide("inhibited", fp, now, alert, by_fingerprint=root_fp, root_node=root_member["node"])
                continue
            if alert.get("kind") == "streaming_fraud" and incident and incident.get("links"):
                farm_members.append((fp, alert))  # one notification for the farm, below
                continue
            alert = dict(alert)
            if incident:  # the latest view of the incident, as of sending
                alert["related"] = sorted(f for f in incident["members"] if f != fp)
                alert["root_cause"] = incident.get("root_cause")
            sent = self._get_dedup(fp)
            if sent is not None:
                sent["sent"] = True
                self.dedup[fp] = sent
            alert["group"] = {"incident_id": inc, "size": len(batch)}
            alert["emitted_at"] = emitted_at
            alert["alert_id"] = notification_id(alert, now)
            out.append(alert)
            self._decide("notified", fp, now, alert, incident_id=inc, group_size=len(batch),
                         notification=alert.get("notification"), alert_id=alert["alert_id"])
        if farm_members:
            note = self._farm(st, inc, incident or {}, farm_members, now, emitted_at)
            if note is not None:
                out.append(note)
        return out

    def _farm(self, st: dict[str, Any], inc: str, incident: Mapping[str, Any], members: list[tuple[str, dict[str, Any]]],
              now: int, emitted_at: int) -> Optional[dict[str, Any]]:
        """The farm's notification for the accounts of this batch (see the module doc), if it has
        news: its first, accounts that joined, or a higher severity."""
        farms = st.setdefault("farms", {})
        farm = farms.get(inc)
        if farm is None:
            tie = farm_tie([a for _, a in members]) or inc
            farm = farms[inc] = {"fingerprint": fingerprint("streaming_fraud", "behavior.fraud", {"fraud_farm": tie}), "tie": tie,
                                 "accounts": {}, "open": [], "severity": None, "last": None,
                                 "first": min(a.get("starts_at") or a["event_time"] for _, a in members)}
        joined = [fp for fp, _ in members if fp not in farm["accounts"] and fp not in farm.setdefault("uncounted", [])]
        for fp, alert in members:
            if fp in joined:
                if len(farm["accounts"]) < MAX_FARM_ACCOUNTS:
                    farm["accounts"][fp] = dict(alert["entity"])
                else:  # counted, not listed (the notification and the table value stay bounded)
                    farm["uncounted"] = (farm["uncounted"] + [fp])[-MAX_FARM_ACCOUNTS:]
                    farm["more"] = farm.get("more", 0) + 1
                links = farm.setdefault("links", {})
                for link in set((alert.get("details") or {}).get("links") or ()):
                    if link in links or len(links) < MAX_FARM_LINKS:
                        links[link] = links.get(link, 0) + 1
            if fp not in farm["open"]:
                farm["open"].append(fp)
            state = self._get_dedup(fp)
            if state is not None:
                state["sent"], state["farm"] = True, inc
                self.dedup[fp] = state
        best = max((a for _, a in members), key=lambda a: (SEVERITY_RANK.get(a["severity"], 0), a.get("score", 0)))
        if farm["severity"] is not None and not joined and SEVERITY_RANK.get(best["severity"], 0) <= SEVERITY_RANK.get(farm["severity"], 0):
            for fp, alert in members:
                self._decide("deduplicated", fp, now, alert, farm=farm["fingerprint"], reason="the farm's notification already lists it")
            return None
        kind = "new" if farm["severity"] is None else "updated"
        severity = best["severity"] if farm["severity"] is None else max(best["severity"], farm["severity"], key=lambda x: SEVERITY_RANK.get(x, 0))
        priority = min([best["priority"]] + ([farm["last"]["priority"]] if farm["last"] else []))
        accounts = [farm["accounts"][fp] for fp in sorted(farm["accounts"])]
        n_accounts = len(accounts) + farm.get("more", 0)
        tie = farm.get("tie", inc)
        # what two or more of its accounts share, the tie first, countries last
        counts = farm.get("links") or {}
        shared = sorted((x for x, n in counts.items() if n >= 2), key=lambda x: (x != tie, x.startswith("country:"), -counts[x], x))
        ties = (shared or [tie])[:8]
        named = tie.replace(":", " ", 1) if not tie.startswith("inc-") else ""
        note = {
            **best,
            "fingerprint": farm["fingerprint"],
            "severity": severity,
            "priority": priority,
            "title": f"[{priority}] streaming fraud farm: {n_accounts} accounts" + (f", {named}" if named else ""),
            "summary": f"streaming fraud farm: {n_accounts} accounts that share " + ", ".join(ties) + ".",
            "entity": {"fraud_farm": tie},
            "related": [],
            "root_cause": incident.get("root_cause"),
            "notification": kind,
            "starts_at": farm["first"],
            "last_seen": max(a.get("last_seen", a["event_time"]) for _, a in members),
            "occurrences": n_accounts,
            # the news it carries, not when the group went out: its first account, or the last to join
            "event_time": (min(a["event_time"] for _, a in members) if kind == "new"
                           else max(a["event_time"] for fp, a in members if fp in joined or not joined)),
            "details": {"accounts": accounts, "account_count": n_accounts,
                        "joined": [farm["accounts"][fp] for fp in joined if fp in farm["accounts"]], "links": shared[:40],
                        "example": best.get("details", {})},
            "group": {"incident_id": inc, "size": len(members)},
            "emitted_at": emitted_at,
        }
        note["alert_id"] = notification_id(note, now)
        farm.update(severity=severity, last={k: v for k, v in note.items() if k != "details"} | {"details": {"accounts": accounts}})
        for fp, alert in members:
            self._decide("notified", fp, now, alert, incident_id=inc, farm=farm["fingerprint"], notification=kind,
                         alert_id=note["alert_id"])
        self._decide("notified", farm["fingerprint"], now, note, incident_id=inc, notification=kind, alert_id=note["alert_id"],
                     accounts=n_accounts, joined=len(joined))
        return note

    def _farm_resolved(self, st: dict[str, Any], fp: str, inc: str, ends_at: int, now: int, emitted_at: int) -> Optional[dict[str, Any]]:
        """One account of a farm resolved: the farm's resolved notification once it was the last."""
        farm = st.get("farms", {}).get(inc)
        if not farm:
            return None
        if fp in farm["open"]:
            farm["open"].remove(fp)
        if farm["open"] or not farm.get("last"):
            return None
        del st["farms"][inc]
        note = dict(farm["last"])
        note.update({"status": "resolved", "notification": "resolved", "ends_at": ends_at, "last_seen": ends_at,
                     "emitted_at": emitted_at, "title": note["title"].replace("] ", "] resolved: ", 1)})
        note.pop("group", None)
        note["alert_id"] = notification_id(note, now)
        return note

    def _hold(self, st: dict[str, Any], fp: str, by: str, now: int) -> None:
        held = st.setdefault("held", {})
        if fp in held or len(held) < MAX_HELD:
            held.setdefault(fp, {"by": by, "since": now})

    def _resolved(self, state: Mapping[str, Any], ends_at: int, now: int, emitted_at: int) -> dict[str, Any]:
        alert = dict(state["last_alert"])
        alert.update({
            "status": "resolved",
            "notification": "resolved",
            "ends_at": ends_at,
            "last_seen": state["last_seen"],
            "occurrences": state["occurrences"],
            "emitted_at": emitted_at,
            "title": alert["title"].replace("] ", "] resolved: ", 1),
        })
        alert.pop("group", None)
        alert["alert_id"] = notification_id(alert, now)
        return alert
