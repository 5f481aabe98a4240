"""One root error; each subclass names exactly one gRPC status code (here, and only here).

The code is the status's name, so the domain raising these needs no grpc: the gRPC
adapters turn it into `grpc.StatusCode[code]` (broker/api/handlers.py).
"""

from __future__ import annotations

import random


def retry_hint_ms(low_s: float = 1.0, high_s: float = 3.0) -> int:
    """A jittered retry-after, so refused callers do not all come back at once."""
    return int(random.uniform(low_s, high_s) * 1000)


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""

    #: the gRPC status code's name (grpc.StatusCode member)
    code: str = "INTERNAL"

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: sent as the `grpc-retry-pushback-ms` trailer: when the caller may try again
        self.retry_after_ms = retry_after_ms


# Caller mistakes ------------------------------------------------------------


class CallerError(BrokerError):
    """The request is at fault; retrying it unchanged will not help."""


class InvalidArgument(CallerError):
    code = "INVALID_ARGUMENT"


class NotFound(CallerError):
    code = "NOT_FOUND"


class Conflict(CallerError):
    """An idempotency key reused for a different request."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(CallerError):
    """The command is in a state that does not allow this (e.g. cancel after delivery)."""

    code = "FAILED_PRECONDITION"


class Unauthenticated(CallerError):
    code = "UNAUTHENTICATED"


class PermissionDenied(CallerError):
    code = "PERMISSION_DENIED"


class QuotaExceeded(CallerError):
    """The caller's own quota is spent."""

    code = "RESOURCE_EXHAUSTED"


# Server conditions ------------------------------------------------------------


class ServerError(BrokerError):
    """The broker cannot serve this now; the request may succeed later."""


class Unavailable(ServerError):
    """Retryable: the store cannot write, the broker is shutting down, or it is overloaded."""

    code = "UNAVAILABLE"


class StoreUnavailable(Unavailable):
    """The durable store cannot accept writes; nothing already accepted is lost."""


class DeadlineExceeded(ServerError):
    """The caller's deadline leaves no time to do this; nothing was done."""

    code = "DEADLINE_EXCEEDED"


class Replaced(ServerError):
    """A vehicle stream was replaced by a newer connection for the same car."""

    code = "ABORTED"
