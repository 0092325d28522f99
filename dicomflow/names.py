"""Resource names of the Cloud Healthcare API, validated and round-tripped.

Each name is a frozen dataclass: ``str(name)`` gives the REST resource name and
``Name.from_string(s)`` parses one, raising ``ValueError`` with the expected form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Self

_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")


def _check_id(kind: str, value: str) -> None:
    if not _ID.match(value):
        raise ValueError(f"invalid {kind} id {value!r}: use letters, digits, '_', '-' or '.'")


@dataclass(frozen=True)
class DatasetName:
    """``projects/{project}/locations/{location}/datasets/{dataset}``."""

    project: str
    location: str
    dataset: str

    def __post_init__(self) -> None:
        _check_id("project", self.project)
        _check_id("location", self.location)
        _check_id("dataset", self.dataset)

    def __str__(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/datasets/{self.dataset}"

    @classmethod
    def from_string(cls, name: str) -> DatasetName:
        parts = name.strip("/").split("/")
        if len(parts) != 6 or parts[0::2] != ["projects", "locations", "datasets"]:
            raise ValueError(
                f"invalid dataset name {name!r}: expected projects/P/locations/L/datasets/D"
            )
        return cls(parts[1], parts[3], parts[5])


@dataclass(frozen=True)
class _InDataset:
    """A resource of a dataset, ``{dataset}/{COLLECTION}/{id}``; subclasses set the
    collection, the kind the error messages name, and the id's placeholder."""

    COLLECTION: ClassVar[str]
    KIND: ClassVar[str]
    PLACEHOLDER: ClassVar[str]

    dataset: DatasetName
    id: str

    def __post_init__(self) -> None:
        _check_id(self.KIND, self.id)

    def __str__(self) -> str:
        return f"{self.dataset}/{self.COLLECTION}/{self.id}"

    @classmethod
    def from_string(cls, name: str) -> Self:
        parts = name.strip("/").split("/")
        if len(parts) != 8 or parts[6] != cls.COLLECTION:
            raise ValueError(
                f"invalid {cls.KIND} name {name!r}: "
                f"expected projects/P/locations/L/datasets/D/{cls.COLLECTION}/{cls.PLACEHOLDER}"
            )
        return cls(DatasetName.from_string("/".join(parts[:6])), parts[7])


@dataclass(frozen=True)
class DicomStoreName(_InDataset):
    """``projects/{p}/locations/{l}/datasets/{d}/dicomStores/{store}``."""

    COLLECTION = "dicomStores"
    KIND = "DICOM store"
    PLACEHOLDER = "S"

    @property
    def store(self) -> str:
        return self.id

    @property
    def dicomweb_path(self) -> str:
        """The path of the store's DICOMweb root, relative to the API version."""
        return f"{self}/dicomWeb"


@dataclass(frozen=True)
class OperationName(_InDataset):
    """``projects/{p}/locations/{l}/datasets/{d}/operations/{operation}``."""

    COLLECTION = "operations"
    KIND = "operation"
    PLACEHOLDER = "OP"

    @property
    def operation(self) -> str:
        return self.id


@dataclass(frozen=True)
class TopicName:
    """``projects/{project}/topics/{topic}``."""

    project: str
    topic: str

    def __post_init__(self) -> None:
        _check_id("project", self.project)
        _check_id("topic", self.topic)

    def __str__(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    @classmethod
    def from_string(cls, name: str) -> TopicName:
        parts = name.strip("/").split("/")
        if len(parts) != 4 or parts[0::2] != ["projects", "topics"]:
            raise ValueError(f"invalid topic name {name!r}: expected projects/P/topics/T")
        return cls(parts[1], parts[3])
