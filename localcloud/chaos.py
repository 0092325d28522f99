"""Chaos run: uploads with broken and conflicting files, repeated and reordered events,
faults and crashes.

``run_chaos(m)`` uploads the corpus (``chaos_corpus``) to a ``MeasuredStack``, repeats
and holds back events (``ChaosDeliverer``), injects Storage and Healthcare faults, kills
functions (``Killer``), waits for every outcome and then ``check_invariants`` says
which invariant broke, if any.

See docs/architecture.md#chaos-run
"""

from __future__ import annotations

import base64
import hashlib
import io
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from google.cloud import storage

from dicomflow import alerts as alert_lib
from dicomflow import objects
from dicomflow.config import (
    BATCHES_PREFIX,
    DROPPED_PREFIX,
    MANIFESTS_PREFIX,
    QUARANTINE_PREFIX,
    load_settings,
)
from dicomflow.ops import outcomes
from dicomflow.ops.outcomes import Outcome
from dicomflow.pool import pmap
from dicomflow.staging import (
    BATCH_STATE_PREFIX,
    OPEN_PREFIX,
    FileRecord,
    file_key,
    quarantine_name,
    sealed_done_name,
    sealed_name,
    staged_name,
    summary_name,
)
from dicomflow.verify import CONFLICT, FAILED, SUCCESS
from localcloud import leaks
from localcloud.corpus import generate_studies
from localcloud.delivery import STORAGE_FINALIZED, Deliverer, Event
from localcloud.errors import LocalCloudError
from localcloud.eventarc import BucketWatcher
from localcloud.harness import MeasuredStack
from localcloud.healthcare import knobs
from localcloud.ports import wait_http
from localcloud.stack import Stack

BROKEN_KINDS = ("not-dicom", "truncated", "missing-uid")
# Alert kinds the corpus explains: broken files and conflicting pairs. Anything else
# (import_failed, operation_failed, stalled, backlog, dropped, ...) is a false alert.
EXPECTED_ALERTS = ("quarantined", "conflict")
CHAOS_FUNCTION_ENV = {
    "DICOMFLOW_BATCH_WINDOW_SECONDS": "5",
    "DICOMFLOW_SEAL_GRACE_SECONDS": "2",
    "DICOMFLOW_LATE_WINDOW_SECONDS": "10",
    "DICOMFLOW_BATCH_MAX_FILES": "500",
    # Enough samples that an alert names each of its files by key, so coverage is
    # checked per file; alerts with more files are checked by count.
    "DICOMFLOW_ALERT_SAMPLE_FILES": "100",
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
    pair: int | None = None  # both files of a same-SOP-UID, different-bytes pair share it

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def md5(self) -> str:
        """Base64 MD5, as Cloud Storage reports it."""
        return base64.b64encode(hashlib.md5(self.data).digest()).decode()


def chaos_corpus(
    m: int, broken_share: float = 0.05, conflict_share: float = 0.04, seed: int = 0
) -> list[Upload]:
    """``m`` uploads in shuffled order: ``round(m * broken_share)`` broken, and about
    ``m * conflict_share`` in same-SOP-UID, different-bytes pairs."""
    rng = random.Random(seed)
    broken = max(1, round(m * broken_share)) if broken_share > 0 else 0
    pairs = max(1, round(m * conflict_share / 2)) if conflict_share > 0 else 0
    valid = m - broken - pairs  # the first of each pair is one of these
    uploads: list[Upload] = []
    generated = list(generate_studies(-(-valid // 50), 1, 50, patient_name="CHAOS^PATIENT"))
    for index, g in enumerate(generated[:valid]):
        pair = index if index < pairs else None
        uploads.append(
            Upload(f"chaos/{g.study_uid[-8:]}/{g.sop_uid[-12:]}.dcm", g.data, None, g.sop_uid, pair)
        )
        if pair is not None:
            # The same UIDs with other pixel data: a conflict, whichever lands first.
            ds = pydicom.dcmread(io.BytesIO(g.data))
            ds.PixelData = bytes(255 - b for b in ds.PixelData)
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            name = f"chaos/{g.study_uid[-8:]}/{g.sop_uid[-12:]}-other.dcm"
            uploads.append(Upload(name, buffer.getvalue(), None, g.sop_uid, pair))
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
    """Kills a random function of ``names`` every ``interval`` s (jittered), then restarts it.

    The restarts run in the killer's own thread, and the stack starts each process
    with ``PR_SET_PDEATHSIG`` (``localcloud.ports.die_with_parent``), which Linux
    fires when the *thread* that forked the process exits, not its process. So
    ``stop`` only ends the kills; the thread lives on until ``close``, after the
    stack has stopped. Were it to exit at ``stop``, every function it had restarted
    would get SIGTERM at that moment and shut down gracefully: listener closed, an
    in-flight tick finished for up to gunicorn's 30 s graceful timeout, then exit. That
    is the function "alive but not answering" that ``_revive`` would find.
    """

    def __init__(
        self, stack: Stack, names: tuple[str, ...], interval: float, seed: int = 0
    ) -> None:
        self._stack = stack
        self._names = names
        self._interval = interval
        self._rng = random.Random(seed)
        self._killing = threading.Event()
        self._closed = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="chaos-killer", daemon=True)
        self.kills: Counter[str] = Counter()
        self.errors: list[str] = []
        # Seconds from each kill until the function answered again (it is down meanwhile).
        self.down_seconds: list[float] = []

    def start(self) -> None:
        self._killing.set()
        self._thread.start()

    def stop(self) -> None:
        """No more kills; waits for a restart under way to finish."""
        self._killing.clear()
        self._idle.wait(timeout=120)

    def close(self) -> None:
        """End the thread: only once the processes it started are stopped."""
        self.stop()
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._closed.wait(self._rng.uniform(0.3, 1.7) * self._interval):
            if not self._killing.is_set():
                continue
            name = self._rng.choice(self._names)
            self._idle.clear()
            try:
                if not self._killing.is_set():
                    continue
                killed = time.monotonic()
                self._stack.restart(name)
                self.kills[name] += 1
                self.down_seconds.append(time.monotonic() - killed)
            except Exception as exc:  # keep going; the checker will see the damage
                self.errors.append(f"{name}: {exc}")
            finally:
                self._idle.set()


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
    knobs.post(stack.urls["healthcare"], values)


def _upload(
    client: storage.Client, stack: Stack, uploads: list[Upload], pause: float
) -> dict[str, str]:
    """Upload in the given order, except that the later file of two pairs in three goes
    ``pause`` s after the rest, so that its pair spans windows even when the upload is
    quicker than one window. Returns name -> generation."""
    bucket = client.bucket(stack.config.landing_bucket)
    seen: set[int] = set()
    later: list[Upload] = []
    first: list[Upload] = []
    for upload in uploads:
        if upload.pair is not None and upload.pair in seen and upload.pair % 3:
            later.append(upload)
        else:
            first.append(upload)
        if upload.pair is not None:
            seen.add(upload.pair)

    def put(upload: Upload) -> tuple[str, str]:
        blob = bucket.blob(upload.name)
        blob.upload_from_string(upload.data, content_type="application/dicom")
        return upload.name, str(blob.generation)

    with ThreadPoolExecutor(8) as pool:
        generations = dict(pool.map(put, first))
        time.sleep(pause)
        generations.update(pool.map(put, later))
    return generations


class OutcomeReader:
    """``outcomes.read_all``, read again every round but reading only what can have changed.

    A verified batch's manifests do not change once its summary exists (the summary is
    written last, create-if-absent), so they are read once; a drop record is read
    once. Each round costs four listings (one per 1,000 objects) plus the reads of
    batches verified since the last round.
    """

    def __init__(self, client: storage.Client, bucket: str) -> None:
        self._bucket = client.bucket(bucket)
        self._verified: dict[str, list[dict[str, Any]]] = {}
        self._drops: dict[str, dict[str, Any] | None] = {}
        self.reads = 0
        # Keys with lines in more than one verified batch (two records of one generation).
        self.doubles: dict[str, list[str]] = {}
        # The staging copies of the last round (conflicts must keep theirs).
        self.staged_names: set[str] = set()

    def _verify_new(self) -> None:
        fresh = [b for b in outcomes.batch_ids(self._bucket) if b not in self._verified]

        def read(batch: str) -> list[dict[str, Any]] | None:
            if objects.read_json(self._bucket, summary_name(batch)) is None:
                return None  # still being verified: its manifests may be rewritten
            return outcomes.manifest_lines(self._bucket, batch)

        for batch, lines in zip(fresh, pmap(read, fresh), strict=True):
            self.reads += 1
            if lines is not None:
                self.reads += 2
                self._verified[batch] = lines

    def read(self) -> dict[str, Outcome]:
        self._verify_new()
        found: dict[str, Outcome] = {}
        for batch, lines in sorted(self._verified.items()):
            for line in lines:
                key = line["key"]
                if key in found:
                    self.doubles.setdefault(key, [str(found[key].batch)]).append(batch)
                    continue
                found[key] = Outcome.of_manifest(batch, line)
        for blob in objects.blobs(self._bucket, QUARANTINE_PREFIX):
            window = blob.name[len(QUARANTINE_PREFIX) :].split("/", 1)[0]
            record = FileRecord.from_blob(blob, window)
            if record is not None and record.key not in found:
                found[record.key] = Outcome(
                    record.key, outcomes.QUARANTINED, record.reason, None, window, record
                )
        names = [
            b.name for b in objects.blobs(self._bucket, DROPPED_PREFIX) if b.name.endswith(".json")
        ]
        fresh = [n for n in names if n not in self._drops]
        for name, doc in zip(
            fresh, pmap(lambda n: objects.read_json(self._bucket, n), fresh), strict=True
        ):
            self.reads += 1
            self._drops[name] = doc
        for name in names:
            doc = self._drops.get(name)
            if doc is not None and doc.get("key") and doc["key"] not in found:
                record = FileRecord.from_line(doc)
                found[record.key] = Outcome(
                    record.key, outcomes.DROPPED, doc.get("reason"), None, record.window, record
                )
        self.staged_names = set()
        for blob in objects.blobs(self._bucket, BATCHES_PREFIX):
            if not blob.name.endswith(".dcm"):
                continue
            self.staged_names.add(blob.name)
            window = blob.name[len(BATCHES_PREFIX) :].split("/", 1)[0]
            record = FileRecord.from_blob(blob, window)
            if record is not None and record.key not in found:
                found[record.key] = Outcome(record.key, outcomes.STAGED, None, None, window, record)
        # A file ingest could not read or copy (none is expected here: a failure to explain).
        for window, record in outcomes.failure_records(self._bucket):
            if record.key not in found:
                found[record.key] = Outcome(record.key, FAILED, record.reason, None, window, record)
        return found


class _FirstFaults:
    """Fails every call of each faulted Healthcare method until the Healthcare proxy has
    seen one fail with the method's fault status, then a ``rate`` share of them."""

    def __init__(self, stack: Stack, measured: MeasuredStack, rate: float) -> None:
        self._stack = stack
        self._measured = measured
        self._rate = rate
        self._pending = set(HEALTHCARE_FAULTS)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-first-faults", daemon=True)

    def start(self) -> None:
        self._apply()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _apply(self) -> None:
        faults = {
            method: {**fault, "rate": 1.0 if method in self._pending else self._rate}
            for method, fault in HEALTHCARE_FAULTS.items()
        }
        _set_knobs(self._stack, {"faults": faults})

    def _run(self) -> None:
        while self._pending and not self._stopped.wait(0.1):
            statuses = self._measured.healthcare_proxy.snapshot()["statuses"]
            fired = {
                method
                for method in self._pending
                if statuses.get(f"{method} {HEALTHCARE_FAULTS[method]['status']}", 0)
            }
            if fired and not self._stopped.is_set():
                self._pending -= fired
                self._apply()


def run_chaos(
    m: int,
    home: Path,
    *,
    seed: int = 1,
    fault_rate: float = 0.1,
    after_fault_rate: float = 0.1,
    every_fault: bool = False,
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
    writes that take effect and are then answered with 503. With ``every_fault``, each
    faulted Healthcare method fails every call until one has failed, and then a
    ``fault_rate`` share as the others do: a small run makes only a few calls of some
    methods (an import per batch), too few for a 10 % fault to be sure to happen.
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
    settings = load_settings({**stack.env(), **env})
    # One Storage client for the harness's own reads and uploads, closed at the end.
    client = stack.storage_client()
    deliverer = ChaosDeliverer(
        seed=seed, dead_letter=home / "chaos-dead-letter.ndjson", max_backoff=max_backoff
    )
    killer = Killer(stack, ("ingest", "report"), kill_interval, seed=seed)
    stats: dict[str, Any] = {"m": m, "seed": seed}
    problems: list[str] = []
    first_faults: _FirstFaults | None = None
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
        if every_fault:
            first_faults = _FirstFaults(stack, measured, fault_rate)
            first_faults.start()
        elif fault_rate:
            _set_knobs(
                stack,
                {"faults": {k: {**v, "rate": fault_rate} for k, v in HEALTHCARE_FAULTS.items()}},
            )
        started = time.monotonic()
        killer.start()
        # Past the late window too: under kills most deliveries go the late path.
        window = int(env["DICOMFLOW_LATE_WINDOW_SECONDS"])
        generations = _upload(client, stack, uploads, pause=window + 1.0)
        stats["uploadSeconds"] = round(time.monotonic() - started, 1)
        log(f"uploaded {m} files in {stats['uploadSeconds']} s; waiting for their outcomes")
        expected_keys = {
            file_key(stack.config.landing_bucket, u.name, generations[u.name]): u for u in uploads
        }
        deadline = started + settle_timeout
        reader = OutcomeReader(client, stack.config.staging_bucket)
        found: dict[str, Outcome] = {}
        while time.monotonic() < deadline:
            time.sleep(2.0)
            try:
                found = reader.read()
            except Exception as exc:  # the harness reads storage directly; retry next round
                log(f"outcome read failed: {exc}")
                continue
            final = sum(
                1 for k in expected_keys if k in found and found[k].status in outcomes.FINAL
            )
            if final == len(expected_keys) and not deliverer.held():
                break
        stats["finalSeconds"] = round(time.monotonic() - started, 1)
        killer.stop()
        stats["revived"] = _revive(stack, ("ingest", "report"))
        stats["stuck"] = _stuck_windows(client, stack, found)
        if stats["stuck"]:
            log(f"not final at the settle deadline: {stats['stuck']}")
        stats["kills"] = dict(killer.kills)
        stats["functionDownSeconds"] = {
            "total": round(sum(killer.down_seconds), 1),
            "max": round(max(killer.down_seconds, default=0.0), 1),
        }
        stats["settled"] = not stats["stuck"] and all(k in found for k in expected_keys)
        log(
            f"outcomes {'final' if stats['settled'] else 'NOT final'} after "
            f"{stats['finalSeconds']} s; kills {dict(killer.kills)}; revived {stats['revived']}"
        )
        # Faults off; let the report tick publish what is due (quarantine windows close late).
        if first_faults is not None:
            first_faults.stop()
        measured.storage_proxy.fault_rate = 0.0
        measured.storage_proxy.after_fault_rate = 0.0
        _set_knobs(stack, {"faults": {}})
        alerts = measured.alerts()
        if wait_quarantine_alerts:
            broken = {k for k, u in expected_keys.items() if u.broken}
            until = time.monotonic() + 150
            while time.monotonic() < until:
                if not _uncovered(broken, alerts, "quarantined", found, _window_of):
                    break
                time.sleep(3.0)
                alerts += measured.alerts()
        stats["alertsSeconds"] = round(time.monotonic() - started, 1)
        deliverer.wait_idle(60)
        time.sleep(2 * 2.0)  # two more ticks: anything false would show now
        alerts += measured.alerts()
        found = reader.read()
        stored = measured.store_instances()
        staging = client.bucket(stack.config.staging_bucket)
        quarantine_objects = {b.name: b for b in client.list_blobs(staging, prefix="quarantine/")}
        dead_file = home / "chaos-dead-letter.ndjson"
        dead = dead_file.read_text().splitlines() if dead_file.exists() else []
        storage_counts = measured.storage_proxy.snapshot()
        healthcare = measured.healthcare_proxy.snapshot()
        stats.update(
            eventsDuplicated=deliverer.duplicated,
            eventsDelayed=deliverer.delayed,
            deliveryFailures=deliverer.failed_attempts,
            storageCalls=sum(storage_counts["counts"].values()),
            storageFaults=sum(storage_counts["faults"].values()),
            storageAfterFaults=sum(storage_counts["after_faults"].values()),
            healthcareCalls=sum(healthcare["counts"].values()),
            healthcareCallsByMethod=dict(healthcare["counts"]),
            healthcareFaultsOrQuota=sum(
                v for k, v in healthcare["statuses"].items() if k.endswith((" 429", " 503"))
            ),
            killErrors=killer.errors,
            alerts=dict(Counter(str(a.get("kind")) for a in _unique(alerts))),
            harnessReads=reader.reads,
            faultsFired=_faults_fired(storage_counts, healthcare, killer, deliverer),
        )

        def label(upload: Upload) -> str:
            return alert_lib.object_label(settings, stack.config.landing_bucket, upload.name)

        problems = check_invariants(
            expected_keys,
            found,
            stored,
            quarantine_objects,
            alerts,
            dead,
            wait_quarantine_alerts,
            staged_names=reader.staged_names,
            doubles=reader.doubles,
            label=label,
        )
        if stats["revived"]:
            problems.append(f"{len(stats['revived'])} revivals: {', '.join(stats['revived'])}")
        markers = leaks.corpus_markers((u.name, u.data) for u in uploads)
        leaked = leaks.scan_run(stack.config.home, alerts, markers)
        stats["leakScan"] = {
            "logLines": len(leaks.function_log_lines(stack.config.home)),
            "alerts": len(alerts),
            "markers": markers.counts(),
            "found": len(leaked),
        }
        problems += leaked
        pairs = {u.pair for u in uploads if u.pair is not None}
        stats["outcomes"] = outcomes.totals(found[k] for k in expected_keys if k in found)
        stats["conflictPairs"] = len(pairs)
        stats["conflictsDetected"] = sum(
            1
            for k, u in expected_keys.items()
            if u.pair is not None and k in found and found[k].status == CONFLICT
        )
        batches_of: dict[int, set[str]] = defaultdict(set)
        for key, upload in expected_keys.items():
            if upload.pair is not None and key in found:
                batches_of[upload.pair].add(str(found[key].batch))
        stats["pairsAcrossBatches"] = sum(1 for b in batches_of.values() if len(b) > 1)
        stats["storedInstances"] = len(stored)
    finally:
        if first_faults is not None:
            first_faults.stop()
        killer.stop()
        deliverer.stop()
        measured.stop()
        killer.close()  # after the stop: see Killer
        client.close()
    return ChaosResult(m, sum(1 for u in uploads if u.broken), problems, stats)


def _faults_fired(
    storage_counts: dict[str, dict[str, int]],
    healthcare: dict[str, dict[str, int]],
    killer: Killer,
    deliverer: ChaosDeliverer,
) -> dict[str, int]:
    """How often each kind of fault the run injects happened: Storage 429 and 503 (the
    fault proxy's own answers: fake-gcs-server answers neither), Storage writes whose
    answer was lost, each Healthcare method's fault status (an import's 429 may also be
    the emulator's concurrency quota), each function's kills, repeated and delayed events.
    """
    lost = sum(storage_counts["after_faults"].values())

    def storage(status: int) -> int:
        return sum(n for k, n in storage_counts["statuses"].items() if k.endswith(f" {status}"))

    fired = {
        "storage 429": storage(429),
        "storage 503": storage(503) - lost,
        "storage lost answer": lost,
    }
    for method, fault in HEALTHCARE_FAULTS.items():
        key = f"{method} {fault['status']}"
        fired[f"healthcare {key}"] = healthcare["statuses"].get(key, 0)
    for name in ("ingest", "report"):
        fired[f"kill {name}"] = killer.kills[name]
    fired["event repeated"] = deliverer.duplicated
    fired["event delayed"] = deliverer.delayed
    return fired


def _revive(stack: Stack, names: tuple[str, ...]) -> list[str]:
    """Restart each function that has exited or does not answer HTTP within 15 s.

    The platform replaces an instance that fails its health check; so does this.
    A run that needs it fails (``run_chaos`` adds a problem): a function that
    stops answering after the kills would, on Cloud Run, just stop ticking.
    """
    revived: list[str] = []
    for name in names:
        if stack.ensure_running(name):
            revived.append(f"{name} (exited)")
            continue
        try:
            wait_http(stack.urls[name], 15, name)
        except LocalCloudError:
            stack.restart(name)
            revived.append(f"{name} (not answering)")
    return revived


def _stuck_windows(
    client: storage.Client, stack: Stack, found: dict[str, Outcome]
) -> dict[str, Any]:
    """For files still staged: their windows and which of each window's markers exist.

    Tells a window waiting to be sealed, imported, or verified from one whose import
    intent was left by a killed ingest (repaired after ``IMPORT_RESTART_SECONDS``).
    """
    waiting = Counter(str(o.window) for o in found.values() if o.status not in outcomes.FINAL)
    if not waiting:
        return {}
    staging = client.bucket(stack.config.staging_bucket)
    report: dict[str, Any] = {}
    for window, count in sorted(waiting.items()):
        present = [
            label
            for label, name in (("seal", sealed_name(window)), ("done", sealed_done_name(window)))
            if objects.exists(staging, name)
        ]
        present += [
            f"open:{n[len(OPEN_PREFIX) :]}"
            for n in objects.names(staging, f"{OPEN_PREFIX}{window}")
        ]
        for name in objects.names(staging, f"{BATCH_STATE_PREFIX}{window}"):
            blob = staging.get_blob(name)
            when = f"@{blob.time_created:%H:%M:%S}" if blob is not None else ""
            present.append(name[len(BATCH_STATE_PREFIX) :] + when)
        present += [
            n[len(MANIFESTS_PREFIX) :]
            for n in objects.names(staging, f"{MANIFESTS_PREFIX}{window}")
        ]
        report[window] = {"files": count, "markers": present}
    return report


def _unique(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One of each alert (``alertId`` is a hash of kind and subject; Pub/Sub may repeat)."""
    return list({str(a.get("alertId")): a for a in alerts}.values())


def _window_of(outcome: Outcome) -> str:
    return str(outcome.window)


def _batch_of(outcome: Outcome) -> str:
    return str(outcome.batch)


def _covered(
    alerts: list[dict[str, Any]], kind: str, scope_detail: str
) -> tuple[dict[str, dict[str, Any]], Counter[str]]:
    """Keys the alerts of ``kind`` name (key -> the alert), and per scope (window or
    batch) the files of alerts whose samples were cut short (counted, not named)."""
    keys: dict[str, dict[str, Any]] = {}
    unnamed: Counter[str] = Counter()
    for alert in _unique(alerts):
        if alert.get("kind") != kind:
            continue
        details = alert.get("details") or {}
        samples = [s for s in details.get("sampleFiles") or [] if s.get("key")]
        for sample in samples:
            keys[str(sample["key"])] = alert
        unnamed[str(details.get(scope_detail))] += max(
            0, int(details.get("files") or 0) - len(samples)
        )
    return keys, unnamed


_SCOPES = {"quarantined": "window", "conflict": "batch"}


def _uncovered(
    wanted: set[str],
    alerts: list[dict[str, Any]],
    kind: str,
    found: dict[str, Outcome],
    scope: Callable[[Outcome], str],
) -> list[str]:
    """The keys of ``wanted`` that no alert of ``kind`` names or counts."""
    keys, unnamed = _covered(alerts, kind, _SCOPES[kind])
    missing: list[str] = []
    for key in sorted(wanted):
        if key in keys:
            continue
        where = scope(found[key]) if key in found else ""
        if unnamed[where] > 0:
            unnamed[where] -= 1
            continue
        missing.append(key)
    return missing


def check_invariants(
    expected: dict[str, Upload],
    found: dict[str, Outcome],
    stored: dict[str, str],
    quarantine_objects: dict[str, Any],
    alerts: list[dict[str, Any]],
    dead_letters: list[str],
    require_quarantine_alerts: bool,
    *,
    staged_names: set[str] | None = None,
    doubles: dict[str, list[str]] | None = None,
    label: Callable[[Upload], str] | None = None,
) -> list[str]:
    """Every broken invariant, one line each (empty: all hold).

    ``found``: key -> outcome (``dicomflow.ops.outcomes``); ``stored``: SOP Instance UID ->
    SHA-256 of the stored bytes; ``staged_names``: the staging copies that exist;
    ``doubles``: keys with lines in several verified batches; ``label``: an upload's
    object label as alerts carry it.
    """
    problems: list[str] = []

    def report(what: str, items: list[str]) -> None:
        if items:
            problems.append(f"{len(items)} {what}: {', '.join(sorted(items)[:5])}")

    report("uploads without an outcome", [u.name for k, u in expected.items() if k not in found])
    report("outcomes for no upload", [k for k in found if k not in expected])
    report(
        "outcomes not final",
        [f"{o.key}={o.status}" for o in found.values() if o.status not in outcomes.FINAL],
    )
    report(
        "files with lines in several batches",
        [f"{k} in {','.join(b)}" for k, b in (doubles or {}).items()],
    )
    singles = {k: u for k, u in expected.items() if u.broken is None and u.pair is None}
    paired = {k: u for k, u in expected.items() if u.pair is not None}
    broken = {k: u for k, u in expected.items() if u.broken is not None}
    report(
        "valid files not imported",
        [
            f"{u.name}={found[k].status}:{found[k].reason}"
            for k, u in singles.items()
            if k in found and found[k].status not in SUCCESS
        ],
    )
    valid = [*singles.values(), *paired.values()]
    report(
        "valid files missing from the store",
        sorted({u.sop_uid or "?" for u in valid if u.sop_uid not in stored}),
    )
    # The bytes each stored SOP must hold: a single's own, a pair's imported one.
    want: dict[str, str] = {str(u.sop_uid): u.sha256 for u in singles.values()}
    by_pair: dict[int, list[tuple[str, Upload]]] = defaultdict(list)
    for key, upload in paired.items():
        by_pair[int(upload.pair or 0)].append((key, upload))
    conflicts: set[str] = set()
    for members in by_pair.values():
        statuses = [found[k].status if k in found else "none" for k, _ in members]
        winners = [u for (k, u), s in zip(members, statuses, strict=True) if s in SUCCESS]
        losers = [k for (k, _), s in zip(members, statuses, strict=True) if s == CONFLICT]
        if len(winners) != 1 or len(losers) != 1:
            problems.append(
                "conflicting pair without one imported and one conflict: "
                + ", ".join(f"{u.name}={s}" for (_, u), s in zip(members, statuses, strict=True))
            )
        if winners:
            want[str(winners[0].sop_uid)] = winners[0].sha256
        conflicts.update(losers)
    report(
        "stored instances whose bytes differ",
        [sop for sop, sha in want.items() if sop in stored and stored[sop] != sha],
    )
    report(
        "instances in the store that were never uploaded as valid",
        [s for s in stored if s not in want and s not in {u.sop_uid for u in valid}],
    )
    if staged_names is not None:
        report(
            "conflicts whose staging copy is gone",
            [
                expected[k].name
                for k in conflicts
                if staged_name(str(found[k].window), k) not in staged_names
            ],
        )
    for key, upload in broken.items():
        outcome = found.get(key)
        if outcome is None:
            continue
        if outcome.status != outcomes.QUARANTINED:
            problems.append(f"broken {upload.name} is {outcome.status}, not quarantined")
            continue
        if not outcome.reason or not outcome.reason.startswith(upload.broken or "?"):
            problems.append(
                f"broken {upload.name}: reason {outcome.reason!r}, want {upload.broken}"
            )
        copy = quarantine_name(str(outcome.window), key)
        if copy not in quarantine_objects:
            problems.append(f"broken {upload.name}: no quarantine copy {copy}")
        elif quarantine_objects[copy].md5_hash != upload.md5:
            problems.append(f"broken {upload.name}: quarantine copy differs from the upload")
    report("events dead-lettered", dead_letters)
    report(
        "false alerts",
        sorted(
            {
                f"{a.get('kind')}:{a.get('subject')}"
                for a in alerts
                if a.get("kind") not in EXPECTED_ALERTS
            }
        ),
    )
    for kind, wanted, scope in (
        ("conflict", conflicts, _batch_of),
        ("quarantined", set(broken), _window_of),
    ):
        named, unnamed = _covered(alerts, kind, _SCOPES[kind])
        report(f"{kind} alerts naming other files", [k for k in named if k not in wanted])
        extra = sum(unnamed.values()) + len(named) - len(wanted)
        if extra > 0:
            problems.append(f"{kind} alerts count {extra} files more than there are")
        if kind == "conflict" or require_quarantine_alerts:
            missing = _uncovered(wanted, alerts, kind, found, scope)
            if missing:
                problems.append(
                    f"{kind} alerts cover {len(wanted) - len(missing)} of {len(wanted)} files; "
                    f"missing: {', '.join(expected[k].name for k in missing[:5])}"
                )
        if label is not None:
            report(
                f"{kind} alerts whose samples lack the object label",
                [
                    expected[k].name
                    for k, a in named.items()
                    if k in expected
                    and label(expected[k]) not in ((a.get("details") or {}).get("samples") or [])
                ],
            )
    return problems
