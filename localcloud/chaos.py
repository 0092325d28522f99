"""Chaos run: uploads with broken files, repeated and reordered events, faults and crashes.

``run_chaos(m)`` starts a ``MeasuredStack`` (see ``localcloud.harness``) and:

- uploads ``m`` files, about 5 % of them broken (not DICOM, truncated, or
  without a SOP Instance UID), all named ``*.dcm``;
- delivers about 10 % of the finalize events twice and holds back about 20 %
  for up to 3 s, so they arrive out of order (``ChaosDeliverer``);
- fails 10 % of the functions' Cloud Storage calls with 429 or 503 (the
  fault proxy) and 10 % of their Healthcare calls (the emulator's knobs:
  429 on import, 503 or 429 on the others);
- lets 10 % of the functions' Cloud Storage writes take effect and then
  answers them with 503 (``after_fault_rate``: the response is lost, so the
  retry meets the function's own write);
- kills the ingest or the report function with SIGKILL at random moments and
  starts it again.

Then it waits until every upload has a final ledger entry, turns the faults
off, and ``check_invariants`` confirms: every valid file is in the store
exactly once and byte for byte; every broken file is quarantined with its
reason (copy and reason record present); the ledger holds one final entry per
upload and nothing else; no event was dead-lettered; and no alert was raised
except ``quarantined`` alerts covering the broken files.

Import faults are 429 only. A kill of ingest between the import intent and the
operation record leaves the batch to dicomflow's crash repair, which imports it
again after ``DICOMFLOW_IMPORT_RESTART_SECONDS`` (300 s). That delay is scaled
down to ``IMPORT_RESTART_SECONDS`` (30 s) here, as the batch window is (60 s to
5 s), through the functions' settings.

Event redelivery backs off exponentially up to ``max_backoff`` (30 s, about
Eventarc's pace; the suite's test uses 5 s so that its run stays short). When the
ledger does not settle in time, ``stats["stuck"]`` names the batches of the
entries not final and which of their markers exist (seal, file list, import
intent, operation record, open/active/finished state).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from google.api_core.exceptions import NotFound
from google.cloud import storage

from dicomflow import batches, ledger
from dicomflow.config import LEDGER_PREFIX
from localcloud.corpus import generate_studies
from localcloud.delivery import STORAGE_FINALIZED, Deliverer, Event
from localcloud.errors import LocalCloudError
from localcloud.eventarc import BucketWatcher
from localcloud.harness import MeasuredStack
from localcloud.ports import wait_http
from localcloud.stack import Stack

BROKEN_KINDS = ("not-dicom", "truncated", "missing-uid")
CHAOS_FUNCTION_ENV = {
    "DICOMFLOW_BATCH_WINDOW_SECONDS": "5",
    "DICOMFLOW_SEAL_GRACE_SECONDS": "2",
    "DICOMFLOW_BATCH_MAX_FILES": "500",
}
# The batch window is scaled from 60 s to 5 s; the crash-repair delay of an import
# whose starter was killed (DICOMFLOW_IMPORT_RESTART_SECONDS, 300 s) likewise.
IMPORT_RESTART_SECONDS = 30
HEALTHCARE_FAULTS = {
    "import": {"rate": 0.1, "status": 429},
    "operations.get": {"rate": 0.1, "status": 503},
    "operations.list": {"rate": 0.1, "status": 429},
    "dicomWeb.search": {"rate": 0.1, "status": 503},
    "dicomWeb.retrieve": {"rate": 0.1, "status": 429},
}


@dataclass(frozen=True)
class Upload:
    """One file of the chaos corpus and what must become of it."""

    name: str
    data: bytes
    broken: str | None  # the expected quarantine reason code, None for a valid file
    sop_uid: str | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def chaos_corpus(m: int, broken_share: float = 0.05, seed: int = 0) -> list[Upload]:
    """``m`` uploads, ``round(m * broken_share)`` of them broken, in shuffled order."""
    rng = random.Random(seed)
    broken = max(1, round(m * broken_share)) if broken_share > 0 else 0
    valid = m - broken
    uploads: list[Upload] = []
    generated = list(generate_studies(-(-valid // 50), 1, 50, patient_name="CHAOS^PATIENT"))
    for g in generated[:valid]:
        uploads.append(
            Upload(f"chaos/{g.study_uid[-8:]}/{g.sop_uid[-12:]}.dcm", g.data, None, g.sop_uid)
        )
    extra = list(generate_studies(1, 1, broken, patient_name="CHAOS^BROKEN"))
    for index, g in enumerate(extra):
        kind = BROKEN_KINDS[index % len(BROKEN_KINDS)]
        if kind == "not-dicom":
            data = rng.randbytes(200 + rng.randrange(2000))
        elif kind == "truncated":
            data = g.data[: len(g.data) - 40]
        else:
            ds = pydicom.dcmread(io.BytesIO(g.data))
            del ds.SOPInstanceUID
            buffer = io.BytesIO()
            ds.save_as(buffer)
            data = buffer.getvalue()
        uploads.append(Upload(f"chaos/broken/{kind}-{index:05d}.dcm", data, kind, None))
    rng.shuffle(uploads)
    return uploads


class ChaosDeliverer(Deliverer):
    """A ``Deliverer`` that repeats some finalize events and holds some back (reordering)."""

    def __init__(
        self,
        duplicate_share: float = 0.1,
        delay_share: float = 0.2,
        max_delay: float = 3.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._rng = random.Random(seed)
        self._duplicate_share = duplicate_share
        self._delay_share = delay_share
        self._max_delay = max_delay
        self._held: list[threading.Timer] = []
        self.duplicated = 0
        self.delayed = 0

    def submit(self, event: Event) -> None:
        if event.headers.get("ce-type") != STORAGE_FINALIZED:
            super().submit(event)
            return
        if self._rng.random() < self._duplicate_share:
            self.duplicated += 1
            copy = Event(event.target, dict(event.headers), event.body)
            self._later(copy, self._rng.uniform(0, self._max_delay))
        if self._rng.random() < self._delay_share:
            self.delayed += 1
            self._later(event, self._rng.uniform(0.5, self._max_delay))
        else:
            super().submit(event)

    def _later(self, event: Event, delay: float) -> None:
        timer = threading.Timer(delay, super().submit, args=(event,))
        timer.daemon = True
        self._held.append(timer)
        timer.start()

    def held(self) -> int:
        """Events still held back."""
        return sum(1 for t in self._held if t.is_alive())

    def stop(self) -> None:
        for timer in self._held:
            timer.cancel()
        super().stop()


class Killer:
    """Kills a random function of ``names`` every ``interval`` s (jittered), then restarts it."""

    def __init__(
        self, stack: Stack, names: tuple[str, ...], interval: float, seed: int = 0
    ) -> None:
        self._stack = stack
        self._names = names
        self._interval = interval
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-killer", daemon=True)
        self.kills: Counter[str] = Counter()
        self.errors: list[str] = []
        # Seconds from each kill until the function answered again (it is down meanwhile).
        self.down_seconds: list[float] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stop.wait(self._rng.uniform(0.3, 1.7) * self._interval):
            name = self._rng.choice(self._names)
            killed = time.monotonic()
            try:
                self._stack.restart(name)
                self.kills[name] += 1
                self.down_seconds.append(time.monotonic() - killed)
            except Exception as exc:  # keep going; the checker will see the damage
                self.errors.append(f"{name}: {exc}")


@dataclass
class ChaosResult:
    """What happened and what the checker found."""

    uploads: int
    broken: int
    problems: list[str]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _set_knobs(stack: Stack, values: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{stack.urls['healthcare']}/_emulator/knobs",
        data=json.dumps(values).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def _upload(client: storage.Client, stack: Stack, uploads: list[Upload]) -> dict[str, str]:
    """Upload in the given order; returns name -> generation."""
    bucket = client.bucket(stack.config.landing_bucket)

    def put(upload: Upload) -> tuple[str, str]:
        blob = bucket.blob(upload.name)
        blob.upload_from_string(upload.data, content_type="application/dicom")
        return upload.name, str(blob.generation)

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(put, uploads))


class LedgerReader:
    """The ledger, read again every round but downloading only entries that changed.

    ``ledger.list_entries`` downloads every entry; polled every 2 s at M = 5,000
    that is up to 5,000 reads a round (about 9 s of the harness's and
    fake-gcs-server's CPU, taken from the run it measures). One listing gives
    each entry's generation; only new generations are read.
    """

    def __init__(self, client: storage.Client, bucket: str) -> None:
        self._client = client
        self._bucket = client.bucket(bucket)
        self._seen: dict[str, tuple[int, ledger.Entry]] = {}
        self.downloads = 0

    def read(self) -> dict[str, ledger.Entry]:
        found: dict[str, tuple[int, ledger.Entry]] = {}
        for blob in self._client.list_blobs(self._bucket, prefix=LEDGER_PREFIX):
            if not blob.name.endswith(".json"):
                continue
            generation = int(blob.generation or 0)
            cached = self._seen.get(blob.name)
            if cached is None or cached[0] != generation:
                try:
                    data = blob.download_as_bytes()
                except NotFound:  # replaced since the listing: read it next round
                    continue
                self.downloads += 1
                cached = (generation, ledger.Entry.from_json(data))
            found[blob.name] = cached
        self._seen = found
        return {entry.key: entry for _, entry in found.values()}


def run_chaos(
    m: int,
    home: Path,
    *,
    seed: int = 1,
    fault_rate: float = 0.1,
    after_fault_rate: float = 0.1,
    kill_interval: float = 6.0,
    operation_latency: float = 1.0,
    max_concurrent_ops: int = 5,
    settle_timeout: float = 600.0,
    wait_quarantine_alerts: bool = True,
    max_backoff: float = 30.0,
    import_restart_seconds: int | None = IMPORT_RESTART_SECONDS,
    log: Any = print,
) -> ChaosResult:
    """Run the chaos scenario on a fresh local cloud in ``home`` and check the invariants.

    ``max_backoff`` caps the event redelivery backoff (seconds); ``import_restart_seconds``
    scales dicomflow's crash-repair delay (the DICOMFLOW_IMPORT_RESTART_SECONDS setting;
    None: the default 300 s). ``after_fault_rate`` is the share of the functions' Storage
    writes that take effect and are then answered with 503.
    """
    uploads = chaos_corpus(m, seed=seed)
    env = dict(CHAOS_FUNCTION_ENV)
    if import_restart_seconds is not None:
        env["DICOMFLOW_IMPORT_RESTART_SECONDS"] = str(import_restart_seconds)
    measured = MeasuredStack.start(
        home,
        function_env=env,
        minute_interval=2.0,
        operation_latency=operation_latency,
        max_concurrent_ops=max_concurrent_ops,
        seed=seed,
    )
    stack = measured.stack
    # One Storage client for the harness's own reads and uploads, closed at the end.
    client = stack.storage_client()
    deliverer = ChaosDeliverer(
        seed=seed, dead_letter=home / "chaos-dead-letter.ndjson", max_backoff=max_backoff
    )
    killer = Killer(stack, ("ingest", "report"), kill_interval, seed=seed)
    stats: dict[str, Any] = {"m": m, "seed": seed}
    try:
        # Our own watcher, delivering through the chaos deliverer.
        assert stack.watcher is not None
        stack.watcher.stop()
        watcher = BucketWatcher(
            client, stack.config.landing_bucket, stack.urls["ingest"], deliverer
        )
        stack.watcher = watcher
        watcher.start()
        measured.storage_proxy.fault_rate = fault_rate
        measured.storage_proxy.after_fault_rate = after_fault_rate
        if fault_rate:
            _set_knobs(
                stack,
                {"faults": {k: {**v, "rate": fault_rate} for k, v in HEALTHCARE_FAULTS.items()}},
            )
        started = time.monotonic()
        killer.start()
        generations = _upload(client, stack, uploads)
        stats["uploadSeconds"] = round(time.monotonic() - started, 1)
        log(f"uploaded {m} files in {stats['uploadSeconds']} s; waiting for the ledger")
        expected_keys = {
            ledger.ledger_key(stack.config.landing_bucket, u.name, generations[u.name]): u
            for u in uploads
        }
        deadline = started + settle_timeout
        reader = LedgerReader(client, stack.config.staging_bucket)
        entries: dict[str, ledger.Entry] = {}
        while time.monotonic() < deadline:
            time.sleep(2.0)
            try:
                entries = reader.read()
            except Exception as exc:  # the harness reads storage directly; retry next round
                log(f"ledger read failed: {exc}")
                continue
            final = sum(1 for e in entries.values() if e.status in ledger.FINAL)
            if len(entries) >= m and final == len(entries) and not deliverer.held():
                break
        killer.stop()
        stats["settleSeconds"] = round(time.monotonic() - started, 1)
        stats["revived"] = _revive(stack, ("ingest", "report"))
        stats["stuck"] = _stuck_batches(client, stack, entries)
        if stats["stuck"]:
            log(f"not final at the settle deadline: {stats['stuck']}")
        stats["kills"] = dict(killer.kills)
        stats["functionDownSeconds"] = {
            "total": round(sum(killer.down_seconds), 1),
            "max": round(max(killer.down_seconds, default=0.0), 1),
        }
        stats["settled"] = not stats["stuck"] and len(entries) >= m
        log(
            f"ledger {'settled' if stats['settled'] else 'NOT settled'} after "
            f"{stats['settleSeconds']} s; kills {dict(killer.kills)}"
        )
        # Faults off; let the report tick publish what is due (quarantine windows close late).
        measured.storage_proxy.fault_rate = 0.0
        measured.storage_proxy.after_fault_rate = 0.0
        _set_knobs(stack, {"faults": {}})
        alerts = measured.alerts()
        if wait_quarantine_alerts:
            broken = sum(1 for u in uploads if u.broken)
            until = time.monotonic() + 150
            while time.monotonic() < until:
                covered = _quarantine_alert_files(alerts)
                if covered >= broken:
                    break
                time.sleep(3.0)
                alerts += measured.alerts()
        deliverer.wait_idle(60)
        time.sleep(2 * 2.0)  # two more ticks: anything false would show now
        alerts += measured.alerts()
        entries = reader.read()
        stored = measured.store_instances()
        staging = client.bucket(stack.config.staging_bucket)
        quarantine_objects = {b.name: b for b in client.list_blobs(staging, prefix="quarantine/")}
        dead_file = home / "chaos-dead-letter.ndjson"
        dead = dead_file.read_text().splitlines() if dead_file.exists() else []
        storage = measured.storage_proxy.snapshot()
        healthcare = measured.healthcare_proxy.snapshot()
        stats.update(
            eventsDuplicated=deliverer.duplicated,
            eventsDelayed=deliverer.delayed,
            deliveryFailures=deliverer.failed_attempts,
            storageCalls=sum(storage["counts"].values()),
            storageFaults=sum(storage["faults"].values()),
            storageAfterFaults=sum(storage["after_faults"].values()),
            healthcareCalls=sum(healthcare["counts"].values()),
            healthcareFaultsOrQuota=sum(
                v for k, v in healthcare["statuses"].items() if k.endswith((" 429", " 503"))
            ),
            killErrors=killer.errors,
            alerts=dict(Counter(str(a.get("kind")) for a in alerts)),
        )
        problems = check_invariants(
            expected_keys, entries, stored, quarantine_objects, alerts, dead, wait_quarantine_alerts
        )
        stats["ledger"] = ledger.totals(list(entries.values()))
        stats["storedInstances"] = len(stored)
    finally:
        killer.stop()
        deliverer.stop()
        measured.stop()
        client.close()
    return ChaosResult(m, sum(1 for u in uploads if u.broken), problems, stats)


def _revive(stack: Stack, names: tuple[str, ...]) -> list[str]:
    """Restart each function that has exited or does not answer HTTP within 15 s.

    Seen in two of five M = 200 runs on a shared machine: after the killer's last
    restarts both functions refused connections although their processes were
    alive, so no tick ran after the settle and no quarantine alert was sent. The
    platform replaces an instance that fails its health check; so does this, and
    the run's ``revived`` stat says when it did.
    """
    revived: list[str] = []
    for name in names:
        if stack.ensure_running(name):
            revived.append(name)
            continue
        try:
            wait_http(stack.urls[name], 15, name)
        except LocalCloudError:
            stack.restart(name)
            revived.append(f"{name} (not answering)")
    return revived


def _stuck_batches(
    client: storage.Client, stack: Stack, entries: dict[str, ledger.Entry]
) -> dict[str, Any]:
    """For entries not final: their batches and which of each batch's markers exist.

    Tells a batch waiting to be sealed, imported, or verified from one whose import
    intent was left by a killed ingest (repaired after ``IMPORT_RESTART_SECONDS``).
    """
    waiting = Counter(
        f"{e.status}:{e.batch}" for e in entries.values() if e.status not in ledger.FINAL
    )
    if not waiting:
        return {}
    staging = client.bucket(stack.config.staging_bucket)
    markers = {
        "seal": batches.seal_name,
        "files": batches.files_name,
        "intent": batches.intent_name,
        "operation": batches.operation_name,
        "open": batches.open_name,
        "active": batches.active_name,
        "finished": batches.finished_name,
    }
    found: dict[str, Any] = {}
    for status_batch, count in sorted(waiting.items()):
        batch = status_batch.partition(":")[2]
        present: list[str] = []
        if batch and batch != "None":
            for label, name in markers.items():
                blob = staging.get_blob(name(batch))
                if blob is not None:
                    present.append(label)
                    if label == "intent":
                        present.append(f"intent@{blob.time_created:%H:%M:%S}")
        found[status_batch] = {"files": count, "markers": present}
    return found


def _quarantine_alert_files(alerts: list[dict[str, Any]]) -> int:
    by_id = {a.get("alertId"): a for a in alerts if a.get("kind") == "quarantined"}
    return sum(int((a.get("details") or {}).get("files") or 0) for a in by_id.values())


def check_invariants(
    expected: dict[str, Upload],
    entries: dict[str, ledger.Entry],
    stored: dict[str, str],
    quarantine_objects: dict[str, Any],
    alerts: list[dict[str, Any]],
    dead_letters: list[str],
    require_quarantine_alerts: bool,
) -> list[str]:
    """Every broken invariant, one line each (empty: all hold)."""
    problems: list[str] = []

    def report(what: str, items: list[str]) -> None:
        if items:
            problems.append(f"{len(items)} {what}: {', '.join(sorted(items)[:5])}")

    report(
        "uploads without a ledger entry", [u.name for k, u in expected.items() if k not in entries]
    )
    report("ledger entries for no upload", [k for k in entries if k not in expected])
    report(
        "entries not final",
        [f"{e.key}={e.status}" for e in entries.values() if e.status not in ledger.FINAL],
    )
    valid = {k: u for k, u in expected.items() if u.broken is None}
    broken = {k: u for k, u in expected.items() if u.broken is not None}
    report(
        "valid files not imported",
        [
            f"{u.name}={entries[k].status}:{entries[k].reason}"
            for k, u in valid.items()
            if k in entries and entries[k].status not in (ledger.IMPORTED, ledger.DUPLICATE)
        ],
    )
    report(
        "valid files missing from the store",
        [u.name for u in valid.values() if u.sop_uid not in stored],
    )
    report(
        "stored instances whose bytes differ",
        [u.name for u in valid.values() if u.sop_uid in stored and stored[u.sop_uid] != u.sha256],
    )
    wanted = {u.sop_uid for u in valid.values()}
    report(
        "instances in the store that were never uploaded as valid",
        [s for s in stored if s not in wanted],
    )
    for key, upload in broken.items():
        entry = entries.get(key)
        if entry is None:
            continue
        if entry.status != ledger.QUARANTINED:
            problems.append(f"broken {upload.name} is {entry.status}, not quarantined")
            continue
        if not entry.reason or not entry.reason.startswith(upload.broken or "?"):
            problems.append(f"broken {upload.name}: reason {entry.reason!r}, want {upload.broken}")
        copy = entry.quarantine or ""
        if copy not in quarantine_objects:
            problems.append(f"broken {upload.name}: no quarantine copy {copy}")
        elif copy.removesuffix(".dcm") + ".json" not in quarantine_objects:
            problems.append(f"broken {upload.name}: no reason record beside {copy}")
        elif quarantine_objects[copy].md5_hash != entry.source.md5Hash:
            problems.append(f"broken {upload.name}: quarantine copy differs from the upload")
    report("events dead-lettered", dead_letters)
    false_alerts = [
        f"{a.get('kind')}:{a.get('subject')}" for a in alerts if a.get("kind") != "quarantined"
    ]
    report("false alerts", sorted(set(false_alerts)))
    covered = _quarantine_alert_files(alerts)
    if covered > len(broken):
        problems.append(f"quarantined alerts cover {covered} files but {len(broken)} were broken")
    if require_quarantine_alerts and covered < len(broken):
        problems.append(f"quarantined alerts cover {covered} of {len(broken)} broken files")
    return problems
