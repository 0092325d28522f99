"""dicomflow against two per-file baselines: a burst of uploads, then a steady load.

Three strategies, each on a fresh local cloud with the same files and the same
emulator settings (a per-operation start latency and a concurrency quota, 429
beyond it):

- ``dicomflow`` (``main.py``): staging copies, windows sealed into batches, at
  most K imports at once;
- ``import`` (``bench/baseline/main.py``): one ``dicomStores.import`` per
  finalize event, raise on 429 so that the event is redelivered;
- ``stow`` (``bench/baseline/stow.py``): download each object and POST it to the
  store (STOW-RS); it never meets the import quota.

Upload events are redelivered on Eventarc's schedule (exponential from 10 s,
capped at 600 s, with jitter) scaled by ``TIME_SCALE`` like dicomflow's windows
and the emulator's operation latency: everything runs ten times faster than on
Google Cloud, so the ratios between strategies hold.

Two phases per strategy:

- burst: ``--instances`` uploads at once, with ``--workers`` ingest processes
  (``LOCALCLOUD_INGEST_WORKERS``; the table shows 1 and 4). Measured: seconds
  until every instance is in the store (dicomflow: and its outcomes are final),
  import operations, 429s, Storage and Healthcare calls per file (counted by a
  proxy in front of each service, ``localcloud.harness``), invocations and the
  seconds each took, CPU ms per event. A strategy that does not finish within
  ``--timeout`` is shown with how far it got and the rate it reached.
- steady: ``--rate`` uploads a second for ``--steady-seconds`` (below every
  strategy's saturation), one ingest process. Measured per file: seconds from
  its upload to its instance in the store (p50, p99), ingest request seconds,
  CPU ms per event, and the lag from the last upload until all are in the store
  minus the parts that are configuration (dicomflow: the rest of the window,
  the seal grace, one tick, the operation latency; import: the operation
  latency; STOW-RS: nothing).

Then the cost model (``bench/cost.py``) per million files, contended (the
burst) and uncontended (the steady load), for 0.5 MB and 20 MB files.

dicomflow's ticks cost calls whether files arrive or not: the calls of idle
ticks, counted for ``--idle`` seconds after its burst, times the seconds
counted, are taken out of its per-file figures and priced apart as a monthly
fixed cost.

Usage: ``python bench/ingest_burst.py [--instances N] [--only STRATEGY ...]``;
the default is the full size, 5,000 instances (results ``ingest_burst_5000.json``;
more than 500 are named by their size); ``make bench`` runs 100 (``ingest_burst.json``).
With ``--only``, those strategies run and write ``ingest_burst_<N>_<strategies>.json``.
``--recost RESULT`` derives the costs and the table again from a result's measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cost

from dicomflow import log
from dicomflow.ops import outcomes
from localcloud.corpus import generate_studies
from localcloud.harness import MeasuredStack, process_usage

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SOURCES = {
    "dicomflow": ROOT / "main.py",
    "import": ROOT / "bench" / "baseline" / "main.py",
    "stow": ROOT / "bench" / "baseline" / "stow.py",
}
LABELS = {"dicomflow": "dicomflow", "import": "per-file import", "stow": "per-file STOW-RS"}
TICK_SECONDS = 2.0
# Every time of the rig is a tenth of Google Cloud's: dicomflow's windows (60 s -> 6 s),
# the emulator's operation latency, the tick (60 s -> 2 s is faster still) and
# Eventarc's redelivery schedule (Pub/Sub push: 10 s doubling to 600 s, with jitter).
TIME_SCALE = 0.1
EVENTARC_RETRY = (10.0 * TIME_SCALE, 600.0 * TIME_SCALE, 0.5)
DICOMFLOW_ENV = {
    "DICOMFLOW_BATCH_WINDOW_SECONDS": "6",
    "DICOMFLOW_LATE_WINDOW_SECONDS": "60",
    "DICOMFLOW_SEAL_GRACE_SECONDS": "4",
}
CLASS_A = cost.CLASS_A
CLASS_B = cost.CLASS_B


@dataclass(frozen=True)
class File:
    name: str
    data: bytes
    sop: str


def corpus(count: int, tag: str = "burst") -> list[File]:
    """``count`` small CT instances in studies of 2 series x 50 instances."""
    studies = -(-count // 100)
    files = [
        File(
            f"{tag}/{g.study_uid[-10:]}/{g.series_uid[-10:]}/{g.sop_uid[-12:]}.dcm",
            g.data,
            g.sop_uid,
        )
        for g in generate_studies(studies, 2, 50, patient_name=f"BENCH^{tag.upper()}")
    ]
    return files[:count]


def _put(stack: MeasuredStack) -> Callable[[File], float]:
    bucket = stack.stack.storage_client().bucket(stack.stack.config.landing_bucket)

    def put(item: File) -> float:
        bucket.blob(item.name).upload_from_string(item.data, content_type="application/dicom")
        return time.time()

    return put


def upload(stack: MeasuredStack, files: list[File], workers: int = 8) -> None:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(_put(stack), files))


def _operations(stack: MeasuredStack) -> int:
    import sqlite3

    index = stack.stack.config.home / "healthcare" / "index.sqlite3"
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        return int(
            db.execute(
                "SELECT count(*) FROM operations WHERE body LIKE '%ImportDicomData%'"
            ).fetchone()[0]
        )
    finally:
        db.close()


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of ``values``, nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _start(
    strategy: str, args: argparse.Namespace, workers: int, tag: str
) -> tuple[MeasuredStack, Path]:
    home = Path(tempfile.mkdtemp(prefix=f"bench-{strategy}-{tag}-"))
    measured = MeasuredStack.start(
        home,
        function_env=DICOMFLOW_ENV if strategy == "dicomflow" else {},
        functions_source=SOURCES[strategy],
        minute_interval=TICK_SECONDS,
        operation_latency=args.latency,
        max_concurrent_ops=args.quota,
        ingest_workers=workers,
        event_retry=EVENTARC_RETRY,
    )
    if strategy == "dicomflow":
        # The first ticks of a deployment write its cursors once; they are not the
        # fixed cost, nor any file's.
        time.sleep(3 * TICK_SECONDS)
    return measured, home


def _request_seconds(measured: MeasuredStack) -> dict[str, list[float]]:
    """Seconds of every delivery attempt so far: upload events, and ticks by function."""
    stack = measured.stack
    assert stack.deliverer is not None and stack.tick_deliverer is not None
    ingest = stack.urls["ingest"]
    events = list(stack.deliverer.attempt_seconds.get(ingest, []))
    ticks = [
        d for durations in list(stack.tick_deliverer.attempt_seconds.values()) for d in durations
    ]
    return {"events": events, "ticks": ticks}


def burst(
    strategy: str, files: list[File], args: argparse.Namespace, workers: int
) -> dict[str, Any]:
    """All files at once on a fresh local cloud; the burst's measurements."""
    measured, _ = _start(strategy, args, workers, f"burst{workers}")
    stack = measured.stack
    settled = outcomes_final(len(files)) if strategy == "dicomflow" else None
    idle_seconds = args.idle if strategy == "dicomflow" and workers == 1 else 0.0
    try:
        idle_before = idle_ticks(measured, idle_seconds) if idle_seconds else None
        before = process_usage(stack.process_ids("ingest"))
        measured.storage_proxy.reset()
        measured.healthcare_proxy.reset()
        invocations0 = measured.invocations()
        requests0 = {k: len(v) for k, v in _request_seconds(measured).items()}
        timeline: list[tuple[float, int]] = [(0.0, 0)]
        started = time.monotonic()
        upload_seconds = complete_seconds = None
        with ThreadPoolExecutor(1) as pool:
            uploading = pool.submit(upload, measured, files)
            while time.monotonic() - started < args.timeout:
                time.sleep(0.5)
                now = time.monotonic() - started
                if upload_seconds is None and uploading.done():
                    uploading.result()
                    upload_seconds = now
                count = measured.store_count()
                timeline.append((round(now, 2), count))
                if count >= len(files) and upload_seconds is not None:
                    complete_seconds = now
                    break
        # dicomflow's work is not over when the store is full: report verifies and cleans up.
        settle_seconds = None
        if settled is not None and complete_seconds is not None:
            while time.monotonic() - started < args.timeout:
                if settled(measured):
                    settle_seconds = time.monotonic() - started
                    break
                time.sleep(1.0)
        usage = process_usage(stack.process_ids("ingest"))
        report_usage = process_usage(stack.process_ids("report"))
        storage = measured.storage_proxy.snapshot()
        healthcare = measured.healthcare_proxy.snapshot()
        invocations = measured.invocations() - invocations0
        seconds = {k: v[requests0[k] :] for k, v in _request_seconds(measured).items()}
        busy_seconds = time.monotonic() - started
        idle = None
        if idle_seconds and settle_seconds is not None:
            idle = idle_ticks(measured, idle_seconds)
        operations = _operations(measured)
    finally:
        measured.stop()
    n = len(files)
    in_store = timeline[-1][1]
    measured_for = timeline[-1][0]
    return {
        "strategy": strategy,
        "workers": workers,
        "files": n,
        "complete": complete_seconds is not None,
        "uploadSeconds": round(upload_seconds or 0.0, 2),
        "secondsUntilAllInStore": round(complete_seconds, 2) if complete_seconds else None,
        "inStoreAtEnd": in_store,
        "secondsMeasured": round(measured_for, 2),
        "filesPerSecondReached": round(in_store / measured_for, 2) if measured_for else None,
        "secondsUntilOutcomesFinal": round(settle_seconds, 2) if settle_seconds else None,
        "importOperationsStarted": operations,
        "import429": healthcare["statuses"].get("import 429", 0),
        "storageCalls": storage["counts"],
        "storageCallsByArea": dict(sorted(storage["areas"].items(), key=lambda kv: -kv[1])[:20]),
        "healthcareCalls": healthcare["counts"],
        "secondsCounted": round(busy_seconds, 2),
        "idleBefore": idle_before,
        "idle": idle,
        "storageCallsPerFile": round(sum(storage["counts"].values()) / n, 2),
        "healthcareCallsPerFile": round(sum(healthcare["counts"].values()) / n, 3),
        "functionInvocations": invocations,
        "eventRequests": len(seconds["events"]),
        "billedSeconds": {k: round(cost.billed_seconds(v), 2) for k, v in seconds.items()},
        "ingestCpuMsPerFile": round((usage["cpuMs"] - before["cpuMs"]) / n, 2),
        "reportCpuMsPerFile": round(report_usage["cpuMs"] / n, 2),
        "ingestRssPeakMiB": round(usage["rssPeakMiB"], 1),
        "loadAverage": os.getloadavg()[0],
        "timeline": timeline,
    }


def steady(strategy: str, files: list[File], args: argparse.Namespace) -> dict[str, Any]:
    """``args.rate`` uploads a second on a fresh local cloud; per-file latencies."""
    measured, _ = _start(strategy, args, 1, "steady")
    stack = measured.stack
    uploaded: dict[str, float] = {}
    stored: dict[str, float] = {}
    try:
        before = process_usage(stack.process_ids("ingest"))
        measured.storage_proxy.reset()
        measured.healthcare_proxy.reset()
        invocations0 = measured.invocations()
        requests0 = {k: len(v) for k, v in _request_seconds(measured).items()}
        put = _put(measured)
        started = time.monotonic()

        def feed() -> None:
            with ThreadPoolExecutor(4) as pool:
                for i, item in enumerate(files):
                    time.sleep(max(0.0, started + i / args.rate - time.monotonic()))
                    pool.submit(lambda f: uploaded.__setitem__(f.sop, put(f)), item)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        deadline = started + len(files) / args.rate + args.timeout
        while time.monotonic() < deadline and len(stored) < len(files):
            now = time.time()
            for sop in measured.store_instances():
                stored.setdefault(sop, now)
            time.sleep(0.25)
        feeder.join(timeout=60)
        elapsed = time.monotonic() - started
        usage = process_usage(stack.process_ids("ingest"))
        storage = measured.storage_proxy.snapshot()
        healthcare = measured.healthcare_proxy.snapshot()
        invocations = measured.invocations() - invocations0
        seconds = {k: v[requests0[k] :] for k, v in _request_seconds(measured).items()}
        operations = _operations(measured)
    finally:
        measured.stop()
    n = len(files)
    latencies = [
        stored[f.sop] - uploaded[f.sop] for f in files if f.sop in stored and f.sop in uploaded
    ]
    last_upload = max(uploaded.values()) if uploaded else None
    all_stored = max(stored.values()) if len(stored) >= n else None
    lag = all_stored - last_upload if all_stored and last_upload else None
    configured = _configured_lag(strategy, last_upload, args) if last_upload else None
    return {
        "strategy": strategy,
        "files": n,
        "rate": args.rate,
        "complete": len(stored) >= n,
        "inStoreAtEnd": len(stored),
        "secondsCounted": round(elapsed, 2),
        "latencySeconds": {
            "p50": _round(percentile(latencies, 0.5)),
            "p99": _round(percentile(latencies, 0.99)),
            "max": _round(max(latencies) if latencies else None),
        },
        "ingestRequestSeconds": {
            "p50": _round(percentile(seconds["events"], 0.5), 3),
            "p99": _round(percentile(seconds["events"], 0.99), 3),
        },
        "lastUploadToAllInStoreSeconds": _round(lag),
        "configuredPartSeconds": _round(configured),
        "lagBeyondConfiguredSeconds": _round(lag - configured)
        if lag and configured is not None
        else None,
        "importOperationsStarted": operations,
        "import429": healthcare["statuses"].get("import 429", 0),
        "storageCalls": storage["counts"],
        "healthcareCalls": healthcare["counts"],
        "functionInvocations": invocations,
        "eventRequests": len(seconds["events"]),
        "billedSeconds": {k: round(cost.billed_seconds(v), 2) for k, v in seconds.items()},
        "ingestCpuMsPerFile": round((usage["cpuMs"] - before["cpuMs"]) / n, 2),
        "loadAverage": os.getloadavg()[0],
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _configured_lag(strategy: str, last_upload: float, args: argparse.Namespace) -> float:
    """Seconds from the last upload until all are in store that the settings account for."""
    if strategy == "stow":
        return 0.0
    if strategy == "import":
        return args.latency
    window = float(DICOMFLOW_ENV["DICOMFLOW_BATCH_WINDOW_SECONDS"])
    rest_of_window = window - last_upload % window
    grace = float(DICOMFLOW_ENV["DICOMFLOW_SEAL_GRACE_SECONDS"])
    return rest_of_window + grace + TICK_SECONDS + args.latency


def idle_ticks(measured: MeasuredStack, seconds: float) -> dict[str, Any]:
    """The calls of ``seconds`` of idle ticks (ingest and report every TICK_SECONDS)."""
    measured.storage_proxy.reset()
    measured.healthcare_proxy.reset()
    invocations0 = measured.invocations()
    ticks0 = len(_request_seconds(measured)["ticks"])
    time.sleep(seconds)
    storage = measured.storage_proxy.snapshot()["counts"]
    healthcare = measured.healthcare_proxy.snapshot()["counts"]
    invocations = measured.invocations() - invocations0
    tick_seconds = _request_seconds(measured)["ticks"][ticks0:]
    # A tick is one ingest and one report invocation; the daily export tick never falls in.
    ticks = max(1.0, invocations / 2)
    return {
        "seconds": seconds,
        "ticks": ticks,
        "invocations": invocations,
        "storageCalls": sum(storage.values()),
        "storageCallsByOperation": storage,
        "healthcareCalls": sum(healthcare.values()),
        "healthcareCallsByOperation": healthcare,
        "billedSeconds": round(cost.billed_seconds(tick_seconds), 2),
        "perTick": {
            "storage": {op: round(n / ticks, 2) for op, n in sorted(storage.items())},
            "healthcare": {op: round(n / ticks, 2) for op, n in sorted(healthcare.items())},
        },
    }


def outcomes_final(expected: int) -> Callable[[MeasuredStack], bool]:
    """Every file has a final outcome (its batch is verified): summaries first, which
    are cheap; the per-file listing only once they add up."""

    def check(measured: MeasuredStack) -> bool:
        staging = measured.stack.storage_client().bucket(measured.stack.config.staging_bucket)
        verified = sum(s["counts"]["total"] for s in outcomes.summaries(staging))
        if verified < expected:
            return False
        found = outcomes.read_all(staging)
        return len(found) >= expected and all(o.status in outcomes.FINAL for o in found.values())

    return check


def marginal(result: dict[str, Any], idle: dict[str, Any] | None) -> dict[str, Any]:
    """Calls per file with the schedule's fixed cost taken out.

    ``idle`` (dicomflow's idle ticks) gives the fixed rate of calls, invocations and
    billed tick seconds; that rate times the seconds counted is subtracted before
    dividing by the files. The baselines have no ticks (``idle`` None).
    ``fixedPerTick``: one idle tick interval (all functions), which on the deployed
    schedule (one tick a minute) is the cost of being deployed.
    """
    n = result["files"]
    seconds = result["secondsCounted"]

    def rate(count: float) -> float:
        return count / idle["seconds"] if idle else 0.0

    idle_ops = idle["storageCallsByOperation"] if idle else {}
    idle_hc = idle["healthcareCallsByOperation"] if idle else {}
    storage = {
        op: max(0.0, (count - rate(idle_ops.get(op, 0)) * seconds) / n)
        for op, count in result["storageCalls"].items()
    }
    healthcare = {
        op: max(0.0, (count - rate(idle_hc.get(op, 0)) * seconds) / n)
        for op, count in result["healthcareCalls"].items()
    }
    billed = result["billedSeconds"]
    # dicomflow's ticks do per-file work (seals, imports); the baselines' ticks reach
    # functions that ignore them and would not be deployed: only their events count.
    tick_billed = max(0.0, billed["ticks"] - rate(idle["billedSeconds"]) * seconds) if idle else 0.0
    invocations = (
        result["functionInvocations"] - rate(idle["invocations"]) * seconds
        if idle
        else result["eventRequests"]
    )
    return {
        "storageCallsPerFile": {op: round(v, 3) for op, v in storage.items()},
        "storageCallsPerFileTotal": round(sum(storage.values()), 3),
        "classAPerFile": round(sum(v for op, v in storage.items() if op in CLASS_A), 3),
        "classBPerFile": round(sum(v for op, v in storage.items() if op in CLASS_B), 3),
        "healthcareCallsPerFile": {op: round(v, 4) for op, v in healthcare.items()},
        "healthcareCallsPerFileTotal": round(sum(healthcare.values()), 4),
        "invocationsPerFile": round(max(0.0, invocations) / n, 3),
        "billedSecondsPerFile": round((billed["events"] + tick_billed) / n, 4),
        "fixedPerTick": {
            "storageCalls": {
                op: round(rate(c) * TICK_SECONDS, 2) for op, c in sorted(idle_ops.items())
            },
            "healthcareCalls": round(
                rate(idle["healthcareCalls"] if idle else 0) * TICK_SECONDS, 2
            ),
            "invocations": round(rate(idle["invocations"] if idle else 0) * TICK_SECONDS, 2),
            "billedSeconds": round(rate(idle["billedSeconds"] if idle else 0) * TICK_SECONDS, 3),
        },
    }


def costs(strategy: str, result: dict[str, Any], idle: dict[str, Any] | None) -> dict[str, Any]:
    """USD per million files for each file size, from ``result``'s marginal counts."""
    per = marginal(result, idle)
    per_file = cost.PerFile(
        storage=per["storageCallsPerFile"],
        healthcare=per["healthcareCallsPerFile"],
        invocations=per["invocationsPerFile"],
        billed_seconds=per["billedSecondsPerFile"],
        cpu_ms=result["ingestCpuMsPerFile"],
        keeps_copy=strategy == "dicomflow",
        bytes_through=2.0 if strategy == "stow" else 0.0,
    )
    return {
        "marginal": per,
        "usd": {f"{mb:g}": cost.usd_per_million(per_file, mb) for mb in cost.FILE_SIZES_MB},
    }


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _time_in_store(run: dict[str, Any]) -> str:
    if run["secondsUntilAllInStore"] is not None:
        return _shown(run["secondsUntilAllInStore"])
    # Did not finish: how far it got, and the rate it reached.
    return (
        f">{run['secondsMeasured']:.0f} ({run['inStoreAtEnd']}/{run['files']}, "
        f"{run['filesPerSecondReached']}/s)"
    )


def table(out: dict[str, Any]) -> str:
    """The one table: each strategy's column, the rows the README quotes."""
    names = [s for s in SOURCES if s in out["strategies"]]
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("burst N=1: first upload -> all in store, s", lambda r: _time_in_store(r["burst1"])),
        ("burst N=4: first upload -> all in store, s", lambda r: _time_in_store(r["burst4"])),
        ("burst: import operations", lambda r: _shown(r["burst1"]["importOperationsStarted"])),
        ("burst: 429s met on import", lambda r: _shown(r["burst1"]["import429"])),
        (
            "burst: Storage calls per file (A / B)",
            lambda r: (
                f"{r['contended']['marginal']['classAPerFile']:.2f} / "
                f"{r['contended']['marginal']['classBPerFile']:.2f}"
            ),
        ),
        (
            "burst: Healthcare calls per file",
            lambda r: f"{r['contended']['marginal']['healthcareCallsPerFileTotal']:.3f}",
        ),
        (
            "burst: invocations per file",
            lambda r: _shown(r["contended"]["marginal"]["invocationsPerFile"]),
        ),
        ("steady: ingest CPU ms per event", lambda r: _shown(r["steady"]["ingestCpuMsPerFile"])),
        (
            "steady: upload -> store p50 / p99, s",
            lambda r: (
                f"{_shown(r['steady']['latencySeconds']['p50'])} / "
                f"{_shown(r['steady']['latencySeconds']['p99'])}"
            ),
        ),
        (
            "steady: ingest request p50 / p99, ms",
            lambda r: (
                f"{_ms(r['steady']['ingestRequestSeconds']['p50'])} / "
                f"{_ms(r['steady']['ingestRequestSeconds']['p99'])}"
            ),
        ),
        (
            "steady: lag beyond configured parts, s",
            lambda r: _shown(r["steady"]["lagBeyondConfiguredSeconds"]),
        ),
    ]
    for mb in cost.FILE_SIZES_MB:
        for case in ("contended", "uncontended"):
            rows.append(
                (
                    f"USD per million files, {case}, {mb:g} MB",
                    lambda r, c=case, m=mb: _shown(r[c]["usd"][f"{m:g}"]["total"]),
                )
            )
    width = 44
    header = f"{'':{width}}" + "".join(f"{LABELS[s]:>26}" for s in names)
    lines = [header]
    for label, cell in rows:
        values = []
        for s in names:
            try:
                values.append(cell(out["strategies"][s]))
            except (KeyError, TypeError):
                values.append("-")
        lines.append(f"{label:{width}}" + "".join(f"{v:>26}" for v in values))
    return "\n".join(lines)


def chart(out: dict[str, Any], path: Path) -> None:
    """Instances in the store over time in the burst with one ingest process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for strategy, entry in out["strategies"].items():
        run = entry.get("burst1")
        if run:
            xs = [t for t, _ in run["timeline"]]
            ys = [c for _, c in run["timeline"]]
            ax.plot(xs, ys, label=LABELS[strategy], linewidth=2)
    ax.set_xlabel("seconds since the first upload")
    ax.set_ylabel("instances in the DICOM store")
    emulator = out["emulator"]
    ax.set_title(
        f"{out['instances']} uploads, {emulator['operationLatencySeconds']:g} s op latency, "
        f"{emulator['maxConcurrentOps']} concurrent ops, 1 ingest process"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _prices() -> dict[str, Any]:
    return {
        k: {"usd": v[0], "unit": v[1], "source": v[2], "note": v[3]} for k, v in cost.PRICES.items()
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--latency", type=float, default=2.0, help="operation start latency, s")
    parser.add_argument("--quota", type=int, default=5, help="concurrent operations allowed")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds a strategy's burst may take; if it does not finish, how far it got "
        "and the rate it reached are reported",
    )
    parser.add_argument("--rate", type=float, default=1.5, help="steady uploads per second")
    parser.add_argument("--steady-seconds", type=float, default=40.0, help="steady load length")
    parser.add_argument(
        "--idle", type=float, default=20.0, help="seconds of dicomflow's idle ticks counted"
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a dicomflow setting for this run, over the scaled-down defaults",
    )
    parser.add_argument(
        "--only", action="append", choices=tuple(SOURCES), help="run these strategies only"
    )
    parser.add_argument(
        "--workers",
        type=int,
        action="append",
        help="ingest processes in the burst (LOCALCLOUD_INGEST_WORKERS); default 1 and 4",
    )
    parser.add_argument("--no-steady", action="store_true", help="skip the steady load")
    parser.add_argument(
        "--recost",
        type=Path,
        metavar="RESULT",
        help="derive the costs and the table again from a result's measurements (after a "
        "change of prices or of the cost model), without running anything",
    )
    args = parser.parse_args()
    if args.recost:
        out = json.loads(args.recost.read_text())
        out["prices"] = _prices()
        for strategy, entry in out["strategies"].items():
            idle = entry.get("burst1", {}).get("idle")
            for case, run in (
                ("contended", entry.get("burst1")),
                ("uncontended", entry.get("steady")),
            ):
                if run:
                    entry[case] = costs(strategy, run, idle)
            if idle:
                fixed = marginal(entry["burst1"], idle)["fixedPerTick"]
                entry["fixedPerMonthUsd"] = cost.fixed_per_month(fixed, fixed["billedSeconds"])
        args.recost.write_text(json.dumps(out, indent=2) + "\n")
        print(table(out))
        print(f"\nwrote {args.recost}")
        return 0
    for pair in args.setting:
        name, _, value = pair.partition("=")
        DICOMFLOW_ENV[name.strip()] = value.strip()
    strategies = args.only or list(SOURCES)
    workers = args.workers or [1, 4]

    files = corpus(args.instances)
    steady_files = corpus(max(1, round(args.rate * args.steady_seconds)), tag="steady")
    log_stream = (Path(tempfile.mkdtemp(prefix="bench-burst-logs-")) / "bench.log").open("a")
    log.configure(stream=log_stream)
    print(
        f"{len(files)} instances, {sum(len(f.data) for f in files) / len(files):.0f} B each; "
        f"emulator: {args.latency:g} s start latency, {args.quota} concurrent operations; "
        f"redelivery {EVENTARC_RETRY[0]:g} s doubling to {EVENTARC_RETRY[1]:g} s; "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    out: dict[str, Any] = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "loadAverageAtStart": round(os.getloadavg()[0], 2),
        "instances": len(files),
        "instanceBytes": round(sum(len(f.data) for f in files) / len(files)),
        "emulator": {"operationLatencySeconds": args.latency, "maxConcurrentOps": args.quota},
        "timeScale": TIME_SCALE,
        "eventRetry": dict(
            zip(("firstSeconds", "largestSeconds", "jitter"), EVENTARC_RETRY, strict=True)
        ),
        "dicomflowSettings": {**DICOMFLOW_ENV, "tickSeconds": TICK_SECONDS},
        "steadyLoad": {"filesPerSecond": args.rate, "files": len(steady_files)},
        "prices": _prices(),
        "strategies": {},
    }
    for strategy in strategies:
        entry: dict[str, Any] = {}
        for n in workers:
            entry[f"burst{n}"] = run = burst(strategy, files, args, n)
            print(
                f"{LABELS[strategy]}, burst, {n} ingest process(es): {_time_in_store(run)} s "
                f"(load {run['loadAverage']:.2f})",
                flush=True,
            )
        idle = entry.get("burst1", {}).get("idle")
        if "burst1" in entry:
            entry["contended"] = costs(strategy, entry["burst1"], idle)
        if not args.no_steady:
            entry["steady"] = run = steady(strategy, steady_files, args)
            entry["uncontended"] = costs(strategy, run, idle)
            print(
                f"{LABELS[strategy]}, steady {args.rate:g}/s: "
                f"p50 {run['latencySeconds']['p50']} s, p99 {run['latencySeconds']['p99']} s "
                f"(load {run['loadAverage']:.2f})",
                flush=True,
            )
        if idle:
            fixed = marginal(entry["burst1"], idle)["fixedPerTick"]
            entry["fixedPerMonthUsd"] = cost.fixed_per_month(fixed, fixed["billedSeconds"])
        out["strategies"][strategy] = entry

    print()
    print(table(out))
    for strategy, entry in out["strategies"].items():
        if "fixedPerMonthUsd" in entry:
            print(
                f"{LABELS[strategy]}'s fixed cost, one tick a minute: "
                f"{entry['fixedPerMonthUsd']} USD a month"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.only and len(args.only) < len(SOURCES):
        path = RESULTS / f"ingest_burst_{len(files)}_{'_'.join(strategies)}.json"
    else:
        # ``make bench``'s size keeps the plain name; larger runs are named by their size.
        stem = "ingest_burst" if len(files) <= 500 else f"ingest_burst_{len(files)}"
        path = RESULTS / f"{stem}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    chart(out, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png').name}")
    finished = all(
        e[k]["complete"]
        for s, e in out["strategies"].items()
        if s == "dicomflow"
        for k in e
        if k.startswith("burst")
    )
    # A baseline running out of time is a finding (the rate it reached), not a failure.
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(main())
