"""The incident page: the alert engine's incidents as one self-contained HTML page.

:func:`render_incidents` is a pure function of the engine's state (its ``dedup`` and ``scopes``
mappings, the silences), a :class:`~soundcheck.detectors.history.SeriesHistory` and the engine's
event-time clock. It lists the open incidents and those resolved in the last hour of event time,
worst priority first: priority, severity and business impact, the root cause with its
confidence and evidence, the members (title, status, what holds them back), the silences that
are active or pending; and for each signal of each member an inline SVG plot of the last hour of
its window values with the expected band and a marker where it fired (and where it resolved).

Everything is inline (CSS, SVG; no JavaScript, no external resource) and every text from the
state is escaped: alert titles and entity labels come from the input records. The worker serves
it at ``GET /incidents`` (agents/web.py); the page shows the incidents of the alerting partitions
that worker holds, and the plots the windows its stage-2 partitions evaluated since it started.
"""

from __future__ import annotations

import html
import math
import time
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional, Sequence

from soundcheck.alerting.silences import matchers_of, state as silence_state

RECENT_MS = 3_600_000  # resolved incidents stay on the page this long (event time)
PLOT_SPAN_MS = 3_600_000  # what a plot spans, ending at the engine's clock
PRIORITY_RANK = {"P0": 0, "P1": 1, "P2": 2, "P3": 3}
SEVERITY_RANK = {"critical": 0, "high": 1, "medium": 2, "low": 3, "info": 4}
W, H = 560, 150  # plot size (px)
ML, MR, MT, MB = 56, 10, 10, 22  # plot margins: left (y labels), right, top, bottom (x labels)


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def ts(ms: Optional[int], with_date: bool = True) -> str:
    """Epoch ms as UTC text."""
    if ms is None:
        return "-"
    t = datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC" if with_date else "%H:%M:%S")


def fmt(x: Any) -> str:
    """A number as short text (anything else as its text; not escaped)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "" if x is None else str(x)
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def num(x: Any) -> str:
    """:func:`fmt`, escaped."""
    return esc(fmt(x))


def labels(entity: Optional[Mapping[str, Any]]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((entity or {}).items()))


# ---------------------------------------------------------------------------------------------
# what the page shows


def engine_clock(scopes: Mapping[str, Any]) -> Optional[int]:
    """The engine's event-time clock: the furthest any scope has moved."""
    nows = [int(st["now"]) for st in _values(scopes) if st and st.get("now")]
    return max(nows) if nows else None


def _values(mapping: Mapping[str, Any]) -> list[Any]:
    return [v for _, v in list(mapping.items())]


def incidents(dedup: Mapping[str, Any], scopes: Mapping[str, Any], now: int,
              recent_ms: int = RECENT_MS) -> list[dict[str, Any]]:
    """The open incidents and those resolved within ``recent_ms`` of ``now``, worst first; each
    with its members' lifecycle states and last alerts."""
    out = []
    for scope, st in list(scopes.items()):
        if not st:
            continue
        held = st.get("held") or {}
        for inc in st.get("incidents") or []:
            members = []
            for fp, member in (inc.get("members") or {}).items():
                state = dedup.get(fp) or {}
                alert = state.get("last_alert") or {}
                members.append({
                    "fingerprint": fp, "member": member, "state": state, "alert": alert,
                    "status": state.get("status") or "expired", "held": held.get(fp),
                })
            if not members:
                continue
            firing = [m for m in members if m["status"] == "firing"]
            ended = [m["state"].get("ends_at") or m["state"].get("last_seen") or 0 for m in members]
            resolved_at = None if firing else max(ended)
            if resolved_at is not None and now - resolved_at > recent_ms:
                continue
            alerts = [m["alert"] for m in members if m["alert"]]
            worst = min(alerts, key=lambda a: (PRIORITY_RANK.get(a.get("priority"), 9),
                                               SEVERITY_RANK.get(a.get("severity"), 9),
                                               -float((a.get("business_impact") or {}).get("score", 0))), default={})
            members.sort(key=lambda m: (m["fingerprint"] != (inc.get("root_cause") or {}).get("fingerprint"),
                                        m["member"].get("first_seen", 0), m["fingerprint"]))
            out.append({
                "incident": inc, "scope": scope, "members": members, "worst": worst,
                "open": bool(firing), "resolved_at": resolved_at,
            })
    out.sort(key=lambda i: (not i["open"], PRIORITY_RANK.get(i["worst"].get("priority"), 9),
                            -int(i["incident"].get("started_at", 0)), i["incident"].get("incident_id", "")))
    return out


def silence_rows(silences: Iterable[Mapping[str, Any]], now: int) -> list[tuple[Mapping[str, Any], str, list[str]]]:
    """The silences in force or pending at ``now``, with their matchers as text."""
    rows = []
    for s in silences:
        if not s:
            continue
        st = silence_state(s, now)
        if st == "expired":
            continue
        try:
            matchers = [str(m) for m in matchers_of(s)]
        except Exception:
            matchers = ["(unreadable matchers)"]
        rows.append((s, st, matchers))
    rows.sort(key=lambda r: (r[1] != "active", str(r[0].get("id", ""))))
    return rows


# ---------------------------------------------------------------------------------------------
# plots


def plot_svg(points: Sequence[Any], *, start: int, end: int, fired_at: Optional[int] = None,
             resolved_at: Optional[int] = None, observed: Optional[float] = None, title: str = "") -> str:
    """An inline SVG line chart of window values (``points``: start, observed, expected, lower,
    upper) between ``start`` and ``end`` (epoch ms): the expected band shaded, the expected value
    dashed, the observed value as a line, a red marker where the signal fired (and a green one
    where it resolved). Without points, a frame that says so."""
    pts = [p for p in points if start <= p[0] <= end]
    head = (f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>'
            f'<rect class="frame" x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}"/>')
    if not pts:
        return (head + f'<text class="empty" x="{(W + ML) / 2:.0f}" y="{H / 2:.0f}" text-anchor="middle">'
                'no window history on this worker for this series</text></svg>')
    ys = [v for p in pts for v in (p[1], p[3], p[4])] + ([observed] if observed is not None and math.isfinite(observed) else [])
    lo, hi = min(ys), max(ys)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 1.0
    else:
        pad = (hi - lo) * 0.06
    lo, hi = lo - pad, hi + pad
    span = max(1, end - start)

    def x(t: float) -> float:
        return ML + (t - start) / span * (W - ML - MR)

    def y(v: float) -> float:
        return MT + (hi - v) / (hi - lo) * (H - MT - MB)

    def line(vals: Iterable[tuple[float, float]]) -> str:
        return " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in vals)

    band = line([(p[0], p[4]) for p in pts] + [(p[0], p[3]) for p in reversed(pts)])
    parts = [head]
    parts.append(f'<polygon class="band" points="{band}"/>')
    parts.append(f'<polyline class="expected" points="{line((p[0], p[2]) for p in pts)}"/>')
    parts.append(f'<polyline class="value" points="{line((p[0], p[1]) for p in pts)}"/>')
    if len(pts) == 1:
        parts.append(f'<circle class="value-dot" cx="{x(pts[0][0]):.1f}" cy="{y(pts[0][1]):.1f}" r="2.5"/>')
    for cls, at, text in (("fired", fired_at, "fired"), ("resolved", resolved_at, "resolved")):
        if at is not None and start <= at <= end:
            xx = x(at)
            anchor = "end" if xx > W - 90 else "start"
            dx = -3 if anchor == "end" else 3
            parts.append(f'<line class="marker {cls}" x1="{xx:.1f}" y1="{MT}" x2="{xx:.1f}" y2="{H - MB}"/>'
                         f'<text class="marker-label {cls}" x="{xx + dx:.1f}" y="{MT + 10}" text-anchor="{anchor}">'
                         f'{text} {ts(at, False)}</text>')
    for v in (hi - pad, lo + pad):
        parts.append(f'<text class="axis" x="{ML - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{num(round(v, 6))}</text>')
    parts.append(f'<text class="axis" x="{ML}" y="{H - 6}" text-anchor="start">{ts(start, False)}</text>')
    parts.append(f'<text class="axis" x="{W - MR}" y="{H - 6}" text-anchor="end">{ts(end, False)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# the page

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 20px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;font-size:13px;color:#c9cfdb}main{padding:12px 20px}
section.incident{background:#fff;border-radius:6px;margin:0 0 16px;padding:12px 16px;border-left:6px solid #999;box-shadow:0 1px 2px #0002}
section.incident.P0{border-left-color:#c0182b}section.incident.P1{border-left-color:#e8590c}
section.incident.P2{border-left-color:#e0a800}section.incident.P3{border-left-color:#5c7cfa}
section.incident.resolved{opacity:.85;border-left-color:#2b8a3e}
h2{font-size:17px;margin:0 0 6px}h3{font-size:14px;margin:12px 0 4px}
.badge{display:inline-block;padding:1px 7px;border-radius:10px;font-size:12px;font-weight:600;color:#fff;background:#666;margin-right:4px}
.badge.P0,.badge.critical{background:#c0182b}.badge.P1,.badge.high{background:#e8590c}.badge.P2,.badge.medium{background:#b08900}
.badge.P3,.badge.low{background:#5c7cfa}.badge.open,.badge.firing{background:#c0182b}.badge.resolved{background:#2b8a3e}
.badge.held{background:#6741d9}.badge.expired{background:#868e96}
table{border-collapse:collapse;font-size:13px;margin:4px 0}td,th{border-bottom:1px solid #e3e6ea;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5}.kv td:first-child{color:#555;white-space:nowrap}code{font-size:12px}
.member{border-top:1px solid #e3e6ea;padding-top:6px;margin-top:6px}.signal{display:inline-block;margin:4px 12px 4px 0;vertical-align:top}
.caption{font-size:12px;color:#333;margin:2px 0}.empty-page{color:#555}
svg.plot{background:#fff;font-family:inherit}svg.plot .frame{fill:none;stroke:#ccd1d9}
svg.plot .band{fill:#4dabf7;fill-opacity:.22;stroke:none}svg.plot .expected{fill:none;stroke:#1c7ed6;stroke-dasharray:4 3;stroke-width:1}
svg.plot .value{fill:none;stroke:#1d2330;stroke-width:1.6}svg.plot .value-dot{fill:#1d2330}
svg.plot .marker{stroke-width:1.5}svg.plot .marker.fired{stroke:#c0182b}svg.plot .marker.resolved{stroke:#2b8a3e;stroke-dasharray:3 2}
svg.plot text{font-size:10px;fill:#555}svg.plot .marker-label.fired{fill:#c0182b}svg.plot .marker-label.resolved{fill:#2b8a3e}
svg.plot .empty{font-size:12px;fill:#868e96}
"""


def render_incidents(dedup: Mapping[str, Any], scopes: Mapping[str, Any], silences: Iterable[Mapping[str, Any]],
                     history: Any = None, now: Optional[int] = None, *, generated_at: Optional[float] = None,
                     refresh_s: int = 30) -> str:
    """The incident page (see the module doc). ``now``: the engine's event-time clock (epoch ms;
    default: the furthest scope clock); ``history``: a SeriesHistory, or None (no plots data)."""
    clock = now if now is not None else engine_clock(scopes)
    wall = time.time() if generated_at is None else generated_at
    if clock is None:
        clock = int(wall * 1000)
    found = incidents(dedup, scopes, clock)
    silenced = silence_rows(silences, clock)
    n_open = sum(1 for i in found if i["open"])
    out = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s else "",
        "<title>Soundcheck incidents</title>",
        f"<style>{CSS}</style></head><body>",
        "<header><h1>Soundcheck incidents</h1>",
        f"<p>event-time clock {esc(ts(clock))} &middot; {n_open} open, {len(found) - n_open} resolved in the last hour "
        f"&middot; generated {esc(ts(int(wall * 1000)))} &middot; this worker's alerting partitions</p></header><main>",
    ]
    out.append(_silences_html(silenced))
    if not found:
        out.append('<p class="empty-page">No open incident, and none resolved in the last hour.</p>')
    for item in found:
        out.append(_incident_html(item, history, clock, silenced))
    out.append("</main></body></html>")
    return "".join(out)


def render_engine(engine: Any, history: Any = None, now: Optional[int] = None) -> str:
    """:func:`render_incidents` over an :class:`~soundcheck.alerting.engine.AlertEngine`'s state."""
    silences = list(engine.static_silences) + [s for s in _values(engine.control) if s]
    return render_incidents(engine.dedup, engine.scopes, silences, history, now)


def _silences_html(rows: list[tuple[Mapping[str, Any], str, list[str]]]) -> str:
    out = ['<section class="silences"><h3>Silences</h3>']
    if not rows:
        out.append("<p>None active.</p></section>")
        return "".join(out)
    out.append("<table><tr><th>id</th><th>state</th><th>matchers</th><th>from</th><th>until</th><th>by</th><th>comment</th></tr>")
    for s, st, matchers in rows:
        out.append(
            f'<tr class="silence"><td><code>{esc(s.get("id"))}</code></td><td><span class="badge {esc(st)}">{esc(st)}</span></td>'
            f'<td>{"<br>".join(f"<code>{esc(m)}</code>" for m in matchers)}</td><td>{esc(ts(s.get("starts_at")))}</td>'
            f'<td>{esc(ts(s.get("ends_at")))}</td><td>{esc(s.get("author", ""))}</td><td>{esc(s.get("comment", ""))}</td></tr>'
        )
    out.append("</table></section>")
    return "".join(out)


def _impact_html(bi: Mapping[str, Any]) -> str:
    if not bi:
        return "-"
    comps = bi.get("components") or {}
    parts = [f"score {num(bi.get('score'))}", f"revenue loss {num(bi.get('revenue_loss_per_hour'))}/h",
             f"{num(bi.get('affected_users'))} users affected"]
    if comps:
        parts.append("(" + ", ".join(f"{esc(k)} {num(v)}" for k, v in sorted(comps.items())) + ")")
    if bi.get("drivers"):
        parts.append("driven by " + ", ".join(esc(d) for d in bi["drivers"]))
    return " &middot; ".join(parts)  # each part escaped already


def _incident_html(item: Mapping[str, Any], history: Any, clock: int,
                   silenced: list[tuple[Mapping[str, Any], str, list[str]]]) -> str:
    inc, worst = item["incident"], item["worst"]
    prio, sev = worst.get("priority", "?"), worst.get("severity", "?")
    status = "open" if item["open"] else "resolved"
    rc = inc.get("root_cause") or {}
    root_alert = next((m["alert"] for m in item["members"] if m["fingerprint"] == rc.get("fingerprint")), {}) or worst
    headline = root_alert.get("title") or worst.get("title") or inc.get("incident_id")
    out = [f'<section class="incident {esc(prio)} {status}" id="{esc(inc.get("incident_id"))}" '
           f'data-incident-id="{esc(inc.get("incident_id"))}">',
           f'<h2><span class="badge {esc(prio)}">{esc(prio)}</span><span class="badge {esc(sev)}">{esc(sev)}</span>'
           f'<span class="badge {status}">{status}</span> {esc(headline)}</h2>',
           '<table class="kv">',
           f'<tr><td>incident</td><td><code>{esc(inc.get("incident_id"))}</code> in scope <b>{esc(item["scope"])}</b> '
           f'(region {esc(inc.get("region"))})</td></tr>',
           f'<tr><td>started</td><td>{esc(ts(inc.get("started_at")))}; last anomaly {esc(ts(inc.get("last_seen")))}'
           + (f'; resolved {esc(ts(item["resolved_at"]))}' if item["resolved_at"] is not None else "") + "</td></tr>",
           f'<tr><td>business impact</td><td>{_impact_html(worst.get("business_impact") or {})}</td></tr>']
    if rc:
        out.append(
            f'<tr class="root-cause"><td>root cause</td><td><b>{esc(rc.get("node"))}</b> on '
            f'<b>{esc(labels(rc.get("entity")))}</b>, confidence {num(rc.get("confidence"))} '
            f'(<code>{esc(rc.get("fingerprint"))}</code>)</td></tr>')
    out.append(f'<tr><td>members</td><td>{len(item["members"])}'
               + (f' (+{num(inc.get("dropped_members"))} not listed)' if inc.get("dropped_members") else "") + "</td></tr>")
    out.append("</table>")
    if rc.get("evidence"):
        out.append('<h3>Root-cause evidence</h3><table class="evidence"><tr><th>first seen</th><th>node</th><th>kind</th>'
                   "<th>signals</th><th>fingerprint</th></tr>")
        for ev in rc["evidence"]:
            out.append(f'<tr><td>{esc(ts(ev.get("first_seen")))}</td><td>{esc(ev.get("node"))}</td><td>{esc(ev.get("kind"))}</td>'
                       f'<td>{esc(", ".join(str(s) for s in ev.get("signals") or []))}</td>'
                       f'<td><code>{esc(ev.get("fingerprint"))}</code></td></tr>')
        out.append("</table>")
    out.append("<h3>Members</h3>")
    for m in item["members"]:
        out.append(_member_html(m, history, clock, silenced, is_root=m["fingerprint"] == rc.get("fingerprint")))
    out.append("</section>")
    return "".join(out)


def _member_html(m: Mapping[str, Any], history: Any, clock: int,
                 silenced: list[tuple[Mapping[str, Any], str, list[str]]], is_root: bool) -> str:
    a, state, member = m["alert"], m["state"], m["member"]
    entity = a.get("entity") or member.get("entity") or {}
    title = a.get("title") or f'{member.get("kind", "")}: {labels(entity)}'
    badges = [f'<span class="badge {esc(m["status"])}">{esc(m["status"])}</span>']
    if a.get("priority"):
        badges.append(f'<span class="badge {esc(a["priority"])}">{esc(a["priority"])}</span>')
    held = m.get("held")
    if held and m["status"] == "firing":
        badges.append(f'<span class="badge held">held: {esc(held.get("by"))}</span>')
    out = [f'<div class="member{" root" if is_root else ""}" data-fingerprint="{esc(m["fingerprint"])}">',
           f'<div>{"".join(badges)} <b>{esc(title)}</b>{" &middot; <i>root cause</i>" if is_root else ""}</div>',
           f'<div class="caption"><code>{esc(m["fingerprint"])}</code> &middot; {esc(a.get("detector", ""))} &middot; '
           f'{esc(labels(entity))} &middot; since {esc(ts(state.get("first_seen") or member.get("first_seen")))}'
           + (f' &middot; ended {esc(ts(state.get("ends_at")))}' if m["status"] == "resolved" else "")
           + f' &middot; {num(state.get("occurrences", 0))} windows</div>']
    if a.get("summary"):
        out.append(f'<div class="caption">{esc(a["summary"])}</div>')
    signals = a.get("signals") or [{"metric": s} for s in member.get("signals") or []]
    fired_default = state.get("first_seen") or member.get("first_seen")
    resolved_at = state.get("ends_at") if m["status"] == "resolved" else None
    end = max(clock, int(resolved_at or 0))
    for s in signals:
        metric = str(s.get("metric", ""))
        found = history.find(a.get("detector", ""), entity, metric) if history is not None and a.get("detector") else None
        # each window at its end: when its value was known and its signal could fire (Signal.since)
        step = int(getattr(history, "step_ms", 0) or 0)
        points = [(p[0] + step, *p[1:]) for p in found[1]] if found else []
        # the last hour, or less when the worker has seen less of the series
        start = max(end - PLOT_SPAN_MS, min((p[0] for p in points), default=end - PLOT_SPAN_MS))
        fired = s.get("since") if isinstance(s.get("since"), int) else fired_default
        observed = s.get("observed") if isinstance(s.get("observed"), (int, float)) else None
        caption = metric
        if observed is not None:
            caption += f": {fmt(observed)} (expected {fmt(s.get('expected'))}"
            caption += f", limit {fmt(s['limit'])})" if s.get("limit") is not None else ")"
        svg = plot_svg(points, start=start, end=end, fired_at=fired, resolved_at=resolved_at, observed=observed,
                       title=f"{metric} on {labels(entity)}: last hour of window values")
        out.append(f'<figure class="signal" data-metric="{esc(metric)}">{svg}'
                   f'<figcaption class="caption">{esc(caption)}</figcaption></figure>')
    out.append("</div>")
    return "".join(out)
