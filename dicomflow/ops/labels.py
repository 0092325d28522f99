"""Map keyed labels (alerts, logs) back to the objects and UIDs they stand for.

A label cannot be reversed; it can only be recomputed. ``resolve`` computes the
labels of every file record in the staging bucket (``outcomes.read_all``: staging,
quarantine and drop records and the batch manifests) under the deployment key and
returns the records whose object or UIDs match. So it finds what the pipeline
recorded; an object it skipped (filtered out) has no record to match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from dicomflow import keys
from dicomflow.json_types import JSON
from dicomflow.ops import outcomes
from dicomflow.runtime import Context

LABEL = re.compile(r"^h:([0-9a-f]{8}):[0-9a-f]{32}$")
# What of a record a label can stand for, and how to label it.
_FIELDS = (("object", keys.OBJECT), ("study", keys.UID), ("series", keys.UID), ("sop", keys.UID))


@dataclass(frozen=True)
class Match:
    """One record a label stands for, and which of its fields the label names."""

    label: str
    field: str  # object, study, series or sop
    value: str  # the gs:// URI or the UID
    key: str
    status: str
    batch: str | None

    def as_dict(self) -> JSON:
        return {
            "label": self.label,
            "field": self.field,
            "value": self.value,
            "key": self.key,
            "status": self.status,
            "batch": self.batch,
        }


def check(label: str, key: keys.DeploymentKey) -> str | None:
    """Why ``label`` cannot be resolved with ``key`` (None: it can)."""
    found = LABEL.match(label)
    if found is None:
        return "not a label (expected h:<key id>:<32 hex>)"
    if found.group(1) != key.key_id:
        return f"made by key {found.group(1)}; this deployment's key is {key.key_id}"
    return None


def resolve(ctx: Context, wanted: Iterable[str]) -> list[Match]:
    """Every record whose object or UIDs carry one of the ``wanted`` labels."""
    key = keys.load(ctx.settings)
    wanted = set(wanted)
    bucket = ctx.storage.bucket(ctx.settings.staging_bucket)
    found: list[Match] = []
    for outcome in outcomes.read_all(bucket).values():
        record = outcome.record
        if record is None:
            continue
        values = {
            "object": record.uri,
            "study": record.study,
            "series": record.series,
            "sop": record.sop,
        }
        for name, purpose in _FIELDS:
            value = values[name]
            if not value:
                continue
            label = key.hash(purpose, value)
            if label in wanted:
                found.append(Match(label, name, value, outcome.key, outcome.status, outcome.batch))
    return sorted(found, key=lambda m: (m.label, m.key))
