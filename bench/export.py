"""Export throughput of the Healthcare emulator, per mimeType, on the ingest burst's corpus.

The same generated instances as ``bench/ingest_burst.py`` (``corpus``) are
imported once into a fresh emulator; then one ``dicomStores.export`` per
mimeType writes them to Cloud Storage (fake-gcs-server). Measured from the
export call until its operation is done, objects written included.

Writes ``bench/results/export.json``.

Usage: ``python bench/export.py [--instances N]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from google.auth.credentials import AnonymousCredentials
from googleapiclient.discovery import build
from ingest_burst import corpus

from localcloud.healthcare import start_healthcare
from localcloud.storage import start_storage

RESULTS = Path(__file__).resolve().parent / "results" / "export.json"
MIME_TYPES = (
    "application/dicom; transfer-syntax=*",
    "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.80",
    "application/octet-stream",
    "image/jpeg",
    "image/png",
)
STORE = "projects/bench/locations/local/datasets/bench/dicomStores/s"


def _wait(api: Any, operation: dict[str, Any]) -> dict[str, Any]:
    datasets = api.projects().locations().datasets()
    while not operation.get("done"):
        time.sleep(0.02)
        operation = datasets.operations().get(name=operation["name"]).execute()
    if "error" in operation:
        raise RuntimeError(f"operation failed: {operation['error']}")
    return operation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="exports per mimeType (median)")
    args = parser.parse_args()
    files = corpus(args.instances)

    storage = start_storage()
    healthcare = start_healthcare(storage_endpoint=storage.url)
    results: dict[str, Any] = {}
    try:
        gcs = storage.client()
        source = gcs.create_bucket("bench-export-source")
        backups = gcs.create_bucket("bench-export-backups")
        for item in files:
            source.blob(item.name).upload_from_string(item.data)
        api = build(
            "healthcare",
            "v1",
            static_discovery=True,
            cache_discovery=False,
            client_options={"api_endpoint": healthcare.url},
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        )
        datasets = api.projects().locations().datasets()
        datasets.create(
            parent="projects/bench/locations/local", datasetId="bench", body={}
        ).execute()
        datasets.dicomStores().create(
            parent="projects/bench/locations/local/datasets/bench", dicomStoreId="s", body={}
        ).execute()
        body = {"gcsSource": {"uri": "gs://bench-export-source/**.dcm"}}
        _wait(api, datasets.dicomStores().import_(name=STORE, body=body).execute())
        for index, mime in enumerate(MIME_TYPES):
            seconds = []
            written = 0
            for attempt in range(args.repeat):
                prefix = f"gs://{backups.name}/m{index}-{attempt}"
                request = {"gcsDestination": {"uriPrefix": prefix, "mimeType": mime}}
                started = time.perf_counter()
                _wait(api, datasets.dicomStores().export(name=STORE, body=request).execute())
                seconds.append(time.perf_counter() - started)
                written = sum(1 for _ in gcs.list_blobs(backups, prefix=f"m{index}-{attempt}/"))
            median = statistics.median(seconds)
            results[mime] = {
                "seconds": [round(s, 3) for s in seconds],
                "medianSeconds": round(median, 3),
                "objectsWritten": written,
                "instancesPerSecond": round(len(files) / median, 1),
            }
            if written != len(files):
                raise RuntimeError(f"{mime}: {written} objects written for {len(files)} instances")
        api.close()
        gcs.close()
    finally:
        healthcare.stop()
        storage.stop()

    print(f"\nexport of {len(files)} instances, median of {args.repeat}:")
    print(f"{'mimeType':60} {'s':>8} {'instances/s':>12}")
    for mime, row in results.items():
        print(f"{mime:60} {row['medianSeconds']:>8} {row['instancesPerSecond']:>12}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).date().isoformat(),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
                "instances": len(files),
                "instanceBytes": round(sum(len(f.data) for f in files) / len(files)),
                "exports": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
