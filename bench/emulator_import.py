"""Import throughput of the Healthcare emulator, against Orthanc's STOW-RS as a yardstick.

Generates N small CT instances (default 5,000 of about 9 KB), imports them
from fake-gcs-server with one ``dicomStores.import`` operation, then pushes
the same files to a fresh Orthanc (Debian packages ``orthanc`` and
``orthanc-dicomweb``, installed with apt-get when missing; skipped, and said
so, when that fails) by STOW-RS, B files per request from one client. Both
store what they are given after checking it: the emulator runs the same header
and UID checks as in the tests. Each of ``--runs`` rounds measures both, one
after the other, on the same files; the table gives the median of each and the
ratio of the medians, and prints Orthanc's configuration, which is pinned here.
Writes ``bench/results/emulator_import.json``.

Usage: ``python bench/emulator_import.py [--instances N] [--stow-batch B] [--runs R]``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import requests
from google.auth.credentials import AnonymousCredentials
from googleapiclient.discovery import build
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localcloud.healthcare import start_healthcare
from localcloud.ports import free_port, wait_http
from localcloud.storage import start_storage

RESULTS = Path(__file__).parent / "results" / "emulator_import.json"
PLUGINS = "/usr/share/orthanc/plugins"


def orthanc_config(workdir: str, http_port: int, dicom_port: int) -> dict[str, object]:
    """Orthanc's configuration for the run, pinned rather than left to the package's defaults.

    Storage and index on the same temp file system as the emulator's data. No
    fsync per stored file (``SyncStorageArea``), no compression and no
    transcoding on ingest, so both sides keep the bytes as sent with the same
    durability (the emulator writes SQLite in WAL mode with synchronous=NORMAL).
    """
    return {
        "Name": "bench",
        "StorageDirectory": f"{workdir}/db",
        "IndexDirectory": f"{workdir}/db",
        "StorageCompression": False,
        "SyncStorageArea": False,
        "OverwriteInstances": False,
        "MaximumStorageSize": 0,
        "MaximumPatientCount": 0,
        "HttpPort": http_port,
        "HttpThreadsCount": 50,
        "KeepAlive": True,
        "TcpNoDelay": True,
        "DicomPort": dicom_port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SaveJobs": False,
        "StableAge": 60,
        "Plugins": [PLUGINS],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }


def generate(count: int) -> list[bytes]:
    """``count`` 64x64 16-bit CT instances in 10 series of one study each per 100."""
    rng = np.random.default_rng(7)
    files = []
    study = series = ""
    for index in range(count):
        if index % 100 == 0:
            study = generate_uid()
        if index % 10 == 0:
            series = generate_uid()
        dataset = Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.PatientName, dataset.PatientID = "Bench^Patient", f"BENCH{index // 100}"
        dataset.Modality, dataset.StudyDate, dataset.InstanceNumber = "CT", "20260101", index
        dataset.Rows = dataset.Columns = 64
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
        dataset.PixelRepresentation = 0
        dataset.PixelData = rng.integers(0, 4096, (64, 64), dtype=np.uint16).tobytes()
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files


def bench_emulator(files: list[bytes]) -> float:
    """Seconds from the import call to its operation being done."""
    storage = start_storage()
    healthcare = start_healthcare(storage_endpoint=storage.url)
    try:
        gcs = storage.client()
        bucket = gcs.create_bucket(f"bench-{uuid.uuid4().hex[:8]}")
        for index, data in enumerate(files):
            bucket.blob(f"in/{index:06d}.dcm").upload_from_string(data)
        gcs.close()
        api = build(
            "healthcare",
            "v1",
            static_discovery=True,
            cache_discovery=False,
            client_options={"api_endpoint": healthcare.url},
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        )
        datasets = api.projects().locations().datasets()
        parent = "projects/bench/locations/local"
        datasets.create(parent=parent, datasetId="bench", body={}).execute()
        datasets.dicomStores().create(
            parent=f"{parent}/datasets/bench", dicomStoreId="s", body={}
        ).execute()
        started = time.perf_counter()
        operation = (
            datasets.dicomStores()
            .import_(
                name=f"{parent}/datasets/bench/dicomStores/s",
                body={"gcsSource": {"uri": f"gs://{bucket.name}/in/**.dcm"}},
            )
            .execute()
        )
        while not operation.get("done"):
            time.sleep(0.01)
            operation = datasets.operations().get(name=operation["name"]).execute()
        elapsed = time.perf_counter() - started
        counter = operation["metadata"]["counter"]
        if counter.get("success") != str(len(files)):
            raise RuntimeError(f"emulator import incomplete: {operation}")
        api.close()
        return elapsed
    finally:
        healthcare.stop()
        storage.stop()


def ensure_orthanc() -> str | None:
    """The Orthanc binary, installed from Debian packages when missing; None when impossible."""
    found = shutil.which("Orthanc")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "orthanc", "orthanc-dicomweb"],
    ):
        try:
            subprocess.run(command, check=True, env=env)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"Orthanc is not installed and `{' '.join(command)}` failed: {exc}")
            return None
    return shutil.which("Orthanc")


def orthanc_version(binary: str) -> str:
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (output.stdout.splitlines() or ["unknown"])[0]


def bench_orthanc(binary: str, files: list[bytes], batch: int) -> float:
    """Seconds to STOW every file to a fresh Orthanc, ``batch`` files per request."""
    with tempfile.TemporaryDirectory(prefix="bench-orthanc-") as workdir:
        port = free_port()
        config = orthanc_config(workdir, port, free_port())
        config_path = Path(workdir) / "orthanc.json"
        config_path.write_text(json.dumps(config))
        with open(Path(workdir) / "orthanc.log", "wb") as log:
            process = subprocess.Popen(
                [binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_http(
                f"http://127.0.0.1:{port}/system", 60, "Orthanc", lambda: process.poll() is None
            )
            url = f"http://127.0.0.1:{port}/dicom-web/studies"
            with requests.Session() as session:
                started = time.perf_counter()
                for start in range(0, len(files), batch):
                    boundary = uuid.uuid4().hex
                    body = (
                        b"".join(
                            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                            + data
                            + b"\r\n"
                            for data in files[start : start + batch]
                        )
                        + f"--{boundary}--\r\n".encode()
                    )
                    response = session.post(
                        url,
                        data=body,
                        headers={
                            "Content-Type": "multipart/related; "
                            f'type="application/dicom"; boundary={boundary}',
                            "Accept": "application/dicom+json",
                        },
                        timeout=120,
                    )
                    response.raise_for_status()
                elapsed = time.perf_counter() - started
                stored = session.get(f"http://127.0.0.1:{port}/statistics", timeout=30).json()
            if stored["CountInstances"] != len(files):
                raise RuntimeError(f"Orthanc stored {stored['CountInstances']} of {len(files)}")
            return elapsed
        finally:
            process.terminate()
            process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--stow-batch", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    files = generate(args.instances)
    binary = ensure_orthanc()
    emulator_runs: list[float] = []
    orthanc_runs: list[float] = []
    for run in range(1, args.runs + 1):
        emulator_runs.append(bench_emulator(files))
        line = f"run {run}: emulator {emulator_runs[-1]:.2f} s"
        if binary is not None:
            orthanc_runs.append(bench_orthanc(binary, files, args.stow_batch))
            line += f", Orthanc {orthanc_runs[-1]:.2f} s"
        print(line, flush=True)
    emulator = statistics.median(emulator_runs)
    rows = [("localcloud emulator, dicomStores.import from fake-gcs-server", emulator)]
    orthanc = statistics.median(orthanc_runs) if orthanc_runs else None
    if orthanc is not None:
        rows.append((f"Orthanc STOW-RS, {args.stow_batch} per request", orthanc))
    print(f"\n{args.instances} instances of {len(files[0])} bytes, median of {args.runs} runs")
    print(f"{'system':<62} {'seconds':>8} {'instances/s':>12}")
    for label, seconds in rows:
        print(f"{label:<62} {seconds:>8.2f} {args.instances / seconds:>12.1f}")
    result: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "instances": args.instances,
        "instance_bytes": len(files[0]),
        "runs": args.runs,
        "emulator_seconds_runs": [round(x, 3) for x in emulator_runs],
        "emulator_seconds": round(emulator, 3),
        "emulator_instances_per_s": round(args.instances / emulator, 1),
    }
    if orthanc is not None and binary is not None:
        ratio = orthanc / emulator
        print(f"emulator / Orthanc throughput ratio (medians): {ratio:.2f}")
        config = orthanc_config("TMPDIR", 0, 0)
        print(f"Orthanc: {orthanc_version(binary)}, configuration: {json.dumps(config)}")
        result.update(
            {
                "orthanc_version": orthanc_version(binary),
                "orthanc_config": config,
                "orthanc_seconds_runs": [round(x, 3) for x in orthanc_runs],
                "orthanc_seconds": round(orthanc, 3),
                "orthanc_instances_per_s": round(args.instances / orthanc, 1),
                "orthanc_stow_batch": args.stow_batch,
                "emulator_to_orthanc_ratio": round(ratio, 2),
            }
        )
    else:
        print("Orthanc: not available, so no comparison was made (see above)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
