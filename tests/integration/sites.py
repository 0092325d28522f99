"""What the integration tests build on the session's emulators (see ``conftest.py``).

``PubSubServers`` hands out the two Pub/Sub back-ends by kind. ``PipelineFactory``
builds a ``Site``: one test's buckets, DICOM store, alerts topic and subscription,
settings, settable clock and ``Context``. Test modules subclass ``Site`` for the
helpers of their own flow.
"""

from __future__ import annotations

import base64
import json
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from google.cloud import storage

from dicomflow import runtime
from dicomflow.config import Settings, load_settings
from localcloud.healthcare import HealthcareServer
from localcloud.pubsub import PubSubServer, emulator_missing_reason, start_pubsub
from localcloud.storage import StorageServer
from tests.deployment_key import KEY_FILE
from tests.ingest_support import Clock, StorageCalls, counted_client

PARENT = "projects/local/locations/us-central1"


class PubSubServers:
    """Pub/Sub servers by kind ("emulator", "fallback"), each started on first use."""

    def __init__(self) -> None:
        self._servers: dict[str, PubSubServer] = {}

    def get(self, kind: str) -> PubSubServer:
        """The server of ``kind``; "auto" is the emulator when installed, else the fallback.

        Skips the test when it asks for the emulator and there is none.
        """
        if kind == "auto":
            kind = "fallback" if emulator_missing_reason() is not None else "emulator"
        if kind == "emulator" and (reason := emulator_missing_reason()) is not None:
            pytest.skip(f"Pub/Sub emulator not available: {reason}")
        if kind not in self._servers:
            self._servers[kind] = start_pubsub(kind=kind, project="local")
        server = self._servers[kind]
        assert server.kind == kind
        return server

    def stop(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()


def set_knobs(url: str, **values: object) -> None:
    """Set the Healthcare emulator's knobs at ``url`` (see ``localcloud.healthcare.knobs``)."""
    request = urllib.request.Request(
        f"{url}/_emulator/knobs",
        data=json.dumps(values).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@dataclass(kw_only=True)
class Site:
    """One test's share of the emulators, and a ``Context`` on it.

    ``gcs`` is the test's own Storage client; ``ctx.storage`` is the functions' one,
    the same client unless the factory was asked to count its requests (``calls``).
    """

    ctx: runtime.Context
    clock: Clock
    gcs: storage.Client
    calls: StorageCalls | None
    apps: dict[str, Any]
    landing: str
    staging: str
    backups: str
    dataset: str
    subscription: str
    healthcare_url: str
    received: list[dict[str, Any]] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def store(self) -> str:
        return str(self.ctx.settings.dicom_store)

    @property
    def bucket(self) -> storage.Bucket:
        """The staging bucket."""
        return self.gcs.bucket(self.staging)

    def pull(self, max_messages: int = 500) -> list[dict[str, Any]]:
        """New alerts on the subscription (decoded body plus attributes), acknowledged;
        also kept in ``received``."""
        got: list[dict[str, Any]] = []
        subs = self.ctx.pubsub().projects().subscriptions()
        for _ in range(3):
            resp = subs.pull(
                subscription=self.subscription,
                body={"maxMessages": max_messages, "returnImmediately": True},
            ).execute()
            received = resp.get("receivedMessages", [])
            if received:
                subs.acknowledge(
                    subscription=self.subscription,
                    body={"ackIds": [m["ackId"] for m in received]},
                ).execute()
            for m in received:
                body = json.loads(base64.b64decode(m["message"]["data"]))
                got.append({"body": body, "attributes": m["message"].get("attributes", {})})
        self.received.extend(got)
        return got

    def knobs(self, **values: Any) -> None:
        set_knobs(self.healthcare_url, **values)

    def close(self) -> None:
        """Close this thread's API clients (their keep-alive sockets) and drop the context."""
        self.ctx.close_clients()
        runtime.set_context(None)


S = TypeVar("S", bound=Site)


class PipelineFactory:
    """Builds ``Site``s (or a subclass of it) on the session's emulators; see ``pipeline``."""

    def __init__(
        self,
        gcs_server: StorageServer,
        healthcare_server: HealthcareServer,
        pubsub_servers: PubSubServers,
        apps: dict[str, Any],
    ) -> None:
        self.gcs_server = gcs_server
        self.healthcare_server = healthcare_server
        self.pubsub_servers = pubsub_servers
        self.apps = apps
        self.made: list[Site] = []
        self._clients: list[storage.Client] = []

    def __call__(
        self,
        cls: type[S] = Site,  # type: ignore[assignment]
        *,
        clock: Clock | None = None,
        counted: bool = False,
        pubsub: str = "auto",
        settings: Mapping[str, str] | None = None,
    ) -> S:
        """A new site: buckets ``landing-*``, ``staging-*``, ``backups-*``, a dataset with
        a store ``store``, an alerts topic with a pull subscription, and the settings for
        them, updated by ``settings``; its context is the current one (``runtime.set_context``).

        Args:
            cls: ``Site`` or a subclass (with defaults for any fields of its own).
            clock: the context's clock (default: now).
            counted: give the functions a Storage client whose requests are counted.
            pubsub: the Pub/Sub kind ("auto", "emulator", "fallback").
        """
        suffix = uuid.uuid4().hex[:10]
        gcs = self.gcs_server.client()
        self._clients.append(gcs)
        landing, staging, backups = f"landing-{suffix}", f"staging-{suffix}", f"backups-{suffix}"
        for name in (landing, staging, backups):
            gcs.create_bucket(name)
        dataset = f"{PARENT}/datasets/ds-{suffix}"
        server = self.pubsub_servers.get(pubsub)
        env = {
            "DICOMFLOW_DICOM_STORE": f"{dataset}/dicomStores/store",
            "DICOMFLOW_LANDING_BUCKET": landing,
            "DICOMFLOW_STAGING_BUCKET": staging,
            "DICOMFLOW_BACKUP_BUCKET": backups,
            "DICOMFLOW_ALERTS_TOPIC": f"projects/local/topics/alerts-{suffix}",
            "DICOMFLOW_KEY_FILE": KEY_FILE,
            "DICOMFLOW_HEALTHCARE_ENDPOINT": self.healthcare_server.url,
            "DICOMFLOW_PUBSUB_ENDPOINT": server.url,
            "STORAGE_EMULATOR_HOST": self.gcs_server.url,
            **(settings or {}),
        }
        calls = None
        functions_client = gcs
        if counted:
            functions_client, calls = counted_client(self.gcs_server.url)
            self._clients.append(functions_client)
        clock = clock or Clock(datetime.now(UTC))
        ctx = runtime.Context(settings=load_settings(env), storage=functions_client, clock=clock)
        datasets = ctx.healthcare().projects().locations().datasets()
        datasets.create(parent=PARENT, datasetId=f"ds-{suffix}", body={}).execute()
        datasets.dicomStores().create(parent=dataset, dicomStoreId="store", body={}).execute()
        topic = str(ctx.settings.alerts_topic)
        subscription = f"projects/local/subscriptions/alerts-{suffix}"
        topics = ctx.pubsub().projects()
        topics.topics().create(name=topic, body={}).execute()
        topics.subscriptions().create(
            name=subscription, body={"topic": topic, "ackDeadlineSeconds": 30}
        ).execute()
        runtime.set_context(ctx)
        site = cls(
            ctx=ctx,
            clock=clock,
            gcs=gcs,
            calls=calls,
            apps=self.apps,
            landing=landing,
            staging=staging,
            backups=backups,
            dataset=dataset,
            subscription=subscription,
            healthcare_url=self.healthcare_server.url,
        )
        if calls is not None:
            calls.reset()
        self.made.append(site)
        return site

    def close(self) -> None:
        while self.made:
            self.made.pop().close()
        while self._clients:
            self._clients.pop().close()
        runtime.set_context(None)
