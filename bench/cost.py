"""The cost model of the ingest benchmarks: USD per million files from measured counts.

Every price is a public list price, with the page it was read from and the date
of the copy read (``PRICES``; Tier 1 / us-central1 rows, beyond the free tiers).
A strategy's measurements per file (``PerFile``) come from
``bench/ingest_burst.py``: Cloud Storage calls by operation, Healthcare calls by
method, function invocations and the seconds each took, and the bytes a
strategy keeps that another does not. What is common to every strategy (the
landing objects, the bytes in the DICOM store, the Eventarc events) is left out.

Compute is priced as Cloud Run functions bill it with one request per instance
at a time (``max_instance_request_concurrency = 1`` in ``infra/functions.tf``):
each request's duration, rounded up to 100 ms, times the instance's vCPU and
memory. The function has 512 MiB and the 0.333 vCPU that goes with it.
Durations measured on a shared 2-core machine are longer than Cloud Run's, so
compute is an upper bound; the CPU time the functions used is its lower bound
(``computeCpuBound``).

Healthcare data volume: the price list charges DICOM imports and STOW-RS per
request (import and export are multi-operation requests); the copies read list
no per-GB charge for them, so none is modelled. The bytes in the store are the
same for every strategy.

Kept bytes: dicomflow's staging copy of each file stays
``STAGING_COPY_DAYS`` (the lifecycle rule), then ``NONCURRENT_DAYS`` as a
noncurrent version and ``SOFT_DELETE_DAYS`` in soft delete. The baselines keep
no copy.

Run alone, ``python bench/cost.py [RESULT.json]`` prints the model for a
result of ``ingest_burst.py`` (default ``bench/results/ingest_burst.json``).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRICES_READ = "2026-12-01"
# Each entry: (USD, unit, source page, what the copy read says and its date).
PRICES: dict[str, tuple[float, str, str, str]] = {
    "storage_class_a": (
        0.005 / 1000,
        "per operation",
        "https://cloud.google.com/storage/pricing-examples",
        "Class A operations * $0.005 per 1,000 operations (Standard, regional); read "
        + PRICES_READ,
    ),
    "storage_class_b": (
        0.0004 / 1000,
        "per operation",
        "https://cloud.google.com/storage/pricing-examples",
        "Class B operations * $0.0004 per 1,000 operations; read " + PRICES_READ,
    ),
    "storage_gib_month": (
        0.020,
        "per GiB-month",
        "https://cloud.google.com/storage/pricing",
        "Standard storage, Iowa (us-central1) $0.020; read " + PRICES_READ,
    ),
    "run_vcpu_second": (
        0.000024,
        "per vCPU-second",
        "https://cloud.google.com/run/pricing",
        "CPU only allocated during request processing, Tier 1: $0.00002400 / vCPU-second "
        "beyond free tier; read " + PRICES_READ,
    ),
    "run_gib_second": (
        0.0000025,
        "per GiB-second",
        "https://cloud.google.com/run/pricing",
        "same table, memory $0.00000250 / GiB-second; read " + PRICES_READ,
    ),
    "run_request": (
        0.40 / 1e6,
        "per request",
        "https://cloud.google.com/run/pricing",
        "same table, $0.40 per million requests beyond 2 million free; read " + PRICES_READ,
    ),
    "healthcare_standard": (
        0.39 / 1e5,
        "per request",
        "https://cloud.google.com/healthcare/pricing",
        "Standard Requests $0.39 per 100,000, 25,000 to 1 billion a month (archived copy "
        "of 2021-02-02, the latest copy with the table; the current page, read "
        + PRICES_READ
        + ", lists the same categories and the 25,000 free requests)",
    ),
    "healthcare_complex": (
        0.69 / 1e5,
        "per request",
        "https://cloud.google.com/healthcare/pricing",
        "Complex Requests $0.69 per 100,000 (same copy)",
    ),
    "healthcare_multi_operation": (
        0.39 / 1e5,
        "per request",
        "https://cloud.google.com/healthcare/pricing",
        "Multi-operation Requests $0.39 per 100,000 (same copy)",
    ),
}
# What a function instance is given (infra/main.tf: 512Mi) and the vCPU that comes with
# it (https://cloud.google.com/functions/docs/configuring/memory: 512 MiB, .333 vCPU).
FUNCTION_GIB = 0.5
FUNCTION_VCPU = 0.333
BILLING_STEP_SECONDS = 0.1
# infra/variables.tf defaults, and Cloud Storage's default soft delete retention.
STAGING_COPY_DAYS = 7
NONCURRENT_DAYS = 7
SOFT_DELETE_DAYS = 7
DAYS_PER_MONTH = 30.4
FILE_SIZES_MB = (0.5, 20.0)
# An assumption, not a measurement: what one function instance moves to and from Cloud
# Storage and the Healthcare API in its region, MB/s. Only the STOW-RS baseline moves a
# file's bytes itself, so only its rows for big files depend on it.
TRANSFER_MB_PER_SECOND = 100.0

CLASS_A = (
    "objects.insert",
    "objects.rewrite",
    "objects.copy",
    "objects.compose",
    "objects.list",
    "objects.patch",
    "buckets.list",
)
CLASS_B = ("objects.get", "objects.download", "buckets.get")
# Healthcare methods by price category. The price page's exceptions to "standard": import
# and export are multi-operation requests; QIDO-RS searches are counted as complex (an
# assumption: the archived table names the category but this copy lists no methods).
HEALTHCARE_MULTI = ("import", "export")
HEALTHCARE_COMPLEX = ("dicomWeb.search",)


def price(name: str) -> float:
    return PRICES[name][0]


@dataclass
class PerFile:
    """One strategy's measured counts, per file ingested (fixed tick costs taken out)."""

    storage: dict[str, float]
    healthcare: dict[str, float]
    invocations: float
    billed_seconds: float = 0.0
    cpu_ms: float = 0.0
    keeps_copy: bool = False
    # Bytes the function moves through itself per file (STOW-RS: down, then up), as
    # multiples of the file's size; their time is added to the billed seconds.
    bytes_through: float = 0.0


def billed_seconds(durations: list[float]) -> float:
    """Instance seconds Cloud Run bills for these requests (each rounded up to 100 ms)."""
    return sum(math.ceil(d / BILLING_STEP_SECONDS - 1e-9) * BILLING_STEP_SECONDS for d in durations)


def usd_per_million(per_file: PerFile, file_mb: float) -> dict[str, float]:
    """USD per million files, by part, for files of ``file_mb`` MB."""
    storage_ops = sum(
        n * (price("storage_class_a") if op in CLASS_A else price("storage_class_b"))
        for op, n in per_file.storage.items()
        if op in CLASS_A or op in CLASS_B
    )
    healthcare = sum(
        n
        * price(
            "healthcare_multi_operation"
            if op in HEALTHCARE_MULTI
            else "healthcare_complex"
            if op in HEALTHCARE_COMPLEX
            else "healthcare_standard"
        )
        for op, n in per_file.healthcare.items()
        if op != "emulator"
    )
    invocations = per_file.invocations * price("run_request")
    seconds = per_file.billed_seconds + per_file.bytes_through * file_mb / TRANSFER_MB_PER_SECOND
    compute = seconds * (
        FUNCTION_VCPU * price("run_vcpu_second") + FUNCTION_GIB * price("run_gib_second")
    )
    cpu_bound = (
        per_file.cpu_ms
        / 1000
        * (price("run_vcpu_second") + FUNCTION_GIB / FUNCTION_VCPU * price("run_gib_second"))
    )
    kept_days = (STAGING_COPY_DAYS + NONCURRENT_DAYS + SOFT_DELETE_DAYS) * per_file.keeps_copy
    kept = file_mb * 1e6 / 2**30 * kept_days / DAYS_PER_MONTH * price("storage_gib_month")
    parts = {
        "storageOperations": storage_ops,
        "healthcareRequests": healthcare,
        "invocations": invocations,
        "compute": compute,
        "keptBytes": kept,
    }
    out = {k: round(v * 1e6, 2) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) * 1e6, 2)
    out["computeCpuBound"] = round(cpu_bound * 1e6, 2)
    return out


def fixed_per_month(per_tick: dict[str, Any], tick_seconds: float) -> float:
    """USD a month of one idle tick a minute: its Storage and Healthcare calls,
    invocations and the billed seconds of its requests (``tick_seconds``, one tick's)."""
    storage = per_tick.get("storageCalls", {})
    tick = PerFile(
        storage=storage,
        healthcare={"other": per_tick.get("healthcareCalls", 0.0)},
        invocations=per_tick.get("invocations", 0.0),
        billed_seconds=tick_seconds,
    )
    usd = usd_per_million(tick, 0.0)["total"] / 1e6
    return round(usd * 60 * 24 * DAYS_PER_MONTH, 2)


def table(result: dict[str, Any]) -> str:
    """The cost lines of an ``ingest_burst.py`` result, as text."""
    lines = [f"USD per million files (list prices read {PRICES_READ}; see bench/cost.py)"]
    for strategy, entry in result.get("strategies", {}).items():
        for case in ("contended", "uncontended"):
            for size, parts in entry.get(case, {}).get("usd", {}).items():
                shown = ", ".join(f"{k} {v}" for k, v in parts.items())
                lines.append(f"  {strategy:10} {case:12} {size:>4} MB: {shown}")
    return "\n".join(lines)


def main() -> int:
    path = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).parent / "results" / ("ingest_burst.json")
    )
    for name, (usd, unit, source, note) in PRICES.items():
        print(f"{name:28} {usd:.10f} USD {unit:16} {source}  ({note})")
    if path.exists():
        print(table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
