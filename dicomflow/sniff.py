"""Files without a matching name that are DICOM all the same, found by their magic bytes.

Modalities and gateways often write DICOM files without an extension
(``IM000001``), which the include globs (``*.dcm`` by default) do not match. A
DICOM Part 10 file holds ``DICM`` at bytes 128-131, after its preamble. With
``DICOMFLOW_SNIFF`` on, an object that fails the filter only because of its
name gets one 4-byte ranged read of those bytes, and is ingested when they
read ``DICM``; any other object is ignored silently, as with sniffing off.

Cost, per object no glob matches: one ranged GET (a Class B operation) when
the object is at least 132 bytes and passes every other check, none otherwise
(too small, outside the include prefixes, a folder, or one of the pipeline's
own objects). Objects a glob matches, and every object with sniffing off,
cost nothing here.

Ingest needs one call in place of ``events.skip_reason``::

    skipped = sniffed_skip_reason(ctx.settings, ctx.storage, obj)
"""

from __future__ import annotations

from google.api_core import exceptions as api_exceptions
from google.cloud import storage

from dicomflow import retry
from dicomflow.config import Settings
from dicomflow.events import StorageObject, skip_reason

MAGIC = b"DICM"
MAGIC_START = 128
MAGIC_END = MAGIC_START + len(MAGIC) - 1  # inclusive, as Blob.download_as_bytes takes it


def needs_sniff(settings: Settings, obj: StorageObject) -> bool:
    """True when ``obj`` is ingested or ignored on its first bytes alone: sniffing is on,
    only its name kept it out, and it is large enough to hold the magic."""
    return (
        settings.sniff
        and skip_reason(settings, obj) == "pattern"
        and obj.size >= MAGIC_START + len(MAGIC)
    )


def has_dicom_magic(client: storage.Client, obj: StorageObject) -> bool:
    """True when bytes 128-131 of this generation of ``obj`` are ``DICM``; one ranged read.

    An object deleted or replaced since its event reads as not DICOM: nothing is
    left of that generation to ingest.

    Raises:
        TransientError: Cloud Storage kept failing with 429, 5xx or timeouts.
    """
    blob = client.bucket(obj.bucket).blob(obj.name, generation=int(obj.generation))
    try:
        head: bytes = blob.download_as_bytes(
            start=MAGIC_START,
            end=MAGIC_END,
            checksum=None,
            retry=retry.storage(),
            timeout=retry.DEADLINE,
        )
    except (api_exceptions.NotFound, api_exceptions.RequestRangeNotSatisfiable):
        return False
    return head == MAGIC


def sniffed_skip_reason(
    settings: Settings, client: storage.Client, obj: StorageObject
) -> str | None:
    """``events.skip_reason``, except that a name no glob matches is sniffed when
    ``settings.sniff`` is on: None (ingest it) when its bytes 128-131 are ``DICM``."""
    reason = skip_reason(settings, obj)
    if reason == "pattern" and needs_sniff(settings, obj) and has_dicom_magic(client, obj):
        return None
    return reason
