"""The ``dicomflow`` command line: one handler per subcommand, ``--json`` on each.

To add a subcommand, write ``cmd_<name>(make_ctx, args) -> int`` (its docstring is the
help) and, if it takes arguments, ``<name>_arguments(parser)``, then list a
``Command`` for it in ``COMMANDS``. Settings come from the environment, as for the
functions.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from dicomflow import functions, ingest, log, retry, staging
from dicomflow.config import EXPORT_MODES, load_settings
from dicomflow.errors import ConfigError, DicomflowError, Refused
from dicomflow.events import StorageObject, skip_reason
from dicomflow.json_types import JSON
from dicomflow.ops import cli_restore
from dicomflow.ops.args import (
    Bars,
    Command,
    ContextFactory,
    UsageError,
    day,
    emit,
    mime_type,
    show,
    stderr_console,
    window,
    window_arguments,
)
from dicomflow.runtime import Context, make_context
from dicomflow.staging import file_key, window_id

logger = logging.getLogger(__name__)


def _default_context() -> Context:
    return make_context(load_settings())


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


def backfill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", help="gs://BUCKET/PREFIX")
    parser.add_argument("--workers", type=int, default=8, help="parallel objects (default 8)")
    parser.add_argument(
        "--tick", action="store_true", help="run one ingest tick afterwards (seal, import)"
    )


RECORDED = "recorded"


def cmd_backfill(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """Feed existing objects through ingest (safe to run twice).

    Send every object under gs://BUCKET/PREFIX that the pipeline has no record of
    through the ingest path, as if its finalize event had arrived: filtered, checked,
    staged or quarantined. Objects with a record (a staging or quarantine copy, a late
    claim, a drop or failure record) are counted and left as they are.
    """
    from rich.progress import Progress

    try:
        bucket, prefix = parse_gs_uri(args.uri)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ctx = make_ctx()
    settings = ctx.settings
    if bucket != settings.landing_bucket:
        # Ingest records objects of other buckets as dropped (foreign-bucket), unread.
        raise UsageError(
            f"gs://{bucket} is not the landing bucket "
            f"(DICOMFLOW_LANDING_BUCKET={settings.landing_bucket}); copy the objects there "
            "instead: their uploads are ingested as they land"
        )
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
        Progress(console=stderr_console() if args.json else None, transient=args.json) as bar,
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
    result: JSON = {"objects": len(listed), "outcomes": dict(sorted(counts.items()))}
    if errors:
        result["errors"] = errors[:20]
    if args.tick:
        result["tick"] = functions.ingest_tick(ctx, "backfill")
    lines = [f"{len(listed)} objects under gs://{bucket}/{prefix}"]
    lines += [f"  {status}: {n}" for status, n in sorted(counts.items())]
    lines += [f"  error: {e}" for e in errors[:20]]
    emit(args, result, "\n".join(lines))
    return 1 if errors else 0


# ---- export ----------------------------------------------------------------------------------


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", type=day, help="YYYY-MM-DD, UTC (default: today)")
    parser.add_argument("--mode", choices=EXPORT_MODES, help="default: DICOMFLOW_EXPORT_MODE")
    parser.add_argument("--mime-type", type=mime_type, help="default: DICOMFLOW_EXPORT_MIME_TYPE")
    parser.add_argument(
        "--force", action="store_true", help="rerun a date whose export already finished"
    )
    parser.add_argument(
        "--wait", action="store_true", help="follow the operation, then write the manifest"
    )
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")


def cmd_export(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """Back up the store to its dated folder now (same path as the schedule).

    Start the export of the DICOM store to gs://BACKUP_BUCKET/PREFIX/<date>/, once per
    date: a date that already has an export reports it, unless --force.
    """
    from rich.progress import Progress

    from dicomflow import export

    ctx = make_ctx()
    run = functools.partial(
        export.run_command,
        ctx,
        day=args.date,
        mode=args.mode or ctx.settings.export_mode,
        mime_type=args.mime_type or ctx.settings.export_mime_type,
        force=args.force,
        wait=args.wait,
        timeout=args.timeout,
    )
    if args.wait:
        with Progress(console=stderr_console() if args.json else None, transient=args.json) as bar:
            task = bar.add_task("export", total=None)

            def progress(p: JSON) -> None:
                done = p["counter"].get("success", 0) + p["counter"].get("failure", 0)
                total = p["expected"].get("instances")
                bar.update(task, completed=done, total=total, description=p["state"])

            result = run(on_progress=progress)
    else:
        result = run()
    lines = [
        f"export {result.get('date')} attempt {result.get('attempt')}: {result['status']}",
        f"  destination: {result.get('destination')}",
        f"  operation: {result.get('operation')}",
        f"  expected: {result.get('expected')}",
    ]
    if result.get("manifest"):
        lines.append(f"  manifest: {result['manifest']}")
    lines += [f"  problem: {p}" for p in result.get("problems") or []]
    emit(args, result, "\n".join(lines))
    return 1 if result["status"] in ("failed", "timeout") else 0


# ---- status, batches, batch, retry, alerts tail ---------------------------------------------


def status_arguments(parser: argparse.ArgumentParser) -> None:
    window_arguments(parser)
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


def cmd_status(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """File totals, batches in flight, running operations, recent alerts.

    The pipeline at a glance: files by outcome (all time, from the batch summaries,
    quarantine and drop records and the open windows); open, sealed and importing
    batches with their ages; running operations; alerts and backups in the window.
    --html FILE also writes a self-contained page with a timeline.
    """
    from pathlib import Path

    from dicomflow import subscription
    from dicomflow.ops import status, status_page, tables

    ctx = make_ctx()
    now, since = window(ctx, args)
    with Bars("reading ") as bars:
        result = status.gather(ctx, now, since, progress=bars)
    result["deadLetters"] = None
    if args.dead_letters:
        path = subscription.subscription_path(args.dead_letters, ctx.settings.alerts_topic.project)
        waiting = subscription.count_waiting(ctx, path)
        result["deadLetters"] = {"subscription": path, "count": waiting}
    if args.html:
        Path(args.html).write_text(status_page.render(result), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    emit(args, result, tables.status_tables(result))
    return 0


def cmd_batches(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """The batches of the window and their state.

    Every batch whose window falls in the time window, oldest first.
    """
    from dicomflow.ops import status, tables

    ctx = make_ctx()
    now, since = window(ctx, args)
    with Bars("reading ") as bars:
        found = status.list_batches(ctx, now, since, progress=bars)
    emit(args, {"batches": found}, tables.batches_table(found))
    return 0


def batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "batch_id", metavar="ID", help="batch id, e.g. 20261125T125300Z or 20261125T125300Z-01"
    )
    parser.add_argument(
        "--files", action="store_true", help="list every file, not only the failures"
    )


def cmd_batch(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """One batch: seal, file list, operation, summary and manifest.

    The details, the file list and the per-file manifest of one batch.
    """
    from dicomflow.ops import status, tables

    ctx = make_ctx()
    try:
        detail = status.batch_detail(ctx, args.batch_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if detail is None:
        print(f"dicomflow batch: no batch {args.batch_id}", file=sys.stderr)
        return 1
    emit(args, detail, tables.batch_tables(detail, args.files))
    return 0


def retry_arguments(parser: argparse.ArgumentParser) -> None:
    from dicomflow.ops.redrive import RETRYABLE

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


def cmd_retry(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """Send failed or quarantined files through ingest again, after a fix.

    Re-drive files whose outcome is failed or quarantined (or conflict, if asked): each
    is staged again into the current window under a retry key, from its source
    generation or the copy its outcome kept, and a later batch gives it a fresh outcome
    that replaces the old one in the totals. Quarantined files are checked again first;
    those still rejected are left as they are. Safe to run twice: a re-driven outcome
    is not selected again.
    """
    from rich.progress import Progress

    from dicomflow.ops import outcomes, redrive, tables

    ctx = make_ctx()
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    with stderr_console().status("reading outcomes"):
        found = outcomes.read_all(bucket)
        retried = redrive.retried_keys(bucket)
    chosen = redrive.select(
        found, retried, args.status or redrive.DEFAULT_STATUSES, args.prefix, args.batch
    )
    files: list[JSON]
    errors: list[str] = []
    if args.dry_run:
        files = [
            {"key": o.key, "previous": o.status, "result": "would-retry", "status": o.status}
            for o in chosen
        ]
    else:
        with Progress(console=stderr_console(), transient=True) as progress:
            task = progress.add_task("re-drive", total=len(chosen))
            results, errors = redrive.redrive_all(
                ctx, chosen, args.workers, lambda _: progress.advance(task)
            )
        files = [r.as_dict() for r in results]
    result: JSON = {
        "selected": len(chosen),
        "dryRun": args.dry_run,
        "results": dict(sorted(Counter(str(f["result"]) for f in files).items())),
        "files": files,
        "errors": errors,
    }
    emit(args, result, tables.retry_tables(result))
    return 1 if errors else 0


def alerts_tail_arguments(parser: argparse.ArgumentParser) -> None:
    # The CLI's own setting (the functions never read it), hence read here.
    parser.add_argument(
        "--subscription",
        default=os.environ.get("DICOMFLOW_ALERTS_SUBSCRIPTION"),
        help="projects/P/subscriptions/S, or S in the alerts topic's project",
    )
    parser.add_argument("--max", type=int, help="stop after this many alerts")
    parser.add_argument("--follow", action="store_true", help="keep waiting for new alerts")
    parser.add_argument("--timeout", type=float, help="with --follow, stop after this many seconds")
    parser.add_argument(
        "--no-ack", action="store_true", help="leave the alerts on the subscription"
    )


def cmd_alerts_tail(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """Pull and print alerts from a subscription.

    Pull alerts from a pull subscription on the alerts topic, print them and acknowledge
    them. The subscription defaults to DICOMFLOW_ALERTS_SUBSCRIPTION (localcloud prints
    it with `python -m localcloud env`).
    """
    from dicomflow import subscription
    from dicomflow.ops import tables

    if not args.subscription:
        raise UsageError(
            "no subscription; pass --subscription or set DICOMFLOW_ALERTS_SUBSCRIPTION"
        )
    ctx = make_ctx()
    try:
        path = subscription.subscription_path(args.subscription, ctx.settings.alerts_topic.project)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def on_alert(alert: JSON) -> None:
        # --json: one document at the end, or one line per alert while following.
        if not args.json:
            show(tables.alert_row(alert))
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
            on_alert=on_alert,
        )
    except DicomflowError as exc:
        print(f"dicomflow alerts tail: {path}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    if args.json and not args.follow:
        print(json.dumps({"subscription": path, "alerts": got}, sort_keys=True))
    elif not args.json:
        print(f"{len(got)} alerts from {path}", file=sys.stderr)
    return 0


# ---- label -----------------------------------------------------------------------------------


def label_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", nargs="+", metavar="LABEL", help="h:<key id>:<32 hex>")


def cmd_label(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """Resolve labels from alerts or logs to their objects and UIDs.

    Alerts and logs name objects and DICOM UIDs by keyed labels (h:<key id>:<32 hex>).
    This recomputes the labels of every file record in the staging bucket with the
    deployment key (DICOMFLOW_KEY_SECRET or DICOMFLOW_KEY_FILE) and prints the records
    that match: the gs:// URI or the UID, with the file's key, outcome and batch. It
    needs read access to the staging bucket and to the key, and reads every record, so
    it takes a while on a large deployment. Exit status 1 when a label is unknown, 2
    when one is malformed.
    """
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

COMMANDS: list[Command] = [
    Command("backfill", cmd_backfill, backfill_arguments),
    Command("export", cmd_export, export_arguments),
    Command("restore", cli_restore.cmd_restore, cli_restore.restore_arguments),
    Command("resolve", cli_restore.cmd_resolve, cli_restore.resolve_arguments),
    Command("erase", cli_restore.cmd_erase, cli_restore.erase_arguments),
    Command("status", cmd_status, status_arguments),
    Command("batches", cmd_batches, window_arguments),
    Command("batch", cmd_batch, batch_arguments),
    Command("retry", cmd_retry, retry_arguments),
    Command("alerts tail", cmd_alerts_tail, alerts_tail_arguments),
    Command("label", cmd_label, label_arguments),
]

# The help of each group of subcommands (``alerts tail``).
GROUPS = {"alerts": "read alerts back from Pub/Sub"}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    parser = argparse.ArgumentParser(
        prog="dicomflow", description="Cloud Storage to Cloud Healthcare API DICOM, batched."
    )
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for command in COMMANDS:
        group, _, name = command.name.rpartition(" ")
        where = top
        if group:
            if group not in groups:
                groups[group] = top.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest=f"{group}_command", required=True
                )
            where = groups[group]
        sub = where.add_parser(
            name, parents=[common], help=command.help, description=command.description
        )
        command.arguments(sub)
        sub.set_defaults(handler=command.handler, command_name=command.name)
    return parser


def main(argv: Sequence[str] | None = None, make_ctx: ContextFactory | None = None) -> int:
    """Run one subcommand; the exit status (0 ok, 1 some work failed, 2 usage or settings).

    Errors the handler raises are printed as ``dicomflow <command>: ...``; the contexts
    it made have their clients closed.
    """
    args = build_parser().parse_args(argv)
    log.configure(logging.WARNING, sys.stderr)
    made: list[Context] = []

    def make() -> Context:
        ctx = (make_ctx or _default_context)()
        made.append(ctx)
        return ctx

    try:
        code: int = args.handler(make, args)
    except ConfigError as exc:
        print(f"dicomflow: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"dicomflow {args.command_name}: {exc}", file=sys.stderr)
        return 2
    except DicomflowError as exc:
        refused = "refused: " if isinstance(exc, Refused) else ""
        print(f"dicomflow {args.command_name}: {refused}{exc}", file=sys.stderr)
        return 1
    finally:
        for ctx in made:
            ctx.close_clients()
    return code
