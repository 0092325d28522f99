"""What the integration tests build on the session's emulators (see ``conftest.py``).

``PubSubServers`` hands out the two Pub/Sub back-ends by kind. ``PipelineFactory``
builds a ``Site``: one test's buckets, DICOM store, alerts topic and subscription,
settings, settable clock and ``Context``. Test modules subclass ``Site`` for the
helpers of their own flow; ``Pipeline`` is the one driven by events through the
functions, as Eventarc and Cloud Scheduler would.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from google.cloud import storage

from dicomflow import batches, runtime
from dicomflow.config import Settings, load_settings
from dicomflow.ops import outcomes
from dicomflow.staging import file_key
from localcloud.healthcare import HealthcareServer, knobs
from localcloud.pubsub import PubSubServer, emulator_missing_reason, start_pubsub
from localcloud.storage import StorageServer
from tests.deployment_key import KEY_FILE
from tests.ingest_support import (
    Clock,
    StorageCalls,
    Uploaded,
    counted_client,
    finalize_event,
    post,
    tick_event,
    upload,
)

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
    assert knobs.post(url, values) == 200


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


@dataclass(kw_only=True)
class Pipeline(Site):
    """A site driven through the functions by events, whose functions' Storage requests
    are counted (``calls``); a test may record the URIs of the import calls and the kinds
    of the alerts published (``imports``, ``alerts``)."""

    calls: StorageCalls
    imports: list[str] = field(default_factory=list)  # import URIs, in call order
    alerts: list[str] = field(default_factory=list)

    def upload(self, name: str, data: bytes) -> Uploaded:
        return upload(self.gcs, self.landing, name, data, self.clock())

    def upload_many(self, files: dict[str, bytes]) -> list[Uploaded]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda item: self.upload(*item), files.items()))

    def deliver(self, obj: Uploaded) -> int:
        return post(self.apps["ingest"].test_client(), finalize_event(obj, self.clock()))

    def tick(self) -> None:
        assert post(self.apps["ingest"].test_client(), tick_event(self.clock())) == 200

    def report_tick(self) -> None:
        assert post(self.apps["report"].test_client(), tick_event(self.clock())) == 200

    def outcomes(self) -> dict[str, outcomes.Outcome]:
        return outcomes.read_all(self.bucket)

    def drain(self, max_ticks: int = 60, tick: Callable[[], Any] | None = None) -> int:
        """Tick ingest and report (a window later each time) until every file has a final
        outcome and no batch is open; the number of rounds."""
        for count in range(1, max_ticks + 1):
            self.clock.advance(self.settings.batch_window_seconds + 1)
            if tick is None:
                self.tick()
            else:
                tick()
            self.report_tick()
            if not batches.open_batches(self.bucket) and all(
                o.status in outcomes.FINAL for o in self.outcomes().values()
            ):
                return count
            time.sleep(0.05)  # imports run in the emulator's threads
        raise AssertionError(f"still open after {max_ticks} ticks: {self.open()}")

    def open(self) -> list[str]:
        return batches.open_batches(self.bucket)

    def import_operations(self) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = []
        api = self.ctx.healthcare().projects().locations().datasets().operations()
        token = None
        while True:
            page = api.list(name=self.dataset, pageToken=token).execute()
            ops += page.get("operations", [])
            token = page.get("nextPageToken")
            if not token:
                break
        return [o for o in ops if "Import" in o.get("metadata", {}).get("apiMethodName", "")]

    def stored_sops(self) -> list[str]:
        found = self.ctx.dicomweb().search_for_instances(limit=50000)
        return [i["00080018"]["Value"][0] for i in found]

    def summaries(self) -> list[dict[str, Any]]:
        return outcomes.summaries(self.bucket)

    def key(self, obj: Uploaded) -> str:
        return file_key(obj.bucket, obj.name, obj.generation)


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
