"""Chaos benchmark: M uploads (broken files, conflicting pairs) under faults, repeats,
reordering and crashes; then the invariants.

See ``localcloud.chaos`` for the scenario. Prints the result and writes
``bench/results/chaos_5000.json`` (M = 5,000, the default and acceptance size, about
10 to 30 minutes here) or ``chaos.json`` (smaller M; ``make bench`` runs 200); exits 1
when an invariant is broken.

Usage: ``python bench/chaos.py [--files M] [--seed S] [--kill-interval SECONDS]
[--fault-rate R] [--after-fault-rate R]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomflow import log
from localcloud.chaos import run_chaos

RESULTS = Path(__file__).resolve().parent / "results"


def _count(problems: list[str], what: str) -> int:
    """The count at the head of the problem line about ``what`` (0 when there is none)."""
    for line in problems:
        head, _, rest = line.partition(" ")
        if rest.startswith(what) and head.isdigit():
            return int(head)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kill-interval", type=float, default=6.0)
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument(
        "--after-fault-rate",
        type=float,
        default=0.1,
        help="share of Storage writes that take effect and are then answered with 503",
    )
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    (home / "logs").mkdir()
    with (home / "logs" / "bench.log").open("a") as stream:
        log.configure(stream=stream)
        started = time.monotonic()
        result = run_chaos(
            args.files,
            home,
            seed=args.seed,
            fault_rate=args.fault_rate,
            after_fault_rate=args.after_fault_rate,
            kill_interval=args.kill_interval,
            settle_timeout=args.timeout,
        )
    seconds = round(time.monotonic() - started, 1)
    out = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "files": result.uploads,
        "broken": result.broken,
        "faultRate": args.fault_rate,
        "afterFaultRate": args.after_fault_rate,
        "killIntervalSeconds": args.kill_interval,
        "seconds": seconds,
        "ok": result.ok,
        "problems": result.problems,
        # Files, not problem lines: each line starts with its count ("3 false alerts: ...").
        # Lost: an upload with no final outcome (none at all, or still staged).
        "lost": _count(result.problems, "uploads without an outcome")
        + _count(result.problems, "outcomes not final"),
        "notFinal": _count(result.problems, "outcomes not final"),
        "missingFromStore": _count(result.problems, "valid files missing from the store"),
        "falseAlerts": _count(result.problems, "false alerts"),
        "revivals": len(result.stats.get("revived") or []),
        **result.stats,
    }
    print(json.dumps(out, indent=2))
    print(f"logs: {home / 'logs'}")
    # The acceptance run (M >= 5000) keeps its own file; `make bench` writes chaos.json.
    name = "chaos_5000.json" if args.files >= 5000 else "chaos.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    print("chaos:", "all invariants hold" if result.ok else "INVARIANTS BROKEN")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
