"""``dicomflow status --html FILE``: the status dict as one self-contained HTML page.

``render(status)`` is pure: it takes the dict from ``dicomflow.ops.status.gather``
and returns the page. Everything is inline (CSS and an SVG timeline, no
script, no web font, no network), so the file can be mailed or attached to an
incident. The timeline has four lanes over the window's busy span: files (a
histogram by outcome over the windows they arrived in), batch seals, import and
export operations (bars from start to end), and alerts. Hovering an element shows
its details (SVG titles).
"""

from __future__ import annotations

import html
from datetime import datetime, timedelta

from dicomflow.clock import parse_time
from dicomflow.json_types import JSON

STATUS_COLORS = {
    "imported": "#2f9e5f",
    "duplicate": "#67b7a9",
    "staged": "#5b8fd6",
    "quarantined": "#e3a33b",
    "conflict": "#a45fc4",
    "failed": "#d64541",
    "dropped": "#9aa0a6",
}
OPERATION_COLORS = {"done": "#3b6fb6", "running": "#e3a33b", "failed": "#d64541"}
ALERT_COLORS = {
    "import_failed": "#d64541",
    "conflict": "#a45fc4",
    "quarantined": "#e3a33b",
    "export_failed": "#b03060",
    "operation_failed": "#c0392b",
    "stalled": "#8e6c3a",
    "backlog": "#6c7a89",
    "permission_denied": "#d64541",
    "unreadable": "#b03060",
    "verification_stuck": "#c0392b",
    "stale_state": "#6c7a89",
}
_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200)
_FAVICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E"
    "%3Crect width='16' height='16' rx='3' fill='%232f9e5f'/%3E%3C/svg%3E"
)

WIDTH = 1240
LEFT = 130
RIGHT = 24

CSS = """
:root { --ink:#1f2933; --muted:#6b7785; --line:#e3e8ee; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: #17324d; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; }
header p { margin: 4px 0 0; color: #b9c7d6; font-size: 13px; }
main { padding: 20px 32px 40px; max-width: 1320px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin-bottom: 18px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px;
        min-width: 96px; flex: 1; }
.card .n { font-size: 26px; font-weight: 650; }
.card .l { color: var(--muted); font-size: 11px; text-transform: uppercase; letter-spacing: .03em; }
.card.bad .n { color: #d64541; } .card.warn .n { color: #c27c0e; } .card.good .n { color: #2f9e5f; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px;
          margin-bottom: 18px; }
h2 { font-size: 15px; margin: 0 0 10px; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); }
th { color: var(--muted); font-weight: 600; font-size: 12px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.empty { color: var(--muted); font-style: italic; }
.mono { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 12px; }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; fill: #3d4852; }
svg .lane { font-weight: 600; font-size: 12px; }
footer { color: var(--muted); font-size: 12px; }
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def duration(seconds: float | int | None) -> str:
    """``3d 4h``, ``2h 5m``, ``4m 10s``, ``12s``."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    if s >= 60:
        return f"{s // 60}m {s % 60}s"
    return f"{s}s"


class _Scale:
    """Time -> x pixel over the timeline's span."""

    def __init__(self, start: datetime, end: datetime) -> None:
        self.start = start
        self.seconds = max(1.0, (end - start).total_seconds())
        self.width = WIDTH - LEFT - RIGHT

    def x(self, moment: datetime) -> float:
        offset = (moment - self.start).total_seconds() / self.seconds
        return LEFT + max(0.0, min(1.0, offset)) * self.width

    def ticks(self) -> list[tuple[float, str]]:
        step = next((s for s in _STEPS if self.seconds / s <= 12), 86400)
        first = self.start.replace(microsecond=0)
        epoch = int(first.timestamp())
        moment = first + timedelta(seconds=(-epoch) % step)
        fmt = "%H:%M:%S" if step < 60 else "%H:%M"
        if self.seconds > 2 * 86400:
            fmt = "%m-%d %H:%M"
        out = []
        while (moment - self.start).total_seconds() <= self.seconds:
            out.append((self.x(moment), moment.strftime(fmt)))
            moment += timedelta(seconds=step)
        return out


def _lanes(bars: list[JSON], scale: _Scale, end: datetime) -> list[int]:
    """A row for each operation bar so that overlapping bars do not cover each other."""
    rows_end: list[float] = []
    rows: list[int] = []
    for bar in bars:
        start = parse_time(bar["start"])
        stop = parse_time(bar["end"]) or end
        x0 = scale.x(start) if start else LEFT
        x1 = max(x0 + 6, scale.x(stop))
        for i, last in enumerate(rows_end):
            if x0 >= last + 2:
                rows_end[i] = x1
                rows.append(i)
                break
        else:
            rows_end.append(x1)
            rows.append(len(rows_end) - 1)
    return rows


def timeline_svg(tl: JSON, now: datetime) -> str:
    """The SVG timeline: uploads, seals, operations and alerts on one time axis."""
    start, end = parse_time(tl["start"]), parse_time(tl["end"])
    assert start is not None and end is not None
    scale = _Scale(start, end)
    parts: list[str] = []
    y = 34

    # Legend.
    lx = LEFT
    for name, color in STATUS_COLORS.items():
        parts.append(f'<rect x="{lx}" y="8" width="10" height="10" rx="2" fill="{color}"/>')
        parts.append(f'<text x="{lx + 14}" y="17">{name}</text>')
        lx += 22 + 7 * len(name)
    lx += 16
    for name, color in OPERATION_COLORS.items():
        parts.append(f'<rect x="{lx}" y="8" width="18" height="10" rx="2" fill="{color}"/>')
        parts.append(f'<text x="{lx + 22}" y="17">operation {name}</text>')
        lx += 34 + 7 * len(f"operation {name}")

    # Uploads: stacked histogram by outcome.
    uploads = tl["uploads"]
    lane_h = 120
    parts.append(_lane_label(y, lane_h, "Files", f"{uploads['total']} by window"))
    peak = max((sum(max(0, n) for n in b["counts"].values()) for b in uploads["bins"]), default=0)
    width = uploads["binSeconds"]
    for b in uploads["bins"]:
        t0 = parse_time(b["time"])
        if t0 is None:
            continue
        x0 = scale.x(t0)
        x1 = max(x0 + 2, scale.x(t0 + timedelta(seconds=width)) - 1)
        base = y + lane_h
        for status in STATUS_COLORS:
            n = b["counts"].get(status, 0)
            if n <= 0:
                continue
            h = n / peak * (lane_h - 8)
            base -= h
            parts.append(
                f'<rect class="upload" x="{x0:.1f}" y="{base:.1f}" width="{x1 - x0:.1f}" '
                f'height="{h:.1f}" fill="{STATUS_COLORS[status]}">'
                f"<title>{_e(b['time'])} +{width}s: {n} {status}</title></rect>"
            )
    if peak:
        parts.append(f'<text x="{LEFT - 6}" y="{y + 12}" text-anchor="end">{peak}</text>')
    y += lane_h + 14

    # Batch seals.
    lane_h = 44
    parts.append(_lane_label(y, lane_h, "Batch seals", f"{len(tl['seals'])} batches"))
    mid = y + lane_h / 2
    parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{mid}" y2="{mid}" stroke="#e3e8ee"/>')
    for seal in tl["seals"]:
        t = parse_time(seal["time"])
        if t is None:
            continue
        x = scale.x(t)
        parts.append(
            f'<path class="seal" d="M{x:.1f},{mid - 7} l7,7 l-7,7 l-7,-7 z" fill="#17324d">'
            f"<title>batch {_e(seal['batch'])} sealed {_e(seal['time'])}: "
            f"{_e(seal.get('files'))} files</title></path>"
        )
    y += lane_h + 14

    # Operations, one row per overlap.
    for kind, label in (("import", "Imports"), ("export", "Exports")):
        bars = [b for b in tl["operations"] if b["kind"] == kind]
        rows = _lanes(bars, scale, now)
        lane_h = max(30, 16 * (max(rows, default=0) + 1) + 10)
        parts.append(_lane_label(y, lane_h, label, f"{len(bars)} operations"))
        for bar, row in zip(bars, rows, strict=True):
            t0 = parse_time(bar["start"])
            t1 = parse_time(bar["end"]) or now
            x0 = scale.x(t0) if t0 else LEFT
            x1 = max(x0 + 6, scale.x(t1))
            counter = ", ".join(f"{k} {v}" for k, v in sorted(bar["counter"].items()))
            parts.append(
                f'<rect class="operation" x="{x0:.1f}" y="{y + 5 + row * 16}" '
                f'width="{x1 - x0:.1f}" height="12" rx="3" '
                f'fill="{OPERATION_COLORS.get(bar["state"], "#888")}">'
                f"<title>{_e(kind)} {_e(bar['id'])} ({_e(bar['state'])}) {_e(bar['start'])} "
                f"to {_e(bar['end'] or 'now')} {_e(counter)}</title></rect>"
            )
        y += lane_h + 14

    # Alerts.
    lane_h = 40
    parts.append(_lane_label(y, lane_h, "Alerts", f"{len(tl['alerts'])} published"))
    mid = y + lane_h / 2
    for alert in tl["alerts"]:
        t = parse_time(alert["time"])
        if t is None:
            continue
        x = scale.x(t)
        color = ALERT_COLORS.get(str(alert["kind"]), "#555")
        parts.append(
            f'<path class="alert" d="M{x:.1f},{mid - 9} l8,15 l-16,0 z" fill="{color}" '
            f'stroke="#fff" stroke-width="1"><title>{_e(alert["kind"])} alert '
            f"{_e(alert['alertId'])} at {_e(alert['time'])}</title></path>"
        )
    kinds = sorted({str(a["kind"]) for a in tl["alerts"]})
    lx = LEFT
    for kind in kinds:
        parts.append(
            f'<path d="M{lx + 5},{y + lane_h + 4} l5,9 l-10,0 z" '
            f'fill="{ALERT_COLORS.get(kind, "#555")}"/>'
        )
        parts.append(f'<text x="{lx + 14}" y="{y + lane_h + 13}">{_e(kind)}</text>')
        lx += 24 + 7 * len(kind)
    y += lane_h + (22 if kinds else 8)

    # Axis.
    parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y}" y2="{y}" stroke="#9aa5b1"/>')
    for x, text in scale.ticks():
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="30" y2="{y + 4}" stroke="#eef1f4" '
            f'stroke-dasharray="2,3"/>'
        )
        parts.append(f'<text x="{x:.1f}" y="{y + 16}" text-anchor="middle">{_e(text)}</text>')
    parts.append(
        f'<text x="{WIDTH - RIGHT}" y="{y + 32}" text-anchor="end">UTC, '
        f"{_e(tl['start'])} to {_e(tl['end'])}</text>"
    )
    height = y + 40
    return (
        f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
        f'width="100%" role="img" aria-label="timeline of uploads, seals, operations and alerts">'
        + "".join(parts)
        + "</svg>"
    )


def _lane_label(y: float, height: float, title: str, sub: str) -> str:
    return (
        f'<rect x="{LEFT}" y="{y}" width="{WIDTH - LEFT - RIGHT}" height="{height}" '
        f'fill="#fafbfc" stroke="#eef1f4"/>'
        f'<text class="lane" x="8" y="{y + height / 2}">{_e(title)}</text>'
        f'<text x="8" y="{y + height / 2 + 14}" fill="#6b7785">{_e(sub)}</text>'
    )


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> str:
    if not rows:
        return '<p class="empty">none</p>'
    numeric = numeric or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _swatch(color: str) -> str:
    return f'<span class="swatch" style="background:{color}"></span>'


def render(status: JSON) -> str:
    """The page for a status dict from ``dicomflow.ops.status.gather``."""
    now = parse_time(status["generatedAt"])
    assert now is not None
    led = status["files"]
    outcomes = led["outcomes"]
    bat = status["batches"]
    al = status["alerts"]
    cards = [
        ("files", led["files"], ""),
        ("imported", outcomes["imported"], "good"),
        ("duplicate", outcomes["duplicate"], ""),
        ("quarantined", outcomes["quarantined"], "warn" if outcomes["quarantined"] else ""),
        ("conflict", outcomes["conflict"], "bad" if outcomes["conflict"] else ""),
        ("failed", outcomes["failed"], "bad" if outcomes["failed"] else ""),
        ("in progress", outcomes["in progress"], ""),
        ("batches verified", bat["verified"], ""),
        ("running operations", len(status["operations"]["running"]), ""),
        ("alerts", al["total"], "warn" if al["total"] else ""),
    ]
    cards.append(("erased studies", status.get("erasures", 0), ""))
    last_drill = ((status.get("drills") or {}).get("recent") or [None])[-1]
    if last_drill is not None:
        state = str(last_drill.get("state"))
        kind = {"passed": "good", "failed": "bad"}.get(state, "")
        cards.append((f"drill {last_drill['date']}", state, kind))
    card_html = "".join(
        f'<div class="card {cls}"><div class="n">{_e(n)}</div><div class="l">{_e(label)}</div>'
        "</div>"
        for label, n, cls in cards
    )

    file_rows = [
        [_swatch(STATUS_COLORS.get(s, "#999")) + _e(s), _e(n)]
        for s, n in led["totals"].items()
        if n
    ]
    reason_rows = [
        [_e(s), _e(code), _e(n)] for s, codes in led["reasons"].items() for code, n in codes.items()
    ]
    batch_rows = []
    for state in ("open", "sealed", "importing", "verifying"):
        for b in bat[state]:
            batch_rows.append(
                [
                    f'<span class="mono">{_e(b["batch"])}</span>',
                    _e(state),
                    _e(b.get("files", "-")),
                    _e(duration(b.get("ageSeconds"))),
                    f'<span class="mono">{_e(str(b.get("operation") or "").rsplit("/", 1)[-1])}'
                    "</span>",
                ]
            )
    op_rows = [
        [
            _e(op["kind"]),
            f'<span class="mono">{_e(op["id"])}</span>',
            _e(op["createTime"]),
            _e(duration(op.get("runningSeconds"))),
        ]
        for op in status["operations"]["running"]
    ]
    alert_kind_rows = [
        [_swatch(ALERT_COLORS.get(k, "#555")) + _e(k), _e(n)] for k, n in al["byKind"].items()
    ]
    recent_rows = [
        [_e(a["time"]), _e(a["kind"]), f'<span class="mono">{_e(a["alertId"])}</span>']
        for a in reversed(al["recent"][-15:])
    ]
    export_rows = [
        [
            _e(x["date"]),
            _e(x["state"]),
            _e(x.get("attempt")),
            f'<span class="mono">{_e(x.get("destination"))}</span>',
        ]
        for x in status["exports"]
    ]
    drills = status.get("drills") or {}
    drill_rows = [
        [
            _e(d["date"]),
            _e(d.get("backupDate")),
            _e(d.get("state")),
            _e(d.get("studies")),
            _e(d.get("instances")),
            _e(d.get("present")),
            _e(duration(d.get("seconds"))),
        ]
        for d in reversed(drills.get("recent") or [])
    ]
    drill_title = f"Restore drills (every {_e(drills.get('everyDays') or '-')} days)"
    window = status["window"]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dicomflow status {_e(status["generatedAt"])}</title>
<link rel="icon" href="{_FAVICON}">
<style>{CSS}</style>
</head>
<body>
<header>
<h1>dicomflow status</h1>
<p>{_e(status["dicomStore"])} &middot; window {_e(window["since"])} to {_e(window["until"])}
&middot; generated {_e(status["generatedAt"])}</p>
</header>
<main>
<div class="cards">{card_html}</div>
<section><h2>Timeline</h2>{timeline_svg(status["timeline"], now)}</section>
<div class="grid">
<section><h2>Files by status (all time)</h2>
{_table(["status", "files"], file_rows, {1})}</section>
<section><h2>Reasons</h2>{_table(["status", "reason", "files"], reason_rows, {2})}</section>
<section><h2>Batches in flight</h2>
{_table(["batch", "state", "files", "age", "operation"], batch_rows, {2})}</section>
<section><h2>Running operations</h2>
{_table(["kind", "operation", "started", "running"], op_rows)}</section>
<section><h2>Alerts in the window, by kind</h2>{_table(["kind", "alerts"], alert_kind_rows, {1})}
</section>
<section><h2>Latest alerts</h2>{_table(["time", "kind", "alert id"], recent_rows)}</section>
<section><h2>Backups</h2>{_table(["date", "state", "attempt", "destination"], export_rows)}
</section>
<section><h2>{drill_title}</h2>
{_table(["date", "backup", "state", "studies", "instances", "present", "time"], drill_rows)}
</section>
</div>
<footer>Object names are never shown; file keys, batch ids and alert ids lead to the manifests.
</footer>
</main>
</body>
</html>
"""
