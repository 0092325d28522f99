"""The ``dicomflow`` command line: one function per subcommand, ``--json`` on each.

To add a subcommand, write ``cmd_<name>(ctx_factory, args) -> int`` and an
``add_<name>(subparsers, common)`` that registers it, then list the adder in
``SUBCOMMANDS``. Settings come from the environment, as for the functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from dicomflow import functions, ingest, log, retry, staging
from dicomflow.config import load_settings
from dicomflow.errors import ConfigError, DicomflowError
from dicomflow.events import StorageObject, skip_reason
from dicomflow.ops import cli_restore
from dicomflow.runtime import Context, make_context
from dicomflow.staging import file_key, window_id

logger = logging.getLogger(__name__)

ContextFactory = Callable[[], Context]


def _default_context() -> Context:
    return make_context(load_settings())


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(text)


# ---- backfill --------------------------------------------------------------------------------


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://BUCKET/PREFIX`` -> (bucket, prefix).

    Raises:
        ValueError: not a gs:// URI with a bucket.
    """
    if not uri.startswith("gs://"):
        raise ValueError(f"expected gs://BUCKET/PREFIX, got {uri!r}")
    bucket, _, prefix = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, prefix


def add_backfill(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "backfill",
        parents=[common],
        help="feed existing objects through ingest (safe to run twice)",
        description=(
            "Send every object under gs://BUCKET/PREFIX that the pipeline has no record of "
            "through the ingest path, as if its finalize event had arrived: filtered, "
            "checked, staged or quarantined. Objects with a record (a staging or quarantine "
            "copy, a late claim, a drop or failure record) are counted and left as they are."
        ),
    )
    parser.add_argument("uri", help="gs://BUCKET/PREFIX")
    parser.add_argument("--workers", type=int, default=8, help="parallel objects (default 8)")
    parser.add_argument(
        "--tick", action="store_true", help="run one ingest tick afterwards (seal, import)"
    )
    parser.set_defaults(handler=cmd_backfill)


RECORDED = "recorded"


def cmd_backfill(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """List the objects, ingest those without a record with a progress bar, print the totals."""
    from rich.progress import Progress

    try:
        bucket, prefix = parse_gs_uri(args.uri)
    except ValueError as exc:
        print(f"dicomflow backfill: {exc}", file=sys.stderr)
        return 2
    ctx = make_ctx()
    settings = ctx.settings
    if bucket != settings.landing_bucket:
        # Ingest records objects of other buckets as dropped (foreign-bucket), unread.
        print(
            f"dicomflow backfill: gs://{bucket} is not the landing bucket "
            f"(DICOMFLOW_LANDING_BUCKET={settings.landing_bucket}); copy the objects there "
            "instead: their uploads are ingested as they land",
            file=sys.stderr,
        )
        return 2
    listed = [
        StorageObject.from_blob(b)
        for b in ctx.storage.list_blobs(bucket, prefix=prefix or None, retry=retry.storage())
    ]
    counts: Counter[str] = Counter()
    wanted: list[tuple[StorageObject, str]] = []
    for obj in listed:
        if skip_reason(settings, obj) or obj.time_created is None:
            counts["skipped"] += 1
        else:
            wanted.append((obj, file_key(obj.bucket, obj.name, obj.generation)))
    homes = [
        (key, window_id(obj.time_created, settings.batch_window_seconds))
        for obj, key in wanted
        if obj.time_created
    ]
    recorded = staging.recorded_keys(ctx.storage.bucket(settings.staging_bucket), settings, homes)
    if recorded:
        counts[RECORDED] += len(recorded)
    todo = [(obj, key) for obj, key in wanted if key not in recorded]
    errors: list[str] = []

    def one(item: tuple[StorageObject, str]) -> str:
        obj, key = item
        # The event id is logged: the key, not the name (names can be patient names).
        result = ingest.ingest_object(ctx, obj, f"backfill:{key}", None)
        status = str(result["status"])
        return f"{status} (again)" if result.get("repeat") else status

    with (
        Progress(console=None if not args.json else _stderr_console(), transient=args.json) as bar,
        ThreadPoolExecutor(max(1, args.workers)) as pool,
    ):
        task = bar.add_task(f"backfill gs://{bucket}/{prefix}", total=len(todo))
        futures = {pool.submit(one, item): item for item in todo}
        for future in as_completed(futures):
            try:
                counts[future.result()] += 1
            except DicomflowError as exc:
                counts["error"] += 1
                errors.append(f"key {futures[future][1]}: {exc}")
            bar.advance(task)
    result: dict[str, Any] = {"objects": len(listed), "outcomes": dict(sorted(counts.items()))}
    if errors:
        result["errors"] = errors[:20]
    if args.tick:
        result["tick"] = functions.ingest_tick(ctx, "backfill")
    lines = [f"{len(listed)} objects under gs://{bucket}/{prefix}"]
    lines += [f"  {status}: {n}" for status, n in sorted(counts.items())]
    lines += [f"  error: {e}" for e in errors[:20]]
    _emit(args, result, "\n".join(lines))
    return 1 if errors else 0


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)


# ---- export ----------------------------------------------------------------------------------


def _export_date(text: str) -> Any:
    from dicomflow import backup

    try:
        return backup.parse_day(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _export_mime(text: str) -> str:
    from dicomflow.config import parse_mime_type

    try:
        parse_mime_type(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_export(subparsers: Any, common: argparse.ArgumentParser) -> None:
    from dicomflow.config import EXPORT_MODES

    parser = subparsers.add_parser(
        "export",
        parents=[common],
        help="back up the store to its dated folder now (same path as the schedule)",
        description=(
            "Start the export of the DICOM store to gs://BACKUP_BUCKET/PREFIX/<date>/, "
            "once per date: a date that already has an export reports it, unless --force."
        ),
    )
    parser.add_argument("--date", type=_export_date, help="YYYY-MM-DD, UTC (default: today)")
    parser.add_argument("--mode", choices=EXPORT_MODES, help="default: DICOMFLOW_EXPORT_MODE")
    parser.add_argument(
        "--mime-type", type=_export_mime, help="default: DICOMFLOW_EXPORT_MIME_TYPE"
    )
    parser.add_argument(
        "--force", action="store_true", help="rerun a date whose export already finished"
    )
    parser.add_argument(
        "--wait", action="store_true", help="follow the operation, then write the manifest"
    )
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    parser.set_defaults(handler=cmd_export)


def cmd_export(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """Start (or find) the date's export; with --wait, show progress until it is settled."""
    from rich.progress import Progress

    from dicomflow import export

    ctx = make_ctx()
    options: dict[str, Any] = {
        "day": args.date,
        "mode": args.mode or ctx.settings.export_mode,
        "mime_type": args.mime_type or ctx.settings.export_mime_type,
        "force": args.force,
        "wait": args.wait,
        "timeout": args.timeout,
    }
    try:
        if args.wait:
            with Progress(
                console=_stderr_console() if args.json else None, transient=args.json
            ) as bar:
                task = bar.add_task("export", total=None)

                def show(p: dict[str, Any]) -> None:
                    done = p["counter"].get("success", 0) + p["counter"].get("failure", 0)
                    total = p["expected"].get("instances")
                    bar.update(task, completed=done, total=total, description=p["state"])

                result = export.run_command(ctx, on_progress=show, **options)
        else:
            result = export.run_command(ctx, **options)
    except DicomflowError as exc:
        print(f"dicomflow export: {exc}", file=sys.stderr)
        return 1
    lines = [
        f"export {result.get('date')} attempt {result.get('attempt')}: {result['status']}",
        f"  destination: {result.get('destination')}",
        f"  operation: {result.get('operation')}",
        f"  expected: {result.get('expected')}",
    ]
    if result.get("manifest"):
        lines.append(f"  manifest: {result['manifest']}")
    lines += [f"  problem: {p}" for p in result.get("problems") or []]
    _emit(args, result, "\n".join(lines))
    return 1 if result["status"] in ("failed", "timeout") else 0


# ---- status, batches, batch, retry, alerts tail ---------------------------------------------


def _window_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--since", type=_since_time, help="start of the window, ISO time (UTC)")
    group.add_argument("--hours", type=float, default=24.0, help="window length (default 24)")


def _since_time(text: str) -> Any:
    from dicomflow.clock import parse_time

    moment = parse_time(text)
    if moment is None:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r}")
    return moment


def _window(ctx: Context, args: argparse.Namespace) -> tuple[Any, Any]:
    from datetime import timedelta

    now = ctx.clock()
    return now, args.since or now - timedelta(hours=args.hours)


def _print(renderable: Any) -> None:
    from rich.console import Console

    Console(width=max(120, Console().width)).print(renderable)


class _Bar:
    """A transient progress bar on stderr for the long reads (summaries, batches, alerts)."""

    def __init__(self) -> None:
        from rich.progress import Progress

        self.progress = Progress(console=_stderr_console(), transient=True)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(f"reading {label}", total=total)
        self.progress.update(self.tasks[label], completed=done, total=total)


def add_status(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "status",
        parents=[common],
        help="file totals, batches in flight, running operations, recent alerts",
        description=(
            "The pipeline at a glance: files by outcome (all time, from the batch summaries, "
            "quarantine and drop records and the open windows); open, sealed and importing "
            "batches with their ages; running operations; alerts and backups in the window. "
            "--html FILE also writes a self-contained page with a timeline."
        ),
    )
    import os

    _window_args(parser)
    parser.add_argument("--html", metavar="FILE", help="write the status page (HTML) to FILE")
    # The CLI's own setting (the functions never read it), hence read here.
    parser.add_argument(
        "--dead-letters",
        metavar="SUBSCRIPTION",
        default=os.environ.get("DICOMFLOW_DEAD_LETTER_SUBSCRIPTION"),
        help=(
            "subscription on the ingest trigger's dead-letter topic, whose waiting events "
            "are counted (default: DICOMFLOW_DEAD_LETTER_SUBSCRIPTION)"
        ),
    )
    parser.set_defaults(handler=cmd_status)


def cmd_status(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """Gather the status dict once; print it as tables or JSON, and optionally as a page."""
    from pathlib import Path

    from dicomflow import subscription
    from dicomflow.ops import status, status_page, tables

    ctx = make_ctx()
    now, since = _window(ctx, args)
    try:
        with _Bar() as bar:
            result = status.gather(ctx, now, since, progress=bar)
        result["deadLetters"] = None
        if args.dead_letters:
            path = subscription.subscription_path(
                args.dead_letters, ctx.settings.alerts_topic.project
            )
            waiting = subscription.count_waiting(ctx, path)
            result["deadLetters"] = {"subscription": path, "count": waiting}
    finally:
        ctx.close_clients()
    if args.html:
        Path(args.html).write_text(status_page.render(result), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        _print(tables.status_tables(result))
    return 0


def add_batches(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "batches",
        parents=[common],
        help="the batches of the window and their state",
        description="Every batch whose window falls in the time window, oldest first.",
    )
    _window_args(parser)
    parser.set_defaults(handler=cmd_batches)


def cmd_batches(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    from dicomflow.ops import status, tables

    ctx = make_ctx()
    now, since = _window(ctx, args)
    with _Bar() as bar:
        found = status.list_batches(ctx, now, since, progress=bar)
    if args.json:
        print(json.dumps({"batches": found}, sort_keys=True))
    else:
        _print(tables.batches_table(found))
    return 0


def add_batch(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "batch",
        parents=[common],
        help="one batch: seal, file list, operation, summary and manifest",
        description="The details, the file list and the per-file manifest of one batch.",
    )
    parser.add_argument(
        "batch_id", metavar="ID", help="batch id, e.g. 20261125T125300Z or 20261125T125300Z-01"
    )
    parser.add_argument(
        "--files", action="store_true", help="list every file, not only the failures"
    )
    parser.set_defaults(handler=cmd_batch)


def cmd_batch(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    from dicomflow.ops import status, tables

    ctx = make_ctx()
    try:
        detail = status.batch_detail(ctx, args.batch_id)
    except ValueError as exc:
        print(f"dicomflow batch: {exc}", file=sys.stderr)
        return 2
    if detail is None:
        print(f"dicomflow batch: no batch {args.batch_id}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(detail, sort_keys=True))
    else:
        _print(tables.batch_tables(detail, args.files))
    return 0


def add_retry(subparsers: Any, common: argparse.ArgumentParser) -> None:
    from dicomflow.ops.redrive import RETRYABLE

    parser = subparsers.add_parser(
        "retry",
        parents=[common],
        help="send failed or quarantined files through ingest again, after a fix",
        description=(
            "Re-drive files whose outcome is failed or quarantined (or conflict, if asked): "
            "each is staged again into the current window under a retry key, from its "
            "source generation or the copy its outcome kept, and a later batch gives it a "
            "fresh outcome that replaces the old one in the totals. Quarantined files are "
            "checked again first; those still rejected are left as they are. Safe to run "
            "twice: a re-driven outcome is not selected again."
        ),
    )
    parser.add_argument(
        "--status",
        action="append",
        choices=RETRYABLE,
        help="which outcome to re-drive; repeatable (default: failed and quarantined)",
    )
    parser.add_argument("--prefix", help="only objects under this name prefix (or gs://B/P)")
    parser.add_argument("--batch", help="only files of this batch (failed and conflict)")
    parser.add_argument("--dry-run", action="store_true", help="list the files, change nothing")
    parser.add_argument("--workers", type=int, default=8, help="parallel files (default 8)")
    parser.set_defaults(handler=cmd_retry)


def cmd_retry(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from dicomflow.ops import outcomes, redrive, tables

    ctx = make_ctx()
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    with _stderr_console().status("reading outcomes"):
        found = outcomes.read_all(bucket)
        retried = redrive.retried_keys(bucket)
    chosen = redrive.select(
        found, retried, args.status or redrive.DEFAULT_STATUSES, args.prefix, args.batch
    )
    files: list[dict[str, Any]]
    errors: list[str] = []
    if args.dry_run:
        files = [
            {"key": o.key, "previous": o.status, "result": "would-retry", "status": o.status}
            for o in chosen
        ]
    else:
        with Progress(console=_stderr_console(), transient=True) as progress:
            task = progress.add_task("re-drive", total=len(chosen))
            results, errors = redrive.redrive_all(
                ctx, chosen, args.workers, lambda _: progress.advance(task)
            )
        files = [r.as_dict() for r in results]
    result: dict[str, Any] = {
        "selected": len(chosen),
        "dryRun": args.dry_run,
        "results": dict(sorted(Counter(str(f["result"]) for f in files).items())),
        "files": files,
        "errors": errors,
    }
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        _print(tables.retry_tables(result))
    return 1 if errors else 0


def add_alerts(subparsers: Any, common: argparse.ArgumentParser) -> None:
    import os

    parser = subparsers.add_parser("alerts", help="read alerts back from Pub/Sub")
    sub = parser.add_subparsers(dest="alerts_command", required=True)
    tail = sub.add_parser(
        "tail",
        parents=[common],
        help="pull and print alerts from a subscription",
        description=(
            "Pull alerts from a pull subscription on the alerts topic, print them and "
            "acknowledge them. The subscription defaults to DICOMFLOW_ALERTS_SUBSCRIPTION "
            "(localcloud prints it with `python -m localcloud env`)."
        ),
    )
    # The CLI's own setting (the functions never read it), hence read here.
    tail.add_argument(
        "--subscription",
        default=os.environ.get("DICOMFLOW_ALERTS_SUBSCRIPTION"),
        help="projects/P/subscriptions/S, or S in the alerts topic's project",
    )
    tail.add_argument("--max", type=int, help="stop after this many alerts")
    tail.add_argument("--follow", action="store_true", help="keep waiting for new alerts")
    tail.add_argument("--timeout", type=float, help="with --follow, stop after this many seconds")
    tail.add_argument("--no-ack", action="store_true", help="leave the alerts on the subscription")
    tail.set_defaults(handler=cmd_alerts_tail)


def cmd_alerts_tail(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    from dicomflow import subscription
    from dicomflow.ops import tables

    if not args.subscription:
        print(
            "dicomflow alerts tail: no subscription; pass --subscription or set "
            "DICOMFLOW_ALERTS_SUBSCRIPTION",
            file=sys.stderr,
        )
        return 2
    ctx = make_ctx()
    try:
        path = subscription.subscription_path(args.subscription, ctx.settings.alerts_topic.project)
    except ValueError as exc:
        print(f"dicomflow alerts tail: {exc}", file=sys.stderr)
        return 2

    def show(alert: dict[str, Any]) -> None:
        # --json: one document at the end, or one line per alert while following.
        if not args.json:
            _print(tables.alert_row(alert))
        elif args.follow:
            print(json.dumps(alert, sort_keys=True), flush=True)

    try:
        got = subscription.pull(
            ctx,
            path,
            max_messages=args.max,
            follow=args.follow,
            timeout=args.timeout,
            ack=not args.no_ack,
            on_alert=show,
        )
    except DicomflowError as exc:
        print(f"dicomflow alerts tail: {path}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        ctx.close_clients()
    if args.json and not args.follow:
        print(json.dumps({"subscription": path, "alerts": got}, sort_keys=True))
    elif not args.json:
        print(f"{len(got)} alerts from {path}", file=sys.stderr)
    return 0


# ---- label -----------------------------------------------------------------------------------


def add_label(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "label",
        parents=[common],
        help="resolve labels from alerts or logs to their objects and UIDs",
        description=(
            "Alerts and logs name objects and DICOM UIDs by keyed labels "
            "(h:<key id>:<32 hex>). This recomputes the labels of every file record in the "
            "staging bucket with the deployment key (DICOMFLOW_KEY_SECRET or "
            "DICOMFLOW_KEY_FILE) and prints the records that match: the gs:// URI or the "
            "UID, with the file's key, outcome and batch. It needs read access to the "
            "staging bucket and to the key, and reads every record, so it takes a while "
            "on a large deployment."
        ),
    )
    parser.add_argument("labels", nargs="+", metavar="LABEL", help="h:<key id>:<32 hex>")
    parser.set_defaults(handler=cmd_label)


def cmd_label(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """Print what each label stands for; exit 1 when one is unknown, 2 when one is malformed."""
    from dicomflow import keys
    from dicomflow.ops import labels

    ctx = make_ctx()
    key = keys.load(ctx.settings)
    bad = {label: why for label in args.labels if (why := labels.check(label, key))}
    for label, why in bad.items():
        print(f"dicomflow label: {label}: {why}", file=sys.stderr)
    matches = labels.resolve(ctx, [label for label in args.labels if label not in bad])
    unknown = sorted(set(args.labels) - set(bad) - {m.label for m in matches})
    for label in unknown:
        print(f"dicomflow label: {label}: no file record carries it", file=sys.stderr)
    if args.json:
        print(json.dumps({"matches": [m.as_dict() for m in matches], "unknown": unknown}))
    else:
        for m in matches:
            print(f"{m.label}  {m.field}  {m.value}  key={m.key} {m.status} {m.batch or '-'}")
    return 2 if bad else 1 if unknown else 0


# ---- entry point -----------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Any, argparse.ArgumentParser], None]] = [
    add_backfill,
    add_export,
    cli_restore.add_restore,
    cli_restore.add_resolve,
    cli_restore.add_erase,
    add_status,
    add_batches,
    add_batch,
    add_retry,
    add_alerts,
    add_label,
]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    parser = argparse.ArgumentParser(
        prog="dicomflow", description="Cloud Storage to Cloud Healthcare API DICOM, batched."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None, make_ctx: ContextFactory | None = None) -> int:
    """Run one subcommand; the exit status (0 ok, 1 some work failed, 2 usage or settings)."""
    args = build_parser().parse_args(argv)
    log.configure(logging.WARNING, sys.stderr)
    try:
        code: int = args.handler(make_ctx or _default_context, args)
    except ConfigError as exc:
        print(f"dicomflow: {exc}", file=sys.stderr)
        return 2
    return code
