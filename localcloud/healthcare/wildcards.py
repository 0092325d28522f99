"""The ``gcsSource.uri`` wildcard rules of ``dicomStores.import``.

- ``*`` matches 0 or more characters other than ``/``.
- ``?`` matches exactly 1 character (any character, as documented).
- ``**`` matches 0 or more characters including ``/``. It must stand at the end
  of the URI, may be followed by an extension (``**.dcm``), and then no other
  wildcard may appear anywhere in the URI.
- Every other form (``***``, ``**/x``, ``a**b``, ``**.d*m``, a wildcard in the
  bucket, an empty object part) is invalid.

There is no escape: a ``*`` or ``?`` in an object name can only be matched by a
wildcard. Listing uses the literal part before the first wildcard as prefix,
because fake-gcs-server ignores ``match_glob``; matching happens here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EXTENSION = re.compile(r"^\.[^*?/]+$")


@dataclass(frozen=True)
class GcsPattern:
    """A parsed ``gs://bucket/pattern`` import source."""

    bucket: str
    pattern: str
    prefix: str
    regex: re.Pattern[str]

    @property
    def has_wildcard(self) -> bool:
        return self.prefix != self.pattern

    def matches(self, name: str) -> bool:
        """True when the object ``name`` is selected by the pattern."""
        return self.regex.fullmatch(name) is not None


def parse_gcs_source(uri: str) -> GcsPattern:
    """Parse and validate an import URI.

    Raises:
        ValueError: the URI is not ``gs://BUCKET/OBJECT_PATTERN`` or breaks a wildcard rule.
    """
    if not uri.startswith("gs://"):
        raise ValueError(f"invalid gcsSource.uri {uri!r}: must start with gs://")
    bucket, slash, pattern = uri[len("gs://") :].partition("/")
    if not bucket or "*" in bucket or "?" in bucket:
        raise ValueError(f"invalid gcsSource.uri {uri!r}: the bucket must be a plain name")
    if not slash or not pattern:
        raise ValueError(f"invalid gcsSource.uri {uri!r}: an object path or pattern is required")
    regex: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**", index):
            rest = pattern[index + 2 :]
            earlier = pattern[:index]
            if "*" in earlier or "?" in earlier:
                raise ValueError(
                    f"invalid gcsSource.uri {uri!r}: '**' cannot be combined with other wildcards"
                )
            if rest and not _EXTENSION.match(rest):
                raise ValueError(
                    f"invalid gcsSource.uri {uri!r}: '**' must be at the end of the path, "
                    "optionally followed by an extension such as '**.dcm'"
                )
            regex.append(".*" + re.escape(rest))
            break
        if char == "*":
            regex.append("[^/]*")
        elif char == "?":
            regex.append(".")
        else:
            regex.append(re.escape(char))
        index += 1
    first = min((i for i in (pattern.find("*"), pattern.find("?")) if i >= 0), default=-1)
    prefix = pattern if first < 0 else pattern[:first]
    return GcsPattern(bucket, pattern, prefix, re.compile("".join(regex), re.DOTALL))
