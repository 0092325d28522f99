"""Storage calls of the daily pass (the reconciliation sweep and landing retention).

Two deployments, each with N landing objects (default 10,000) that were verified
``imported`` in batches and 10 more whose event never came: the state the
functions would leave, written directly (staging copies, the windows' file lists,
the batch manifests and summaries). One has landing retention off, the other
``DICOMFLOW_LANDING_DELETE_AFTER_DAYS=3``. The daily pass runs three times on a
clock 2 days, 3 days and 4 days after the uploads (one sweep period apart); every
Cloud Storage call of the pass goes through a counting proxy.

Writes ``bench/results/sweep.json`` at the default size (10,000), ``sweep_<N>.json`` at another.

Usage: ``python bench/sweep.py [--objects N]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.cloud import storage

from dicomflow import keys, objects, runtime, sweep
from dicomflow.config import load_settings
from dicomflow.staging import (
    FileRecord,
    file_key,
    files_name,
    iso,
    staged_name,
    success_name,
    summary_name,
    window_id,
)
from localcloud.corpus import generate_instance
from localcloud.faultproxy import FaultProxy
from localcloud.pubsub import start_pubsub
from localcloud.storage import client as storage_client
from localcloud.storage import start_storage

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_OBJECTS = 10_000
MISSED = 10
DAYS = (2, 3, 4)
# Class A: writes and listings; Class B: reads; deletes are free (Cloud Storage pricing).
CLASS_A = ("objects.list", "objects.insert", "objects.rewrite", "objects.compose", "objects.patch")
CLASS_B = ("objects.get", "objects.download")


def populate(gcs: storage.Client, landing: str, staging: str, count: int) -> datetime:
    """``count`` verified uploads and ``MISSED`` unrecorded ones; the time of the uploads."""
    data = generate_instance("2.25.1", "2.25.2", 1).data
    land, stage = gcs.bucket(landing), gcs.bucket(staging)

    def put(i: int) -> storage.Blob:
        blob = land.blob(f"site/study{i // 100:04d}/IM{i % 100:04d}.dcm")
        blob.upload_from_string(data, content_type="application/dicom")
        return blob

    with ThreadPoolExecutor(16) as pool:
        blobs = list(pool.map(put, range(count + MISSED)))
    created = min(b.time_created for b in blobs if b.time_created)
    records = [
        FileRecord(
            key=file_key(landing, b.name, b.generation or 0),
            bucket=landing,
            name=b.name,
            generation=str(b.generation),
            size=len(data),
            home=window_id(b.time_created or created, 60),
            window=window_id(b.time_created or created, 60),
        )
        for b in blobs[:count]
    ]

    def copy(record: FileRecord) -> None:
        target = stage.blob(staged_name(record.window, record.key))
        target.metadata = record.metadata()
        target.upload_from_string(b"", content_type="application/dicom")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(copy, records))
    by_window: dict[str, list[FileRecord]] = defaultdict(list)
    for record in records:
        by_window[record.window].append(record)
    for window, lines in by_window.items():
        listed = objects.ndjson(r.line() for r in lines)
        objects.create_text(stage, files_name(window), listed, "application/x-ndjson")
        success = objects.ndjson({**r.line(), "status": "imported", "batch": window} for r in lines)
        objects.write_text(stage, success_name(window), success, "application/x-ndjson")
        summary = {"batch": window, "times": {"verifiedAt": iso(created)}}
        objects.create(stage, summary_name(window), summary)
    return created


def run(storage_url: str, pubsub_url: str, count: int, delete_after: int) -> list[dict[str, Any]]:
    suffix = f"{delete_after}-{time.monotonic_ns()}"
    direct = storage_client(storage_url)
    landing, staging = f"landing-{suffix}", f"staging-{suffix}"
    for name in (landing, staging):
        direct.create_bucket(name)
    started = time.monotonic()
    created = populate(direct, landing, staging, count)
    print(f"  populated {count + MISSED} uploads in {time.monotonic() - started:.0f} s")
    proxy = FaultProxy(storage_url).start()
    counted = storage_client(proxy.url)
    key_file = Path(tempfile.mkdtemp(prefix="bench-sweep-")) / "deployment.key"
    keys.write_key_file(str(key_file))  # the sweep's alert labels its objects with it
    settings = load_settings(
        {
            "DICOMFLOW_DICOM_STORE": "projects/p/locations/l/datasets/d/dicomStores/s",
            "DICOMFLOW_LANDING_BUCKET": landing,
            "DICOMFLOW_STAGING_BUCKET": staging,
            "DICOMFLOW_BACKUP_BUCKET": "backups",
            "DICOMFLOW_ALERTS_TOPIC": "projects/local/topics/alerts",
            "DICOMFLOW_PUBSUB_ENDPOINT": pubsub_url,
            "DICOMFLOW_LANDING_DELETE_AFTER_DAYS": str(delete_after),
            "DICOMFLOW_KEY_FILE": str(key_file),
        }
    )
    passes = []
    try:
        for day in DAYS:
            now = created + timedelta(days=day, hours=1)
            ctx = runtime.Context(settings=settings, storage=counted, clock=lambda n=now: n)
            listed = sum(1 for _ in direct.list_blobs(landing))
            proxy.reset()
            began = time.monotonic()
            result = sweep.run_due(ctx, now)
            seconds = time.monotonic() - began
            calls = proxy.snapshot()["counts"]
            calls.pop("buckets.get", None)  # the client's one bucket metadata lookup
            assert result is not None
            passes.append(
                {
                    "day": day,
                    "landingObjects": listed,
                    "calls": dict(sorted(calls.items())),
                    "total": sum(calls.values()),
                    "classA": sum(n for op, n in calls.items() if op in CLASS_A),
                    "classB": sum(n for op, n in calls.items() if op in CLASS_B),
                    "deletes": calls.get("objects.delete", 0),
                    "missed": result["sweep"]["missed"],
                    "retention": result.get("retention"),
                    "seconds": round(seconds, 2),
                }
            )
            ctx.close_clients()
    finally:
        counted.close()  # type: ignore[no-untyped-call]
        direct.close()  # type: ignore[no-untyped-call]
        proxy.stop()
    return passes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--objects", type=int, default=DEFAULT_OBJECTS, help="verified landing objects"
    )
    args = parser.parse_args()
    logging.getLogger("dicomflow").setLevel(logging.ERROR)  # the table says it all
    gcs = start_storage()
    pubsub = start_pubsub(kind="fallback")
    try:
        api = runtime._discovery("pubsub", pubsub.url, None)
        api.projects().topics().create(name="projects/local/topics/alerts", body={}).execute()
        api.close()
        results = {}
        for label, delete_after in (("without retention", 0), ("retention 3 days", 3)):
            print(f"{label}:")
            results[label] = run(gcs.url, pubsub.url, args.objects, delete_after)
    finally:
        pubsub.stop()
        gcs.stop()

    print(
        f"\ndaily pass, {args.objects:,} verified uploads and {MISSED} without an event "
        "(Storage calls)"
    )
    print(
        f"{'':20} {'day':>4} {'landing':>8} {'calls':>7} {'A':>6} {'B':>6} {'del':>6} {'missed':>7}"
    )
    for label, passes in results.items():
        for p in passes:
            print(
                f"{label:20} {p['day']:>4} {p['landingObjects']:>8} {p['total']:>7} "
                f"{p['classA']:>6} {p['classB']:>6} {p['deletes']:>6} {p['missed']:>7}"
            )
    suffix = "" if args.objects == DEFAULT_OBJECTS else f"_{args.objects}"
    out = RESULTS / f"sweep{suffix}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).date().isoformat(),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
                "verifiedUploads": args.objects,
                "missedUploads": MISSED,
                "passes": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
