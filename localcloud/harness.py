"""A measured local cloud for benchmarks and chaos runs.

``MeasuredStack`` starts the ordinary ``Stack`` with two ``FaultProxy``
instances in the functions' path: one in front of Cloud Storage (the
functions' ``STORAGE_EMULATOR_HOST``; behind it the stack's storage front,
which enforces preconditions, then fake-gcs-server) and one in front of the
Healthcare emulator (their ``DICOMFLOW_HEALTHCARE_ENDPOINT``). The proxies
count every call the functions make and can inject faults, before a request
is forwarded or, for writes, after it took effect. The bucket watcher, the
scheduler and the harness itself talk to the storage front directly, so they
are neither counted nor faulted.

Also here: reading a function process's CPU time and peak RSS from
``/proc``, counting the store's instances, and draining the alerts
subscription.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from localcloud.faultproxy import FaultProxy, healthcare_operation, storage_area, storage_operation
from localcloud.ports import HOST, listening_socket
from localcloud.stack import Stack, StackConfig

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class MeasuredStack:
    """A started ``Stack`` plus the two counting proxies in front of its services."""

    stack: Stack
    storage_proxy: FaultProxy
    healthcare_proxy: FaultProxy

    @classmethod
    def start(
        cls,
        home: Path,
        *,
        function_env: Mapping[str, str] | None = None,
        functions_source: Path | None = None,
        minute_interval: float = 60.0,
        operation_latency: float = 0.0,
        max_concurrent_ops: int = 0,
        seed: int | None = None,
        ingest_workers: int = 1,
        event_retry: tuple[float, float, float] | None = None,
    ) -> MeasuredStack:
        """Start the proxies and the stack behind them.

        The proxies must know the services' ports before the stack starts: the
        services' listening sockets are bound here and handed to the stack.
        """
        listeners = {
            "storage": listening_socket(0, "Cloud Storage"),
            "healthcare": listening_socket(0, "the Healthcare API emulator"),
        }
        upstreams = {name: f"http://{HOST}:{s.getsockname()[1]}" for name, s in listeners.items()}
        storage_proxy = FaultProxy(
            upstreams["storage"], storage_operation, storage_area, seed=seed
        ).start()
        healthcare_proxy = FaultProxy(
            upstreams["healthcare"], healthcare_operation, seed=seed
        ).start()
        env = {
            **(function_env or {}),
            "STORAGE_EMULATOR_HOST": storage_proxy.url,
            "DICOMFLOW_HEALTHCARE_ENDPOINT": healthcare_proxy.url,
        }
        config = StackConfig(
            home=home,
            minute_interval=minute_interval,
            function_env=env,
            healthcare_args=(
                "--operation-latency",
                str(operation_latency),
                "--max-concurrent-ops",
                str(max_concurrent_ops),
            ),
            ingest_workers=ingest_workers,
        )
        if event_retry is not None:
            config = replace(config, event_retry=event_retry)
        if functions_source is not None:
            config = replace(config, functions_source=functions_source)
        stack = Stack(config, listeners)
        try:
            stack.start()
        except BaseException:
            storage_proxy.stop()
            healthcare_proxy.stop()
            raise
        return cls(stack, storage_proxy, healthcare_proxy)

    def stop(self) -> None:
        self.stack.stop()
        self.storage_proxy.stop()
        self.healthcare_proxy.stop()

    def store_count(self) -> int:
        """Instances in the DICOM store, read from the emulator's index (no API call)."""
        return count_instances(self.stack.config.home / "healthcare" / "index.sqlite3")

    def store_instances(self) -> dict[str, str]:
        """SOP Instance UID -> SHA-256 of the stored bytes, for every stored instance."""
        return list_instances(self.stack.config.home / "healthcare" / "index.sqlite3")

    def alerts(self) -> list[dict[str, Any]]:
        return self.stack.drain_alerts()

    def invocations(self) -> int:
        """Function invocations so far (every delivery attempt, upload events and ticks)."""
        return sum(
            d.delivered + d.failed_attempts
            for d in (self.stack.deliverer, self.stack.tick_deliverer)
            if d is not None
        )


def _connect(index: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30)


def count_instances(index: Path) -> int:
    """Rows of the emulator's ``instances`` table (0 before the first import)."""
    if not index.exists():
        return 0
    db = _connect(index)
    try:
        return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def list_instances(index: Path) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 from the emulator's index (its key is (store, sop))."""
    db = _connect(index)
    try:
        return {str(sop): str(sha) for sop, sha in db.execute("SELECT sop, sha256 FROM instances")}
    finally:
        db.close()


def process_usage(pids: list[int]) -> dict[str, float]:
    """CPU time (ms, user+system, with reaped children) and peak RSS (MiB) of ``pids``.

    ``rssPeakMiB`` is the largest VmHWM of one process (the busiest worker);
    ``rssPeakSumMiB`` adds them up.
    """
    cpu = 0
    peaks: list[int] = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # utime, stime, cutime, cstime are fields 14-17 of stat (1-based).
        cpu += sum(int(v) for v in fields[11:15])
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]))
    return {
        "cpuMs": cpu * 1000 / _TICKS,
        "rssPeakMiB": max(peaks, default=0) / 1024,
        "rssPeakSumMiB": sum(peaks) / 1024,
    }
