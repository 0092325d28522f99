"""The whole local cloud in one supervisor process.

``Stack.start()`` brings up, in order: Cloud Storage (fake-gcs-server), Pub/Sub
(the SDK emulator or the built-in fallback), the Healthcare API emulator, the
three functions (one process each, as on Cloud Functions: functions-framework's
app in gunicorn), the bucket watcher that stands in for Eventarc, and the
scheduler. Once all of them answer, it writes ``state.json`` in the home folder; ``python -m
localcloud env|status|tick|down`` read that file.

Every name a user or a test needs is in ``Stack.env()`` (see ``ENV_NAMES``).

Upload events and scheduler ticks travel on two delivery queues, as they come
through two Eventarc triggers: a tick never waits behind a burst of uploads.
``LOCALCLOUD_INGEST_WORKERS=N`` (default 1) starts N ingest processes behind the
one ingest URL, like N Cloud Run instances of the function; each event goes to
the instance with the fewest requests in flight (``localcloud.delivery``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

from dicomflow import keys
from localcloud.delivery import Deliverer, pubsub_dead_letters
from localcloud.errors import LocalCloudError
from localcloud.eventarc import BucketWatcher
from localcloud.ports import HOST, die_with_parent, listening_socket, wait_http
from localcloud.scheduler import Schedule, Scheduler
from localcloud.storage import StorageServer, start_storage

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = ("ingest", "report", "export")

# The names `python -m localcloud env` prints; fixed, others rely on them.
ENV_NAMES = (
    "STORAGE_EMULATOR_HOST",
    "DICOMFLOW_HEALTHCARE_ENDPOINT",
    "DICOMFLOW_PUBSUB_ENDPOINT",
    "DICOMFLOW_DICOM_STORE",
    "DICOMFLOW_LANDING_BUCKET",
    "DICOMFLOW_STAGING_BUCKET",
    "DICOMFLOW_BACKUP_BUCKET",
    "DICOMFLOW_ALERTS_TOPIC",
    "DICOMFLOW_ALERTS_SUBSCRIPTION",
    "DICOMFLOW_KEY_FILE",
)


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise LocalCloudError(
            f"{name}={raw!r} is not a number; set it to seconds, e.g. {default:g}"
        ) from None


def _workers(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name, "").strip() or "1"
    if not raw.isdigit() or not 1 <= int(raw) <= 16:
        raise LocalCloudError(f"{name}={raw!r}; set it to a whole number of processes, 1-16")
    return int(raw)


def _port(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name, "").strip() or "0"
    if not raw.isdigit() or int(raw) > 65535:
        raise LocalCloudError(
            f"{name}={raw!r} is not a port; set it to 1-65535, or 0 for any free port"
        )
    return int(raw)


@dataclass(frozen=True)
class StackConfig:
    """What to start and where. ``from_env`` reads the LOCALCLOUD_* settings."""

    home: Path
    project: str = "local"
    location: str = "us-central1"
    dataset: str = "dicomflow"
    store: str = "store"
    landing_bucket: str = "dicomflow-landing"
    staging_bucket: str = "dicomflow-staging"
    backup_bucket: str = "dicomflow-backups"
    alerts_topic: str = "dicomflow-alerts"
    pubsub_kind: str = "auto"
    minute_interval: float = 60.0
    export_interval: float = 86_400.0
    poll_interval: float = 0.2
    functions_source: Path = ROOT / "main.py"
    ports: dict[str, int] = field(default_factory=dict)
    function_env: dict[str, str] = field(default_factory=dict)
    healthcare_args: tuple[str, ...] = ()
    # The backups bucket's retention period, enforced by the storage front (0: none).
    backup_retention_seconds: int = 0
    ingest_workers: int = 1
    # Upload event redelivery: (first delay, largest delay, jitter fraction), seconds.
    event_retry: tuple[float, float, float] = (0.2, 30.0, 0.0)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StackConfig:
        env = os.environ if env is None else env
        home = Path(env.get("LOCALCLOUD_HOME") or ROOT / ".localcloud")
        ports = {
            name: _port(env, f"LOCALCLOUD_{name.upper()}_PORT")
            for name in ("storage", "pubsub", "healthcare", *FUNCTIONS)
        }
        kind = env.get("LOCALCLOUD_PUBSUB_KIND", "auto")
        if kind not in ("auto", "emulator", "fallback"):
            raise LocalCloudError(
                f"LOCALCLOUD_PUBSUB_KIND={kind!r}; use auto, emulator or fallback"
            )
        source = Path(env.get("LOCALCLOUD_FUNCTIONS_SOURCE") or ROOT / "main.py")
        if not source.is_file():
            raise LocalCloudError(
                f"LOCALCLOUD_FUNCTIONS_SOURCE={source} does not exist; point it at a main.py"
            )
        function_env = {}
        for pair in env.get("LOCALCLOUD_FUNCTION_ENV", "").split(","):
            if pair.strip():
                name, sep, value = pair.strip().partition("=")
                if not sep or not name.startswith("DICOMFLOW_"):
                    raise LocalCloudError(
                        f"LOCALCLOUD_FUNCTION_ENV has {pair.strip()!r}; "
                        "use comma-separated DICOMFLOW_NAME=value pairs"
                    )
                function_env[name] = value
        return cls(
            home=home,
            function_env=function_env,
            pubsub_kind=kind,
            minute_interval=_float(env, "LOCALCLOUD_MINUTE_SECONDS", 60.0),
            export_interval=_float(env, "LOCALCLOUD_EXPORT_SECONDS", 86_400.0),
            poll_interval=_float(env, "LOCALCLOUD_POLL_SECONDS", 0.2),
            backup_retention_seconds=int(_float(env, "LOCALCLOUD_BACKUP_RETENTION_SECONDS", 0)),
            functions_source=source.resolve(),
            ports=ports,
            ingest_workers=_workers(env, "LOCALCLOUD_INGEST_WORKERS"),
        )

    @property
    def dead_letter_path(self) -> Path:
        """Where event delivery keeps the events it gave up on (see ``localcloud.delivery``)."""
        return self.home / "dead-letter.ndjson"

    @property
    def key_path(self) -> Path:
        """The deployment key of this home (labels in alerts and logs), made at first start."""
        return self.home / "deployment.key"

    @property
    def store_name(self) -> str:
        return (
            f"projects/{self.project}/locations/{self.location}/datasets/{self.dataset}"
            f"/dicomStores/{self.store}"
        )


def _bin(name: str) -> str:
    """An executable installed beside the running Python (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise LocalCloudError(f"{name} is not installed; run `make setup`")
    return found


def _function_args(function: str, source: Path, fd: int) -> list[str]:
    """gunicorn serving the function ``function`` of ``source`` on the inherited socket ``fd``.

    The settings are the ones functions-framework's own command gives gunicorn:
    one worker with four threads per core, no request timeout, no request-line
    limit. Only the listening socket differs: bound by the stack, not by gunicorn.
    """
    app = (
        f"functions_framework:create_app(target={function!r}, source={str(source)!r}, "
        "signature_type='cloudevent')"
    )
    threads = (os.cpu_count() or 1) * 4
    return [
        *(_bin("gunicorn"), "--bind", f"fd://{fd}", "--workers", "1"),
        *("--threads", str(threads), "--timeout", "0", "--limit-request-line", "0"),
        *("--log-level", "error", app),
    ]


def _reason(log_file: Path) -> str:
    """The most telling line of a service's log: a CRITICAL JSON message, else the last line."""
    lines = log_file.read_text(errors="replace").strip().splitlines() if log_file.exists() else []
    for line in reversed(lines):
        if '"severity": "CRITICAL"' in line:
            try:
                return str(json.loads(line)["message"])
            except (ValueError, KeyError):
                break
    return lines[-1] if lines else "no output"


def _stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Stack:
    """A running local cloud, owned by this process.

    The stack binds the listening socket of every service it starts from its own
    code (the storage front, the Healthcare emulator, each function instance) and
    hands it to the process, so no other process can take a port between its
    choice and its use, and a restarted process serves on the same socket.
    ``listeners`` may bring such sockets, bound and listening, for "storage" and
    "healthcare"; the stack owns them from then on.
    """

    def __init__(
        self, config: StackConfig, listeners: Mapping[str, socket.socket] | None = None
    ) -> None:
        self.config = config
        self._given = dict(listeners or {})
        self._sockets: dict[str, socket.socket] = {}
        self.urls: dict[str, str] = {}
        self.pubsub_kind = ""
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._commands: dict[str, tuple[list[str], dict[str, str] | None, tuple[int, ...]]] = {}
        self._logs: list[IO[bytes]] = []
        self._storage: StorageServer | None = None
        self._pubsub: Any = None
        self.deliverer: Deliverer | None = None
        self.tick_deliverer: Deliverer | None = None
        self.ingest_urls: list[str] = []
        self.watcher: BucketWatcher | None = None
        self._watch_client: storage.Client | None = None
        self.scheduler: Scheduler | None = None
        self.schedules: dict[str, Schedule] = {}

    # -- start-up ---------------------------------------------------------

    def start(self) -> None:
        """Start everything, or stop what was started and raise LocalCloudError."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _log(self, name: str) -> IO[bytes]:
        handle = (self.config.home / "logs" / f"{name}.log").open("ab")
        self._logs.append(handle)
        return handle

    def _listen(self, name: str, port: int, what: str, setting: str) -> socket.socket:
        """The listening socket of the process ``name``: given to the stack, else bound to
        ``port`` (0: any free one). Held until ``stop``, for restarts to serve on."""
        sock = self._given.pop(name, None) or listening_socket(port, what, setting)
        self._sockets[name] = sock
        return sock

    def _spawn(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self._commands[name] = (args, env, pass_fds)
        self._processes[name] = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log(name),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,  # its own process group, so stop() reaches its children
            preexec_fn=die_with_parent,
            pass_fds=pass_fds,
        )

    def _start(self) -> None:
        cfg = self.config
        (cfg.home / "logs").mkdir(parents=True, exist_ok=True)
        keys.write_key_file(str(cfg.key_path))
        ports = cfg.ports

        self._storage = start_storage(
            ports.get("storage", 0),
            listener=self._given.pop("storage", None),
            data_dir=cfg.home / "storage",
            buckets=(cfg.landing_bucket, cfg.staging_bucket, cfg.backup_bucket),
            log=self._log("storage"),
            retention={cfg.backup_bucket: cfg.backup_retention_seconds},
        )
        self.urls["storage"] = self._storage.url

        from localcloud.pubsub import start_pubsub

        self._pubsub = start_pubsub(
            ports.get("pubsub", 0),
            kind=cfg.pubsub_kind,
            project=cfg.project,
            data_dir=cfg.home / "pubsub",
            log=self._log("pubsub"),
        )
        self.urls["pubsub"] = self._pubsub.url
        self.pubsub_kind = self._pubsub.kind

        listener = self._listen(
            "healthcare",
            ports.get("healthcare", 0),
            "the Healthcare API emulator",
            "LOCALCLOUD_HEALTHCARE_PORT",
        )
        self._spawn(
            "healthcare",
            [
                sys.executable,
                "-m",
                "localcloud.healthcare",
                "--fd",
                str(listener.fileno()),
                "--data-dir",
                str(cfg.home / "healthcare"),
                "--storage-endpoint",
                self._storage.url,
                "--storage-root",
                str(self._storage.root),
                "--pubsub-endpoint",
                self._pubsub.url,
                *cfg.healthcare_args,
            ],
            pass_fds=(listener.fileno(),),
        )
        self.urls["healthcare"] = f"http://{HOST}:{listener.getsockname()[1]}"
        self._wait(
            "healthcare",
            f"{self.urls['healthcare']}/v1/projects/{cfg.project}/locations/{cfg.location}/datasets",
        )
        self._create_resources()

        env = {**os.environ, **self.env(), **cfg.function_env}
        # Cloud Run sets K_SERVICE; main.py then checks the settings at start-up.
        env.pop("PUBSUB_EMULATOR_HOST", None)
        # (process, function): further instances of ingest run the same command with the
        # same settings on any free port.
        instances = [(f, f) for f in FUNCTIONS] + [
            (f"ingest-{r}", "ingest") for r in range(2, cfg.ingest_workers + 1)
        ]
        for name, function in instances:
            setting = f"LOCALCLOUD_{name.upper()}_PORT" if name in FUNCTIONS else ""
            sock = self._listen(name, ports.get(name, 0), f"the {name} function", setting)
            self._spawn(
                name,
                _function_args(function, cfg.functions_source, sock.fileno()),
                {**env, "K_SERVICE": function},
                (sock.fileno(),),
            )
            self.urls[name] = f"http://{HOST}:{sock.getsockname()[1]}/"
        self.ingest_urls = [self.urls[name] for name, f in instances if f == "ingest"]
        for name, _ in instances:
            self._wait(name, self.urls[name])

        routes = {self.urls["ingest"]: self.ingest_urls}
        first, largest, jitter = cfg.event_retry
        dead_letters = pubsub_dead_letters(self.urls["pubsub"], self.dead_letter_topic)
        self.deliverer = Deliverer(
            dead_letter=cfg.dead_letter_path,
            on_dead_letter=dead_letters,
            min_backoff=first,
            max_backoff=largest,
            jitter=jitter,
            routes=routes,
        )
        self.tick_deliverer = Deliverer(
            workers=2,
            dead_letter=cfg.dead_letter_path,
            on_dead_letter=dead_letters,
            routes=routes,
        )
        self._watch_client = self._storage.client()
        self.watcher = BucketWatcher(
            self._watch_client,
            cfg.landing_bucket,
            self.urls["ingest"],
            self.deliverer,
            interval=cfg.poll_interval,
            seen_file=cfg.home / "eventarc-seen.json",
        )
        self.watcher.start()
        self.schedules = {
            "minute": Schedule(
                "minute",
                f"projects/{cfg.project}/topics/dicomflow-tick",
                cfg.minute_interval,
                (("ingest", self.urls["ingest"]), ("report", self.urls["report"])),
            ),
            "export": Schedule(
                "export",
                f"projects/{cfg.project}/topics/dicomflow-export",
                cfg.export_interval,
                (("export", self.urls["export"]),),
            ),
        }
        self.scheduler = Scheduler(self.tick_deliverer, list(self.schedules.values()))
        self.scheduler.start()

    def _wait(self, name: str, url: str) -> None:
        process = self._processes[name]
        log_file = self.config.home / "logs" / f"{name}.log"
        try:
            wait_http(url, 60, name, lambda: process.poll() is None)
        except LocalCloudError as exc:
            raise LocalCloudError(f"{exc}: {_reason(log_file)}") from None

    @property
    def dead_letter_topic(self) -> str:
        """Where event delivery publishes the events it gave up on."""
        return f"projects/{self.config.project}/topics/dicomflow-dead-letters"

    def _create_resources(self) -> None:
        """The dataset, DICOM store, drill store, the alerts and dead-letter topics and their
        subscriptions, when missing."""
        cfg = self.config
        parent = f"projects/{cfg.project}/locations/{cfg.location}"
        topic = f"projects/{cfg.project}/topics/{cfg.alerts_topic}"
        env = self.env()
        with self.api("healthcare") as healthcare, self.api("pubsub") as pubsub:
            datasets = healthcare.projects().locations().datasets()
            for call in (
                datasets.create(parent=parent, datasetId=cfg.dataset, body={}),
                datasets.dicomStores().create(
                    parent=f"{parent}/datasets/{cfg.dataset}", dicomStoreId=cfg.store, body={}
                ),
                # The restore drill's scratch store (DICOMFLOW_DRILL_STORE's default).
                datasets.dicomStores().create(
                    parent=f"{parent}/datasets/{cfg.dataset}",
                    dicomStoreId=f"{cfg.store}-drill",
                    body={},
                ),
                pubsub.projects().topics().create(name=topic, body={}),
                pubsub.projects()
                .subscriptions()
                .create(
                    name=env["DICOMFLOW_ALERTS_SUBSCRIPTION"],
                    body={"topic": topic, "ackDeadlineSeconds": 30},
                ),
                pubsub.projects().topics().create(name=self.dead_letter_topic, body={}),
                pubsub.projects()
                .subscriptions()
                .create(
                    name=env["DICOMFLOW_DEAD_LETTER_SUBSCRIPTION"],
                    body={"topic": self.dead_letter_topic, "ackDeadlineSeconds": 30},
                ),
            ):
                try:
                    call.execute()
                except HttpError as exc:
                    if exc.status_code != 409:
                        raise

    # -- what others read ---------------------------------------------------

    def api(self, name: str) -> Any:
        """A googleapiclient client ("healthcare" or "pubsub") for this stack; close after use."""
        return build(
            name,
            "v1",
            static_discovery=True,
            cache_discovery=False,
            client_options={"api_endpoint": self.urls[name] + "/"},
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        )

    def drain_alerts(self) -> list[dict[str, Any]]:
        """Pull and acknowledge every alert waiting on the alerts tail subscription."""
        subscription = self.env()["DICOMFLOW_ALERTS_SUBSCRIPTION"]
        found: list[dict[str, Any]] = []
        with self.api("pubsub") as pubsub:
            subscriptions = pubsub.projects().subscriptions()
            while True:
                body = {"maxMessages": 100, "returnImmediately": True}
                received = (
                    subscriptions.pull(subscription=subscription, body=body)
                    .execute()
                    .get("receivedMessages", [])
                )
                if not received:
                    return found
                found += [json.loads(base64.b64decode(i["message"]["data"])) for i in received]
                subscriptions.acknowledge(
                    subscription=subscription, body={"ackIds": [i["ackId"] for i in received]}
                ).execute()

    def storage_client(self) -> storage.Client:
        """A google-cloud-storage client for this stack's Cloud Storage."""
        if self._storage is None:
            raise LocalCloudError("the local cloud is not started")
        return self._storage.client()

    def env(self) -> dict[str, str]:
        """The settings that point dicomflow, tests and scripts at this stack."""
        cfg = self.config
        return {
            "STORAGE_EMULATOR_HOST": self.urls.get("storage", ""),
            "DICOMFLOW_HEALTHCARE_ENDPOINT": self.urls.get("healthcare", ""),
            "DICOMFLOW_PUBSUB_ENDPOINT": self.urls.get("pubsub", ""),
            "DICOMFLOW_DICOM_STORE": cfg.store_name,
            "DICOMFLOW_LANDING_BUCKET": cfg.landing_bucket,
            "DICOMFLOW_STAGING_BUCKET": cfg.staging_bucket,
            "DICOMFLOW_BACKUP_BUCKET": cfg.backup_bucket,
            "DICOMFLOW_ALERTS_TOPIC": f"projects/{cfg.project}/topics/{cfg.alerts_topic}",
            "DICOMFLOW_ALERTS_SUBSCRIPTION": (
                f"projects/{cfg.project}/subscriptions/{cfg.alerts_topic}-tail"
            ),
            "DICOMFLOW_DEAD_LETTER_SUBSCRIPTION": (
                f"projects/{cfg.project}/subscriptions/dicomflow-dead-letters-keep"
            ),
            "DICOMFLOW_KEY_FILE": str(cfg.key_path),
        }

    def state(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started": time.time(),
            "pubsubKind": self.pubsub_kind,
            "urls": self.urls,
            "env": self.env(),
            "home": str(self.config.home),
        }

    def write_state(self) -> Path:
        path = self.config.home / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        tmp.replace(path)
        return path

    def process_ids(self, name: str) -> list[int]:
        """Pids of the process ``name`` (e.g. ``ingest``), its further instances
        (``ingest-2`` ...) and their children, for measurements."""
        roots = [
            process.pid
            for key, process in self._processes.items()
            if (key == name or key.startswith(f"{name}-")) and process.poll() is None
        ]
        found, todo = list(roots), list(roots)
        while todo:
            children = Path(f"/proc/{todo.pop()}/task")
            for task in children.glob("*/children") if children.exists() else ():
                for pid in task.read_text().split():
                    found.append(int(pid))
                    todo.append(int(pid))
        return found

    def restart(self, name: str, kill: bool = True) -> None:
        """Kill the process ``name`` (SIGKILL to its group, as a crash) and start it again.

        Waits until it answers again (functions and the Healthcare emulator).
        """
        if name not in self._commands:
            raise LocalCloudError(f"no process named {name!r} in this stack")
        process = self._processes[name]
        if process.poll() is None:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            else:
                _stop_process(process)
        args, env, pass_fds = self._commands[name]
        self._spawn(name, args, env, pass_fds)
        url = self.urls.get(name)
        if url:
            self._wait(name, url)

    def ensure_running(self, name: str) -> bool:
        """Start ``name`` again if its process has exited, as the platform replaces a dead
        instance; True when it had exited."""
        process = self._processes.get(name)
        if process is not None and process.poll() is None:
            return False
        self.restart(name, kill=False)
        return True

    # -- shut-down ------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything this stack started; safe to call twice."""
        for part in (self.scheduler, self.watcher):
            if part is not None:
                part.stop()
        for deliverer in (self.deliverer, self.tick_deliverer):
            if deliverer is not None:
                deliverer.stop()
        if self._watch_client is not None:
            self._watch_client.close()
            self._watch_client = None
        for name in reversed(list(self._processes)):
            _stop_process(self._processes.pop(name))
        for sock in [*self._sockets.values(), *self._given.values()]:
            sock.close()
        self._sockets.clear()
        self._given.clear()
        if self._pubsub is not None:
            self._pubsub.stop()
            self._pubsub = None
        if self._storage is not None:
            self._storage.stop()
            self._storage = None
        for handle in self._logs:
            handle.close()
        self._logs.clear()
        (self.config.home / "state.json").unlink(missing_ok=True)


def with_overrides(config: StackConfig, **changes: Any) -> StackConfig:
    """A copy of ``config`` with fields replaced (tests and the demo)."""
    return replace(config, **changes)
