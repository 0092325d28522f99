"""The JSON log lines: one object per record, chatty libraries held to warnings."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from dicomflow import keys, log


def test_records_are_json_lines_and_dicomweb_client_requests_are_not_logged() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    try:
        log.configure(stream=stream)
        logging.getLogger("dicomweb_client.web").info('search for instances of study "1.2.3"')
        logging.getLogger("dicomweb_client.web").warning("retrying")
        logging.getLogger("dicomflow.test").info("tick", extra=log.fields(batch="b1"))
    finally:
        for handler in list(root.handlers):
            if handler not in before[0]:
                root.removeHandler(handler)
        root.setLevel(before[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["logger"], x["message"]) for x in lines] == [
        ("dicomweb_client.web", "retrying"),
        ("dicomflow.test", "tick"),
    ]
    assert lines[1]["batch"] == "b1" and lines[1]["severity"] == "INFO"


# --- scrubbing: no UIDs or object names in clear -----------------------------------------------

STUDY = "1.2.826.0.1.3680043.8.498.1234567890123"
SOP = "2.25.302416284374919395638925187036468532241"
NAME = "incoming/Roe^Richard MRN-9999/x.dcm"


def _lines(emit: Any, labels: log.Labels | None = None) -> list[dict[str, Any]]:
    """What ``emit()`` logs through ``log.configure``'s handler, as parsed JSON lines."""
    stream = io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level, log.SCRUBBER.labels)
    try:
        logging.captureWarnings(False)  # an earlier test's configure() may have left it on
        log.configure(stream=stream)
        log.use_labels(labels)
        emit()
    finally:
        log.use_labels(before[2])
        for handler in list(root.handlers):
            if handler not in before[0]:
                root.removeHandler(handler)
        root.setLevel(before[1])
        logging.captureWarnings(False)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _labels(tmp_path: Path) -> log.Labels:
    path = tmp_path / "deployment.key"
    keys.write_key_file(str(path))
    return log.Labels(keys.DeploymentKey(path.read_bytes()), lambda _b, n: n.startswith("batches/"))


def test_uids_and_names_leave_messages_fields_and_tracebacks_as_labels(tmp_path: Path) -> None:
    labels = _labels(tmp_path)
    quoted = quote(NAME, safe="")

    def emit() -> None:
        logger = logging.getLogger("dicomflow.report")
        logger.info("qido of study %s", STUDY, extra=log.fields(sop=SOP, uri=f"gs://land/{NAME}"))
        try:
            try:
                raise OSError(f"404 GET http://h/download/storage/v1/b/land/o/{quoted}?alt=media")
            except OSError as inner:
                raise RuntimeError(f"500 for url: http://h/v1/dicomWeb/studies/{STUDY}") from inner
        except RuntimeError:
            logger.exception("verification failed")
        # Cloud Storage listing and upload URLs name objects in the query.
        logger.warning(f"GET /storage/v1/b/land/o?prefix={quoted}&maxResults=5")
        # The pipeline's own objects keep their names; their UIDs do not.
        logger.info(f"import gs://staging/batches/20261125T125300Z/**.dcm; gs://backups/{SOP}")

    lines = _lines(emit, labels)
    text = json.dumps(lines)
    for secret in (STUDY, SOP, "Roe", "9999", quoted):
        assert secret not in text
    study = labels.key.hash(keys.UID, STUDY)
    obj = labels.key.hash(keys.OBJECT, f"gs://land/{NAME}")
    assert lines[0]["message"] == f"qido of study {study}"
    assert lines[0]["sop"] == labels.key.hash(keys.UID, SOP) and lines[0]["uri"] == obj
    trace = lines[1]["exception"]
    assert f"studies/{study}" in trace and f"/b/land/o/{obj}?alt=media" in trace
    assert "RuntimeError" in trace and "OSError" in trace  # the traceback is kept, scrubbed
    assert lines[2]["message"] == f"GET /storage/v1/b/land/o?prefix={obj}&maxResults=5"
    assert "gs://staging/batches/20261125T125300Z/**.dcm" in lines[3]["message"]


def test_names_being_handled_are_scrubbed_in_any_form_and_placeholders_before_a_key() -> None:
    def emit() -> None:
        with log.naming("land", NAME):
            logging.getLogger("x").warning(f"cannot read {NAME} ({quote(NAME)})")
        logging.getLogger("x").warning(f"uid {SOP} in gs://land/{NAME}")
        logging.getLogger("x").warning(f"copy of 'gs://land/{NAME}' failed")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f"Invalid value for VR UI: '{STUDY}'", UserWarning, stacklevel=1)

    lines = _lines(emit)
    assert lines[0]["message"] == "cannot read <object> (<object>)"
    assert lines[1]["message"] == "uid <uid> in <object>"
    assert lines[2]["message"] == "copy of '<object>' failed"
    assert lines[3]["logger"] == "py.warnings" and STUDY not in lines[3]["message"]


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1:8080", "python 3.11.4", "0.25 s", "10.0.0.12", "2.0.1", "20261125T125300Z"],
)
def test_what_is_not_a_uid_stays(text: str) -> None:
    assert log.Scrubber().scrub(text) == text


@pytest.mark.parametrize(
    "uid", [STUDY, SOP, "1.2.840.10008.5.1.4.1.1.2", "999.999.2.19941105.112000", "1.2.3.4"]
)
def test_uids_in_any_position_go(uid: str) -> None:
    for text in (uid, f"({uid})", f"/studies/{uid}/series", f"x_{uid}.dcm", f"uid={uid}."):
        assert uid not in log.Scrubber().scrub(text), text


def test_pydicom_records_lose_quoted_values() -> None:
    def emit() -> None:
        logging.getLogger("pydicom").warning("Invalid value for VR UI: '05fa52f0e599'. See <x>")
        logging.getLogger("pydicom").warning('Invalid value for VR PN: "Doe^John"')

    lines = _lines(emit)
    assert [x["message"] for x in lines] == [
        "Invalid value for VR UI: '<value>'. See <x>",
        "Invalid value for VR PN: '<value>'",
    ]
