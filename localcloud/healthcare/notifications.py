"""DICOM store Pub/Sub notifications, published to a Pub/Sub REST endpoint (localcloud's).

The store's settings are the v1 discovery document's (``DicomStore``):

- ``notificationConfig`` (``NotificationConfig``): ``pubsubTopic`` and
  ``sendForBulkImport``. Each new instance from STOW-RS publishes one message
  whose data is the instance's resource name
  (``projects/…/dicomStores/S/dicomWeb/studies/…/series/…/instances/…``) and
  which has no attributes, as Google's "Configure DICOM Pub/Sub notifications"
  page shows. An import publishes only when ``sendForBulkImport`` is true.
- ``notificationConfigs[]`` (``DicomNotificationConfig``): ``pubsubTopic``. The
  same data, with the attributes that field's description lists: ``action``
  (``StoreInstances`` or ``ImportDicomData``), ``lastUpdatedTime``,
  ``storeName``, ``studyInstanceUID``, ``seriesInstanceUID``,
  ``sopInstanceUID``, ``modality`` (when the instance has one) and
  ``storageClass``. The description names ``ImportDicomData`` as an action, so
  imports publish here whatever ``sendForBulkImport`` says.

Only newly stored instances publish; an identical re-send, which the store
ignores, does not. Publishing happens before the STOW response or the import's
progress is recorded, so a client that sees the store succeed can pull the
messages at once. A failed publish is logged and does not fail the store, as
the service logs such errors to Cloud Logging.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Sequence
from typing import Any

import requests

from localcloud.healthcare.instances import ParsedInstance

log = logging.getLogger(__name__)

STORE_ACTION = "StoreInstances"
IMPORT_ACTION = "ImportDicomData"
# Pub/Sub takes at most 1,000 messages per publish request.
_PUBLISH_BATCH = 1000


def _topics(store: dict[str, Any], bulk: bool) -> list[tuple[str, bool]]:
    """(topic, with attributes) for every configured destination that this change reaches."""
    found: list[tuple[str, bool]] = []
    legacy = store.get("notificationConfig") or {}
    reached = not bulk or (isinstance(legacy, dict) and legacy.get("sendForBulkImport") is True)
    if isinstance(legacy, dict) and legacy.get("pubsubTopic") and reached:
        found.append((str(legacy["pubsubTopic"]), False))
    for config in store.get("notificationConfigs") or []:
        if isinstance(config, dict) and config.get("pubsubTopic"):
            found.append((str(config["pubsubTopic"]), True))
    return found


def _message(
    store_name: str, instance: ParsedInstance, action: str, when: str, attributes: bool
) -> dict[str, Any]:
    path = (
        f"{store_name}/dicomWeb/studies/{instance.study_uid}/series/{instance.series_uid}"
        f"/instances/{instance.sop_uid}"
    )
    message: dict[str, Any] = {"data": base64.b64encode(path.encode()).decode()}
    if attributes:
        values = {
            "action": action,
            "lastUpdatedTime": when,
            "storeName": store_name,
            "studyInstanceUID": instance.study_uid,
            "seriesInstanceUID": instance.series_uid,
            "sopInstanceUID": instance.sop_uid,
            "modality": instance.text("Modality"),
            "storageClass": "STANDARD",
        }
        message["attributes"] = {k: v for k, v in values.items() if v}
    return message


class Notifier:
    """Publishes store notifications to one Pub/Sub endpoint (None: log and drop them)."""

    def __init__(self, endpoint: str | None) -> None:
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def notify(
        self,
        store: dict[str, Any],
        instances: Sequence[ParsedInstance],
        action: str,
        when: str,
    ) -> None:
        """Publish one message per instance to each destination the store's settings name."""
        if not instances:
            return
        for topic, attributes in _topics(store, bulk=action == IMPORT_ACTION):
            messages = [_message(store["name"], i, action, when, attributes) for i in instances]
            for start in range(0, len(messages), _PUBLISH_BATCH):
                self._publish(topic, messages[start : start + _PUBLISH_BATCH])

    def _publish(self, topic: str, messages: list[dict[str, Any]]) -> None:
        if self.endpoint is None:
            log.warning(
                "DICOM store notification to %s dropped: the emulator has no Pub/Sub endpoint "
                "(start it with --pubsub-endpoint)",
                topic,
            )
            return
        try:
            response = self._session().post(
                f"{self.endpoint}/v1/{topic}:publish", json={"messages": messages}, timeout=30
            )
        except requests.RequestException as exc:
            log.warning("DICOM store notification to %s failed: %s", topic, exc)
            return
        if response.status_code != 200:
            log.warning(
                "DICOM store notification to %s failed: HTTP %s %s",
                topic,
                response.status_code,
                response.text[:200],
            )
