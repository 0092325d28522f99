"""A pure-Python Pub/Sub v1 REST server for machines without the gcloud emulator.

It implements the subset dicomflow uses, with the emulator's observable
behaviour (names, defaults, error messages and HTTP statuses):

- topics: create (PUT), get, list, delete, publish;
- subscriptions: create (PUT; ``topic``, ``ackDeadlineSeconds``,
  ``pushConfig.pushEndpoint``), get, list, delete, pull, acknowledge,
  modifyAckDeadline.

Delivery is at least once. A pulled message that is not acknowledged within
its ack deadline is delivered again with a new ack id. A message reaches every
subscription that existed when it was published. Push subscriptions are served
by a dispatcher thread that POSTs the push envelope and treats 2xx and 102 as
an ack; anything else is retried with capped exponential backoff, for as long
as the message is retained.

With a ``data_dir``, topics, subscriptions and unacknowledged messages are
saved after every change and loaded at start, so a restart keeps them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import os
import re
import secrets
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_ACK_DEADLINE = 10
MAX_ACK_DEADLINE = 600
# The real service waits at most about this long on a pull that may not return
# immediately; a bounded wait also lets the server stop promptly.
PULL_WAIT_SECONDS = 10.0
# Push retry backoff: short first retry so a flaky endpoint recovers fast, capped
# so a long outage is retried at a steady pace (the emulator retries every ~1 s).
PUSH_BACKOFF_FIRST = 0.5
PUSH_BACKOFF_MAX = 10.0
PUSH_WORKERS = 8
RETENTION = "604800s"
STATE_FILE = "pubsub-state.json"

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")
_BASE64 = re.compile(r"[A-Za-z0-9+/\-_]*={0,2}")
_PATH = re.compile(
    r"/v1/projects/(?P<project>[^/:]+)/(?P<kind>topics|subscriptions)"
    r"(?:/(?P<id>[^/:]+)(?P<tail>/subscriptions)?(?::(?P<verb>[A-Za-z]+))?)?"
)


class ApiError(Exception):
    """A request the API refuses, carried to the handler as Google's error JSON."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": int(self.status),
                "message": self.message,
                "status": _STATUS[self.status],
            }
        }


_STATUS = {
    HTTPStatus.BAD_REQUEST: "INVALID_ARGUMENT",
    HTTPStatus.NOT_FOUND: "NOT_FOUND",
    HTTPStatus.CONFLICT: "ALREADY_EXISTS",
    HTTPStatus.METHOD_NOT_ALLOWED: "UNIMPLEMENTED",
    HTTPStatus.INTERNAL_SERVER_ERROR: "INTERNAL",
}


def _invalid(message: str) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message)


@dataclass
class Message:
    """A published message as subscribers see it."""

    message_id: str
    data: str  # base64, normalised; "" when the message carries only attributes
    attributes: dict[str, str]
    publish_time: str

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messageId": self.message_id, "publishTime": self.publish_time}
        # The service omits empty fields, as proto3 JSON does.
        if self.data:
            out["data"] = self.data
        if self.attributes:
            out["attributes"] = dict(self.attributes)
        return out


@dataclass
class Delivery:
    """One message waiting on one subscription."""

    message: Message
    attempts: int = 0
    not_before: float = 0.0  # monotonic; push retries wait until then


@dataclass
class Subscription:
    """A subscription with its ready queue and its leased (pulled, unacked) messages."""

    name: str
    topic: str
    ack_deadline: int
    push_endpoint: str
    ready: deque[Delivery] = field(default_factory=deque)
    leased: dict[str, tuple[Delivery, float]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        push = {"pushEndpoint": self.push_endpoint} if self.push_endpoint else {}
        return {
            "name": self.name,
            "topic": self.topic,
            "pushConfig": push,
            "ackDeadlineSeconds": self.ack_deadline,
            "messageRetentionDuration": RETENTION,
        }

    def expire(self, now: float) -> None:
        """Put leases whose ack deadline passed back at the front of the queue."""
        expired = [ack_id for ack_id, (_, deadline) in self.leased.items() if deadline <= now]
        for ack_id in reversed(expired):
            delivery, _ = self.leased.pop(ack_id)
            self.ready.appendleft(delivery)

    def take(self, now: float, limit: int) -> list[Delivery]:
        """Up to ``limit`` deliveries that are due, oldest first."""
        taken: list[Delivery] = []
        kept: deque[Delivery] = deque()
        while self.ready and len(taken) < limit:
            delivery = self.ready.popleft()
            (taken if delivery.not_before <= now else kept).append(delivery)
        kept.extend(self.ready)
        self.ready = kept
        return taken


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_name(kind: str, project: str, resource_id: str) -> str:
    name = f"projects/{project}/{kind}/{resource_id}"
    if not _NAME.fullmatch(resource_id) or resource_id.startswith("goog"):
        raise _invalid(f"Invalid [{kind}] name: (name={name})")
    return name


def _normalise_data(data: object) -> str:
    """Canonical padded base64 of ``data``, or INVALID_ARGUMENT."""
    # The emulator accepts unpadded and URL-safe base64, so accept them too.
    if not isinstance(data, str) or not _BASE64.fullmatch(data):
        raise _invalid("Payload isn't valid for request.")
    standard = data.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except binascii.Error:
        raise _invalid("Payload isn't valid for request.") from None
    return base64.b64encode(raw).decode("ascii")


class Broker:
    """Topics, subscriptions and messages, guarded by one condition variable."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self._cond = threading.Condition()
        self._topics: set[str] = set()
        self._subs: dict[str, Subscription] = {}
        self._next_id = 1
        self._ack_ids = itertools.count(1)
        # Ack ids carry a per-start tag so one from before a restart never matches.
        self._boot = secrets.token_hex(4)
        self._closed = False
        self._state = None if data_dir is None else data_dir / STATE_FILE
        if self._state is not None and self._state.exists():
            self._load(self._state)

    # -- topics ---------------------------------------------------------------

    def create_topic(self, name: str) -> dict[str, Any]:
        with self._cond:
            if name in self._topics:
                raise ApiError(HTTPStatus.CONFLICT, "Topic already exists")
            self._topics.add(name)
            self._save()
        return {"name": name}

    def get_topic(self, name: str) -> dict[str, Any]:
        with self._cond:
            self._topic(name)
        return {"name": name}

    def delete_topic(self, name: str) -> dict[str, Any]:
        with self._cond:
            self._topic(name)
            self._topics.discard(name)
            # Subscriptions outlive their topic, detached, as in the service.
            for sub in self._subs.values():
                if sub.topic == name:
                    sub.topic = "_deleted-topic_"
            self._save()
        return {}

    def list_topics(self, project: str) -> dict[str, Any]:
        prefix = f"projects/{project}/topics/"
        with self._cond:
            names = sorted(t for t in self._topics if t.startswith(prefix))
        return {"topics": [{"name": n} for n in names]} if names else {}

    def topic_subscriptions(self, topic: str) -> dict[str, Any]:
        with self._cond:
            self._topic(topic)
            names = sorted(s.name for s in self._subs.values() if s.topic == topic)
        return {"subscriptions": names} if names else {}

    def publish(self, topic: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = body.get("messages")
        if not raw:
            raise _invalid("No messages to publish")
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            raise _invalid("Payload isn't valid for request.")
        parsed: list[tuple[str, dict[str, str]]] = []
        for item in raw:
            data = _normalise_data(item.get("data", ""))
            attributes = item.get("attributes") or {}
            if not isinstance(attributes, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
            ):
                raise _invalid("Payload isn't valid for request.")
            if not data and not attributes:
                raise _invalid("Some messages are empty")
            parsed.append((data, attributes))
        with self._cond:
            self._topic(topic)
            ids: list[str] = []
            for data, attributes in parsed:
                message = Message(str(self._next_id), data, attributes, _now_rfc3339())
                self._next_id += 1
                ids.append(message.message_id)
                # Only subscriptions that exist now get the message, as in the service.
                for sub in self._subs.values():
                    if sub.topic == topic:
                        sub.ready.append(Delivery(message))
            self._save()
            self._cond.notify_all()
        return {"messageIds": ids}

    # -- subscriptions --------------------------------------------------------

    def create_subscription(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        topic = body.get("topic", "")
        if not isinstance(topic, str):
            raise _invalid("Payload isn't valid for request.")
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != "projects" or parts[2] != "topics":
            raise _invalid(f"Invalid [topics] name: (name={topic})")
        _check_name("topics", parts[1], parts[3])
        deadline = body.get("ackDeadlineSeconds", 0) or DEFAULT_ACK_DEADLINE
        if not isinstance(deadline, int) or not 0 < deadline <= MAX_ACK_DEADLINE:
            raise _invalid("ack_deadline_secs out of bounds")
        push_config = body.get("pushConfig") or {}
        endpoint = push_config.get("pushEndpoint", "") if isinstance(push_config, dict) else None
        if not isinstance(endpoint, str) or (
            endpoint and urllib.parse.urlsplit(endpoint).scheme not in ("http", "https")
        ):
            raise _invalid(f"Invalid push endpoint given (endpoint={endpoint})")
        with self._cond:
            if name in self._subs:
                raise ApiError(HTTPStatus.CONFLICT, "Subscription already exists")
            if topic not in self._topics:
                raise ApiError(HTTPStatus.NOT_FOUND, "Subscription topic does not exist")
            sub = Subscription(name, topic, deadline, endpoint)
            self._subs[name] = sub
            self._save()
            return sub.as_json()

    def get_subscription(self, name: str) -> dict[str, Any]:
        with self._cond:
            return self._sub(name).as_json()

    def delete_subscription(self, name: str) -> dict[str, Any]:
        with self._cond:
            self._sub(name)
            del self._subs[name]
            self._save()
        return {}

    def list_subscriptions(self, project: str) -> dict[str, Any]:
        prefix = f"projects/{project}/subscriptions/"
        with self._cond:
            subs = [s.as_json() for n, s in sorted(self._subs.items()) if n.startswith(prefix)]
        return {"subscriptions": subs} if subs else {}

    def pull(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        limit = body.get("maxMessages", 0)
        if not isinstance(limit, int) or limit <= 0:
            raise _invalid("No max_messages specified")
        wait = 0.0 if body.get("returnImmediately") else PULL_WAIT_SECONDS
        give_up = time.monotonic() + wait
        with self._cond:
            while True:
                sub = self._sub(name)
                now = time.monotonic()
                sub.expire(now)
                taken = sub.take(now, limit)
                if taken or now >= give_up or self._closed:
                    break
                self._cond.wait(min(give_up - now, 0.25))
            received = [
                {"ackId": self._lease(sub, d, now), "message": d.message.as_json()} for d in taken
            ]
        return {"receivedMessages": received} if received else {}

    def acknowledge(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        ack_ids = self._ack_ids_of(name, body)
        with self._cond:
            sub = self._sub(name)
            for ack_id in ack_ids:
                # An expired or repeated ack id is ignored, as in the service.
                sub.leased.pop(ack_id, None)
            self._save()
        return {}

    def modify_ack_deadline(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        ack_ids = self._ack_ids_of(name, body)
        seconds = body.get("ackDeadlineSeconds", 0)
        if not isinstance(seconds, int) or not 0 <= seconds <= MAX_ACK_DEADLINE:
            raise _invalid("Invalid ack deadline given")
        with self._cond:
            sub = self._sub(name)
            now = time.monotonic()
            for ack_id in ack_ids:
                lease = sub.leased.get(ack_id)
                if lease is not None:
                    sub.leased[ack_id] = (lease[0], now + seconds)
            if seconds == 0:  # a nack: make it available again right away
                sub.expire(now)
                self._cond.notify_all()
        return {}

    # -- push delivery --------------------------------------------------------

    def take_push(self, limit: int) -> list[tuple[str, str, str, int, Message]]:
        """Lease due messages of push subscriptions: (sub, endpoint, ack id, timeout, message)."""
        out: list[tuple[str, str, str, int, Message]] = []
        with self._cond:
            now = time.monotonic()
            for sub in self._subs.values():
                if not sub.push_endpoint:
                    continue
                sub.expire(now)
                for delivery in sub.take(now, limit - len(out)):
                    ack_id = self._lease(sub, delivery, now)
                    out.append(
                        (sub.name, sub.push_endpoint, ack_id, sub.ack_deadline, delivery.message)
                    )
                if len(out) >= limit:
                    break
        return out

    def push_done(self, name: str, ack_id: str, ok: bool) -> None:
        """Record the outcome of one push attempt."""
        with self._cond:
            sub = self._subs.get(name)
            lease = None if sub is None else sub.leased.pop(ack_id, None)
            if sub is None or lease is None:
                return  # deleted meanwhile, or the lease expired and was re-queued
            if not ok:
                delivery = lease[0]
                delivery.attempts += 1
                backoff = PUSH_BACKOFF_FIRST * 2 ** (delivery.attempts - 1)
                delivery.not_before = time.monotonic() + min(backoff, PUSH_BACKOFF_MAX)
                sub.ready.append(delivery)
            self._save()

    def wait(self, timeout: float) -> bool:
        """Sleep until something is published or ``timeout`` passes; False once closed."""
        with self._cond:
            if not self._closed:
                self._cond.wait(timeout)
            return not self._closed

    def close(self) -> None:
        """Wake every waiter so pulls return and the dispatcher ends."""
        with self._cond:
            self._closed = True
            self._save()
            self._cond.notify_all()

    # -- internals (caller holds the lock) ------------------------------------

    def _topic(self, name: str) -> None:
        if name not in self._topics:
            raise ApiError(HTTPStatus.NOT_FOUND, "Topic not found")

    def _sub(self, name: str) -> Subscription:
        sub = self._subs.get(name)
        if sub is None:
            raise ApiError(HTTPStatus.NOT_FOUND, "Subscription does not exist")
        return sub

    def _lease(self, sub: Subscription, delivery: Delivery, now: float) -> str:
        ack_id = f"{sub.name}:{self._boot}-{next(self._ack_ids)}"
        sub.leased[ack_id] = (delivery, now + sub.ack_deadline)
        return ack_id

    @staticmethod
    def _ack_ids_of(name: str, body: dict[str, Any]) -> list[str]:
        ack_ids = body.get("ackIds")
        if not ack_ids:
            raise _invalid("No ack ids specified.")
        if not isinstance(ack_ids, list):
            raise _invalid("Payload isn't valid for request.")
        for ack_id in ack_ids:
            if not isinstance(ack_id, str) or not ack_id.startswith(name + ":"):
                raise _invalid(f"Invalid ack id (ack_id={ack_id})")
        return ack_ids

    def _save(self) -> None:
        if self._state is None:
            return
        # Leased messages are saved as ready: after a restart they are redelivered.
        state = {
            "next_id": self._next_id,
            "topics": sorted(self._topics),
            "subscriptions": [
                {
                    "name": s.name,
                    "topic": s.topic,
                    "ackDeadlineSeconds": s.ack_deadline,
                    "pushEndpoint": s.push_endpoint,
                    "messages": [
                        vars(d.message) for d in [*(d for d, _ in s.leased.values()), *s.ready]
                    ],
                }
                for s in self._subs.values()
            ],
        }
        self._state.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state)  # atomic, so a crash never leaves half a file

    def _load(self, path: Path) -> None:
        state = json.loads(path.read_text())
        self._next_id = int(state["next_id"])
        self._topics = set(state["topics"])
        for item in state["subscriptions"]:
            sub = Subscription(
                item["name"], item["topic"], item["ackDeadlineSeconds"], item["pushEndpoint"]
            )
            sub.ready.extend(Delivery(Message(**m)) for m in item["messages"])
            self._subs[sub.name] = sub


# Push endpoints are local; an http_proxy from the environment must not capture them.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def push_once(endpoint: str, subscription: str, message: Message, timeout: float) -> bool:
    """POST one push envelope; True when the endpoint acknowledged it."""
    wire = message.as_json()
    # The service also sends the snake_case spellings; some handlers read those.
    wire["message_id"] = wire["messageId"]
    wire["publish_time"] = wire["publishTime"]
    body = json.dumps({"message": wire, "subscription": subscription}).encode()
    request = urllib.request.Request(
        endpoint, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status = int(response.status)
        return 200 <= status < 300 or status == 102
    except urllib.error.HTTPError as exc:
        exc.close()
        return False
    except (OSError, ValueError):
        return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httplib2 expects
    disable_nagle_algorithm = True  # small JSON replies must not wait for delayed ACKs
    server: _Server

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # request lines would drown the stack's logs

    def _dispatch(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            status, body = HTTPStatus.OK, self._route(method, raw)
        except ApiError as exc:
            status, body = exc.status, exc.body()
        except Exception as exc:  # a bug here must answer 500, not drop the connection
            error = ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")
            status, body = error.status, error.body()
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _route(self, method: str, raw: bytes) -> dict[str, Any]:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/" and method == "GET":
            return {}  # readiness probe, like the emulator's "Ok"
        match = _PATH.fullmatch(path)
        if match is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Not found: {method} {path}")
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise _invalid("Payload isn't valid for request.") from None
        if not isinstance(body, dict):
            raise _invalid("Payload isn't valid for request.")
        broker = self.server.broker
        project, kind = match["project"], match["kind"]
        resource_id, verb = match["id"], match["verb"]
        if resource_id is None:
            if method != "GET":
                raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not supported here")
            if kind == "topics":
                return broker.list_topics(project)
            return broker.list_subscriptions(project)
        name = _check_name(kind, project, urllib.parse.unquote(resource_id))
        key = (kind, method, verb, match["tail"] is not None)
        routes: dict[tuple[str, str, str | None, bool], Any] = {
            ("topics", "PUT", None, False): lambda: broker.create_topic(name),
            ("topics", "GET", None, False): lambda: broker.get_topic(name),
            ("topics", "DELETE", None, False): lambda: broker.delete_topic(name),
            ("topics", "POST", "publish", False): lambda: broker.publish(name, body),
            ("topics", "GET", None, True): lambda: broker.topic_subscriptions(name),
            ("subscriptions", "PUT", None, False): lambda: broker.create_subscription(name, body),
            ("subscriptions", "GET", None, False): lambda: broker.get_subscription(name),
            ("subscriptions", "DELETE", None, False): lambda: broker.delete_subscription(name),
            ("subscriptions", "POST", "pull", False): lambda: broker.pull(name, body),
            ("subscriptions", "POST", "acknowledge", False): lambda: broker.acknowledge(name, body),
            ("subscriptions", "POST", "modifyAckDeadline", False): (
                lambda: broker.modify_ack_deadline(name, body)
            ),
        }
        handler = routes.get(key)
        if handler is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Not found: {method} {path}")
        result: dict[str, Any] = handler()
        return result


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    broker: Broker

    def __init__(self, address: tuple[str, int], broker: Broker) -> None:
        self.broker = broker
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Unblock handler threads idling on keep-alive connections so they close them."""
        with self._open_lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class FallbackServer:
    """The fallback served from background threads of this process."""

    def __init__(self, host: str, port: int, data_dir: Path | None = None) -> None:
        self.broker = Broker(data_dir)
        self._httpd = _Server((host, port), self.broker)
        self.port = int(self._httpd.server_address[1])
        self._pool = ThreadPoolExecutor(PUSH_WORKERS, thread_name_prefix="pubsub-push")
        self._threads = [
            threading.Thread(target=self._httpd.serve_forever, name="pubsub-http", daemon=True),
            threading.Thread(target=self._dispatch, name="pubsub-dispatch", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _dispatch(self) -> None:
        # Poll as well as wait: retries become due with the clock, not with a publish.
        while self.broker.wait(0.1):
            for name, endpoint, ack_id, timeout, message in self.broker.take_push(PUSH_WORKERS):
                self._pool.submit(self._push, name, endpoint, ack_id, timeout, message)

    def _push(self, name: str, endpoint: str, ack_id: str, timeout: int, message: Message) -> None:
        self.broker.push_done(name, ack_id, push_once(endpoint, name, message, timeout))

    def stop(self) -> None:
        """Stop serving and delivering; waits for in-flight pushes to end."""
        self.broker.close()
        self._httpd.shutdown()
        self._httpd.drop_connections()
        self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
