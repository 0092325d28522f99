"""Erasure tombstones: which studies were erased, without naming them.

A tombstone is ``tombstones/<key id>-<hex>.json`` in the staging bucket, where
``h:<key id>:<hex>`` is the deployment key's label of the Study Instance UID
(``keys.load(settings).hash(PURPOSE, uid)``). It holds the label, the key id, the
time, the reason and the deletion's operation; never the UID. Nobody can read the
erased UIDs back from the tombstones; whoever holds the key can tell whether a given
study was erased, which is all a restore needs.

Tombstones are kept for good: no lifecycle rule may match ``tombstones/`` (a backup
that still holds an erased study can be restored years later).

Key rotation: each tombstone keeps the id of the key that made it, and its name
starts with it. ``erased`` takes every key the caller has (the current one, plus
previous ones given by hand) and refuses when a tombstone was made with a key it
does not have, so a rotation can never let an erased study back in silently.
"""

from __future__ import annotations

from collections.abc import Iterable

from dicomflow import keys, objects
from dicomflow.config import TOMBSTONES_PREFIX
from dicomflow.errors import PermanentError
from dicomflow.json_types import JSON
from dicomflow.runtime import Context

SCHEMA_VERSION = 1
# The label purpose of an erased study (keys.DeploymentKey.hash).
PURPOSE = "erased-study"


class UnknownKey(PermanentError):
    """Tombstones were made with a key the caller does not have."""


def label_of(key: keys.DeploymentKey, study: str) -> str:
    """The tombstone label of ``study`` under ``key``: ``h:<key id>:<hex>``."""
    return key.hash(PURPOSE, study)


def name_of(label: str) -> str:
    """The tombstone's object name for ``label``."""
    parts = label.split(":", 2)
    if len(parts) != 3 or parts[0] != "h" or not parts[1] or not parts[2]:
        raise ValueError(f"not a label: {label!r}")
    key_id, digest = parts[1], parts[2]
    return f"{TOMBSTONES_PREFIX}{key_id}-{digest}.json"


def label_from_name(name: str) -> str | None:
    """The label a tombstone's object name stands for, or None for another object."""
    stem = name[len(TOMBSTONES_PREFIX) :].removesuffix(".json")
    key_id, sep, digest = stem.partition("-")
    if not name.startswith(TOMBSTONES_PREFIX) or not sep or not name.endswith(".json"):
        return None
    return f"h:{key_id}:{digest}"


def labels(ctx: Context) -> set[str]:
    """Every tombstone's label (one listing per 1,000 tombstones)."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    found = (label_from_name(n) for n in objects.names(bucket, TOMBSTONES_PREFIX))
    return {label for label in found if label is not None}


def count(ctx: Context) -> int:
    """How many studies were erased (one listing)."""
    return len(labels(ctx))


def erased(
    ctx: Context, studies: Iterable[str], previous: Iterable[keys.DeploymentKey] = ()
) -> set[str]:
    """The studies among ``studies`` that have a tombstone.

    One listing; the deployment key is read only when there are tombstones.

    Raises:
        UnknownKey: a tombstone was made with a key that is neither the deployment key
            nor one of ``previous``.
        ConfigError: there are tombstones and no deployment key is configured.
    """
    found = labels(ctx)
    if not found:
        return set()
    have = [keys.load(ctx.settings), *previous]
    ids = {k.key_id for k in have}
    unknown = sorted({label.split(":")[1] for label in found} - ids)
    if unknown:
        raise UnknownKey(
            f"erasure tombstones were made with key id {', '.join(unknown)}, but the keys at "
            f"hand are {', '.join(sorted(ids))}: give the previous key file with "
            "--previous-key-file, or an erased study could come back"
        )
    return {study for study in studies if any(label_of(k, study) in found for k in have)}


def write(ctx: Context, label: str, doc: JSON) -> int | None:
    """Create the tombstone of ``label`` (create-if-absent); its generation when ours."""
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    return objects.create(bucket, name_of(label), {"schemaVersion": SCHEMA_VERSION, **doc})


def read(ctx: Context, label: str) -> tuple[JSON, int] | None:
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    return objects.read(bucket, name_of(label))


def update(ctx: Context, label: str, doc: JSON, generation: int) -> int | None:
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    return objects.swap(bucket, name_of(label), doc, generation)
