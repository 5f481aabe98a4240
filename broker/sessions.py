"""Live vehicle streams: at most one per car; a newer connection replaces the older."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from broker.errors import BrokerError, Replaced

#: Put in a session's outbox to end its stream.
CLOSE = object()


class Session:
    """One car's live stream, as the dispatcher sees it: an outbox of frames."""

    def __init__(self, vehicle_id: str, *, now_ms: int) -> None:
        self.vehicle_id = vehicle_id
        self.session_id = os.urandom(8).hex()
        self.connected_since_ms = now_ms
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        #: Why the stream ended; None for a clean end (the car hung up).
        self.close_error: BrokerError | None = None
        self.closed = False

    def send(self, frame: Any) -> None:
        if not self.closed:
            self.outbox.put_nowait(frame)

    def close(self, error: BrokerError | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_error = error
        self.outbox.put_nowait(CLOSE)


class SessionRegistry:
    """vehicle_id -> its live session."""

    def __init__(self) -> None:
        self._by_vehicle: dict[str, Session] = {}

    def attach(self, session: Session) -> Session | None:
        """Make `session` the car's live one; close and return the one it replaces."""
        old = self._by_vehicle.get(session.vehicle_id)
        self._by_vehicle[session.vehicle_id] = session
        if old is not None:
            old.close(Replaced("replaced by a newer connection for this vehicle"))
        return old

    def detach(self, session: Session) -> bool:
        """Forget `session` if it is still the live one; True if it was."""
        if self._by_vehicle.get(session.vehicle_id) is session:
            del self._by_vehicle[session.vehicle_id]
            return True
        return False

    def get(self, vehicle_id: str) -> Session | None:
        return self._by_vehicle.get(vehicle_id)

    def __contains__(self, vehicle_id: object) -> bool:
        return vehicle_id in self._by_vehicle

    def __len__(self) -> int:
        return len(self._by_vehicle)

    def all(self) -> list[Session]:
        return list(self._by_vehicle.values())
