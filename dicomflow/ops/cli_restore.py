"""The restore side of the command line: ``restore``, ``erase`` and ``resolve``.

Registered in ``dicomflow.ops.cli.SUBCOMMANDS``; each handler takes the context factory
and the parsed arguments and returns the exit status (0 ok, 1 the work failed or was
refused, 2 usage).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from dicomflow.errors import DicomflowError
from dicomflow.json_types import JSON
from dicomflow.keys import DeploymentKey
from dicomflow.names import DicomStoreName
from dicomflow.runtime import Context

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

ContextFactory = Callable[[], Context]
# What add_subparsers() returns: typeshed names the type, argparse does not export it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _stderr() -> Console:
    from dicomflow.ops import cli

    console: Console = cli._stderr_console()
    return console


def _print(renderable: RenderableType) -> None:
    from dicomflow.ops import cli

    cli._print(renderable)


def _key_file(path: str) -> DeploymentKey:
    """A deployment key from a file (``--previous-key-file``).

    Raises:
        ValueError: unreadable or too short.
    """
    from pathlib import Path

    from dicomflow import keys

    try:
        secret = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"--previous-key-file: cannot read {path}: {exc.strerror}") from None
    if len(secret) < keys.MIN_KEY_BYTES:
        raise ValueError(f"--previous-key-file: {path} holds fewer than {keys.MIN_KEY_BYTES} bytes")
    return keys.DeploymentKey(secret)


def target_store(text: str, live: DicomStoreName) -> DicomStoreName:
    """``--into``: a full store name, or a store id in the live store's dataset.

    Raises:
        ValueError: neither.
    """
    if "/" not in text:
        return DicomStoreName(live.dataset, text)
    return DicomStoreName.from_string(text)


# ---- restore ---------------------------------------------------------------------------------


def add_restore(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    from dicomflow.restore import DEFAULT_VERIFY_BYTES

    parser = subparsers.add_parser(
        "restore",
        parents=[common],
        help="import a dated backup into a DICOM store and check it",
        description=(
            "Import the backup gs://BACKUP_BUCKET/PREFIX/<date>/ into STORE, then check it "
            "against the backup: every instance by one QIDO per series, each series' count "
            "against the backup's _MANIFEST.json, and a random sample byte for byte. Erased "
            "studies (dicomflow erase) are left out. The live store is refused unless "
            "--into-live."
        ),
    )
    from dicomflow.ops.cli import _export_date

    parser.add_argument(
        "--date", type=_export_date, required=True, help="the backup's date, YYYY-MM-DD"
    )
    parser.add_argument(
        "--into",
        required=True,
        metavar="STORE",
        help="projects/P/locations/L/datasets/D/dicomStores/S, or S in the live store's dataset",
    )
    parser.add_argument(
        "--wait", action="store_true", help="follow the import, then check the result"
    )
    parser.add_argument(
        "--verify-bytes",
        type=int,
        default=DEFAULT_VERIFY_BYTES,
        metavar="N",
        help=f"instances compared byte for byte (default {DEFAULT_VERIFY_BYTES}; 0: none)",
    )
    parser.add_argument(
        "--into-live", action="store_true", help="allow restoring into the live store"
    )
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    parser.add_argument(
        "--previous-key-file",
        action="append",
        default=[],
        metavar="PATH",
        help="a deployment key used before a rotation, for erasures recorded with it",
    )
    parser.set_defaults(handler=cmd_restore)


class _Bars:
    """One progress bar per stage (copy, import, check, bytes)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def cmd_restore(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from dicomflow import restore

    ctx = make_ctx()
    try:
        target = target_store(args.into, ctx.settings.dicom_store)
        previous = [_key_file(path) for path in args.previous_key_file]
    except ValueError as exc:
        print(f"dicomflow restore: {exc}", file=sys.stderr)
        return 2
    try:
        with Progress(console=_stderr(), transient=True) as progress:
            result = restore.run(
                ctx,
                args.date,
                target,
                into_live=args.into_live,
                wait=args.wait,
                verify_bytes=max(0, args.verify_bytes),
                previous_keys=previous,
                progress=_Bars(progress),
                timeout=args.timeout,
            )
    except restore.RestoreRefused as exc:
        print(f"dicomflow restore: refused: {exc}", file=sys.stderr)
        return 1
    except DicomflowError as exc:
        print(f"dicomflow restore: {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.close_clients()
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        _print(restore_table(result))
    return 0 if result["status"] in ("restored", "started") else 1


def restore_table(result: JSON) -> RenderableType:
    """The summary of ``restore.run`` as a table."""
    table = Table(title=f"restore {result['restoreId']}", show_header=False, title_justify="left")
    table.add_row("backup", str(result["backup"]))
    table.add_row("into", str(result["target"]))
    table.add_row("studies", str(result["studies"]))
    if result.get("studiesSkipped"):
        table.add_row("studies left out (erased)", str(result["studiesSkipped"]))
    table.add_row("imported from", str(result.get("source", "-")))
    table.add_row("operation", str(result.get("operation", "-")))
    checked = result.get("check") or {}
    for label, key in (
        ("series checked", "series"),
        ("instances in the backup", "instances"),
        ("instances present", "present"),
        ("instances missing", "missing"),
        ("objects lost from the backup", "lostFromBackup"),
        ("compared byte for byte", "bytesChecked"),
        ("differing bytes", "bytesDifferent"),
    ):
        if key in checked:
            table.add_row(label, str(checked[key]))
    if "seconds" in result:
        table.add_row("time", f"{result['seconds']} s")
    status = str(result["status"])
    style = "green" if status == "restored" else ("yellow" if status == "started" else "red")
    lines = [Text(f"status: {status}", style=style)]
    lines += [Text(f"problem: {p}", style="red") for p in result.get("problems") or []]
    if status == "started":
        lines.append(Text("the import runs on; add --wait to follow it and check the result"))
    return Group(table, *lines)


# ---- resolve ---------------------------------------------------------------------------------


def add_resolve(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "resolve",
        parents=[common],
        help="settle a conflict: keep the stored instance, or replace it with the file",
        description=(
            "Settle the conflict of the file KEY (its key, as `dicomflow batch` lists it). "
            "--keep-stored leaves the stored instance and records the decision; --replace "
            "deletes the stored instance and imports the file again (a later batch verifies "
            "it). Both are recorded in the batch's manifests/<batch>/resolutions/."
        ),
    )
    parser.add_argument("key", metavar="KEY", help="the file's key")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep-stored", action="store_true", help="the stored version is right")
    which.add_argument("--replace", action="store_true", help="the file's version is right")
    parser.add_argument("--batch", help="the batch that holds the conflict (faster lookup)")
    parser.set_defaults(handler=cmd_resolve)


def cmd_resolve(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    from dicomflow.ops import resolve

    ctx = make_ctx()
    action = resolve.REPLACE if args.replace else resolve.KEEP_STORED
    try:
        with _stderr().status(f"resolving {args.key} ({action})"):
            done = resolve.resolve(ctx, args.key, action, args.batch)
    except resolve.ResolveRefused as exc:
        print(f"dicomflow resolve: refused: {exc}", file=sys.stderr)
        return 1
    except DicomflowError as exc:
        print(f"dicomflow resolve: {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.close_clients()
    result = done.as_dict()
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    table = Table(title=f"conflict {done.key}", show_header=False, title_justify="left")
    table.add_row("batch", done.batch)
    table.add_row("action", done.action)
    table.add_row("result", done.result)
    record = done.record
    if "deleted" in record:
        table.add_row("stored instance", str(record["deleted"]))
    reimport = record.get("reimport") or {}
    if reimport:
        table.add_row("re-import", f"{reimport.get('result')} as {reimport.get('retryKey')}")
        table.add_row("window", str(reimport.get("window")))
    table.add_row("record", resolve.record_name(done.batch, done.key))
    _print(table)
    return 0


# ---- erase -----------------------------------------------------------------------------------


def add_erase(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "erase",
        parents=[common],
        help="delete a study from the live store, and from every later restore",
        description=(
            "Record a tombstone for the study (a keyed hash of its UID, with the key id, the "
            "time and the reason; never the UID), then delete it from the live store "
            "(studies.delete, followed to the end). Every restore and drill leaves "
            "tombstoned studies out."
        ),
    )
    parser.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    parser.add_argument("--reason", help="why (kept in the tombstone, never logged)")
    parser.add_argument(
        "--no-wait", action="store_true", help="start the deletion and return at once"
    )
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    parser.set_defaults(handler=cmd_erase)


def cmd_erase(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    from dicomflow.ops import erase

    ctx = make_ctx()
    try:
        with _stderr().status("erasing the study"):
            result = erase.erase(
                ctx, args.study, args.reason, wait=not args.no_wait, timeout=args.timeout
            )
    except DicomflowError as exc:
        print(f"dicomflow erase: {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.close_clients()
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        table = Table(title="erasure", show_header=False, title_justify="left")
        for label, key in (
            ("status", "status"),
            ("tombstone label", "label"),
            ("key id", "keyId"),
            ("operation", "operation"),
            ("tombstone", "tombstone"),
        ):
            table.add_row(label, str(result.get(key) or "-"))
        if result.get("notInStore"):
            table.add_row("note", "not in the live store; the tombstone keeps it out of restores")
        problems = [Text(f"problem: {p}", style="red") for p in result.get("problems") or []]
        _print(Group(table, *problems))
    return 0 if result["status"] in (erase.ERASED, erase.ERASING) else 1
