"""A burst of uploads: dicomflow against the per-file-import baseline, in the same run.

N generated CT instances are uploaded at once to the landing bucket of a
fresh local cloud whose Healthcare emulator models a per-operation start
latency and a concurrency quota (429 beyond it). First dicomflow ingests them
(``main.py``), then, on another fresh local cloud with the same knobs and the
same files, the baseline (``bench/baseline/main.py``: one import per
finalize event, raise on 429 so the event is redelivered).

Measured for each: seconds from the first upload until every instance is in
the store; the upload time alone; import operations started and 429s met;
Storage and Healthcare calls per file (counted by a proxy in front of each
service, see ``localcloud.harness``); ingest CPU ms per file and peak RSS of
the ingest function's processes. dicomflow's counts include the report
function's verification and clean-up, measured until every ledger entry is
final. Then a cost model per million files from the call counts and public
list prices. Writes ``bench/results/ingest_burst.json`` and
``ingest_burst.png``.

Usage: ``python bench/ingest_burst.py [--instances N] [--latency S] [--quota K]
[--timeout S] [--baseline-timeout S] [--idle S] [--setting NAME=VALUE ...]
[--only dicomflow|baseline]``. The
default is the full size, 5,000 instances (results ``ingest_burst_5000.json``);
``make bench`` runs 150 (``ingest_burst.json``).

Calls per file are given twice: all calls divided by the files, and without the
schedule's fixed cost (the calls of idle ticks, measured for ``--idle`` seconds
after the run, times the seconds counted). The cost model prices the second, and
the fixed cost per month of one tick a minute apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomflow import log, outcomes
from localcloud.corpus import generate_studies
from localcloud.harness import MeasuredStack, process_usage

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BASELINE = ROOT / "bench" / "baseline" / "main.py"
TICK_SECONDS = 2.0
# dicomflow's windows scaled down with the emulator's start latency (seconds, not minutes):
# a tenth of the defaults (60 s windows, 600 s late windows).
DICOMFLOW_ENV = {
    "DICOMFLOW_BATCH_WINDOW_SECONDS": "6",
    "DICOMFLOW_LATE_WINDOW_SECONDS": "60",
    "DICOMFLOW_SEAL_GRACE_SECONDS": "4",
}

# Public list prices in USD, read on 2026-11-25 (the date of this benchmark's results).
PRICES_DATE = "2026-11-25"
PRICES = {
    # https://cloud.google.com/storage/pricing (Standard storage, regional)
    "storage_class_a_per_1000": 0.005,  # insert, rewrite/copy, list, patch
    "storage_class_b_per_1000": 0.0004,  # get (metadata and media)
    # https://cloud.google.com/functions/pricing (Cloud Run functions), beyond the free tier
    "function_invocations_per_million": 0.40,
    # https://cloud.google.com/healthcare-api/pricing: standard and multi-operation
    # requests, 25,000 to 1 billion a month
    "healthcare_requests_per_100000": 0.39,
}
CLASS_A = ("objects.insert", "objects.rewrite", "objects.copy", "objects.list", "objects.patch")
CLASS_B = ("objects.get", "objects.download")


def corpus(count: int) -> list[tuple[str, bytes]]:
    """``count`` small CT instances in studies of 2 series x 50 instances."""
    studies = -(-count // 100)
    files = [
        (f"burst/{g.study_uid[-10:]}/{g.series_uid[-10:]}/{g.sop_uid[-12:]}.dcm", g.data)
        for g in generate_studies(studies, 2, 50, patient_name="BENCH^BURST")
    ]
    return files[:count]


def upload(stack: MeasuredStack, files: list[tuple[str, bytes]], workers: int = 8) -> None:
    bucket = stack.stack.storage_client().bucket(stack.stack.config.landing_bucket)

    def put(item: tuple[str, bytes]) -> None:
        bucket.blob(item[0]).upload_from_string(item[1], content_type="application/dicom")

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, files))


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


def run(
    strategy: str,
    files: list[tuple[str, bytes]],
    latency: float,
    quota: int,
    timeout: float,
    settled: Callable[[MeasuredStack], bool] | None,
    idle_seconds: float = 0.0,
) -> dict[str, Any]:
    """One strategy on a fresh local cloud; returns its measurements.

    With ``idle_seconds``, the calls of the idle ticks that follow are counted too: the
    fixed cost of the schedule, apart from the cost per file (``fixed_and_marginal``).
    """
    home = Path(tempfile.mkdtemp(prefix=f"bench-{strategy}-"))
    measured = MeasuredStack.start(
        home,
        function_env=DICOMFLOW_ENV if strategy == "dicomflow" else {},
        functions_source=BASELINE if strategy == "baseline" else None,
        minute_interval=TICK_SECONDS,
        operation_latency=latency,
        max_concurrent_ops=quota,
    )
    stack = measured.stack
    try:
        assert stack.deliverer is not None
        # The idle ticks of a fresh deployment: the fixed cost after 0 files. The first
        # ticks of a deployment write its cursors once; they are not the fixed cost.
        if idle_seconds:
            time.sleep(3 * TICK_SECONDS)
        idle_before = idle_ticks(measured, idle_seconds) if idle_seconds else None
        before = process_usage(stack.process_ids("ingest"))
        measured.storage_proxy.reset()
        measured.healthcare_proxy.reset()
        attempts0 = stack.deliverer.delivered + stack.deliverer.failed_attempts
        timeline: list[tuple[float, int]] = [(0.0, 0)]
        started = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            uploading = pool.submit(upload, measured, files)
            upload_seconds = None
            complete_seconds = None
            while time.monotonic() - started < timeout:
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
        usage = process_usage(stack.process_ids("ingest"))
        # dicomflow's work is not over when the store is full: report verifies and cleans up.
        settle_seconds = None
        if settled is not None and complete_seconds is not None:
            while time.monotonic() - started < timeout:
                if settled(measured):
                    settle_seconds = time.monotonic() - started
                    break
                time.sleep(1.0)
            usage = process_usage(stack.process_ids("ingest"))
        report_usage = process_usage(stack.process_ids("report"))
        storage = measured.storage_proxy.snapshot()
        healthcare = measured.healthcare_proxy.snapshot()
        attempts = stack.deliverer.delivered + stack.deliverer.failed_attempts - attempts0
        busy_seconds = time.monotonic() - started
        idle: dict[str, Any] | None = None
        if idle_seconds and settle_seconds is not None:
            idle = idle_ticks(measured, idle_seconds)
        operations = _operations(measured)
        events = stack.watcher.events if stack.watcher else 0
    finally:
        measured.stop()
    n = len(files)
    storage_calls = sum(storage["counts"].values())
    healthcare_calls = sum(healthcare["counts"].values())
    return {
        "strategy": strategy,
        "files": n,
        "complete": complete_seconds is not None,
        "uploadSeconds": round(upload_seconds or 0.0, 2),
        "secondsUntilAllInStore": round(complete_seconds, 2) if complete_seconds else None,
        "inStoreAtEnd": timeline[-1][1],
        "secondsMeasured": round(timeline[-1][0], 2),
        "secondsUntilLedgerFinal": round(settle_seconds, 2) if settle_seconds else None,
        "importOperationsStarted": operations,
        "import429": healthcare["statuses"].get("import 429", 0),
        "storageCalls": storage["counts"],
        # The twenty busiest (operation, bucket:object kind) pairs; see faultproxy.storage_area.
        "storageCallsByArea": dict(sorted(storage["areas"].items(), key=lambda kv: -kv[1])[:20]),
        "secondsCounted": round(busy_seconds, 2),
        "idleBefore": idle_before,
        "idle": idle,
        "healthcareCalls": healthcare["counts"],
        "storageCallsPerFile": round(storage_calls / n, 2),
        "healthcareCallsPerFile": round(healthcare_calls / n, 3),
        "functionInvocations": attempts,
        "finalizeEvents": events,
        "ingestCpuMsPerFile": round((usage["cpuMs"] - before["cpuMs"]) / n, 2),
        "reportCpuMsPerFile": round(report_usage["cpuMs"] / n, 2)
        if strategy == "dicomflow"
        else None,
        "ingestRssPeakMiB": round(usage["rssPeakMiB"], 1),
        "timeline": timeline,
    }


def idle_ticks(measured: MeasuredStack, seconds: float) -> dict[str, Any]:
    """The calls of ``seconds`` of idle ticks (ingest and report every TICK_SECONDS)."""
    stack = measured.stack
    assert stack.deliverer is not None
    measured.storage_proxy.reset()
    measured.healthcare_proxy.reset()
    invocations0 = stack.deliverer.delivered + stack.deliverer.failed_attempts
    time.sleep(seconds)
    storage = measured.storage_proxy.snapshot()["counts"]
    healthcare = measured.healthcare_proxy.snapshot()["counts"]
    invocations = stack.deliverer.delivered + stack.deliverer.failed_attempts - invocations0
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


def marginal(result: dict[str, Any]) -> dict[str, Any]:
    """Calls per file with the schedule's fixed cost taken out.

    The idle ticks measured after the run (``idle``) give the fixed call rate; that rate
    times the seconds counted is subtracted before dividing by the files. The baseline
    has no ticks. ``fixedPerTick``: the calls of one idle tick interval (all functions),
    which on the deployed schedule (one tick a minute) is the cost of being deployed.
    """
    n = result["files"]
    idle = result.get("idle")
    seconds = result["secondsCounted"]
    rate = (lambda count: count / idle["seconds"]) if idle else (lambda count: 0.0)
    idle_ops = idle["storageCallsByOperation"] if idle else {}
    storage = {
        op: max(0.0, (count - rate(idle_ops.get(op, 0)) * seconds) / n)
        for op, count in result["storageCalls"].items()
    }
    healthcare_total = sum(result["healthcareCalls"].values())
    idle_healthcare = idle["healthcareCalls"] if idle else 0
    idle_invocations = idle["invocations"] if idle else 0
    return {
        "storageCallsPerFile": {op: round(v, 3) for op, v in storage.items()},
        "storageCallsPerFileTotal": round(sum(storage.values()), 3),
        "classAPerFile": round(sum(v for op, v in storage.items() if op in CLASS_A), 3),
        "classBPerFile": round(sum(v for op, v in storage.items() if op in CLASS_B), 3),
        "healthcareCallsPerFile": round(
            max(0.0, healthcare_total - rate(idle_healthcare) * seconds) / n, 3
        ),
        "invocationsPerFile": round(
            max(0.0, result["functionInvocations"] - rate(idle_invocations) * seconds) / n, 3
        ),
        "fixedPerTick": {
            "storageCalls": {
                op: round(rate(c) * TICK_SECONDS, 2) for op, c in sorted(idle_ops.items())
            },
            "healthcareCalls": round(rate(idle_healthcare) * TICK_SECONDS, 2),
            "invocations": round(rate(idle_invocations) * TICK_SECONDS, 2),
        },
    }


def _storage_usd(calls: dict[str, float]) -> float:
    class_a = sum(calls.get(k, 0) for k in CLASS_A)
    class_b = sum(calls.get(k, 0) for k in CLASS_B)
    return (
        class_a * PRICES["storage_class_a_per_1000"] + class_b * PRICES["storage_class_b_per_1000"]
    ) / 1000


def cost_per_million(result: dict[str, Any]) -> dict[str, float]:
    """USD per million files (marginal calls per file and PRICES), and the fixed cost per
    month of the schedule's ticks (one a minute when deployed), which does not grow
    with files."""
    per_file = marginal(result)
    storage = _storage_usd(per_file["storageCallsPerFile"]) * 1e6
    invocations = per_file["invocationsPerFile"] * PRICES["function_invocations_per_million"]
    healthcare = per_file["healthcareCallsPerFile"] * PRICES["healthcare_requests_per_100000"] * 10
    fixed = per_file["fixedPerTick"]
    ticks_per_month = 60 * 24 * 30
    fixed_month = ticks_per_month * (
        _storage_usd(fixed["storageCalls"])
        + fixed["invocations"] * PRICES["function_invocations_per_million"] / 1e6
        + fixed["healthcareCalls"] * PRICES["healthcare_requests_per_100000"] / 1e5
    )
    return {
        "storageOperations": round(storage, 2),
        "functionInvocations": round(invocations, 2),
        "healthcareRequests": round(healthcare, 2),
        "total": round(storage + invocations + healthcare, 2),
        "fixedPerMonthUsd": round(fixed_month, 2),
    }


def chart(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for result in results:
        xs = [t for t, _ in result["timeline"]]
        ys = [c for _, c in result["timeline"]]
        label = "dicomflow (batched)" if result["strategy"] == "dicomflow" else "per-file import"
        ax.plot(xs, ys, label=label, linewidth=2)
        ax.axvline(result["uploadSeconds"], linestyle=":", color="grey")
    ax.set_xlabel("seconds since the first upload (dotted: uploads finished)")
    ax.set_ylabel("instances in the DICOM store")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--latency", type=float, default=2.0, help="operation start latency, s")
    parser.add_argument("--quota", type=int, default=5, help="concurrent operations allowed")
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds dicomflow may take until its ledger is final",
    )
    parser.add_argument(
        "--baseline-timeout",
        type=float,
        default=900.0,
        help="seconds the baseline may take; if it does not finish, how far it got is "
        "reported and its time is a lower bound",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=20.0,
        help="seconds of idle ticks counted after dicomflow settles (its fixed cost)",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a dicomflow setting for this run, over the scaled-down defaults above "
        "(e.g. DICOMFLOW_BATCH_WINDOW_SECONDS=60)",
    )
    parser.add_argument(
        "--only",
        choices=("dicomflow", "baseline"),
        help="run one strategy (no ratios; results in ingest_burst_<N>_<strategy>.json)",
    )
    args = parser.parse_args()
    for pair in args.setting:
        name, _, value = pair.partition("=")
        DICOMFLOW_ENV[name.strip()] = value.strip()

    files = corpus(args.instances)
    # The local platform's delivery retries (the baseline's 429s) log to a file, not the screen.
    log_stream = (Path(tempfile.mkdtemp(prefix="bench-burst-logs-")) / "bench.log").open("a")
    log.configure(stream=log_stream)
    print(
        f"{len(files)} instances, {sum(len(d) for _, d in files) / len(files):.0f} B each; "
        f"emulator: {args.latency:g} s start latency, {args.quota} concurrent operations"
    )
    if args.only:
        alone = run(
            args.only,
            files,
            args.latency,
            args.quota,
            args.timeout if args.only == "dicomflow" else args.baseline_timeout,
            outcomes_final(len(files)) if args.only == "dicomflow" else None,
            args.idle if args.only == "dicomflow" else 0.0,
        )
        alone["marginal"] = marginal(alone)
        alone["costPerMillionFilesUsd"] = cost_per_million(alone)
        alone["settings"] = dict(DICOMFLOW_ENV) if args.only == "dicomflow" else {}
        print(json.dumps({k: v for k, v in alone.items() if k != "timeline"}, indent=2))
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"ingest_burst_{len(files)}_{args.only}.json"
        path.write_text(json.dumps(alone, indent=2) + "\n")
        print(f"wrote {path}")
        return 0 if alone["complete"] else 1
    ours = run(
        "dicomflow",
        files,
        args.latency,
        args.quota,
        args.timeout,
        outcomes_final(len(files)),
        args.idle,
    )
    print(f"dicomflow done in {ours['secondsUntilAllInStore']} s")
    theirs = run("baseline", files, args.latency, args.quota, args.baseline_timeout, None)
    print(f"baseline done in {theirs['secondsUntilAllInStore']} s")
    results = [ours, theirs]
    for result in results:
        result["marginal"] = marginal(result)
        result["costPerMillionFilesUsd"] = cost_per_million(result)
        result["marginalStorageCallsPerFile"] = round(
            sum(result["marginal"]["storageCallsPerFile"].values()), 2
        )

    rows = [
        ("upload time alone, s", "uploadSeconds"),
        ("first upload -> all in store, s", "secondsUntilAllInStore"),
        ("import operations started", "importOperationsStarted"),
        ("429s met on import", "import429"),
        ("Storage calls per file, all", "storageCallsPerFile"),
        ("  without the fixed tick cost", "marginalStorageCallsPerFile"),
        ("Healthcare calls per file", "healthcareCallsPerFile"),
        ("function invocations", "functionInvocations"),
        ("ingest CPU ms per file", "ingestCpuMsPerFile"),
        ("ingest peak RSS, MiB", "ingestRssPeakMiB"),
    ]
    print(f"\n{'':34} {'dicomflow':>12} {'per-file':>12} {'per-file/dicomflow':>20}")
    ratios: dict[str, float | None] = {}
    for label, key in rows:
        a, b = ours[key], theirs[key]
        ratios[key] = ratio(b, a)
        shown_ratio = str(ratios[key])
        if key == "secondsUntilAllInStore" and b is None:
            # The baseline did not finish: show how far it got and a lower bound of the ratio.
            b = f">{theirs['secondsMeasured']} ({theirs['inStoreAtEnd']}/{theirs['files']})"
            shown_ratio = f">{ratio(theirs['secondsMeasured'], a)}"
        print(f"{label:34} {a!s:>12} {b!s:>12} {shown_ratio:>20}")
    print(f"\ncost per million files (USD, list prices of {PRICES_DATE}):")
    for key in ("storageOperations", "functionInvocations", "healthcareRequests", "total"):
        a, b = ours["costPerMillionFilesUsd"][key], theirs["costPerMillionFilesUsd"][key]
        print(f"  {key:32} {a:>12} {b:>12} {ratio(b, a)!s:>20}")
    fixed = ours["marginal"]["fixedPerTick"]
    print(
        f"  dicomflow's fixed cost, one tick a minute: "
        f"{ours['costPerMillionFilesUsd']['fixedPerMonthUsd']} USD a month "
        f"({sum(fixed['storageCalls'].values()):.1f} Storage calls per tick)"
    )

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "instances": len(files),
        "instanceBytes": round(sum(len(d) for _, d in files) / len(files)),
        "emulator": {"operationLatencySeconds": args.latency, "maxConcurrentOps": args.quota},
        "dicomflowSettings": {**DICOMFLOW_ENV, "tickSeconds": TICK_SECONDS},
        "prices": {"date": PRICES_DATE, **PRICES},
        "dicomflow": ours,
        "baseline": theirs,
        "ratiosBaselineOverDicomflow": ratios,
    }
    # The full size keeps its own files; `make bench` writes ingest_burst.json and .png.
    stem = "ingest_burst_5000" if len(files) >= 5000 else "ingest_burst"
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    chart(
        results,
        RESULTS / f"{stem}.png",
        f"{len(files)} uploads, {args.latency:g} s op latency, {args.quota} concurrent ops",
    )
    print(f"\nwrote {RESULTS / stem}.json and {stem}.png")
    # The baseline running out of time is a finding (it does not keep pace), not a failure.
    return 0 if ours["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
