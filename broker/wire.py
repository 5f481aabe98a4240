"""The wire contract beyond the .proto files: metadata keys both sides rely on.

Read by the broker's gRPC adapters and by the SDKs (cars and services) alike; see
docs/design.md for the whole contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: metadata naming the car in insecure-dev mode (a signed token names it otherwise)
VEHICLE_ID_HEADER = "x-vehicle-id"
#: trailer carrying a refusal's retry hint, in milliseconds (gRPC's own retry convention)
PUSHBACK_KEY = "grpc-retry-pushback-ms"


#: what the SDKs take as `token=`: a fixed bearer token, a provider called for the current
#: one before each call or stream (so a token that expired is replaced), or None
TokenSource = str | Callable[[], str] | None


def bearer(token: TokenSource) -> tuple[tuple[str, str], ...]:
    """The `authorization` metadata for the token now (none without a token)."""
    current = token() if callable(token) else token
    return (("authorization", f"Bearer {current}"),) if current else ()


def pushback_ms(trailing_metadata: Any) -> int | None:
    """The broker's retry hint from a failed call's trailers, if it sent one."""
    for key, value in trailing_metadata or ():
        if key == PUSHBACK_KEY and str(value).isdigit():
            return int(value)
    return None
