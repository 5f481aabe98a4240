"""One root error; each subclass maps to exactly one gRPC status (here, and only here)."""

from __future__ import annotations

import random
from typing import Any

import grpc

#: trailer carrying a refusal's retry hint, in milliseconds (gRPC's own retry convention)
PUSHBACK_KEY = "grpc-retry-pushback-ms"


def pushback_ms(trailing_metadata: Any) -> int | None:
    """The broker's retry hint from a failed call's trailers, if it sent one."""
    for key, value in trailing_metadata or ():
        if key == PUSHBACK_KEY and str(value).isdigit():
            return int(value)
    return None


def retry_hint_ms(low_s: float = 1.0, high_s: float = 3.0) -> int:
    """A jittered retry-after, so refused callers do not all come back at once."""
    return int(random.uniform(low_s, high_s) * 1000)


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: sent as the `grpc-retry-pushback-ms` trailer: when the caller may try again
        self.retry_after_ms = retry_after_ms


# Caller mistakes ------------------------------------------------------------


class CallerError(BrokerError):
    """The request is at fault; retrying it unchanged will not help."""


class InvalidArgument(CallerError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CallerError):
    status = grpc.StatusCode.NOT_FOUND


class Conflict(CallerError):
    """An idempotency key reused for a different request."""

    status = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CallerError):
    """The command is in a state that does not allow this (e.g. cancel after delivery)."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(CallerError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CallerError):
    status = grpc.StatusCode.PERMISSION_DENIED


class QuotaExceeded(CallerError):
    """The caller's own quota is spent."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


# Server conditions ------------------------------------------------------------


class ServerError(BrokerError):
    """The broker cannot serve this now; the request may succeed later."""


class Unavailable(ServerError):
    """Retryable: the store cannot write, the broker is shutting down, or it is overloaded."""

    status = grpc.StatusCode.UNAVAILABLE


class StoreUnavailable(Unavailable):
    """The durable store cannot accept writes; nothing already accepted is lost."""


class DeadlineExceeded(ServerError):
    """The caller's deadline leaves no time to do this; nothing was done."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Replaced(ServerError):
    """A vehicle stream was replaced by a newer connection for the same car."""

    status = grpc.StatusCode.ABORTED
