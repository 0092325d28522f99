"""A discrete-event model of dicomflow at 1 million files an hour.

Driven by the deployed code's own decisions where they are pure:

- which window a staging copy goes to: ``staging.window_id`` (its home window),
  ``ingest.copy_deadline`` and ``staging.seal_time`` (in time for the home
  window's seal?), ``ingest.late_home`` (else the late window holding that seal),
  ``staging.late_window_id`` (else the current late window, by claim);
- when a window is sealed: ``staging.seal_time``, at the first tick after it;
- how a sealed window becomes batches: ``batches.split`` over the files' keys
  (``staging.file_key``) and sizes, with the batch caps;
- at most K imports at once, started in batch-id order at each tick after the
  ticks' poll frees the slots of finished ones (``batches.run_imports``); a 429
  stops the tick's starts, the batch stays queued.

What it models around them, each parameter with its source (``PARAMETERS``):
uploads as a Poisson stream; Eventarc's delivery delay; ingest instances that
each handle one event at a time (``max_instance_request_concurrency = 1``), up
to a maximum, an event finding none free redelivered on Pub/Sub's push schedule
(10 s doubling to 600 s); an import operation's start latency and throughput;
the service's concurrent-operation quota (429 beyond it). A file is in the
store when its batch's operation ends; its latency is that time minus its
upload. Verification is off that path and not modelled.

Reports imports per hour and p50/p99 upload-to-store latency at the defaults;
the batch cap and K that keep p99 under 10 minutes with the fewest imports;
and a sensitivity table: p99 and imports per hour as each parameter is halved
and doubled. Runs in well under 2 minutes (``--quick``: fewer grid points).
Writes ``bench/results/simulate.json``.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomflow import batches, ingest, staging
from dicomflow.config import Settings

RESULTS = Path(__file__).resolve().parent / "results"
HOUR = 3600.0
# The simulated hour starts at a round time (window ids are UTC times).
EPOCH = datetime(2026, 12, 1, 8, 0, tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class Params:
    """Every input of the model; ``PARAMETERS`` names where each value comes from."""

    files_per_hour: float = 1_000_000
    file_mb: float = 0.5
    event_delay_s: float = 2.0
    handler_s: float = 0.25
    max_instances: int = 50
    tick_s: float = 60.0
    window_s: int = Settings.batch_window_seconds
    grace_s: int = 130
    late_window_s: int = Settings.late_window_seconds
    k: int = Settings.max_running_imports
    batch_max_files: int = Settings.batch_max_files
    batch_max_gib: float = Settings.batch_max_bytes / 2**30
    op_start_s: float = 60.0
    op_files_per_s: float = 100.0
    quota: int = 5


PARAMETERS: dict[str, str] = {
    "files_per_hour": "the target load: 1 million files an hour, arriving as a Poisson stream",
    "file_mb": "a CT slice is about 0.5 MB (bench/cost.py prices 0.5 and 20 MB files)",
    "event_delay_s": "assumption: Eventarc delivers a finalize event a few seconds after it",
    "handler_s": "this machine: ingest request p50 of the steady load "
    "(bench/results/ingest_burst.json, dicomflow), when present",
    "max_instances": "infra/variables.tf ingest_max_instances default (50), one request each",
    "tick_s": "infra/variables.tf tick_schedule default: every minute",
    "window_s": "dicomflow/config.py DICOMFLOW_BATCH_WINDOW_SECONDS default",
    "grace_s": "infra/main.tf: DICOMFLOW_SEAL_GRACE_SECONDS = ingest_timeout_seconds (120) + 10",
    "late_window_s": "dicomflow/config.py DICOMFLOW_LATE_WINDOW_SECONDS default",
    "k": "dicomflow/config.py DICOMFLOW_MAX_RUNNING_IMPORTS default",
    "batch_max_files": "dicomflow/config.py DICOMFLOW_BATCH_MAX_FILES default",
    "batch_max_gib": "dicomflow/config.py DICOMFLOW_BATCH_MAX_BYTES default (20 GiB)",
    "op_start_s": "Google's advice (docs: keep about 5 imports running, since starting and "
    "finishing one takes minutes): 60 s before an operation works",
    "op_files_per_s": "assumption: no public figure; the emulator on this machine imports "
    "about 900 small files/s (bench/results/emulator_import.json), Google's service far "
    "fewer per operation; 100 files/s",
    "quota": "Google publishes no concurrent-operation figure; its advice is about 5",
}
# Pub/Sub push redelivery (Eventarc's retry): 10 s doubling to 600 s.
RETRY_FIRST_S, RETRY_LARGEST_S = 10.0, 600.0


class _Key:
    """What ``batches.split`` reads of a file: its key and size."""

    __slots__ = ("key", "size")

    def __init__(self, key: str, size: int) -> None:
        self.key = key
        self.size = size


# Keys of this many object names, repeated over the files: ``batches.split`` reads only
# a key's first bits, whose share of each prefix the repetition keeps.
DISTINCT_KEYS = 65_536
_KEYS: list[str] = []


def _key_bits() -> np.ndarray:
    """The leading key bits (0-63) of DISTINCT_KEYS object names, by ``staging.file_key``."""
    if not _KEYS:
        _KEYS.extend(
            staging.file_key("landing", f"sim/{i:08d}.dcm", 1)[: staging.BITS]
            for i in range(DISTINCT_KEYS)
        )
    return np.array([int(k, 2) for k in _KEYS], dtype=np.int64)


def _backoff(attempt: int) -> float:
    """Pub/Sub push's pause after failed attempt ``attempt`` (1-based), without jitter."""
    return min(RETRY_LARGEST_S, RETRY_FIRST_S * 2.0 ** (attempt - 1))


def handled(uploads: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray | None:
    """When each file's event starts being handled: the delivery delay, then the first
    attempt that finds one of ``max_instances`` free (each handles one event at a time);
    an attempt that finds none is answered 429 and redelivered on the schedule above."""
    arrivals = uploads + rng.exponential(p.event_delay_s, len(uploads))
    service = p.handler_s * rng.lognormal(0.0, 0.3, len(uploads))
    busy = p.files_per_hour / HOUR * float(np.mean(service))  # instances in use, on average
    if busy < 0.7 * p.max_instances:
        return arrivals  # never near the instance limit: no wait
    if busy >= p.max_instances:
        return None  # more work than the instances can do: the backlog only grows
    starts = np.empty_like(arrivals)
    pending = [(t, i, 1) for i, t in enumerate(arrivals.tolist())]
    heapq.heapify(pending)
    free = [0.0] * p.max_instances
    while pending:
        t, i, attempt = heapq.heappop(pending)
        if free[0] <= t:
            heapq.heapreplace(free, t + service[i])
            starts[i] = t
        else:
            heapq.heappush(pending, (t + _backoff(attempt), i, attempt + 1))
    return starts


def run(p: Params, seed: int = 1) -> dict[str, Any]:
    """One simulated hour of uploads, drained; imports/hour and latencies."""
    rng = np.random.default_rng(seed)
    settings = Settings(
        dicom_store="projects/p/locations/l/datasets/d/dicomStores/s",  # type: ignore[arg-type]
        landing_bucket="landing",
        staging_bucket="staging",
        backup_bucket="backup",
        alerts_topic="projects/p/topics/t",  # type: ignore[arg-type]
        batch_window_seconds=int(p.window_s),
        seal_grace_seconds=int(p.grace_s),
        late_window_seconds=int(p.late_window_s),
        batch_max_files=int(p.batch_max_files),
        batch_max_bytes=int(p.batch_max_gib * 2**30),
        max_running_imports=int(p.k),
    )
    n = round(p.files_per_hour)
    uploads = EPOCH + np.sort(rng.uniform(0.0, HOUR, n))
    starts = handled(uploads, p, rng)
    if starts is None:
        return {
            "files": n,
            "saturated": "ingest instances",
            "imports": None,
            "importsPerHour": None,
            "p50": math.inf,
            "p99": math.inf,
        }
    deadline = ingest.copy_deadline(settings)

    # Window of each copy, by the code's rules, computed once per home window.
    seal_at: dict[str, float] = {}

    def sealed_when(window: str) -> float:
        if window not in seal_at:
            seal_at[window] = staging.seal_time(window, settings).timestamp()
        return seal_at[window]

    home_starts, home_of = np.unique((uploads // p.window_s) * p.window_s, return_inverse=True)
    names: list[str] = []
    home_seal, late_seal = np.empty(len(home_starts)), np.empty(len(home_starts))
    late_index: list[int] = []
    for j, moment in enumerate(home_starts.tolist()):
        home = staging.window_id(datetime.fromtimestamp(moment, UTC), p.window_s)
        late = ingest.late_home(staging.FileRecord("", "", "", "", 0, home, home), settings)
        home_seal[j], late_seal[j] = sealed_when(home), sealed_when(late)
        names.append(home)
        late_index.append(len(names))
        names.append(late)
    landed_by = starts + deadline
    home_index = np.array(late_index, dtype=np.int64) - 1
    window_index = np.where(
        landed_by < home_seal[home_of],
        home_index[home_of],
        home_index[home_of] + 1,
    )
    # Later than the late window's seal too: the current late window, by claim.
    claimed = np.flatnonzero(landed_by >= late_seal[home_of])
    if len(claimed):
        late_starts, late_of = np.unique(
            (starts[claimed] // p.late_window_s) * p.late_window_s, return_inverse=True
        )
        known = {name: j for j, name in enumerate(names)}
        for j, moment in enumerate(late_starts.tolist()):
            window = staging.late_window_id(datetime.fromtimestamp(moment, UTC), p.late_window_s)
            if window not in known:
                known[window] = len(names)
                names.append(window)
            window_index[claimed[late_of == j]] = known[window]
    bits = _key_bits()[np.arange(n) % DISTINCT_KEYS]
    order = np.argsort(window_index, kind="stable")
    bounds = np.searchsorted(window_index[order], np.arange(len(names) + 1))
    members = {
        names[w]: order[bounds[w] : bounds[w + 1]]
        for w in range(len(names))
        if bounds[w + 1] > bounds[w]
    }
    size = int(p.file_mb * 1e6)
    tiles = [_Key(k, size) for k in _KEYS]

    # Ticks: seal the due windows, poll (free slots of finished imports), start while < K.
    due = sorted((sealed_when(w), w) for w in members)
    queue: list[tuple[str, np.ndarray]] = []
    running: list[tuple[float, str]] = []  # (end, batch)
    done_at = np.full(n, np.inf)
    started: list[float] = []
    throttled = 0
    first_tick = math.ceil(EPOCH / p.tick_s) * p.tick_s
    tick = first_tick
    last = EPOCH + HOUR + 6 * HOUR
    next_due = 0
    while tick < last and (next_due < len(due) or queue or running):
        while next_due < len(due) and due[next_due][0] <= tick:
            window = due[next_due][1]
            files = members[window]
            records = [tiles[j] for j in (files % DISTINCT_KEYS).tolist()]
            parts = batches.split(
                records,  # type: ignore[arg-type]
                settings.batch_max_files,
                settings.batch_max_bytes,
            )
            for part_bits, _ in parts:
                depth = len(part_bits)
                mine = (bits[files] >> (staging.BITS - depth)) == int(part_bits or "0", 2)
                queue.append((staging.batch_id(window, part_bits), files[mine]))
            next_due += 1
        queue.sort(key=lambda b: b[0])
        running = [(end, b) for end, b in running if end > tick]
        while queue and len(running) < settings.max_running_imports:
            if len(running) >= p.quota:
                throttled += 1
                break
            batch, files = queue.pop(0)
            end = tick + p.op_start_s + len(files) / p.op_files_per_s
            running.append((end, batch))
            done_at[files] = end
            started.append(tick)
        tick += p.tick_s
    latency = done_at - uploads
    finite = latency[np.isfinite(latency)]
    in_hour = bisect.bisect_left(sorted(started), EPOCH + HOUR)
    return {
        "files": n,
        "imports": len(started),
        "importsPerHour": in_hour,
        "windows": len(members),
        "lateFiles": int(sum(len(f) for w, f in members.items() if staging.is_late_window(w))),
        "throttledTicks": throttled,
        "unfinished": int(n - len(finite)),
        "p50": float(np.percentile(latency, 50)) if len(finite) == n else math.inf,
        "p99": float(np.percentile(latency, 99)) if len(finite) == n else math.inf,
        "meanFilesPerImport": round(n / max(1, len(started)), 1),
    }


def measured_handler_seconds() -> float | None:
    """The ingest request p50 of dicomflow's steady load on this machine, if measured."""
    path = RESULTS / "ingest_burst.json"
    try:
        result = json.loads(path.read_text())
        return float(result["strategies"]["dicomflow"]["steady"]["ingestRequestSeconds"]["p50"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fmt(seconds: float) -> str:
    return "never" if math.isinf(seconds) else f"{seconds:,.0f}"


def _cell(r: dict[str, Any]) -> str:
    """``p99 s  imports/h`` of one run (``saturated`` when ingest cannot keep up)."""
    if r.get("saturated"):
        return "saturated"
    p99 = "never" if math.isinf(r["p99"]) else f"{r['p99']:,.0f} s"
    return f"{p99} {r['importsPerHour']:>4}/h"


def _finite(value: Any) -> Any:
    """JSON has no infinity: None stands for "never"."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _run(item: tuple[Params, int]) -> dict[str, Any]:
    return run(*item)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--processes", type=int, default=2, help="runs at once")
    args = parser.parse_args()
    began = time.monotonic()
    base = Params()
    handler = measured_handler_seconds()
    if handler:
        base = replace(base, handler_s=handler)
    print("parameters (PARAMETERS in bench/simulate.py names each source):")
    for name, value in asdict(base).items():
        print(f"  {name:16} {value:>12,}   {PARAMETERS[name]}")

    caps = (5_000, 10_000, 20_000, 50_000) if args.quick else (2_500, 5_000, 10_000, 20_000, 50_000)
    ks = (2, 5, 8) if args.quick else (1, 2, 3, 5, 8)
    points = [(cap, k) for cap in caps for k in ks]
    # The quota is the service's, not dicomflow's: a K above it is raised with it.
    grid_params = [
        replace(base, batch_max_files=cap, k=k, quota=max(base.quota, k)) for cap, k in points
    ]
    with multiprocessing.get_context("fork").Pool(args.processes) as pool:
        runs = pool.map(_run, [(p, args.seed) for p in [base, *grid_params]])
        result, grid_runs = runs[0], runs[1:]
        print(
            f"\ndefaults: {_cell(result)}, p50 {_fmt(result['p50'])} s, "
            f"{result.get('meanFilesPerImport', '-')} files per import"
        )
        grid = [
            {"batchMaxFiles": c, "k": k, **r} for (c, k), r in zip(points, grid_runs, strict=True)
        ]
        print("\nbatch cap x K at the same load: p99, imports/hour")
        print(f"{'cap':>8}" + "".join(f"{'K=' + str(k):>20}" for k in ks))
        for cap in caps:
            cells = [_cell(g) for g in grid if g["batchMaxFiles"] == cap]
            print(f"{cap:>8,}" + "".join(f"{c:>20}" for c in cells))
        fits = [
            g
            for g in grid
            if not g.get("saturated") and g["p99"] < 600 and g["importsPerHour"] <= 100
        ]
        best = min(fits, key=lambda g: (g["importsPerHour"], g["k"], g["p99"]), default=None)
        if best:
            print(
                f"\nfewest imports with p99 < 10 min: batch cap {best['batchMaxFiles']:,}, "
                f"K={best['k']}: {_cell(best)}, p50 {_fmt(best['p50'])} s"
            )
        else:
            print("\nno grid point keeps p99 under 10 minutes with at most 100 imports/hour")
        start = (
            replace(
                base,
                batch_max_files=best["batchMaxFiles"],
                k=best["k"],
                quota=max(base.quota, best["k"]),
            )
            if best
            else base
        )
        varied = []
        for name in PARAMETERS:
            for factor in (0.5, 2.0):
                value = getattr(start, name) * factor
                if isinstance(getattr(start, name), int):
                    value = max(1, round(value))
                varied.append((name, factor, value, replace(start, **{name: value})))
        center = next(g for g in grid if best and g is best) if best else result
        sens_runs = pool.map(_run, [(v[3], args.seed) for v in varied])
    print(f"\nsensitivity at {'that point' if best else 'the defaults'}: p99, imports/hour")
    print(f"{'parameter':16} {'0.5x':>20} {'1x':>20} {'2x':>20}")
    sensitivity = []
    for i, name in enumerate(PARAMETERS):
        low, high = sens_runs[2 * i], sens_runs[2 * i + 1]
        print(f"{name:16} {_cell(low):>20} {_cell(center):>20} {_cell(high):>20}")
        sensitivity.append(
            {
                "parameter": name,
                "0.5": {"value": varied[2 * i][2], **_brief(low)},
                "1": {"value": getattr(start, name), **_brief(center)},
                "2": {"value": varied[2 * i + 1][2], **_brief(high)},
            }
        )
    seconds = time.monotonic() - began
    print(f"\n{seconds:.0f} s, load average {os.getloadavg()[0]:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "loadAverage": round(os.getloadavg()[0], 2),
        "seconds": round(seconds, 1),
        "parameters": asdict(base),
        "sources": PARAMETERS,
        "defaults": result,
        "grid": grid,
        "best": best,
        "sensitivityAt": asdict(start),
        "sensitivity": sensitivity,
    }
    (RESULTS / "simulate.json").write_text(json.dumps(_finite(out), indent=2) + "\n")
    print(f"wrote {RESULTS / 'simulate.json'}")
    return 0


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "p99": r["p99"],
        "importsPerHour": r["importsPerHour"],
        "saturated": r.get("saturated"),
    }


if __name__ == "__main__":
    sys.exit(main())
