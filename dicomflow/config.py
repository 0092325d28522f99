"""Settings, read once from the environment into a frozen dataclass.

``load_settings()`` is called once per process (at import of ``main.py`` on
Cloud Functions, at start of the CLI) and the result is passed down. No other
module reads ``os.environ``. A bad value raises ``ConfigError`` naming the
setting and the fix.

The same names configure localcloud and Google Cloud; on Google Cloud the
endpoint settings stay unset.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from dicomflow.errors import ConfigError
from dicomflow.names import DicomStoreName, TopicName

# Prefixes the pipeline writes under, in the staging bucket. Events for objects
# under them are always ignored, so a shared landing bucket can never loop.
BATCHES_PREFIX = "batches/"
QUARANTINE_PREFIX = "quarantine/"
MANIFESTS_PREFIX = "manifests/"
STATE_PREFIX = "state/"
# Per-window records of files ingest dropped (state/dropped/<window>/<key>.json).
DROPPED_PREFIX = f"{STATE_PREFIX}dropped/"
# Per-window records of files ingest could not read or copy (failed/<window>/<key>.json).
FAILED_PREFIX = "failed/"
# Restores and drills: the copies a restore imports from, the drill records, and the
# erasure tombstones (which no lifecycle rule may expire).
RESTORES_PREFIX = "restores/"
DRILLS_PREFIX = "drills/"
TOMBSTONES_PREFIX = "tombstones/"
PIPELINE_PREFIXES = (
    BATCHES_PREFIX,
    QUARANTINE_PREFIX,
    MANIFESTS_PREFIX,
    STATE_PREFIX,
    FAILED_PREFIX,
    RESTORES_PREFIX,
    DRILLS_PREFIX,
    TOMBSTONES_PREFIX,
)

EXPORT_MODES = ("full", "incremental")
EXPORT_MIME_TYPES = (
    "application/dicom",
    "application/octet-stream",
    "image/jpeg",
    "image/png",
)
# Transfer syntaxes the export may ask for with application/dicom; "*" keeps the stored one.
EXPORT_TRANSFER_SYNTAXES = (
    "*",
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
)
ALERT_OBJECT_NAMES = ("hash", "plain")
ALERT_UIDS = ("hash", "plain")
_SECRET_VERSION = re.compile(r"^projects/[^/]+/secrets/[^/]+/versions/[^/]+$")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._\-]{1,220}[a-z0-9]$")


@dataclass(frozen=True)
class Settings:
    """Every setting of dicomflow. See the README's settings table for the env names."""

    dicom_store: DicomStoreName
    landing_bucket: str
    staging_bucket: str
    backup_bucket: str
    alerts_topic: TopicName
    healthcare_endpoint: str | None = None
    pubsub_endpoint: str | None = None
    storage_emulator_host: str | None = None
    include_globs: tuple[str, ...] = ("*.dcm",)
    include_prefixes: tuple[str, ...] = ()
    max_event_age_seconds: int = 90_000
    sweep_hours: int = 24
    staging_copy_retention_days: int = 7
    landing_delete_after_days: int = 0
    batch_window_seconds: int = 60
    batch_max_files: int = 20_000
    batch_max_bytes: int = 20 * 1024**3
    seal_grace_seconds: int = 20
    late_window_seconds: int = 600
    feed_grace_seconds: int = 60
    max_running_imports: int = 5
    import_restart_seconds: int = 300
    backup_prefix: str = "backups"
    export_date_layout: str = "%Y-%m-%d"
    export_mime_type: str = "application/dicom; transfer-syntax=*"
    export_mode: str = "full"
    stalled_seconds: int = 3_600
    backlog_seconds: int = 900
    verify_stuck_minutes: int = 30
    stale_state_minutes: int = 360
    alert_object_names: str = "hash"
    alert_sample_files: int = 10
    alert_uids: str = "hash"
    key_secret: str | None = None
    key_file: str | None = None
    sniff: bool = True
    restore_drill_days: int = 7
    restore_drill_studies: int = 50
    drill_store: DicomStoreName | None = None
    ignored_prefixes: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        _check_housekeeping(self)

    @property
    def healthcare_api_root(self) -> str:
        """The base URL requests go to, ending with '/'."""
        return (self.healthcare_endpoint or "https://healthcare.googleapis.com/").rstrip("/") + "/"

    def is_pipeline_object(self, bucket: str, name: str) -> bool:
        """True for objects the pipeline itself writes (never ingested)."""
        return any(bucket == b and name.startswith(p) for b, p in self.ignored_prefixes)


DAY_SECONDS = 86_400


def _check_housekeeping(settings: Settings) -> None:
    """Check the sweep's and landing retention's settings against each other.

    The sweep looks at an upload once it is older than the maximum event age (plus the
    seal grace, so no delivery is still running) and while its staging copy is sure to
    be kept (the retention less a day). Landing retention must not delete an upload
    before a late event for it can come, nor before a sweep has looked at it.

    Raises:
        ConfigError: naming the setting to change and its least value.
    """
    hours = settings.sweep_hours
    # Every upload must be old enough for the sweep, and still recorded, for at least
    # one whole sweep period.
    needed = settings.max_event_age_seconds + settings.seal_grace_seconds + hours * 3600
    kept = settings.staging_copy_retention_days
    if hours and (kept - 1) * DAY_SECONDS <= needed:
        raise ConfigError(
            "DICOMFLOW_STAGING_COPY_RETENTION_DAYS",
            f"{kept} days leave the sweep no whole period between the maximum event age "
            "and the copies' expiry",
            f"set it (and Terraform's staging_copy_retention_days) to "
            f"{needed // DAY_SECONDS + 2} or more, or shorten DICOMFLOW_SWEEP_HOURS",
        )
    delete_after = settings.landing_delete_after_days
    if delete_after and delete_after * DAY_SECONDS < needed:
        raise ConfigError(
            "DICOMFLOW_LANDING_DELETE_AFTER_DAYS",
            f"{delete_after} days is sooner than a late event or the sweep may need the upload",
            f"set it to {-(-needed // DAY_SECONDS)} or more (the maximum event age, the seal "
            "grace and one sweep period), or to 0 to keep landing objects",
        )


# (env name, default shown in the README, description); the README table is built from this.
SETTINGS_DOC: tuple[tuple[str, str, str], ...] = (
    (
        "DICOMFLOW_DICOM_STORE",
        "required",
        "target store, projects/P/locations/L/datasets/D/dicomStores/S",
    ),
    ("DICOMFLOW_LANDING_BUCKET", "required", "bucket whose uploads are ingested"),
    ("DICOMFLOW_STAGING_BUCKET", "required", "batches, quarantine, manifests and state"),
    ("DICOMFLOW_BACKUP_BUCKET", "required", "bucket the exports write to"),
    ("DICOMFLOW_ALERTS_TOPIC", "required", "alerts topic, projects/P/topics/T"),
    ("DICOMFLOW_HEALTHCARE_ENDPOINT", "unset", "Healthcare API base URL (localcloud only)"),
    ("DICOMFLOW_PUBSUB_ENDPOINT", "unset", "Pub/Sub REST base URL (localcloud only)"),
    ("STORAGE_EMULATOR_HOST", "unset", "Cloud Storage emulator URL (localcloud only)"),
    ("DICOMFLOW_INCLUDE_GLOBS", "*.dcm", "comma-separated name globs, case-insensitive"),
    ("DICOMFLOW_INCLUDE_PREFIXES", "(all)", "comma-separated landing prefixes to ingest"),
    (
        "DICOMFLOW_SNIFF",
        "true",
        "also ingest names no glob matches whose bytes 128-131 are DICM (one 4-byte read each)",
    ),
    ("DICOMFLOW_MAX_EVENT_AGE_SECONDS", "90000", "older events are recorded and dropped"),
    (
        "DICOMFLOW_SWEEP_HOURS",
        "24",
        "the ingest tick lists the landing bucket this often and ingests uploads whose event "
        "never came (0: off)",
    ),
    (
        "DICOMFLOW_STAGING_COPY_RETENTION_DAYS",
        "7",
        "days the staging lifecycle rule keeps staging and quarantine copies (Terraform's "
        "staging_copy_retention_days); the sweep looks at uploads younger than this less a day",
    ),
    (
        "DICOMFLOW_LANDING_DELETE_AFTER_DAYS",
        "0",
        "delete landing objects this many days after their file was verified imported or "
        "duplicate (0: keep them)",
    ),
    (
        "DICOMFLOW_BATCH_WINDOW_SECONDS",
        "60",
        "files are grouped in UTC windows of their upload time; a window is sealed after it ends",
    ),
    (
        "DICOMFLOW_BATCH_MAX_FILES",
        "20000",
        "a window with more files is imported in parts (halves, quarters ...) of at most this",
    ),
    ("DICOMFLOW_BATCH_MAX_BYTES", "21474836480", "... and of at most this many bytes (20 GiB)"),
    (
        "DICOMFLOW_SEAL_GRACE_SECONDS",
        "20",
        "wait after a window ends before the tick seals it; a staging copy may take half of it",
    ),
    (
        "DICOMFLOW_LATE_WINDOW_SECONDS",
        "600",
        "files whose event comes after their window's seal are grouped in windows this long",
    ),
    (
        "DICOMFLOW_FEED_GRACE_SECONDS",
        "60",
        "the report alerts a window's quarantined, dropped and failed files this long after "
        "its seal grace ends (records still landing first)",
    ),
    ("DICOMFLOW_MAX_RUNNING_IMPORTS", "5", "import operations running at once (K)"),
    (
        "DICOMFLOW_IMPORT_RESTART_SECONDS",
        "300",
        "an import intent without an operation record this old is imported again",
    ),
    ("DICOMFLOW_BACKUP_PREFIX", "backups", "exports go to gs://BACKUP/PREFIX/DATE/"),
    ("DICOMFLOW_EXPORT_DATE_LAYOUT", "%Y-%m-%d", "strftime layout of the dated folder"),
    ("DICOMFLOW_EXPORT_MIME_TYPE", "application/dicom; transfer-syntax=*", "export format"),
    ("DICOMFLOW_EXPORT_MODE", "full", "full or incremental"),
    ("DICOMFLOW_STALLED_SECONDS", "3600", "an operation running longer raises 'stalled'"),
    ("DICOMFLOW_BACKLOG_SECONDS", "900", "a sealed batch waiting longer raises 'backlog'"),
    (
        "DICOMFLOW_VERIFY_STUCK_MINUTES",
        "30",
        "a finished import whose verification keeps failing this long raises 'verification_stuck'",
    ),
    (
        "DICOMFLOW_STALE_STATE_MINUTES",
        "360",
        "an unsealed window, open batch or open export older than this raises 'stale_state'",
    ),
    ("DICOMFLOW_ALERT_OBJECT_NAMES", "hash", "object names in alerts: hash or plain"),
    ("DICOMFLOW_ALERT_SAMPLE_FILES", "10", "sample files listed in one alert"),
    ("DICOMFLOW_ALERT_UIDS", "hash", "DICOM UIDs in alerts: hash (keyed labels) or plain"),
    (
        "DICOMFLOW_KEY_SECRET",
        "unset",
        "deployment key for labels, a Secret Manager version projects/P/secrets/S/versions/V",
    ),
    (
        "DICOMFLOW_KEY_FILE",
        "unset",
        "... or a file holding it (localcloud); one of the two is required",
    ),
    (
        "DICOMFLOW_RESTORE_DRILL_DAYS",
        "7",
        "restore the latest backup into the drill store this often (days); 0 turns drills off",
    ),
    (
        "DICOMFLOW_RESTORE_DRILL_STUDIES",
        "50",
        "studies a drill restores, sampled at random; 0 restores the whole backup",
    ),
    ("DICOMFLOW_DRILL_STORE", "<store>-drill", "the drill's scratch DICOM store, emptied after"),
)


def _required(env: Mapping[str, str], name: str, fix: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(name, "is not set", fix)
    return value


def _bucket(env: Mapping[str, str], name: str) -> str:
    value = _required(env, name, f"export {name}=<bucket name, without gs://>")
    value = value.removeprefix("gs://").rstrip("/")
    if not _BUCKET.match(value):
        raise ConfigError(
            name,
            f"{value!r} is not a valid bucket name",
            "use 3-222 lowercase letters, digits, '-', '_' or '.'",
        )
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(
            name, f"{raw!r} is not an integer", f"set {name} to a whole number, e.g. {default}"
        ) from None
    if value < minimum:
        raise ConfigError(name, f"{value} is below {minimum}", f"set {name} to {minimum} or more")
    return value


def _csv(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None:
        return default
    return tuple(p.strip() for p in raw.split(",") if p.strip())


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(name, f"{raw!r} is not a yes/no value", f"set {name}=true or {name}=false")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip() or default
    if value not in choices:
        raise ConfigError(name, f"{value!r} is not supported", f"use one of: {', '.join(choices)}")
    return value


def parse_mime_type(value: str) -> tuple[str, str | None]:
    """Split an export mimeType into (type, transfer syntax or None).

    Raises:
        ValueError: the type or the transfer syntax is not supported.
    """
    kind, _, params = value.partition(";")
    kind = kind.strip()
    syntax: str | None = None
    for param in params.split(";"):
        key, _, val = param.strip().partition("=")
        if key.strip() == "transfer-syntax":
            syntax = val.strip()
        elif key.strip():
            raise ValueError(f"unknown mimeType parameter {key.strip()!r}")
    if kind not in EXPORT_MIME_TYPES:
        raise ValueError(f"unsupported mimeType {kind!r}; valid: {', '.join(EXPORT_MIME_TYPES)}")
    if (
        syntax is not None
        and kind == "application/dicom"
        and syntax not in EXPORT_TRANSFER_SYNTAXES
    ):
        raise ValueError(
            f"unsupported transfer-syntax {syntax!r}; valid: {', '.join(EXPORT_TRANSFER_SYNTAXES)}"
        )
    return kind, syntax


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise ConfigError on the first bad one."""
    env = os.environ if env is None else env
    try:
        store = DicomStoreName.from_string(
            _required(
                env,
                "DICOMFLOW_DICOM_STORE",
                "export DICOMFLOW_DICOM_STORE=projects/P/locations/L/datasets/D/dicomStores/S",
            )
        )
    except ValueError as exc:
        raise ConfigError(
            "DICOMFLOW_DICOM_STORE", str(exc), "use projects/P/locations/L/datasets/D/dicomStores/S"
        ) from None
    try:
        topic = TopicName.from_string(
            _required(
                env, "DICOMFLOW_ALERTS_TOPIC", "export DICOMFLOW_ALERTS_TOPIC=projects/P/topics/T"
            )
        )
    except ValueError as exc:
        raise ConfigError("DICOMFLOW_ALERTS_TOPIC", str(exc), "use projects/P/topics/T") from None

    landing = _bucket(env, "DICOMFLOW_LANDING_BUCKET")
    staging = _bucket(env, "DICOMFLOW_STAGING_BUCKET")
    backup = _bucket(env, "DICOMFLOW_BACKUP_BUCKET")
    backup_prefix = env.get("DICOMFLOW_BACKUP_PREFIX", "backups").strip().strip("/")
    if not backup_prefix:
        raise ConfigError(
            "DICOMFLOW_BACKUP_PREFIX", "is empty", "set a folder name such as 'backups'"
        )

    mime = env.get("DICOMFLOW_EXPORT_MIME_TYPE", "").strip() or Settings.export_mime_type
    try:
        parse_mime_type(mime)
    except ValueError as exc:
        raise ConfigError("DICOMFLOW_EXPORT_MIME_TYPE", str(exc), "pick a valid mimeType") from None

    layout = env.get("DICOMFLOW_EXPORT_DATE_LAYOUT", "").strip() or Settings.export_date_layout
    if "%d" not in layout or "%m" not in layout or "%Y" not in layout:
        raise ConfigError(
            "DICOMFLOW_EXPORT_DATE_LAYOUT",
            f"{layout!r} lacks %Y, %m or %d",
            "use e.g. %Y-%m-%d or %Y/%m/%d",
        )

    drill_store = _drill_store(env.get("DICOMFLOW_DRILL_STORE", ""), store)
    ignored = [(staging, p) for p in PIPELINE_PREFIXES] + [(backup, backup_prefix + "/")]
    return Settings(
        dicom_store=store,
        landing_bucket=landing,
        staging_bucket=staging,
        backup_bucket=backup,
        alerts_topic=topic,
        healthcare_endpoint=env.get("DICOMFLOW_HEALTHCARE_ENDPOINT") or None,
        pubsub_endpoint=env.get("DICOMFLOW_PUBSUB_ENDPOINT") or None,
        storage_emulator_host=env.get("STORAGE_EMULATOR_HOST") or None,
        include_globs=_csv(env, "DICOMFLOW_INCLUDE_GLOBS", Settings.include_globs) or ("*",),
        include_prefixes=_csv(env, "DICOMFLOW_INCLUDE_PREFIXES", ()),
        sniff=_bool(env, "DICOMFLOW_SNIFF", Settings.sniff),
        max_event_age_seconds=_int(
            env, "DICOMFLOW_MAX_EVENT_AGE_SECONDS", Settings.max_event_age_seconds, 1
        ),
        sweep_hours=_int(env, "DICOMFLOW_SWEEP_HOURS", Settings.sweep_hours),
        staging_copy_retention_days=_int(
            env,
            "DICOMFLOW_STAGING_COPY_RETENTION_DAYS",
            Settings.staging_copy_retention_days,
            2,
        ),
        landing_delete_after_days=_int(
            env, "DICOMFLOW_LANDING_DELETE_AFTER_DAYS", Settings.landing_delete_after_days
        ),
        batch_window_seconds=_int(
            env, "DICOMFLOW_BATCH_WINDOW_SECONDS", Settings.batch_window_seconds, 1
        ),
        batch_max_files=_int(env, "DICOMFLOW_BATCH_MAX_FILES", Settings.batch_max_files, 1),
        batch_max_bytes=_int(env, "DICOMFLOW_BATCH_MAX_BYTES", Settings.batch_max_bytes, 1),
        seal_grace_seconds=_int(env, "DICOMFLOW_SEAL_GRACE_SECONDS", Settings.seal_grace_seconds),
        late_window_seconds=_int(
            env, "DICOMFLOW_LATE_WINDOW_SECONDS", Settings.late_window_seconds, 1
        ),
        feed_grace_seconds=_int(env, "DICOMFLOW_FEED_GRACE_SECONDS", Settings.feed_grace_seconds),
        max_running_imports=_int(
            env, "DICOMFLOW_MAX_RUNNING_IMPORTS", Settings.max_running_imports, 1
        ),
        import_restart_seconds=_int(
            env, "DICOMFLOW_IMPORT_RESTART_SECONDS", Settings.import_restart_seconds, 1
        ),
        backup_prefix=backup_prefix,
        export_date_layout=layout,
        export_mime_type=mime,
        export_mode=_choice(env, "DICOMFLOW_EXPORT_MODE", Settings.export_mode, EXPORT_MODES),
        stalled_seconds=_int(env, "DICOMFLOW_STALLED_SECONDS", Settings.stalled_seconds, 1),
        backlog_seconds=_int(env, "DICOMFLOW_BACKLOG_SECONDS", Settings.backlog_seconds, 1),
        verify_stuck_minutes=_int(
            env, "DICOMFLOW_VERIFY_STUCK_MINUTES", Settings.verify_stuck_minutes, 1
        ),
        stale_state_minutes=_int(
            env, "DICOMFLOW_STALE_STATE_MINUTES", Settings.stale_state_minutes, 1
        ),
        alert_object_names=_choice(
            env, "DICOMFLOW_ALERT_OBJECT_NAMES", Settings.alert_object_names, ALERT_OBJECT_NAMES
        ),
        alert_sample_files=_int(
            env, "DICOMFLOW_ALERT_SAMPLE_FILES", Settings.alert_sample_files, 1
        ),
        alert_uids=_choice(env, "DICOMFLOW_ALERT_UIDS", Settings.alert_uids, ALERT_UIDS),
        key_secret=_key_secret(env.get("DICOMFLOW_KEY_SECRET", "")),
        key_file=env.get("DICOMFLOW_KEY_FILE", "").strip() or None,
        restore_drill_days=_int(env, "DICOMFLOW_RESTORE_DRILL_DAYS", Settings.restore_drill_days),
        restore_drill_studies=_int(
            env, "DICOMFLOW_RESTORE_DRILL_STUDIES", Settings.restore_drill_studies
        ),
        drill_store=drill_store,
        ignored_prefixes=tuple(ignored),
    )


def _key_secret(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if not _SECRET_VERSION.match(value):
        raise ConfigError(
            "DICOMFLOW_KEY_SECRET",
            f"{value!r} is not a secret version name",
            "use projects/P/secrets/S/versions/latest",
        )
    return value


def _drill_store(raw: str, store: DicomStoreName) -> DicomStoreName:
    """``DICOMFLOW_DRILL_STORE``, by default ``<store>-drill`` in the store's dataset."""
    raw = raw.strip()
    if not raw:
        return DicomStoreName(store.dataset, f"{store.store}-drill")
    try:
        drill = DicomStoreName.from_string(raw)
    except ValueError as exc:
        raise ConfigError(
            "DICOMFLOW_DRILL_STORE", str(exc), "use projects/P/locations/L/datasets/D/dicomStores/S"
        ) from None
    if drill == store:
        raise ConfigError(
            "DICOMFLOW_DRILL_STORE",
            "names the live store",
            "name a scratch store: a drill empties it after each run",
        )
    return drill
