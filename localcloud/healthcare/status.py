"""Google API errors: the HTTP status, the canonical status name and the gRPC code.

Every error the emulator answers is an ``ApiError``; the server turns it into
``{"error": {"code": HTTP, "message": ..., "status": NAME}}`` as Google does.
Operations carry the gRPC code instead (``error.code`` 3 for INVALID_ARGUMENT).
"""

from __future__ import annotations

# canonical name -> (HTTP status, gRPC code)
STATUSES: dict[str, tuple[int, int]] = {
    "CANCELLED": (499, 1),
    "UNKNOWN": (500, 2),
    "INVALID_ARGUMENT": (400, 3),
    "DEADLINE_EXCEEDED": (504, 4),
    "NOT_FOUND": (404, 5),
    "ALREADY_EXISTS": (409, 6),
    "PERMISSION_DENIED": (403, 7),
    "RESOURCE_EXHAUSTED": (429, 8),
    "FAILED_PRECONDITION": (400, 9),
    "ABORTED": (409, 10),
    "OUT_OF_RANGE": (400, 11),
    "UNIMPLEMENTED": (501, 12),
    "INTERNAL": (500, 13),
    "UNAVAILABLE": (503, 14),
    "UNAUTHENTICATED": (401, 16),
}

# The status name a bare HTTP code stands for, for injected faults.
_BY_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def status_for_http(http_status: int) -> str:
    """The canonical status name Google pairs with ``http_status``."""
    return _BY_HTTP.get(http_status, "UNKNOWN" if http_status >= 500 else "FAILED_PRECONDITION")


def grpc_code(status: str) -> int:
    """The numeric gRPC code of a canonical status name."""
    return STATUSES[status][1]


class ApiError(Exception):
    """An error answered to the client in Google's error JSON."""

    def __init__(self, status: str, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.http_status = http_status if http_status is not None else STATUSES[status][0]

    def body(self) -> dict[str, object]:
        """The JSON body Google sends for this error."""
        return {"error": {"code": self.http_status, "message": self.message, "status": self.status}}

    def operation_error(self) -> dict[str, object]:
        """The ``error`` of a finished Operation (a google.rpc.Status)."""
        return {"code": grpc_code(self.status), "message": self.message, "details": []}


def not_found(what: str) -> ApiError:
    """404 NOT_FOUND for a missing resource."""
    return ApiError("NOT_FOUND", f"{what} not found")


def invalid(message: str) -> ApiError:
    """400 INVALID_ARGUMENT."""
    return ApiError("INVALID_ARGUMENT", message)
