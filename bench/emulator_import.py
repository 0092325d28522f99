"""Import throughput of the Healthcare emulator, against Orthanc's STOW-RS as a yardstick.

Generates N small CT instances (default 5,000 of about 9 KB) and uploads them
once to a fake-gcs-server with the filesystem backend behind localcloud's
storage front, as ``localcloud up`` runs it (its root on tmpfs when there is
one, since only the upload writes there). Each of ``--runs`` rounds then
measures, one after the other on the same files:

- the emulator as ``localcloud up`` runs it: its own process (``python -m
  localcloud.healthcare``) with ``--storage-root``, so imports read the object
  files checked against the listing's size and MD5;
- Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``, installed with
  apt-get when missing; skipped, and said so, when that fails), fresh, given
  the same files by STOW-RS, B per request from one client;
- the emulator without ``--storage-root``, reading every object through the
  storage front, for comparison.

Each emulator run is a fresh process and data directory; one
``dicomStores.import`` of ``gs://BUCKET/in/**.dcm`` is timed from the call until
the operation is done (polled every 50 ms), once the emulator answers and its import workers have
started (Orthanc too is timed once it answers). The emulator runs the same
header and UID checks as in the tests. The table gives the median of each, the
ratio of the medians, CPU milliseconds per instance of every process involved,
and Orthanc's configuration, which is pinned here. Writes
``bench/results/emulator_import.json``.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
from google.auth.credentials import AnonymousCredentials
from googleapiclient.discovery import build
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localcloud.ports import listening_socket, start_on_free_port, wait_bound, wait_http
from localcloud.storage import StorageServer, start_storage

RESULTS = Path(__file__).parent / "results" / "emulator_import.json"
PLUGINS = "/usr/share/orthanc/plugins"
ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
# Operation polls cost the client and the emulator CPU on the same 2 cores; one every
# 50 ms adds at most 50 ms to the emulator's time, against it.
POLL_SECONDS = 0.05
FILES, ORTHANC, API = "emulator", "orthanc", "emulator through the front"


def orthanc_config(workdir: str, http_port: int) -> dict[str, object]:
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


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def child_pids(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(int(entry.name))
    return found


def upload(storage: StorageServer, files: list[bytes]) -> str:
    """Upload every file as ``in/NNNNNN.dcm`` to a new bucket; returns its name."""
    gcs = storage.client()
    bucket = gcs.create_bucket(f"bench-{uuid.uuid4().hex[:8]}")

    def one(index: int) -> None:
        bucket.blob(f"in/{index:06d}.dcm").upload_from_string(files[index])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(len(files))))
    gcs.close()
    return str(bucket.name)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until the emulator answers and its import workers have started, as Orthanc is waited for."""
    wait_http(f"{url}/_emulator/health", timeout, "the emulator", lambda: process.poll() is None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = requests.get(f"{url}/_emulator/health", timeout=10).json()
        if health["importWorkersReady"] == health["importWorkers"]:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the emulator's import workers did not start in {timeout} s")


@dataclass
class Measured:
    seconds: float
    cpu: dict[str, float]


def bench_emulator(storage: StorageServer, bucket: str, count: int, read_files: bool) -> Measured:
    """One import into a fresh emulator process; seconds from the call to the operation done."""
    with tempfile.TemporaryDirectory(prefix="bench-emulator-") as workdir:
        listener = listening_socket(0, "the emulator")
        port = listener.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "localcloud.healthcare",
            "--fd",
            str(listener.fileno()),
            "--data-dir",
            f"{workdir}/data",
            "--storage-endpoint",
            storage.url,
        ]
        if read_files:
            command += ["--storage-root", str(storage.root)]
        with listener, open(Path(workdir) / "emulator.log", "wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                pass_fds=(listener.fileno(),),
            )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, process)
            api = build(
                "healthcare",
                "v1",
                static_discovery=True,
                cache_discovery=False,
                client_options={"api_endpoint": url},
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            )
            datasets = api.projects().locations().datasets()
            parent = "projects/bench/locations/local"
            datasets.create(parent=parent, datasetId="bench", body={}).execute()
            datasets.dicomStores().create(
                parent=f"{parent}/datasets/bench", dicomStoreId="s", body={}
            ).execute()
            pids = {
                "emulator": process.pid,
                "fake-gcs-server": storage.process.pid,
                "storage front": storage.front.pid,
            }
            for index, pid in enumerate(child_pids(process.pid), 1):
                pids[f"import worker {index}"] = pid
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            client_before = time.process_time()
            started = time.perf_counter()
            operation = (
                datasets.dicomStores()
                .import_(
                    name=f"{parent}/datasets/bench/dicomStores/s",
                    body={"gcsSource": {"uri": f"gs://{bucket}/in/**.dcm"}},
                )
                .execute()
            )
            while not operation.get("done"):
                time.sleep(POLL_SECONDS)
                operation = datasets.operations().get(name=operation["name"]).execute()
            elapsed = time.perf_counter() - started
            cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
            cpu["client"] = time.process_time() - client_before
            counter = operation["metadata"]["counter"]
            if counter.get("success") != str(count) or "failure" in counter:
                raise RuntimeError(f"emulator import incomplete: {operation}")
            api.close()
            return Measured(elapsed, cpu)
        finally:
            process.terminate()
            process.wait(timeout=30)


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


def start_orthanc(binary: str, workdir: str, port: int) -> tuple[subprocess.Popen[bytes], int]:
    """Orthanc serving HTTP on ``port``, answering, and the port; ``PortTaken`` when another
    process took the port before Orthanc bound it (Orthanc binds the port it is given)."""
    config_path = Path(workdir) / "orthanc.json"
    config_path.write_text(json.dumps(orthanc_config(workdir, port)))
    with open(Path(workdir) / "orthanc.log", "ab") as log:
        process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_bound(process, port, f"http://127.0.0.1:{port}/system", 60, "Orthanc")
    except BaseException:
        process.terminate()
        process.wait(timeout=30)
        raise
    return process, port


def bench_orthanc(binary: str, files: list[bytes], batch: int) -> Measured:
    """Seconds to STOW every file to a fresh Orthanc, ``batch`` files per request."""
    with tempfile.TemporaryDirectory(prefix="bench-orthanc-") as workdir:
        process, port = start_on_free_port(lambda picked: start_orthanc(binary, workdir, picked))
        try:
            url = f"http://127.0.0.1:{port}/dicom-web/studies"
            with requests.Session() as session:
                before = cpu_seconds(process.pid)
                client_before = time.process_time()
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
                cpu = {
                    "Orthanc": cpu_seconds(process.pid) - before,
                    "client": time.process_time() - client_before,
                }
                stored = session.get(f"http://127.0.0.1:{port}/statistics", timeout=30).json()
            if stored["CountInstances"] != len(files):
                raise RuntimeError(f"Orthanc stored {stored['CountInstances']} of {len(files)}")
            return Measured(elapsed, cpu)
        finally:
            process.terminate()
            process.wait(timeout=30)


def storage_root() -> str | None:
    """tmpfs for fake-gcs-server's files when there is one (its uploads fsync every object)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def per_instance_ms(runs: list[Measured], count: int) -> dict[str, float]:
    """Median CPU milliseconds per instance of each process over ``runs``."""
    return {
        name: round(1000 * statistics.median(r.cpu[name] for r in runs) / count, 3)
        for name in runs[0].cpu
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--stow-batch", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    files = generate(args.instances)
    binary = ensure_orthanc()
    runs: dict[str, list[Measured]] = {FILES: [], ORTHANC: [], API: []}
    with tempfile.TemporaryDirectory(prefix="bench-gcs-", dir=storage_root()) as gcs_dir:
        storage = start_storage(data_dir=Path(gcs_dir) / "root")
        try:
            bucket = upload(storage, files)
            for run in range(1, args.runs + 1):
                runs[FILES].append(bench_emulator(storage, bucket, len(files), read_files=True))
                if binary is not None:
                    runs[ORTHANC].append(bench_orthanc(binary, files, args.stow_batch))
                runs[API].append(bench_emulator(storage, bucket, len(files), read_files=False))
                print(
                    f"run {run}: "
                    + ", ".join(f"{label} {r[-1].seconds:.2f} s" for label, r in runs.items() if r),
                    flush=True,
                )
        finally:
            storage.stop()
    load_at_end = os.getloadavg()
    medians = {label: statistics.median(m.seconds for m in r) for label, r in runs.items() if r}
    labels = {
        FILES: "localcloud emulator, dicomStores.import (--storage-root)",
        ORTHANC: f"Orthanc STOW-RS, {args.stow_batch} per request",
        API: "localcloud emulator, import reading through the storage front",
    }
    print(f"\n{args.instances} instances of {len(files[0])} bytes, median of {args.runs} runs")
    print(f"{'system':<64} {'seconds':>8} {'instances/s':>12} {'CPU ms/instance':>16}")
    for label, seconds in medians.items():
        cpu = sum(per_instance_ms(runs[label], args.instances).values())
        print(f"{labels[label]:<64} {seconds:>8.2f} {args.instances / seconds:>12.1f} {cpu:>16.3f}")
    result: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "command": "python " + " ".join(["bench/emulator_import.py", *sys.argv[1:]]),
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "load_average_at_end": [round(x, 2) for x in load_at_end],
        "instances": args.instances,
        "instance_bytes": len(files[0]),
        "runs": args.runs,
    }
    for label, key in ((FILES, "emulator"), (API, "emulator_through_front")):
        result.update(
            {
                f"{key}_seconds_runs": [round(m.seconds, 3) for m in runs[label]],
                f"{key}_seconds": round(medians[label], 3),
                f"{key}_instances_per_s": round(args.instances / medians[label], 1),
                f"{key}_cpu_ms_per_instance": per_instance_ms(runs[label], args.instances),
            }
        )
    if binary is not None:
        ratio = medians[ORTHANC] / medians[FILES]
        through_front = medians[ORTHANC] / medians[API]
        print(f"emulator / Orthanc throughput ratio (medians): {ratio:.2f}")
        print(f"the same, reading through the storage front: {through_front:.2f}")
        config = orthanc_config("TMPDIR", 0)
        print(f"Orthanc: {orthanc_version(binary)}, configuration: {json.dumps(config)}")
        result.update(
            {
                "orthanc_version": orthanc_version(binary),
                "orthanc_config": config,
                "orthanc_seconds_runs": [round(m.seconds, 3) for m in runs[ORTHANC]],
                "orthanc_seconds": round(medians[ORTHANC], 3),
                "orthanc_instances_per_s": round(args.instances / medians[ORTHANC], 1),
                "orthanc_cpu_ms_per_instance": per_instance_ms(runs[ORTHANC], args.instances),
                "orthanc_stow_batch": args.stow_batch,
                "emulator_to_orthanc_ratio": round(ratio, 2),
                "emulator_through_front_to_orthanc_ratio": round(through_front, 2),
            }
        )
    else:
        print("Orthanc: not available, so no comparison was made (see above)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
