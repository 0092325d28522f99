"""The restore side of the command line: ``restore``, ``erase`` and ``resolve``.

Listed in ``dicomflow.ops.cli.COMMANDS``; each handler takes the context factory and
the parsed arguments and returns the exit status (0 ok, 1 the work failed or was
refused, 2 usage).
"""

from __future__ import annotations

import argparse

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from dicomflow.json_types import JSON
from dicomflow.keys import DeploymentKey
from dicomflow.names import DicomStoreName
from dicomflow.ops.args import Bars, ContextFactory, UsageError, day, emit, stderr_console


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


def restore_arguments(parser: argparse.ArgumentParser) -> None:
    from dicomflow.restore import DEFAULT_VERIFY_BYTES

    parser.add_argument("--date", type=day, required=True, help="the backup's date, YYYY-MM-DD")
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


def cmd_restore(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """Import a dated backup into a DICOM store and check it.

    Import the backup gs://BACKUP_BUCKET/PREFIX/<date>/ into STORE, then check it
    against the backup: every instance by one QIDO per series, each series' count
    against the backup's _MANIFEST.json, and a random sample byte for byte. Erased
    studies (dicomflow erase) are left out. The live store is refused unless
    --into-live.
    """
    from dicomflow import restore

    ctx = make_ctx()
    try:
        target = target_store(args.into, ctx.settings.dicom_store)
        previous = [_key_file(path) for path in args.previous_key_file]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with Bars() as bars:
        result = restore.run(
            ctx,
            args.date,
            target,
            into_live=args.into_live,
            wait=args.wait,
            verify_bytes=max(0, args.verify_bytes),
            previous_keys=previous,
            progress=bars,
            timeout=args.timeout,
        )
    emit(args, result, restore_table(result))
    return 0 if result["status"] in ("restored", "started") else 1


CHECK_ROWS = (
    ("series checked", "series"),
    ("instances in the backup", "instances"),
    ("instances present", "present"),
    ("instances missing", "missing"),
    ("objects lost from the backup", "lostFromBackup"),
    ("compared byte for byte", "bytesChecked"),
    ("differing bytes", "bytesDifferent"),
)


def restore_table(result: JSON) -> RenderableType:
    """The summary of ``restore.run`` as a table."""
    rows = [
        ("backup", str(result["backup"])),
        ("into", str(result["target"])),
        ("studies", str(result["studies"])),
    ]
    if result.get("studiesSkipped"):
        rows.append(("studies left out (erased)", str(result["studiesSkipped"])))
    rows.append(("imported from", str(result.get("source", "-"))))
    rows.append(("operation", str(result.get("operation", "-"))))
    checked = result.get("check") or {}
    rows += [(label, str(checked[key])) for label, key in CHECK_ROWS if key in checked]
    if "seconds" in result:
        rows.append(("time", f"{result['seconds']} s"))
    status = str(result["status"])
    style = "green" if status == "restored" else ("yellow" if status == "started" else "red")
    lines = [Text(f"status: {status}", style=style)]
    lines += [Text(f"problem: {p}", style="red") for p in result.get("problems") or []]
    if status == "started":
        lines.append(Text("the import runs on; add --wait to follow it and check the result"))
    return Group(facts(f"restore {result['restoreId']}", rows), *lines)


# ---- resolve ---------------------------------------------------------------------------------


def resolve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", metavar="KEY", help="the file's key")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep-stored", action="store_true", help="the stored version is right")
    which.add_argument("--replace", action="store_true", help="the file's version is right")
    parser.add_argument("--batch", help="the batch that holds the conflict (faster lookup)")


def cmd_resolve(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """Settle a conflict: keep the stored instance, or replace it with the file.

    Settle the conflict of the file KEY (its key, as `dicomflow batch` lists it).
    --keep-stored leaves the stored instance and records the decision; --replace deletes
    the stored instance and imports the file again (a later batch verifies it). Both are
    recorded in the batch's manifests/<batch>/resolutions/.
    """
    from dicomflow.ops import resolve

    ctx = make_ctx()
    action = resolve.REPLACE if args.replace else resolve.KEEP_STORED
    with stderr_console().status(f"resolving {args.key} ({action})"):
        done = resolve.resolve(ctx, args.key, action, args.batch)
    record = done.record
    reimport = record.get("reimport") or {}
    rows = [("batch", done.batch), ("action", done.action), ("result", done.result)]
    if "deleted" in record:
        rows.append(("stored instance", str(record["deleted"])))
    if reimport:
        rows.append(("re-import", f"{reimport.get('result')} as {reimport.get('retryKey')}"))
        rows.append(("window", str(reimport.get("window"))))
    rows.append(("record", resolve.record_name(done.batch, done.key)))
    emit(args, done.as_dict(), facts(f"conflict {done.key}", rows))
    return 0


# ---- erase -----------------------------------------------------------------------------------


def erase_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    parser.add_argument("--reason", help="why (kept in the tombstone, never logged)")
    parser.add_argument(
        "--no-wait", action="store_true", help="start the deletion and return at once"
    )
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")


ERASURE_ROWS = (
    ("status", "status"),
    ("tombstone label", "label"),
    ("key id", "keyId"),
    ("operation", "operation"),
    ("tombstone", "tombstone"),
)


def cmd_erase(make_ctx: ContextFactory, args: argparse.Namespace) -> int:
    """Delete a study from the live store, and from every later restore.

    Record a tombstone for the study (a keyed hash of its UID, with the key id, the time
    and the reason; never the UID), then delete it from the live store (studies.delete,
    followed to the end). Every restore and drill leaves tombstoned studies out.
    """
    from dicomflow.ops import erase

    ctx = make_ctx()
    with stderr_console().status("erasing the study"):
        result = erase.erase(
            ctx, args.study, args.reason, wait=not args.no_wait, timeout=args.timeout
        )
    rows = [(label, str(result.get(key) or "-")) for label, key in ERASURE_ROWS]
    if result.get("notInStore"):
        rows.append(("note", "not in the live store; the tombstone keeps it out of restores"))
    problems = [Text(f"problem: {p}", style="red") for p in result.get("problems") or []]
    emit(args, result, Group(facts("erasure", rows), *problems))
    return 0 if result["status"] in (erase.ERASED, erase.ERASING) else 1


def facts(title: str, rows: list[tuple[str, str]]) -> Table:
    """A table of (label, value) rows under a title, without a header."""
    table = Table(title=title, show_header=False, title_justify="left")
    for label, value in rows:
        table.add_row(label, value)
    return table
