"""The deployment key: HMAC-SHA256 labels for object names and UIDs in alerts and logs.

``load(settings)`` reads the key once per process, from ``DICOMFLOW_KEY_SECRET`` (Secret
Manager) or ``DICOMFLOW_KEY_FILE``; ``DeploymentKey.hash`` makes a label
``h:<key id>:<32 hex>``; ``write_key_file`` creates a key file unless one exists.

See docs/architecture.md#the-deployment-key
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Protocol

from dicomflow.config import Settings
from dicomflow.errors import ConfigError

# Purposes of labels: the same text labelled for two purposes gives two labels.
OBJECT = "object"  # a gs:// URI
UID = "uid"  # a DICOM UID
LABEL_PREFIX = "h:"
LABEL_HEX = 32
MIN_KEY_BYTES = 16

_NEITHER = (
    "DICOMFLOW_KEY_SECRET",
    "is not set, nor is DICOMFLOW_KEY_FILE",
    "set DICOMFLOW_KEY_SECRET=projects/P/secrets/S/versions/latest (Google Cloud) "
    "or DICOMFLOW_KEY_FILE=<path of a file of 32 random bytes> (localcloud writes one per home)",
)


class SecretPayload(Protocol):
    data: bytes
    data_crc32c: int | None


class SecretVersion(Protocol):
    payload: SecretPayload


class SecretClient(Protocol):
    """The one call dicomflow makes of a Secret Manager client."""

    def access_secret_version(self, *, name: str) -> SecretVersion: ...


@dataclass(frozen=True)
class DeploymentKey:
    """The secret of one deployment; ``hash`` makes labels with it."""

    secret: bytes = field(repr=False)

    @property
    def key_id(self) -> str:
        """8 hex digits of SHA-256 of the key: names the key without revealing it."""
        return hashlib.sha256(self.secret).hexdigest()[:8]

    def hash(self, purpose: str, text: str) -> str:
        """The label of ``text`` for ``purpose`` (``object``, ``uid`` ...): ``h:<key id>:<hex>``.

        HMAC-SHA256 over ``purpose + "\\n" + text``; the purpose keeps labels made for
        one use from matching those of another.
        """
        mac = hmac.new(self.secret, f"{purpose}\n{text}".encode(), hashlib.sha256)
        return f"{LABEL_PREFIX}{self.key_id}:{mac.hexdigest()[:LABEL_HEX]}"


_cache: dict[tuple[str | None, str | None], DeploymentKey] = {}
_lock = threading.Lock()


def load(settings: Settings, *, secret_client: SecretClient | None = None) -> DeploymentKey:
    """The deployment key named by ``settings``, read once per process.

    Args:
        settings: ``key_secret`` (read first when set) or ``key_file``.
        secret_client: a Secret Manager client with ``access_secret_version(name=...)``;
            by default one is built with the default credentials.

    Raises:
        ConfigError: neither setting is set, or the key cannot be read, is too short
            or is readable by others.
    """
    where = (settings.key_secret, settings.key_file)
    with _lock:
        found = _cache.get(where)
        if found is None:
            if settings.key_secret:
                secret = _from_secret_manager(settings.key_secret, secret_client)
            elif settings.key_file:
                secret = _from_file(settings.key_file)
            else:
                raise ConfigError(*_NEITHER)
            found = _cache[where] = DeploymentKey(secret)
        return found


def clear_cache() -> None:
    """Forget keys read so far (tests that rotate a key)."""
    with _lock:
        _cache.clear()


def write_key_file(path: str) -> None:
    """Create ``path`` with 32 random bytes, mode 0600, unless it exists (localcloud)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as out:
        out.write(os.urandom(32))


def _from_file(path: str) -> bytes:
    try:
        info = os.stat(path)
        with open(path, "rb") as handle:
            secret = handle.read()
    except OSError as exc:
        raise ConfigError(
            "DICOMFLOW_KEY_FILE",
            f"cannot read {path!r}: {exc.strerror}",
            "point it at the deployment key file (localcloud writes <home>/deployment.key)",
        ) from None
    if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            "DICOMFLOW_KEY_FILE",
            f"{path!r} is readable or writable by group or others",
            f"chmod 600 {path}",
        )
    return _checked(secret, "DICOMFLOW_KEY_FILE")


def _from_secret_manager(name: str, client: SecretClient | None) -> bytes:
    if client is None:
        # Imported by name: mypy following this typed package would hide the untyped
        # google.cloud.storage beside it.
        secretmanager = importlib.import_module("google.cloud.secretmanager")
        client = secretmanager.SecretManagerServiceClient()
    from google.api_core import exceptions as gexc

    try:
        response = client.access_secret_version(name=name)
    except gexc.GoogleAPIError as exc:
        raise ConfigError(
            "DICOMFLOW_KEY_SECRET",
            f"cannot read {name}: {exc}",
            "create the secret version and grant the function's service account "
            "roles/secretmanager.secretAccessor on the secret",
        ) from None
    payload = response.payload
    if payload.data_crc32c:
        import google_crc32c

        if google_crc32c.value(payload.data) != payload.data_crc32c:
            raise ConfigError(
                "DICOMFLOW_KEY_SECRET", f"{name} failed its CRC32C check", "read it again"
            )
    return _checked(bytes(payload.data), "DICOMFLOW_KEY_SECRET")


def _checked(secret: bytes, setting: str) -> bytes:
    if len(secret) < MIN_KEY_BYTES:
        raise ConfigError(
            setting,
            f"the key has {len(secret)} bytes, fewer than {MIN_KEY_BYTES}",
            "use 32 random bytes, e.g. head -c 32 /dev/urandom",
        )
    return secret
