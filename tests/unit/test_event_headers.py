"""ce- header values: percent-encoded by localcloud's delivery, decoded by dicomflow."""

from __future__ import annotations

import pytest
from cloudevents.http import CloudEvent
from hypothesis import given
from hypothesis import strategies as st

from dicomflow.events import decode_attributes, decode_header_value
from localcloud.delivery import binary_headers, encode_header_value

NAMES = [
    "plain/IM000001.dcm",
    "edge/ünïcødé 名前.dcm",
    "latin/café résumé ÿ.dcm",
    "cjk/患者/画像 001.dcm",
    "emoji/🩻 scan 😀.dcm",
    "hash/#1#.dcm",
    "query/what?now=1&x.dcm",
    "percent/100%.dcm",
    "percent/%41%2F%zz.dcm",
    "plus/a+b+c.dcm",
    'quote/say "hi".dcm',
    "tab\tand\x7fdel.dcm",
]


@pytest.mark.parametrize("value", NAMES)
def test_round_trip(value: str) -> None:
    encoded = encode_header_value(value)
    assert decode_header_value(encoded) == value
    # what goes on the wire is printable ASCII without space or double-quote
    assert all("!" <= c <= "~" and c != '"' for c in encoded)
    encoded.encode("latin-1")


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"])))
def test_round_trip_of_any_text(value: str) -> None:
    assert decode_header_value(encode_header_value(value)) == value


def test_the_binding_s_escapes() -> None:
    assert encode_header_value('a b"c%d') == "a%20b%22c%25d"
    assert encode_header_value("ü") == "%C3%BC"
    assert encode_header_value("😀") == "%F0%9F%98%80"
    # printable ASCII other than space, '"' and '%' goes as it is
    assert encode_header_value("objects/a+b#c?d=e&f.dcm") == "objects/a+b#c?d=e&f.dcm"


def test_one_round_of_decoding_only() -> None:
    assert decode_header_value("%2541") == "%41"


def test_a_value_that_is_not_utf8_escapes_stays_as_it_came() -> None:
    assert decode_header_value("%FF%FE") == "%FF%FE"
    assert decode_header_value("100%") == "100%"


def test_binary_headers_prefix_and_encode_every_attribute() -> None:
    headers = binary_headers({"subject": "objects/ü", "id": "1"})
    assert headers == {"ce-subject": "objects/%C3%BC", "ce-id": "1"}


def test_decode_attributes_leaves_data_alone() -> None:
    event = CloudEvent(
        {"type": "t", "source": "s", "id": "1", "subject": "objects/a%20b%25.dcm"},
        {"name": "a%20b.dcm"},
    )
    decoded = decode_attributes(event)
    assert decoded["subject"] == "objects/a b%.dcm"
    assert decoded["id"] == "1" and decoded["type"] == "t"
    assert decoded.data == {"name": "a%20b.dcm"}
