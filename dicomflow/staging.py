"""The staging bucket's layout: keys, windows, and the file record a staging copy carries.

Every name of a file's state is derived from the object alone (``file_key``,
``window_id``, ``late_window_id``, the ``*_name`` functions), so every delivery of one
object generation computes the same names. ``FileRecord`` is the record a copy carries
as its object metadata.

See docs/architecture.md#state-objects
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from google.cloud import storage

from dicomflow import objects
from dicomflow.config import (
    BATCHES_PREFIX,
    DROPPED_PREFIX,
    FAILED_PREFIX,
    MANIFESTS_PREFIX,
    QUARANTINE_PREFIX,
    STATE_PREFIX,
    Settings,
)
from dicomflow.json_types import JSON

BITS = 6
WINDOW_FORMAT = "%Y%m%dT%H%M%SZ"
LATE = "L"
_WINDOW = re.compile(r"^\d{8}T\d{6}[ZL]$")
_BATCH = re.compile(rf"^(\d{{8}}T\d{{6}}[ZL])(?:-([01]{{1,{BITS}}}))?$")
_KEY = re.compile(rf"^[01]{{{BITS}}}[0-9a-f]{{40}}$")

FILES = "_files.ndjson"
SEALED_PREFIX = f"{STATE_PREFIX}sealed/"
OPEN_PREFIX = f"{STATE_PREFIX}open/"
LATE_PREFIX = f"{STATE_PREFIX}late/"
SLOTS_PREFIX = f"{STATE_PREFIX}slots/"
BATCH_STATE_PREFIX = f"{STATE_PREFIX}batch/"
META_PREFIX = "df-"


def file_key(bucket: str, name: str, generation: int | str) -> str:
    """The key of one object generation (see docs/architecture.md#state-objects)."""
    digest = hashlib.sha256(f"{bucket}\n{name}\n{generation}".encode()).digest()
    bits = "".join(str((digest[0] >> (7 - i)) & 1) for i in range(BITS))
    return bits + digest.hex()[:40]


def is_key(text: str) -> bool:
    return bool(_KEY.match(text))


def window_start(moment: datetime, seconds: int) -> datetime:
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, UTC)


def window_id(moment: datetime, seconds: int) -> str:
    """``moment``'s window as text, e.g. ``20261125T125300Z``."""
    return window_start(moment, seconds).strftime(WINDOW_FORMAT)


def late_window_id(moment: datetime, seconds: int) -> str:
    """The late window holding ``moment``: ``20261125T125000L``, ``seconds`` long."""
    return window_start(moment, seconds).strftime(WINDOW_FORMAT)[:-1] + LATE


def is_late_window(window: str) -> bool:
    return window.endswith(LATE)


def parse_window(window: str) -> datetime:
    """The start of a window id (regular or late).

    Raises:
        ValueError: not a window id.
    """
    if not _WINDOW.match(window):
        raise ValueError(f"invalid window {window!r}: expected YYYYMMDDTHHMMSSZ")
    return datetime.strptime(window[:-1] + "Z", WINDOW_FORMAT).replace(tzinfo=UTC)


def seal_time(window: str, settings: Settings) -> datetime:
    """When ``window`` is sealed: its end plus the seal grace."""
    seconds = (
        settings.late_window_seconds if is_late_window(window) else settings.batch_window_seconds
    )
    return parse_window(window) + timedelta(seconds=seconds + settings.seal_grace_seconds)


def late_home_window(home: str, settings: Settings) -> str:
    """The late window of a file that misses its home window's seal: the one holding that
    seal. Every delivery computes the same one, so no claim is needed to go there."""
    return late_window_id(seal_time(home, settings), settings.late_window_seconds)


def record_names(key: str, home: str, settings: Settings) -> list[str]:
    """Every name where ingest may have put the record of ``key`` (home window ``home``).

    A late claim (``state/late/<key>.json``) stands for the copy or drop record in the
    window it names, wherever that is.
    """
    return [
        staged_name(home, key),
        staged_name(late_home_window(home, settings), key),
        quarantine_name(home, key),
        dropped_name(home, key),
        failed_name(home, key),
        late_name(key),
    ]


def recorded_keys(
    bucket: storage.Bucket, settings: Settings, found: Iterable[tuple[str, str]]
) -> set[str]:
    """Which of the (key, home window) pairs ingest left a record of (``record_names``).

    Listings only, however many keys: four per home window (staging copies, quarantine,
    drop and failure records), one per late window holding a home window's seal, and
    one of the late claims.
    """
    pairs = list(found)
    homes = {home for _, home in pairs}
    windows = homes | {late_home_window(home, settings) for home in homes}
    prefixes = [f"{BATCHES_PREFIX}{w}/" for w in sorted(windows)]
    for prefix in (QUARANTINE_PREFIX, DROPPED_PREFIX, FAILED_PREFIX):
        prefixes += [f"{prefix}{w}/" for w in sorted(homes)]
    prefixes.append(LATE_PREFIX)
    with ThreadPoolExecutor(8, thread_name_prefix="records") as pool:
        listed = list(pool.map(lambda prefix: objects.names(bucket, prefix), prefixes))
    have = {name.rsplit("/", 1)[-1].split(".", 1)[0] for names in listed for name in names}
    return {key for key, _ in pairs if key in have}


def has_record(bucket: storage.Bucket, key: str, home: str, settings: Settings) -> bool:
    """True when ingest left any record of ``key`` (``record_names``): staged, quarantined,
    dropped, failed or claimed late. One existence check per name, stopping at the first.

    Valid while staging copies are kept, which the lifecycle rule does for longer than
    the maximum event age.
    """
    return any(objects.exists(bucket, name) for name in record_names(key, home, settings))


def batch_id(window: str, bits: str = "") -> str:
    return f"{window}-{bits}" if bits else window


def parse_batch(batch: str) -> tuple[str, str]:
    """(window, bits) of a batch id.

    Raises:
        ValueError: not a batch id.
    """
    match = _BATCH.match(batch)
    if not match:
        raise ValueError(f"invalid batch id {batch!r}: expected YYYYMMDDTHHMMSSZ[-BITS]")
    return match.group(1), match.group(2) or ""


def _in_window(prefix: str, suffix: str) -> Callable[[str, str], str]:
    """The namer of one key's object in a window: ``{prefix}{window}/{key}{suffix}``."""

    def name(window: str, key: str) -> str:
        return f"{prefix}{window}/{key}{suffix}"

    return name


def _of(prefix: str, suffix: str) -> Callable[[str], str]:
    """The namer of the object of one window, batch or key: ``{prefix}{it}{suffix}``."""

    def name(it: str) -> str:
        return f"{prefix}{it}{suffix}"

    return name


# The names of the module docstring's table, in its order.
staged_name = _in_window(BATCHES_PREFIX, ".dcm")
files_name = _of(BATCHES_PREFIX, f"/{FILES}")
quarantine_name = _in_window(QUARANTINE_PREFIX, ".dcm")
dropped_name = _in_window(DROPPED_PREFIX, ".json")
failed_name = _in_window(FAILED_PREFIX, ".json")
late_name = _of(LATE_PREFIX, ".json")
sealed_name = _of(SEALED_PREFIX, ".json")
sealed_done_name = _of(SEALED_PREFIX, ".done")
open_name = _of(OPEN_PREFIX, ".json")
intent_name = _of(BATCH_STATE_PREFIX, "/intent.json")
operation_name = _of(BATCH_STATE_PREFIX, "/operation.json")
stuck_name = _of(BATCH_STATE_PREFIX, "/stuck.json")  # deleted once the batch is verified
success_name = _of(MANIFESTS_PREFIX, "/success.ndjson")
failure_name = _of(MANIFESTS_PREFIX, "/failure.ndjson")
summary_name = _of(MANIFESTS_PREFIX, "/summary.json")


def slot_name(slot: int) -> str:
    return f"{SLOTS_PREFIX}{slot:03d}.json"


def import_uri(staging_bucket: str, batch: str) -> str:
    """The import source of ``batch``: its window's staging copies whose keys start with
    the batch's bits (no other object under ``batches/`` ends in ``.dcm``)."""
    window, bits = parse_batch(batch)
    return f"gs://{staging_bucket}/{BATCHES_PREFIX}{window}/{bits}*.dcm"


@dataclass(frozen=True)
class FileRecord:
    """What is known of one object generation; carried as the staging copy's metadata.

    ``home`` is the window of the object's ``timeCreated``; ``window`` the one the copy
    is in (later than ``home`` for late deliveries and re-staged copies). No patient
    tags: the source location, sizes, checksums and DICOM UIDs only.
    """

    key: str
    bucket: str
    name: str
    generation: str
    size: int
    home: str
    window: str
    event: str = ""
    md5: str | None = None
    crc32c: str | None = None
    study: str | None = None
    series: str | None = None
    sop: str | None = None
    reason: str | None = None
    via: str | None = None

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.name}"

    @property
    def checksum(self) -> str | None:
        """``md5:<b64>`` of the source, else ``crc32c:<b64>``, else None."""
        if self.md5:
            return f"md5:{self.md5}"
        return f"crc32c:{self.crc32c}" if self.crc32c else None

    def metadata(self) -> dict[str, str]:
        """The record as Cloud Storage custom metadata (string values, none empty)."""
        return {
            f"{META_PREFIX}{k}": str(v)
            for k, v in asdict(self).items()
            if v not in (None, "") and k != "window"
        }

    def line(self) -> JSON:
        """The record as a file-list or manifest line."""
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}

    @classmethod
    def from_line(cls, line: JSON) -> FileRecord:
        fields = cls.__dataclass_fields__
        known = {k: v for k, v in line.items() if k in fields}
        known["size"] = int(known.get("size") or 0)
        known["generation"] = str(known.get("generation", ""))
        return cls(**known)

    @classmethod
    def from_blob(cls, blob: storage.Blob, window: str) -> FileRecord | None:
        """The record a listed staging or quarantine copy carries, or None when it has none."""
        meta = blob.metadata or {}
        values = {k[len(META_PREFIX) :]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
        if not values.get("key") or not values.get("bucket") or not values.get("name"):
            return None
        return cls.from_line({**values, "window": window})
