"""``make demo``: the whole pipeline on real sample data, on a fresh local cloud.

Stages, each timed: start the local cloud; upload pydicom's sample files, the
``pydicom-data`` files and a few generated multi-series studies (the sample
files named ``*.dcm``, so the broken ones are checked and quarantined, not
skipped; some generated ones under awkward names, two without an extension);
wait until every upload has a final outcome (``dicomflow.ops.outcomes``: ingest batches
and imports them, report verifies them); fire the export tick and wait for the
backup's manifest; wait for the quarantine alerts (the report sends one per
quarantine window, DICOMFLOW_FEED_GRACE_SECONDS after the window's seal grace); restore
the backup into a second store and check it (every instance, a sample byte for byte);
read the alerts; scan the functions' logs and the alerts for the corpus's names, IDs,
birth dates, UIDs and object names (``localcloud.leaks``). Then print a summary and check the
invariants (a leak is a broken one). The exit code is 1 when an invariant
is broken, 2 when the local cloud cannot start.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from google.cloud import storage
from rich.console import Console
from rich.table import Table

from dicomflow import feeds, log, objects
from dicomflow.backup import dated_folder, export_day
from dicomflow.config import QUARANTINE_PREFIX, load_settings
from dicomflow.ops import outcomes
from dicomflow.ops.outcomes import Outcome
from dicomflow.staging import BATCH_STATE_PREFIX, OPEN_PREFIX
from dicomflow.verify import DUPLICATE, IMPORTED
from localcloud import leaks
from localcloud.corpus import generate_studies, sample_files
from localcloud.scheduler import fire
from localcloud.stack import Stack, StackConfig

# Short windows so the demo takes a minute, not an hour; the defaults are in config.py.
DEMO_FUNCTION_ENV = {
    "DICOMFLOW_BATCH_WINDOW_SECONDS": "5",
    "DICOMFLOW_SEAL_GRACE_SECONDS": "4",
    "DICOMFLOW_LATE_WINDOW_SECONDS": "15",
    "DICOMFLOW_BATCH_MAX_FILES": "100",
    # Every upload is staged or quarantined seconds after it lands here.
    "DICOMFLOW_FEED_GRACE_SECONDS": "10",
}
TICK_SECONDS = 2.0
SETTLE_TIMEOUT = 150.0
RUNBOOK = Path(__file__).resolve().parents[1] / "docs" / "alerts.md"
# The second store the demo restores its backup into.
RESTORE_STORE = "restored"


@dataclass
class Stages:
    """Wall time per stage, in order."""

    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, console: Console, name: str, step: Callable[[], Any]) -> Any:
        started = time.monotonic()
        with console.status(f"{name} ..."):
            result = step()
        self.seconds[name] = time.monotonic() - started
        console.print(f"[green]✓[/] {name} [dim]({self.seconds[name]:.1f} s)[/]")
        return result


# Names imaging folders and users really produce, each on a generated (valid) instance:
# Latin-1, CJK and emoji, spaces, and the characters a URL, a header or a percent-decoder
# could get wrong. The last two have no extension, as modalities write them (the sniff
# finds DICM at byte 128).
AWKWARD_NAMES = (
    "demo/names/ünïcødé 名前.dcm",
    "demo/names/café résumé ÿ.dcm",
    "demo/names/患者/画像 001.dcm",
    "demo/names/🩻 scan 😀.dcm",
    "demo/names/a b  c .dcm",
    "demo/names/#1#.dcm",
    "demo/names/what?now=1&x=2.dcm",
    "demo/names/100% %41%2F%zz.dcm",
    "demo/names/a+b+c.dcm",
    "demo/names/mixed é 名 😀 # ? % +.dcm",
    "demo/modality/IM000001",
    "demo/modality/IM000002",
)


def _corpus() -> list[tuple[str, bytes]]:
    files = [(f"demo/samples/{p.parent.name}/{p.stem}.dcm", p.read_bytes()) for p in sample_files()]
    generated = [
        (f"demo/generated/{g.study_uid[-8:]}/{g.series_uid[-8:]}/{g.sop_uid[-8:]}.dcm", g.data)
        for g in generate_studies(3, 2, 5, patient_name="DEMO^GENERATED", patient_id="GEN-0001")
    ]
    awkward = [(name, data) for name, (_, data) in zip(AWKWARD_NAMES, generated, strict=False)]
    # Names are unique per upload; records are keyed by (bucket, name, generation).
    return sorted(dict(files + awkward + generated[len(awkward) :]).items())


def _upload(stack: Stack, gcs: storage.Client, corpus: list[tuple[str, bytes]]) -> None:
    bucket = gcs.bucket(stack.config.landing_bucket)

    def put(item: tuple[str, bytes]) -> None:
        bucket.blob(item[0]).upload_from_string(item[1], content_type="application/dicom")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, corpus))


def _wait_settled(
    stack: Stack, gcs: storage.Client, expected: int, console: Console
) -> dict[str, Outcome]:
    staging = gcs.bucket(stack.config.staging_bucket)
    deadline = time.monotonic() + SETTLE_TIMEOUT
    found: dict[str, Outcome] = {}
    while time.monotonic() < deadline:
        found = outcomes.read_all(staging)
        final = sum(1 for o in found.values() if o.status in outcomes.FINAL)
        # A batch is done once its summary is written, after its alerts: wait for that too.
        busy = objects.names(staging, OPEN_PREFIX)
        if len(found) >= expected and final == len(found) and not busy:
            return found
        time.sleep(1.0)
    console.print(f"[red]timed out: {len(found)} files with a record, not all final[/]")
    return found


def _export(stack: Stack, gcs: storage.Client) -> tuple[str, int, dict[str, Any] | None]:
    assert stack.tick_deliverer is not None
    now = datetime.now(UTC)
    fire(stack.tick_deliverer, stack.schedules["export"], now)
    settings = load_settings(stack.env())
    folder = dated_folder(settings, export_day(now))
    backups = gcs.bucket(stack.config.backup_bucket)
    deadline = time.monotonic() + SETTLE_TIMEOUT
    manifest: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        blob = backups.get_blob(f"{folder}_MANIFEST.json")
        if blob is not None:
            manifest = json.loads(blob.download_as_bytes())
            break
        time.sleep(1.0)
    count = sum(
        1 for b in backups.list_blobs(prefix=folder) if not b.name.endswith("_MANIFEST.json")
    )
    return f"gs://{stack.config.backup_bucket}/{folder}", count, manifest


def _restore(stack: Stack, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """Restore the demo's backup into a second store and check it (``dicomflow restore``)."""
    from dicomflow import restore
    from dicomflow.names import DicomStoreName
    from dicomflow.runtime import make_context

    if manifest is None:
        return {"status": "no-backup", "problems": ["there is no backup to restore"]}
    day = date.fromisoformat(str(manifest["date"]))
    ctx = make_context(load_settings(stack.env()))
    live = ctx.settings.dicom_store
    target = DicomStoreName(live.dataset, RESTORE_STORE)
    try:
        stores = ctx.healthcare().projects().locations().datasets().dicomStores()
        stores.create(parent=str(live.dataset), dicomStoreId=RESTORE_STORE, body={}).execute()
        return restore.run(ctx, day, target, wait=True, poll_seconds=0.5, timeout=SETTLE_TIMEOUT)
    finally:
        ctx.close_clients()
        ctx.storage.close()


def _wait_quarantine_alerts(stack: Stack, gcs: storage.Client) -> bool:
    """Wait until the report has alerted on every quarantined file (the feed grace after
    its window's seal grace): each window's progress record holds all its keys."""
    staging = gcs.bucket(stack.config.staging_bucket)
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        windows: dict[str, set[str]] = {}
        for name in objects.names(staging, QUARANTINE_PREFIX):
            window, _, rest = name[len(QUARANTINE_PREFIX) :].partition("/")
            windows.setdefault(window, set()).add(rest.removesuffix(".dcm"))
        markers = feeds.QUARANTINE.markers
        if all(
            keys <= set((objects.read_json(staging, f"{markers}{w}.json") or {}).get("keys") or [])
            for w, keys in windows.items()
        ):
            return True
        time.sleep(1.0)
    return False


def _store_instances(stack: Stack) -> set[str]:
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    url = f"{stack.urls['healthcare']}/v1/{stack.config.store_name}/dicomWeb"
    client = DICOMwebClient(url=url, session=session)
    found: set[str] = set()
    offset = 0
    try:
        while True:
            page = client.search_for_instances(offset=offset, limit=1000, fields=["00080018"])
            found.update(i["00080018"]["Value"][0] for i in page)
            if len(page) < 1000:
                return found
            offset += len(page)
    finally:
        session.close()


def demo_config(home: Path) -> StackConfig:
    """The demo's local cloud: short batch windows and a fast minute tick."""
    base = StackConfig.from_env({"LOCALCLOUD_HOME": str(home)})
    return StackConfig(
        home=home,
        minute_interval=TICK_SECONDS,
        functions_source=base.functions_source,
        function_env=DEMO_FUNCTION_ENV,
    )


def run_flow(stack: Stack, console: Console, stages: Stages | None = None) -> dict[str, Any]:
    """Upload, wait for every outcome, export, read alerts and the store: the summary dict.

    The stack must be started; it is left running, so that callers can inspect it.
    """
    stages = stages or Stages()
    corpus = _corpus()
    gcs = stack.storage_client()
    try:
        stages.run(console, f"upload {len(corpus)} files", lambda: _upload(stack, gcs, corpus))
        found: dict[str, Outcome] = stages.run(
            console,
            "ingest, import and verify",
            lambda: _wait_settled(stack, gcs, len(corpus), console),
        )
        prefix, exported, manifest = stages.run(
            console, "export the store", lambda: _export(stack, gcs)
        )
        stages.run(
            console, "alert on quarantined files", lambda: _wait_quarantine_alerts(stack, gcs)
        )
        restored = stages.run(
            console,
            "restore the backup into a second store",
            lambda: _restore(stack, manifest),
        )
        alerts = stack.drain_alerts()
        stored = _store_instances(stack)
        staging = gcs.bucket(stack.config.staging_bucket)
        batches = {o.batch for o in found.values() if o.batch}
        operations = sum(
            1 for n in objects.names(staging, BATCH_STATE_PREFIX) if n.endswith("/operation.json")
        )
    finally:
        gcs.close()
    markers = leaks.corpus_markers(corpus)
    leaked = leaks.scan_run(stack.config.home, alerts, markers)
    totals = outcomes.totals(found.values())
    reasons = Counter(
        feeds.reason_code(o.reason) for o in found.values() if o.status == outcomes.QUARANTINED
    )
    return {
        "uploaded": len(corpus),
        "records": len(found),
        "totals": totals,
        "quarantineReasons": dict(reasons.most_common()),
        "batches": len(batches),
        "importOperations": operations,
        "storeInstances": len(stored),
        "alerts": dict(sorted(Counter(str(a.get("kind")) for a in alerts).items())),
        "backup": {
            "prefix": prefix,
            "objects": exported,
            "complete": bool(manifest and manifest.get("complete")),
        },
        "restore": _restore_summary(restored),
        "stages": {name: round(seconds, 2) for name, seconds in stages.seconds.items()},
        "leakScan": {
            "logLines": len(leaks.function_log_lines(stack.config.home)),
            "alerts": len(alerts),
            "markers": markers.counts(),
            "found": leaked,
        },
        "problems": check_invariants(
            len(corpus), list(found.values()), stored, len(batches), operations, manifest
        )
        + [f"restore: {p}" for p in restored.get("problems") or []]
        + leaked,
    }


def _restore_summary(result: dict[str, Any]) -> dict[str, Any]:
    checked = result.get("check") or {}
    return {
        "status": result.get("status"),
        "target": result.get("target"),
        "instances": checked.get("instances"),
        "present": checked.get("present"),
        "bytesChecked": checked.get("bytesChecked"),
        "bytesDifferent": checked.get("bytesDifferent"),
    }


def summary_table(summary: dict[str, Any]) -> Table:
    """The demo's summary as a table."""
    totals = summary["totals"]
    table = Table(title="dicomflow demo", show_header=False)
    table.add_row("files uploaded", str(summary["uploaded"]))
    for status in outcomes.STATUSES:
        if totals.get(status):
            table.add_row(f"  {status}", str(totals[status]))
    for reason, count in summary["quarantineReasons"].items():
        table.add_row(f"    quarantined: {reason}", str(count))
    table.add_row(
        "batches / import operations", f"{summary['batches']} / {summary['importOperations']}"
    )
    table.add_row("instances in the store", str(summary["storeInstances"]))
    for kind, count in summary["alerts"].items():
        table.add_row(f"alerts: {kind}", str(count))
    backup = summary["backup"]
    table.add_row("backup", f"{backup['prefix']} ({backup['objects']} objects)")
    table.add_row("backup manifest", "complete" if backup["complete"] else "NOT complete")
    restored = summary["restore"]
    table.add_row(
        "restored into a second store",
        f"{restored['status']}: {restored['present']} of {restored['instances']} instances, "
        f"{restored['bytesChecked']} compared byte for byte ({restored['bytesDifferent']} differ)",
    )
    scan = summary["leakScan"]
    table.add_row(
        "patient data in logs and alerts",
        f"{len(scan['found'])} kinds found in {scan['logLines']} log lines and "
        f"{scan['alerts']} alerts ({sum(scan['markers'].values())} markers)",
    )
    for name, seconds in summary["stages"].items():
        table.add_row(f"time: {name}", f"{seconds:.1f} s")
    return table


def run_demo(keep: bool = False, json_path: Path | None = None) -> int:
    """Run the demo; returns the process exit code. ``json_path`` gets the summary as JSON."""
    console = Console(width=max(110, Console().width))
    stages = Stages()
    home = Path(tempfile.mkdtemp(prefix="dicomflow-demo-"))
    (home / "logs").mkdir()
    log_stream = (home / "logs" / "demo.log").open("a")
    log.configure(stream=log_stream)
    config = demo_config(home)
    stack = Stack(config)
    stages.run(console, "start the local cloud", stack.start)
    try:
        summary = run_flow(stack, console, stages)
    finally:
        if keep:
            stack.write_state()
            console.print(f"local cloud left running; LOCALCLOUD_HOME={home}")
        else:
            stack.stop()
        log_stream.close()

    summary["stages"] = {name: round(seconds, 2) for name, seconds in stages.seconds.items()}
    console.print(summary_table(summary))
    console.print(runbook_line())
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for problem in summary["problems"]:
        console.print(f"[red]invariant broken:[/] {problem}")
    if not summary["problems"]:
        console.print("[green]every uploaded file is accounted for[/]")
    return 1 if summary["problems"] else 0


def runbook_line() -> str:
    """Where the alerts runbook is: relative to the working directory when inside it."""
    where = RUNBOOK.relative_to(Path.cwd()) if RUNBOOK.is_relative_to(Path.cwd()) else RUNBOOK
    return f"alerts: what each kind means and what to do is in {where}"


def check_invariants(
    uploaded: int,
    found: list[Outcome],
    stored: set[str],
    batches: int,
    operations: int,
    manifest: dict[str, Any] | None,
) -> list[str]:
    """What the demo must show; each broken invariant is one line."""
    problems = []
    if len(found) != uploaded:
        problems.append(f"{uploaded} files uploaded but {len(found)} with a record")
    unaccounted = [o for o in found if o.status not in outcomes.FINAL]
    if unaccounted:
        problems.append(f"{len(unaccounted)} files without a final outcome")
    settled = {
        o.record.sop
        for o in found
        if o.record is not None and o.record.sop and o.status in (IMPORTED, DUPLICATE)
    }
    if settled - stored:
        problems.append(f"{len(settled - stored)} files marked imported are not in the store")
    if operations > batches:
        problems.append(f"{operations} import operations for {batches} batches")
    if manifest is None or not manifest.get("complete"):
        problems.append("the backup has no complete manifest")
    return problems
