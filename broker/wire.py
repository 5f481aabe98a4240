"""The wire contract beyond the .proto files: metadata keys both sides rely on.

Read by the broker's gRPC adapters and by the SDKs (cars and services) alike; see
docs/design.md for the whole contract.
"""

from __future__ import annotations

from typing import Any

#: metadata naming the car in insecure-dev mode (a signed token names it otherwise)
VEHICLE_ID_HEADER = "x-vehicle-id"
#: trailer carrying a refusal's retry hint, in milliseconds (gRPC's own retry convention)
PUSHBACK_KEY = "grpc-retry-pushback-ms"


def pushback_ms(trailing_metadata: Any) -> int | None:
    """The broker's retry hint from a failed call's trailers, if it sent one."""
    for key, value in trailing_metadata or ():
        if key == PUSHBACK_KEY and str(value).isdigit():
            return int(value)
    return None
