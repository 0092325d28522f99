"""The deployment key: where it is read from, and what its labels reveal."""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import google_crc32c
import pytest
from google.api_core import exceptions as gexc

from dicomflow import keys
from dicomflow.config import load_settings
from dicomflow.errors import ConfigError

STORE = "projects/p/locations/l/datasets/d/dicomStores/s"
BASE = {
    "DICOMFLOW_DICOM_STORE": STORE,
    "DICOMFLOW_LANDING_BUCKET": "landing",
    "DICOMFLOW_STAGING_BUCKET": "staging",
    "DICOMFLOW_BACKUP_BUCKET": "backups",
    "DICOMFLOW_ALERTS_TOPIC": "projects/p/topics/alerts",
}
SECRET = "projects/p/secrets/dicomflow-key/versions/latest"
GUESSED = "gs://landing/incoming/Roe^Richard MRN-9999/x.dcm"


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    keys.clear_cache()
    yield
    keys.clear_cache()


def _key_file(tmp_path: Path, name: str = "deployment.key") -> str:
    path = tmp_path / name
    keys.write_key_file(str(path))
    return str(path)


def test_key_file_is_32_random_bytes_mode_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = _key_file(tmp_path)
    first = Path(path).read_bytes()
    assert len(first) == 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    keys.write_key_file(path)
    assert Path(path).read_bytes() == first


def test_no_label_is_reversible_without_the_key(tmp_path: Path) -> None:
    key = keys.load(load_settings({**BASE, "DICOMFLOW_KEY_FILE": _key_file(tmp_path)}))
    label = key.hash("object", GUESSED)
    hex_part = label.rsplit(":", 1)[1]
    # The guess hashed without a key (plain SHA-256) and as an HMAC under another key.
    plain = hashlib.sha256(GUESSED.encode()).hexdigest()
    other = hmac.new(os.urandom(32), f"object\n{GUESSED}".encode(), hashlib.sha256).hexdigest()
    for attempt in (plain, other):
        assert hex_part not in attempt
        assert attempt[: len(hex_part)] != hex_part
    assert "Roe" not in label and "9999" not in label


def test_same_object_same_label_within_a_deployment_other_across_keys(tmp_path: Path) -> None:
    one = load_settings({**BASE, "DICOMFLOW_KEY_FILE": _key_file(tmp_path, "a.key")})
    two = load_settings({**BASE, "DICOMFLOW_KEY_FILE": _key_file(tmp_path, "b.key")})
    first = keys.load(one).hash("object", GUESSED)
    keys.clear_cache()  # a new process of the same deployment reads the same file
    assert keys.load(one).hash("object", GUESSED) == first
    assert keys.load(two).hash("object", GUESSED) != first
    # A purpose keeps the label of a UID apart from the label of the same text as a name.
    assert keys.load(one).hash("uid", GUESSED) != first


def test_label_format_names_the_key(tmp_path: Path) -> None:
    path = _key_file(tmp_path)
    key = keys.load(load_settings({**BASE, "DICOMFLOW_KEY_FILE": path}))
    assert key.key_id == hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]
    prefix, key_id, digest = key.hash("uid", "1.2.3.4").split(":")
    assert (prefix, key_id, len(digest)) == ("h", key.key_id, 32)
    assert Path(path).read_bytes().hex() not in repr(key)


def test_neither_setting_names_both(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        keys.load(load_settings(BASE))
    assert "DICOMFLOW_KEY_SECRET" in str(caught.value)
    assert "DICOMFLOW_KEY_FILE" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "mode", "problem"),
    [(b"short", 0o600, "fewer than 16"), (bytes(range(32)), 0o644, "group or others")],
    ids=["short", "group-readable"],
)
def test_bad_key_files(tmp_path: Path, content: bytes, mode: int, problem: str) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=problem):
        keys.load(load_settings({**BASE, "DICOMFLOW_KEY_FILE": str(path)}))
    with pytest.raises(ConfigError, match="cannot read"):
        keys.load(load_settings({**BASE, "DICOMFLOW_KEY_FILE": str(tmp_path / "absent")}))


def test_bad_secret_name_fails_at_settings() -> None:
    with pytest.raises(ConfigError, match="DICOMFLOW_KEY_SECRET"):
        load_settings({**BASE, "DICOMFLOW_KEY_SECRET": "dicomflow-key"})


class FakeSecretManager:
    """The one call dicomflow makes, ``access_secret_version(name=...)``."""

    def __init__(self, data: bytes, *, crc: int | None = None, error: Exception | None = None):
        self.data, self.crc, self.error = data, crc, error
        self.names: list[str] = []

    def access_secret_version(self, *, name: str) -> Any:
        self.names.append(name)
        if self.error is not None:
            raise self.error
        crc = google_crc32c.value(self.data) if self.crc is None else self.crc
        return SimpleNamespace(payload=SimpleNamespace(data=self.data, data_crc32c=crc))


def test_secret_manager_is_read_once_and_preferred_over_the_file(tmp_path: Path) -> None:
    settings = load_settings(
        {**BASE, "DICOMFLOW_KEY_SECRET": SECRET, "DICOMFLOW_KEY_FILE": _key_file(tmp_path)}
    )
    client = FakeSecretManager(b"k" * 32)
    key = keys.load(settings, secret_client=client)
    assert key.secret == b"k" * 32
    assert keys.load(settings, secret_client=client) is key
    assert client.names == [SECRET]


@pytest.mark.parametrize(
    ("client", "problem"),
    [
        (FakeSecretManager(b"k" * 32, error=gexc.PermissionDenied("no")), "secretAccessor"),
        (FakeSecretManager(b"k" * 32, crc=1), "CRC32C"),
        (FakeSecretManager(b"k" * 8), "fewer than 16"),
    ],
)
def test_secret_manager_errors_name_the_setting(client: FakeSecretManager, problem: str) -> None:
    settings = load_settings({**BASE, "DICOMFLOW_KEY_SECRET": SECRET})
    with pytest.raises(ConfigError, match=problem) as caught:
        keys.load(settings, secret_client=client)
    assert caught.value.setting == "DICOMFLOW_KEY_SECRET"


def test_file_setting_does_not_import_secret_manager(tmp_path: Path) -> None:
    sys.modules.pop("google.cloud.secretmanager", None)
    keys.load(load_settings({**BASE, "DICOMFLOW_KEY_FILE": _key_file(tmp_path)}))
    assert "google.cloud.secretmanager" not in sys.modules


def test_functions_read_the_key_at_start_up_and_label_logs_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicomflow import log, runtime

    for name, value in {**BASE, "K_SERVICE": "report"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    runtime.set_context(None)
    try:
        with pytest.raises(SystemExit) as stopped:
            runtime.startup()
        assert stopped.value.code == 3
        assert "DICOMFLOW_KEY_SECRET: is not set, nor is DICOMFLOW_KEY_FILE" in (
            capsys.readouterr().out
        )
        path = _key_file(tmp_path)
        monkeypatch.setenv("DICOMFLOW_KEY_FILE", path)
        runtime.startup()
        labels = log.SCRUBBER.labels
        assert labels is not None and labels.key.secret == Path(path).read_bytes()
        assert labels.keep("staging", "batches/20261125T125300Z/x.dcm")
        assert not labels.keep("landing", "batches/x.dcm")
    finally:
        runtime.set_context(None)
        log.use_labels(None)
