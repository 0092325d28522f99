"""Readable tables for the operator commands (``status``, ``batches``, ``batch``, ``retry``,
``alerts tail``), built with rich from the same dicts that ``--json`` prints."""

from __future__ import annotations

import json

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from dicomflow.json_types import JSON
from dicomflow.ops.status_page import duration

_STYLE = {
    "imported": "green",
    "duplicate": "cyan",
    "quarantined": "yellow",
    "failed": "red",
    "conflict": "magenta",
    "dropped": "dim",
    "in progress": "blue",
}


_DRILL_STYLE = {"passed": "green", "failed": "red"}


def _short(operation: object) -> str:
    return str(operation or "").rsplit("/", 1)[-1]


def status_tables(status: JSON) -> RenderableType:
    """File totals, batches in flight, running operations, alerts and backups."""
    led = status["files"]
    window = status["window"]
    out: list[RenderableType] = [
        Text.assemble(
            ("dicomflow status ", "bold"),
            f"{status['dicomStore']}  window {window['since']} to {window['until']}",
        )
    ]

    totals = Table(title=f"Files: {led['files']} (all time)", title_justify="left")
    totals.add_column("outcome")
    totals.add_column("files", justify="right")
    totals.add_column("reasons")
    reasons = led["reasons"]
    for name, n in led["outcomes"].items():
        codes = reasons.get(name) or {}
        text = ", ".join(f"{c} {k}" for k, c in codes.items())
        totals.add_row(Text(name, style=_STYLE.get(name, "")), str(n), text)
    if led.get("retried"):
        totals.add_row("re-driven", str(led["retried"]), "counted by their retry's outcome")
    out.append(totals)

    bat = status["batches"]
    counts = bat["counts"]
    flight = Table(
        title=(
            f"Batches: {counts['open']} open, {counts['sealed']} sealed, "
            f"{counts['importing']} importing, {counts['verifying']} verifying, "
            f"{counts['verified']} verified in the window"
        ),
        title_justify="left",
    )
    for column in ("batch", "state", "files", "age", "operation"):
        flight.add_column(column, justify="right" if column in ("files", "age") else "left")
    for state in ("open", "sealed", "importing", "verifying"):
        for b in bat[state]:
            flight.add_row(
                b["batch"],
                state,
                str(b.get("files", "-")),
                duration(b.get("ageSeconds")),
                _short(b.get("operation")),
            )
    out.append(flight if flight.row_count else Text(f"{flight.title}; none in flight"))

    running = status["operations"]["running"]
    ops = Table(title=f"Running operations: {len(running)}", title_justify="left")
    for column in ("kind", "operation", "started", "running"):
        ops.add_column(column)
    for op in running:
        ops.add_row(op["kind"], op["id"], op["createTime"] or "-", duration(op["runningSeconds"]))
    out.append(ops if running else Text("Running operations: none"))

    al = status["alerts"]
    alert_table = Table(title=f"Alerts in the window: {al['total']}", title_justify="left")
    alert_table.add_column("kind")
    alert_table.add_column("alerts", justify="right")
    alert_table.add_column("latest")
    latest: dict[str, str] = {}
    for a in al["recent"]:
        latest[str(a["kind"])] = str(a["time"])
    for kind, n in al["byKind"].items():
        alert_table.add_row(kind, str(n), latest.get(kind, "-"))
    out.append(alert_table)

    dead = status.get("deadLetters")
    if dead is None:
        out.append(Text("Dead letters: not counted (set DICOMFLOW_DEAD_LETTER_SUBSCRIPTION)"))
    else:
        count, where = dead["count"], dead["subscription"]
        line = f"Dead letters: {count} event(s) delivery gave up on ({where})"
        out.append(Text(line, style="bold red" if count else ""))

    if status["exports"]:
        backups = Table(title="Backups", title_justify="left")
        for column in ("date", "state", "attempt", "destination"):
            backups.add_column(column)
        for x in status["exports"]:
            backups.add_row(x["date"], str(x["state"]), str(x["attempt"]), str(x["destination"]))
        out.append(backups)
    if status.get("erasures"):
        out.append(Text(f"Erased studies (tombstones): {status['erasures']}"))
    drills = status.get("drills") or {}
    if drills.get("recent") or drills.get("everyDays"):
        table = Table(
            title=f"Restore drills (every {drills.get('everyDays') or '-'} days)",
            title_justify="left",
        )
        for column in ("date", "backup", "state", "studies", "instances", "present", "time"):
            table.add_column(column)
        for d in drills.get("recent") or []:
            table.add_row(
                d["date"],
                str(d.get("backupDate")),
                Text(str(d.get("state")), style=_DRILL_STYLE.get(str(d.get("state")), "")),
                str(d.get("studies")),
                str(d.get("instances") if d.get("instances") is not None else "-"),
                str(d.get("present") if d.get("present") is not None else "-"),
                duration(d.get("seconds")),
            )
        if not drills.get("recent"):
            table.add_row("-", "-", "no drill yet", "", "", "", "")
        out.append(table)
    return Group(*out)


def batches_table(items: list[JSON]) -> RenderableType:
    table = Table(title=f"{len(items)} batches", title_justify="left")
    for column in ("batch", "state", "files", "sealed", "operation", "age", "outcomes"):
        table.add_column(column, justify="right" if column in ("files", "age") else "left")
    for b in items:
        counts = b.get("counts") or {}
        table.add_row(
            b["batch"],
            b["state"],
            str(b.get("files", "-")),
            str(b.get("sealedAt") or "-"),
            _short(b.get("operation")),
            duration(b.get("ageSeconds")),
            ", ".join(f"{k} {v}" for k, v in counts.items() if v),
        )
    return table


def batch_tables(detail: JSON, files: bool) -> RenderableType:
    records = detail["records"]
    head = Table(show_header=False, title=f"batch {detail['batch']}", title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    head.add_row("state", detail["state"])
    head.add_row("sealed", str((records.get("seal") or {}).get("sealedAt", "-")))
    file_list = detail["fileList"]
    head.add_row("files", f"{file_list['count']} ({file_list['bytes']} bytes)")
    op = records.get("operationRecord") or {}
    head.add_row("import", detail["importUri"])
    if op:
        head.add_row("operation", str(op.get("operation")))
        head.add_row("started", str(op.get("startedAt")))
    summary = records.get("summary")
    if summary:
        times = summary.get("times") or {}
        head.add_row("finished", str(times.get("finishedAt")))
        head.add_row("verified", str(times.get("verifiedAt")))
        counts = {k: v for k, v in (summary.get("counts") or {}).items() if k != "total"}
        head.add_row("outcomes", ", ".join(f"{k} {v}" for k, v in counts.items()))
        counter = (summary.get("operation") or {}).get("counter")
        if counter:
            head.add_row("operation counter", json.dumps(counter, sort_keys=True))
    out: list[RenderableType] = [head]
    manifest = detail["manifest"]
    if not manifest["failure"] and not manifest["success"]:
        # Not verified yet: the file list is all there is.
        if files:
            listing = Table(title=f"files ({file_list['count']})", title_justify="left")
            for column in ("key", "size", "object", "SOP Instance UID", "via"):
                listing.add_column(column)
            for f in file_list["files"]:
                listing.add_row(
                    f["key"], str(f["size"]), f["object"], f.get("sop", ""), f.get("via", "")
                )
            out.append(listing)
        return Group(*out)
    lines = manifest["failure"] + (manifest["success"] if files else [])
    title = "manifest: failures" if not files else "manifest"
    table = Table(
        title=f"{title} ({len(manifest['failure'])} failed, {len(manifest['success'])} ok)",
        title_justify="left",
    )
    for column in ("key", "status", "reason", "object", "SOP Instance UID"):
        table.add_column(column)
    for line in lines:
        table.add_row(
            str(line.get("key")),
            Text(str(line.get("status")), style=_STYLE.get(str(line.get("status")), "")),
            str(line.get("reason") or ""),
            str(line.get("object") or ""),
            str(line.get("sop") or ""),
        )
    out.append(table)
    return Group(*out)


def retry_tables(result: JSON) -> RenderableType:
    table = Table(
        title=f"re-drive: {result['selected']} files selected"
        + (" (dry run)" if result.get("dryRun") else ""),
        title_justify="left",
    )
    for column in ("key", "was", "result", "now", "retry key", "window", "reason"):
        table.add_column(column)
    for f in result["files"][:200]:
        table.add_row(
            f["key"],
            f.get("previous", ""),
            f.get("result", ""),
            f.get("status", ""),
            f.get("retryKey", ""),
            f.get("window", ""),
            f.get("reason", ""),
        )
    totals = Text("  ".join(f"{k}: {v}" for k, v in result["results"].items()) or "nothing to do")
    return Group(table, totals, *[Text(f"error: {e}", style="red") for e in result["errors"]])


def alert_row(alert: JSON) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    for _ in range(5):
        table.add_column()
    details = alert.get("details") or {}
    brief = ", ".join(
        f"{k}={details[k]}"
        for k in ("batch", "window", "files", "operation", "date", "episode")
        if k in details and details[k] is not None
    )
    table.add_row(
        str(alert.get("time")),
        Text(str(alert.get("severity")), style="red" if alert.get("severity") == "ERROR" else ""),
        str(alert.get("kind")),
        str(alert.get("subject")),
        brief,
    )
    return table
