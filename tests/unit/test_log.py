"""The JSON log lines: one object per record, chatty libraries held to warnings."""

from __future__ import annotations

import io
import json
import logging

from dicomflow import log


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
