"""The dicomStores.export operation.

Each instance is written to ``uriPrefix/{study}/{series}/{instance}[/{frame}].{ext}``,
overwriting what is there. ``application/dicom`` keeps the stored bytes for
``transfer-syntax=*`` (and when no syntax is given) or transcodes with pydicom.
``application/octet-stream`` writes the decoded pixel data; ``image/jpeg`` and
``image/png`` write one rendered image per frame, the frame number appearing
in the path only for multi-frame instances. A file that cannot be produced is a
per-file failure with the reason in the operation's log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from localcloud.healthcare.gcs import StorageAccess, split_gcs_uri
from localcloud.healthcare.instances import (
    InstanceRejected,
    raw_pixels,
    render_frames,
    transcode,
)
from localcloud.healthcare.operations import RunningOperation
from localcloud.healthcare.repository import Repository, StoredInstance
from localcloud.healthcare.status import ApiError

MIME_TYPES = ("application/dicom", "application/octet-stream", "image/jpeg", "image/png")
_EXTENSIONS = {
    "application/dicom": ".dcm",
    "application/octet-stream": "",
    "image/jpeg": ".jpg",
    "image/png": ".png",
}


def parse_mime_type(value: str) -> tuple[str, str]:
    """Split ``mimeType`` into (type, transfer syntax); the syntax defaults to ``*``.

    Raises:
        ApiError: INVALID_ARGUMENT for an unknown type or parameter.
    """
    kind, _, params = (value or "application/dicom").partition(";")
    kind = kind.strip() or "application/dicom"
    syntax = "*"
    for param in filter(None, (p.strip() for p in params.split(";"))):
        key, _, val = param.partition("=")
        if key.strip() != "transfer-syntax" or not val.strip():
            raise ApiError("INVALID_ARGUMENT", f"invalid mimeType parameter {param!r}")
        syntax = val.strip().strip('"')
    if kind not in MIME_TYPES:
        raise ApiError(
            "INVALID_ARGUMENT", f"unsupported mimeType {kind!r}; use one of {', '.join(MIME_TYPES)}"
        )
    return kind, syntax


def parse_resource_paths(text: str) -> list[tuple[str, str | None, str | None]]:
    """Parse a filterConfig file: ``/studies/S[/series/R[/instances/I]]`` per line.

    Raises:
        ApiError: INVALID_ARGUMENT naming the first bad line.
    """
    paths: list[tuple[str, str | None, str | None]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.strip("/").split("/")
        keys = parts[0::2]
        if (
            len(parts) not in (2, 4, 6)
            or keys != ["studies", "series", "instances"][: len(keys)]
            or not all(parts[1::2])
        ):
            raise ApiError(
                "INVALID_ARGUMENT",
                f"filterConfig line {number} is not /studies/UID[/series/UID[/instances/UID]]",
            )
        values = [*parts[1::2], None, None]
        paths.append((str(values[0]), values[1], values[2]))
    return paths


def _selected(instance: StoredInstance, paths: list[tuple[str, str | None, str | None]]) -> bool:
    return any(
        instance.study == study
        and (series is None or instance.series == series)
        and (sop is None or instance.sop == sop)
        for study, series, sop in paths
    )


def render_export(
    data: bytes, instance: StoredInstance, kind: str, syntax: str
) -> list[tuple[str, bytes]]:
    """The (relative object name, bytes) pairs an instance exports to.

    Raises:
        InstanceRejected: the instance cannot be produced in this form.
    """
    base = f"{instance.study}/{instance.series}/{instance.sop}"
    extension = _EXTENSIONS[kind]
    if kind == "application/dicom":
        return [(base + extension, transcode(data, syntax))]
    if kind == "application/octet-stream":
        if syntax not in ("*", "1.2.840.10008.1.2.1"):
            raise InstanceRejected(f"application/octet-stream cannot use transfer syntax {syntax}")
        return [(base, raw_pixels(data))]
    images = render_frames(data, kind)
    if len(images) == 1:
        return [(base + extension, images[0])]
    return [(f"{base}/{number}{extension}", image) for number, image in enumerate(images, 1)]


def run_export(
    operation: RunningOperation,
    repository: Repository,
    store: str,
    destination: dict[str, Any],
    filter_config: dict[str, Any],
    storage: StorageAccess,
    checkpoint: Callable[[RunningOperation], None],
) -> dict[str, Any] | None:
    """The body of a dicomStores.export operation.

    Raises:
        ApiError: the destination bucket or the filter file is missing or invalid.
    """
    bucket, prefix = split_gcs_uri(str(destination.get("uriPrefix", "")))
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    kind, syntax = parse_mime_type(str(destination.get("mimeType", "")))
    storage.require_bucket(bucket)
    instances = repository.query_instances(store)
    paths_uri = filter_config.get("resourcePathsGcsUri")
    if paths_uri:
        paths_bucket, paths_name = split_gcs_uri(str(paths_uri))
        try:
            text = storage.download(paths_bucket, paths_name).decode("utf-8")
        except Exception as exc:
            # Any failure to read the filter file ends the whole export with its reason.
            raise ApiError("NOT_FOUND", f"cannot read filterConfig {paths_uri}: {exc}") from None
        paths = parse_resource_paths(text)
        instances = [i for i in instances if _selected(i, paths)]
    operation.set_pending(len(instances))
    checkpoint(operation)

    def export_one(instance: StoredInstance) -> None:
        if operation.cancelled.is_set():
            return
        source = f"{instance.study}/{instance.series}/{instance.sop}"
        try:
            outputs = render_export(repository.read_blob(instance.sha256), instance, kind, syntax)
            for name, payload in outputs:
                storage.upload(bucket, prefix + name, payload, kind)
        except InstanceRejected as exc:
            operation.log_failure(source, exc.code, exc.message)
            operation.count(failure=1)
        except Exception as exc:
            # Upload errors fail this file only; the export goes on with the others.
            operation.log_failure(source, 13, f"cannot write to gs://{bucket}/{prefix}: {exc}")
            operation.count(failure=1)
        else:
            operation.count(success=1)

    for _ in storage.pool.map(export_one, instances):
        pass
    checkpoint(operation)
    return None
