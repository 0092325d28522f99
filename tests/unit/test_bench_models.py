"""The benchmarks' cost model and the 1M files/hour simulation, on small known inputs."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import cost
import simulate


def test_billed_seconds_round_each_request_up_to_100_ms() -> None:
    assert cost.billed_seconds([0.01, 0.1, 0.101, 1.05]) == pytest.approx(0.1 + 0.1 + 0.2 + 1.1)


def test_cost_per_million_adds_up_its_parts() -> None:
    per_file = cost.PerFile(
        storage={"objects.rewrite": 1.0, "objects.download": 1.0, "objects.delete": 1.0},
        healthcare={"import": 0.001, "dicomWeb.search": 0.002},
        invocations=1.0,
        billed_seconds=0.2,
        keeps_copy=True,
    )
    small = cost.usd_per_million(per_file, 0.5)
    # 1 Class A (0.005/1000), 1 Class B (0.0004/1000); delete is free.
    assert small["storageOperations"] == pytest.approx(5.4, abs=0.01)
    # import: multi-operation (0.39/1e5); QIDO: complex (0.69/1e5).
    assert small["healthcareRequests"] == pytest.approx(0.0039 + 0.0138, abs=0.01)
    assert small["invocations"] == pytest.approx(0.40)
    assert small["compute"] == pytest.approx(0.2 * (0.333 * 24 + 0.5 * 2.5), abs=0.01)
    parts = ("storageOperations", "healthcareRequests", "invocations", "compute", "keptBytes")
    assert small["total"] == pytest.approx(sum(small[k] for k in parts), abs=0.02)
    # Kept bytes grow with the file; without a copy there are none.
    big = cost.usd_per_million(per_file, 20.0)
    assert big["keptBytes"] == pytest.approx(40 * small["keptBytes"], rel=0.01)
    assert cost.usd_per_million(replace(per_file, keeps_copy=False), 20.0)["keptBytes"] == 0


def test_simulation_of_a_light_load_finishes_within_the_configured_parts() -> None:
    """10,000 files an hour: every window is one batch, nothing waits for a slot, so every
    file is in store within its window, the grace, a tick, the start and the import."""
    p = replace(simulate.Params(), files_per_hour=10_000, handler_s=0.05)
    result = simulate.run(p)
    assert result["unfinished"] == 0 and result["lateFiles"] == 0
    assert result["imports"] == 3600 // p.window_s
    batch = 10_000 / 60
    bound = p.window_s + p.grace_s + p.tick_s + p.op_start_s + batch / p.op_files_per_s
    assert result["p99"] <= bound
    assert result["p50"] >= p.grace_s + p.op_start_s


def test_simulation_splits_windows_over_the_batch_cap() -> None:
    """A cap below a window's files splits each window by key bits, as batches.split does."""
    p = replace(simulate.Params(), files_per_hour=60_000, handler_s=0.05, batch_max_files=600)
    result = simulate.run(p)
    assert result["imports"] == 60 * 2  # 1,000 files a window: halves of about 500
    assert result["unfinished"] == 0


def test_ingest_beyond_its_instances_is_saturated() -> None:
    p = replace(simulate.Params(), files_per_hour=1_000_000, handler_s=1.0, max_instances=10)
    assert simulate.run(p)["saturated"] == "ingest instances"
