"""The operator CLI against the demo's local cloud: status (and its page), batches, batch,
retry and alerts tail, with ``--json`` parsed and checked against ``dicomflow.ops.outcomes`` and
the store.

``status``, ``batches`` and ``batch`` run as the installed ``dicomflow`` console script,
with only the environment that ``python -m localcloud env`` prints; ``retry`` and
``alerts tail`` run in process through ``cli.main`` for speed.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dicomflow import alerts, runtime
from dicomflow.config import load_settings
from dicomflow.ops import cli, outcomes, redrive
from dicomflow.ops.outcomes import Outcome
from tests import browser
from tests.e2e.conftest import DemoRun

# The package fixture runs the whole demo flow; on a loaded machine that takes minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def _dicomflow(run: DemoRun, *args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "dicomflow"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dicomflow"]
    return subprocess.run(
        [*command, *args],
        env={**os.environ, **run.env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _outcomes(run: DemoRun) -> dict[str, Outcome]:
    return outcomes.read_all(run.gcs.bucket(run.stack.config.staging_bucket))


def test_status_json_matches_the_outcomes_and_the_demo(demo_run: DemoRun) -> None:
    summary = demo_run.summary
    status = _json(_dicomflow(demo_run, "status", "--json", "--hours", "2"))
    found = _outcomes(demo_run)
    files = status["files"]
    assert files["files"] == len(found) == summary["uploaded"]
    assert files["totals"] == outcomes.totals(found.values())
    assert sum(files["outcomes"].values()) == len(found)
    assert files["outcomes"]["quarantined"] == summary["totals"]["quarantined"]
    assert sum(files["reasons"]["quarantined"].values()) == files["outcomes"]["quarantined"]
    assert status["batches"]["verified"] == summary["batches"]
    assert status["batches"]["counts"]["importing"] == 0
    assert status["operations"]["running"] == []
    for kind, count in summary["alerts"].items():
        assert status["alerts"]["byKind"][kind] >= count
    [backup] = status["exports"]
    assert backup["state"] == "complete" and backup["destination"] == summary["backup"]["prefix"]
    timeline = status["timeline"]
    assert timeline["uploads"]["total"] == summary["uploaded"]
    assert len(timeline["seals"]) == summary["batches"]
    kinds = [op["kind"] for op in timeline["operations"]]
    assert kinds.count("import") >= summary["importOperations"] and kinds.count("export") == 1

    text = _dicomflow(demo_run, "status")
    assert text.returncode == 0, text.stderr
    assert f"Files: {len(found)} (all time)" in text.stdout
    assert "demo/" not in text.stdout + json.dumps(status)  # object names never shown


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_status_page_renders_in_headless_chromium(demo_run: DemoRun, tmp_path: Path) -> None:
    if browser.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    page = tmp_path / "status.html"
    done = _dicomflow(demo_run, "status", "--json", "--html", str(page), "--hours", "2")
    status = _json(done)
    text = page.read_text()
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org", "")
    timeline = status["timeline"]
    rendered = browser.render(
        page,
        {
            "uploads": "document.querySelectorAll('#timeline rect.upload').length",
            "seals": "document.querySelectorAll('#timeline .seal').length",
            "operations": "document.querySelectorAll('#timeline .operation').length",
            "alerts": "document.querySelectorAll('#timeline .alert').length",
            "width": "document.getElementById('timeline').getBoundingClientRect().width",
            "cards": "Array.from(document.querySelectorAll('.card .n')).map(e => e.textContent)",
        },
    )
    assert rendered.errors == []
    values = rendered.values
    bars = sum(len(b["counts"]) for b in timeline["uploads"]["bins"])
    assert values["uploads"] == bars > 0
    assert values["seals"] == len(timeline["seals"]) == demo_run.summary["batches"]
    assert values["operations"] == len(timeline["operations"])
    assert values["alerts"] == len(timeline["alerts"]) == status["alerts"]["total"]
    assert values["width"] > 1000
    assert values["cards"][0] == str(demo_run.summary["uploaded"])
    assert _png_size(rendered.screenshot) == (1400, 1000)
    assert len(rendered.screenshot) > 30_000  # not a blank page
    target = os.environ.get("DICOMFLOW_STATUS_SCREENSHOT")
    if target:  # refresh docs/status.png: DICOMFLOW_STATUS_SCREENSHOT=docs/status.png
        Path(target).write_bytes(rendered.screenshot)


def test_the_page_checker_catches_errors(tmp_path: Path) -> None:
    if browser.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>x</title></head><body>"
        '<img src="missing.png"><script>console.error("boom"); nope();</script></body></html>'
    )
    errors = "\n".join(browser.render(page, {}).errors)
    assert "nope is not defined" in errors
    assert "boom" in errors
    assert "missing.png" in errors


def test_batches_and_batch_json(demo_run: DemoRun) -> None:
    listed = _json(_dicomflow(demo_run, "batches", "--json", "--hours", "2"))["batches"]
    found = _outcomes(demo_run)
    assert len(listed) == demo_run.summary["batches"]
    assert {b["state"] for b in listed} == {"verified"}
    batched = [o for o in found.values() if o.batch]
    assert sum(b["files"] for b in listed) == len(batched)

    with_failures = [b for b in listed if b["counts"].get("conflict") or b["counts"].get("failed")]
    assert with_failures, "the corpus makes conflicts"
    batch = with_failures[0]["batch"]
    detail = _json(_dicomflow(demo_run, "batch", batch, "--json"))
    assert detail["state"] == "verified"
    mine = [o for o in batched if o.batch == batch]
    failures = {line["key"] for line in detail["manifest"]["failure"]}
    successes = {line["key"] for line in detail["manifest"]["success"]}
    assert failures == {o.key for o in mine if o.status in ("conflict", "failed")}
    assert successes == {o.key for o in mine if o.status in ("imported", "duplicate")}
    assert detail["fileList"]["count"] == len(mine)
    lines = detail["manifest"]["failure"] + detail["manifest"]["success"]
    lines += detail["fileList"]["files"]
    assert all(line["object"].startswith("h:") and "name" not in line for line in lines)
    assert detail["records"]["operationRecord"]["operation"] == with_failures[0]["operation"]

    text = _dicomflow(demo_run, "batch", batch, "--files")
    assert text.returncode == 0 and batch in text.stdout and "manifest" in text.stdout
    assert "demo/" not in text.stdout + json.dumps(detail)
    assert _dicomflow(demo_run, "batch", "not-a-batch").returncode == 2
    assert _dicomflow(demo_run, "batch", "20000101T000000Z-0").returncode == 1


def _settled(run: DemoRun, keys: set[str], timeout: float = 90.0) -> dict[str, Outcome]:
    deadline = time.monotonic() + timeout
    while True:
        found = _outcomes(run)
        pending = [k for k in keys if k not in found or found[k].status not in outcomes.FINAL]
        if not pending:
            return found
        assert time.monotonic() < deadline, f"{len(pending)} re-driven files not settled"
        time.sleep(1.0)


def test_alerts_tail_pulls_prints_and_acknowledges(
    demo_run: DemoRun, capsys: pytest.CaptureFixture[str]
) -> None:
    os.environ.update(demo_run.env)
    ctx = runtime.make_context(load_settings(demo_run.env))
    try:
        _tail_test(ctx, capsys)
    finally:
        ctx.close_clients()
        ctx.storage.close()


def _tail_test(ctx: runtime.Context, capsys: pytest.CaptureFixture[str]) -> None:
    name = f"tail-test-{uuid.uuid4().hex[:8]}"
    topic = str(ctx.settings.alerts_topic)
    ctx.pubsub().projects().subscriptions().create(
        name=f"projects/local/subscriptions/{name}", body={"topic": topic}
    ).execute()

    def publish(subject: str) -> str:
        alert = alerts.build_alert(
            "backlog",
            subject,
            "WARNING",
            str(ctx.settings.dicom_store),
            {"episode": subject, "batches": 1},
            datetime.now(UTC),
        )
        assert alerts.publish_once(ctx, alert)
        return alert.alert_id

    def tail(*args: str) -> list[dict[str, Any]]:
        argv = ["alerts", "tail", "--subscription", name, "--json", *args]
        assert cli.main(argv, make_ctx=lambda: ctx) == 0
        out = capsys.readouterr().out
        if "--follow" in args:
            return [json.loads(line) for line in out.splitlines() if line.strip()]
        doc = json.loads(out)
        assert doc["subscription"] == f"projects/local/subscriptions/{name}"
        alerts_: list[dict[str, Any]] = doc["alerts"]
        return alerts_

    first = publish(f"test/{name}/1")
    kept = tail("--no-ack")
    assert first in [a["alertId"] for a in kept]
    got = [a for a in tail() if a["alertId"] == first]
    assert len(got) == 1
    assert got[0]["kind"] == "backlog" and got[0]["attributes"]["alertId"] == first
    assert first not in [a["alertId"] for a in tail()]  # acknowledged

    def publish_later() -> None:
        try:
            publish(f"test/{name}/2")
        finally:
            ctx.close_clients()  # this thread's clients

    timer = threading.Timer(1.0, publish_later)
    timer.start()
    try:
        followed = tail("--follow", "--timeout", "8")
    finally:
        timer.join()
    assert alerts.alert_id("backlog", f"test/{name}/2", str(ctx.settings.dicom_store)) in [
        a["alertId"] for a in followed
    ]

    assert cli.main(["alerts", "tail", "--subscription", "no-such-sub"], make_ctx=lambda: ctx) == 1
    assert "no-such-sub" in capsys.readouterr().err


def test_retry_leaves_rejected_files_and_gives_redriven_ones_a_fresh_outcome(
    demo_run: DemoRun, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = runtime.make_context(load_settings(demo_run.env))
    try:
        _retry_test(demo_run, ctx, capsys)
    finally:
        ctx.storage.close()


def _retry_test(
    demo_run: DemoRun, ctx: runtime.Context, capsys: pytest.CaptureFixture[str]
) -> None:
    staging = demo_run.gcs.bucket(demo_run.stack.config.staging_bucket)
    before = _outcomes(demo_run)
    quarantined = {k for k, o in before.items() if o.status == outcomes.QUARANTINED}

    assert cli.main(["retry", "--status", "quarantined", "--json"], make_ctx=lambda: ctx) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selected"] == len(quarantined) > 0
    assert out["results"] == {redrive.STILL_REJECTED: len(quarantined)}
    assert redrive.retried_keys(staging) == set()  # nothing written

    # Re-drive the failures of the smallest batch that has some.
    failed = [o for o in before.values() if o.status in ("failed", "conflict")]
    by_batch: dict[str, list[Outcome]] = {}
    for o in failed:
        by_batch.setdefault(str(o.batch), []).append(o)
    batch, chosen = min(by_batch.items(), key=lambda item: len(item[1]))
    keys = {o.key for o in chosen}
    args = ["retry", "--status", "failed", "--status", "conflict", "--batch", batch, "--json"]
    assert cli.main(args, make_ctx=lambda: ctx) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selected"] == len(keys)
    assert out["results"] == {redrive.RESTAGED: len(keys)}
    assert {f["key"] for f in out["files"]} == keys
    assert {f["status"] for f in out["files"]} == {"staged"}
    retry_keys = {f["retryKey"] for f in out["files"]}
    assert len(retry_keys) == len(keys) and not retry_keys & set(before)

    after = _settled(demo_run, retry_keys)
    assert set(after) == set(before) | retry_keys  # one new record per re-driven file
    assert all(o.status in outcomes.FINAL for o in after.values())
    assert {after[k].batch for k in retry_keys}.isdisjoint({batch})
    assert all(after[k].status == before[k].status for k in keys)  # old lines stay
    # The same command again selects nothing: the old outcomes are superseded.
    assert cli.main(args, make_ctx=lambda: ctx) == 0
    assert json.loads(capsys.readouterr().out)["selected"] == 0
    # Each file counts once, by its retry's outcome.
    status = json.loads(_dicomflow(demo_run, "status", "--json", "--hours", "2").stdout)
    assert status["files"]["files"] == len(before)
    assert status["files"]["retried"] == len(keys)


def test_label_resolves_labels_from_logs_and_alerts_to_their_objects(
    demo_run: DemoRun, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load_settings(demo_run.env)
    ctx = runtime.make_context(settings)
    lines = (demo_run.stack.config.home / "logs" / "ingest.log").read_text().splitlines()
    staged = next(x for x in map(json.loads, lines) if x.get("message") == "staged")
    imported = next(o for o in _outcomes(demo_run).values() if o.status == "imported")
    assert imported.record is not None and imported.record.sop
    sop_label = alerts.uid_label(settings, imported.record.sop)
    assert sop_label is not None

    def label(*labels: str) -> tuple[int, dict[str, Any]]:
        code = cli.main(["label", *labels, "--json"], make_ctx=lambda: ctx)
        return code, json.loads(capsys.readouterr().out)

    code, found = label(staged["object"], sop_label)
    assert code == 0 and found["unknown"] == []
    by_field = {m["field"]: m for m in found["matches"]}
    assert by_field["object"]["key"] == staged["key"]
    assert by_field["object"]["value"].startswith(f"gs://{settings.landing_bucket}/demo/")
    assert by_field["sop"]["value"] == imported.record.sop
    assert imported.key in {m["key"] for m in found["matches"] if m["field"] == "sop"}

    key_id = staged["object"].split(":")[1]
    code, found = label(f"h:{key_id}:{'0' * 32}")
    assert code == 1 and found == {"matches": [], "unknown": [f"h:{key_id}:{'0' * 32}"]}
    assert cli.main(["label", f"h:{'f' * 8}:{'0' * 32}"], make_ctx=lambda: ctx) == 2
    assert "made by key ffffffff" in capsys.readouterr().err
