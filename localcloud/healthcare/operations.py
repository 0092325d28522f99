"""Long-running operations: created at once, worked on in a background thread.

An operation waits the modelled start latency, then runs its work function,
which moves the live counters and adds per-file log entries. It finishes with
``response`` when no file failed, else with an ``error`` giving the counts.
Running operations live in memory (so counters are live) and in SQLite (so
they survive a restart; one that was running then ends as ABORTED).
"""

from __future__ import annotations

import datetime
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from localcloud.healthcare.knobs import Knobs
from localcloud.healthcare.repository import Repository
from localcloud.healthcare.status import ApiError, not_found

log = logging.getLogger(__name__)

SERVICE = {
    "import": "dicom.DicomService.ImportDicomData",
    "export": "dicom.DicomService.ExportDicomData",
    "datasets.create": "dataset.DatasetService.CreateDataset",
    "dicomWeb.delete": "dicom.DicomWebService.DeleteStudy",
    "dicomWeb.deleteSeries": "dicom.DicomWebService.DeleteSeries",
}
RESPONSE_TYPE = {
    "import": "dicom.ImportDicomDataResponse",
    "export": "dicom.ExportDicomDataResponse",
    "datasets.create": "Dataset",
    "dicomWeb.delete": "dicom.DeleteStudyResponse",
    "dicomWeb.deleteSeries": "dicom.DeleteSeriesResponse",
}


def now_rfc3339() -> str:
    """The current UTC time as Google formats it."""
    moment = datetime.datetime.now(datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class RunningOperation:
    """The live state of one operation, shared by its worker and the API threads."""

    name: str
    dataset: str
    kind: str
    version: str
    logs_url: str
    create_time: str
    counted: bool
    limited: bool
    success: int = 0
    failure: int = 0
    pending: int = 0
    end_time: str | None = None
    done: bool = False
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    new_logs: list[dict[str, Any]] = field(default_factory=list)

    def count(self, success: int = 0, failure: int = 0) -> None:
        """Move files from pending to success or failure."""
        with self.lock:
            self.success += success
            self.failure += failure
            self.pending = max(0, self.pending - success - failure)

    def set_pending(self, pending: int) -> None:
        with self.lock:
            self.pending = pending

    def log_failure(self, source: str, code: int, message: str) -> None:
        """Keep one per-file error, as an ImportDicomLogEntry-like record."""
        entry = {
            "@type": f"type.googleapis.com/google.cloud.healthcare.logging.{_log_type(self.kind)}",
            "source": source,
            "error": {"code": code, "message": message},
        }
        with self.lock:
            self.new_logs.append(entry)

    def take_logs(self) -> list[dict[str, Any]]:
        with self.lock:
            taken, self.new_logs = self.new_logs, []
        return taken

    def as_json(self) -> dict[str, Any]:
        """The Operation resource, as operations.get returns it."""
        with self.lock:
            metadata: dict[str, Any] = {
                "@type": f"type.googleapis.com/google.cloud.healthcare.{self.version}"
                ".OperationMetadata",
                "apiMethodName": f"google.cloud.healthcare.{self.version}.{SERVICE[self.kind]}",
                "createTime": self.create_time,
                "logsUrl": self.logs_url,
            }
            if self.end_time:
                metadata["endTime"] = self.end_time
            if self.cancelled.is_set():
                metadata["cancelRequested"] = True
            if self.counted:
                counter = {
                    "success": self.success,
                    "failure": self.failure,
                    "pending": self.pending,
                }
                # int64 fields travel as strings; zero values are omitted, as proto3 JSON does.
                metadata["counter"] = {k: str(v) for k, v in counter.items() if v}
            body: dict[str, Any] = {"name": self.name, "metadata": metadata}
            if self.done:
                body["done"] = True
                if self.error is not None:
                    body["error"] = self.error
                else:
                    body["response"] = self.response or {}
            return body


def _log_type(kind: str) -> str:
    return "ExportDicomLogEntry" if kind == "export" else "ImportDicomLogEntry"


Work = Callable[[RunningOperation], dict[str, Any] | None]


class Operations:
    """Creates, runs, lists and cancels the operations of every dataset."""

    def __init__(self, repository: Repository, knobs: Knobs, base_url: Callable[[], str]) -> None:
        self._repository = repository
        self._knobs = knobs
        self._base_url = base_url
        self._running: dict[str, RunningOperation] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._abort_leftovers()

    def _abort_leftovers(self) -> None:
        for name, dataset, body in self._repository.unfinished_operations():
            body["done"] = True
            body.setdefault("metadata", {})["endTime"] = now_rfc3339()
            body["error"] = ApiError(
                "ABORTED", "the emulator stopped while this operation was running"
            ).operation_error()
            self._repository.save_operation(name, dataset, body, True)

    def start(
        self,
        dataset: str,
        kind: str,
        version: str,
        work: Work,
        counted: bool = False,
        limited: bool = False,
        immediate: bool = False,
    ) -> dict[str, Any]:
        """Create an operation and run ``work`` in the background; returns its JSON.

        Raises:
            ApiError: RESOURCE_EXHAUSTED when ``limited`` and the dataset's quota is used up.
        """
        operation_id = str(secrets.randbelow(9 * 10**18) + 10**18)
        name = f"{dataset}/operations/{operation_id}"
        logs_url = f"{self._base_url()}/_emulator/logs/{name}"
        operation = RunningOperation(
            name, dataset, kind, version, logs_url, now_rfc3339(), counted, limited
        )
        with self._lock:
            quota = self._knobs.max_concurrent_ops
            if limited and quota > 0:
                running = sum(
                    1 for op in self._running.values() if op.limited and op.dataset == dataset
                )
                if running >= quota:
                    raise ApiError(
                        "RESOURCE_EXHAUSTED",
                        f"too many concurrent import/export operations in {dataset} "
                        f"(limit {quota}); retry later",
                    )
            self._running[name] = operation
        self._save(operation)
        if immediate:
            self._run(operation, work, wait=False)
        else:
            thread = threading.Thread(
                target=self._run, args=(operation, work), name=f"op-{operation_id}", daemon=True
            )
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()
        return operation.as_json()

    def _save(self, operation: RunningOperation) -> None:
        self._repository.add_logs(operation.name, operation.take_logs())
        self._repository.save_operation(
            operation.name, operation.dataset, operation.as_json(), operation.done
        )

    def checkpoint(self, operation: RunningOperation) -> None:
        """Persist the live counters and logs (called by work functions between batches)."""
        self._save(operation)

    def _run(self, operation: RunningOperation, work: Work, wait: bool = True) -> None:
        response: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        try:
            delay = self._knobs.operation_latency if wait else 0.0
            if delay > 0:
                operation.cancelled.wait(delay)
            if not operation.cancelled.is_set() and not self._stopping.is_set():
                response = work(operation)
        except ApiError as exc:
            error = exc.operation_error()
        except Exception:
            log.exception("operation %s failed inside the emulator", operation.name)
            error = ApiError("INTERNAL", "internal error in the emulator").operation_error()
        with operation.lock:
            if error is None and self._stopping.is_set():
                error = ApiError("ABORTED", "the emulator stopped").operation_error()
            elif error is None and operation.cancelled.is_set():
                error = {"code": 1, "message": "Operation was cancelled", "details": []}
            elif error is None and operation.failure:
                total = operation.success + operation.failure
                noun = "exported" if operation.kind == "export" else "imported"
                error = {
                    "code": 3,
                    "message": (
                        f"{operation.failure} of {total} files could not be {noun} "
                        f"(success: {operation.success}, failure: {operation.failure}); "
                        f"see the per-file errors at {operation.logs_url}"
                    ),
                    "details": [],
                }
            operation.error = error
            operation.response = None if error else _typed(operation, response)
            operation.end_time = now_rfc3339()
            operation.done = True
        self._save(operation)
        with self._lock:
            self._running.pop(operation.name, None)

    def get(self, name: str) -> dict[str, Any]:
        with self._lock:
            running = self._running.get(name)
        if running is not None:
            return running.as_json()
        body = self._repository.get_operation(name)
        if body is None:
            raise not_found(f"operation {name}")
        return body

    def list_for(self, dataset: str) -> list[dict[str, Any]]:
        with self._lock:
            running = {n: op for n, op in self._running.items() if op.dataset == dataset}
        return [
            running[b["name"]].as_json() if b["name"] in running else b
            for b in self._repository.list_operations(dataset)
        ]

    def cancel(self, name: str) -> None:
        with self._lock:
            running = self._running.get(name)
        if running is None:
            if self._repository.get_operation(name) is None:
                raise not_found(f"operation {name}")
            return
        running.cancelled.set()

    def logs(self, name: str) -> list[dict[str, Any]]:
        self.get(name)
        with self._lock:
            running = self._running.get(name)
        pending = list(running.new_logs) if running else []
        return self._repository.get_logs(name) + pending

    def stop(self, timeout: float = 10.0) -> None:
        """Ask running work to end and wait for the workers."""
        self._stopping.set()
        with self._lock:
            for op in self._running.values():
                op.cancelled.set()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()


def _typed(operation: RunningOperation, response: dict[str, Any] | None) -> dict[str, Any]:
    kind = RESPONSE_TYPE[operation.kind]
    body = {"@type": f"type.googleapis.com/google.cloud.healthcare.{operation.version}.{kind}"}
    body.update(response or {})
    return body
