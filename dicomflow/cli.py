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

from dicomflow import ingest, log
from dicomflow.config import load_settings
from dicomflow.errors import ConfigError, DicomflowError
from dicomflow.events import StorageObject
from dicomflow.runtime import Context, make_context

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
            "Send every object under gs://BUCKET/PREFIX through the ingest path, as if its "
            "finalize event had arrived: filtered, checked, claimed in the ledger, staged or "
            "quarantined. Objects already in the ledger are left as they are."
        ),
    )
    parser.add_argument("uri", help="gs://BUCKET/PREFIX")
    parser.add_argument("--workers", type=int, default=8, help="parallel objects (default 8)")
    parser.add_argument(
        "--tick", action="store_true", help="run one ingest tick afterwards (seal, import)"
    )
    parser.set_defaults(handler=cmd_backfill)


def cmd_backfill(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """List the objects, ingest each with a progress bar, print the totals."""
    from rich.progress import Progress

    try:
        bucket, prefix = parse_gs_uri(args.uri)
    except ValueError as exc:
        print(f"dicomflow backfill: {exc}", file=sys.stderr)
        return 2
    ctx = make_ctx()
    blobs = list(ctx.storage.list_blobs(bucket, prefix=prefix or None))
    counts: Counter[str] = Counter()
    errors: list[str] = []

    def one(blob: Any) -> str:
        obj = StorageObject(
            bucket=bucket,
            name=blob.name,
            generation=str(blob.generation),
            size=int(blob.size or 0),
            md5_hash=blob.md5_hash,
            crc32c=blob.crc32c,
            content_type=blob.content_type,
        )
        result = ingest.ingest_object(ctx, obj, f"backfill:{blob.name}#{blob.generation}", None)
        status = str(result["status"])
        return f"{status} (again)" if result.get("repeat") else status

    with (
        Progress(console=None if not args.json else _stderr_console(), transient=args.json) as bar,
        ThreadPoolExecutor(max(1, args.workers)) as pool,
    ):
        task = bar.add_task(f"backfill gs://{bucket}/{prefix}", total=len(blobs))
        futures = {pool.submit(one, blob): blob.name for blob in blobs}
        for future in as_completed(futures):
            try:
                counts[future.result()] += 1
            except DicomflowError as exc:
                counts["error"] += 1
                errors.append(f"gs://{bucket}/{futures[future]}: {exc}")
            bar.advance(task)
    result: dict[str, Any] = {"objects": len(blobs), "outcomes": dict(sorted(counts.items()))}
    if errors:
        result["errors"] = errors[:20]
    if args.tick:
        result["tick"] = ingest.tick(ctx, "backfill")
    lines = [f"{len(blobs)} objects under gs://{bucket}/{prefix}"]
    lines += [f"  {status}: {n}" for status, n in sorted(counts.items())]
    lines += [f"  error: {e}" for e in errors[:20]]
    _emit(args, result, "\n".join(lines))
    return 1 if errors else 0


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)


# ---- export ----------------------------------------------------------------------------------


def _export_date(text: str) -> Any:
    from dicomflow import export

    try:
        return export.parse_day(text)
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


# ---- entry point -----------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[Any, argparse.ArgumentParser], None]] = [add_backfill, add_export]


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
