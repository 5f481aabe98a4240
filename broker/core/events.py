"""Command status changes fanned out to waiters (SendCommand wait modes) and watchers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection

from broker.core.errors import BrokerError, QuotaExceeded, Unavailable, retry_hint_ms
from broker.core.quotas import WATCHER_BEHIND, Refusals
from broker.v1 import types_pb2 as t

Predicate = Callable[[t.Command], bool]


class _Watcher:
    def __init__(
        self,
        vehicle_ids: Collection[str],
        command_ids: Collection[str],
        depth: int,
        visible: Predicate | None = None,
    ):
        self.vehicle_ids = frozenset(vehicle_ids)
        self.command_ids = frozenset(command_ids)
        self.visible = visible
        self.queue: asyncio.Queue[t.Command | None] = asyncio.Queue(maxsize=depth)
        self.overflowed = False
        #: set when the stream must end (shutdown), after what is queued
        self.closing: BrokerError | None = None
        #: set when the stream must end now, before anything still queued
        self.ended: BrokerError | None = None

    def wants(self, command: t.Command) -> bool:
        if self.visible is not None and not self.visible(command):
            return False
        if not self.vehicle_ids and not self.command_ids:
            return True
        return command.vehicle_id in self.vehicle_ids or command.command_id in self.command_ids


class EventHub:
    """Publishes each recorded status change once, after it is durable."""

    def __init__(self, *, watcher_depth: int = 10_000, refusals: Refusals | None = None) -> None:
        self._refusals = refusals
        self._waiters: dict[str, list[tuple[Predicate, asyncio.Future[t.Command | None]]]] = {}
        self._watchers: set[_Watcher] = set()
        self._watcher_depth = watcher_depth
        #: status -> how many changes to it were published (command outcomes, for metrics)
        self.status_counts: dict[int, int] = {}
        #: shutting down: waiters are answered at once (with None), watches end
        self.draining = False

    def publish(self, command: t.Command) -> None:
        self.status_counts[command.status] = self.status_counts.get(command.status, 0) + 1
        waiters = self._waiters.get(command.command_id)
        if waiters:
            keep = []
            for predicate, future in waiters:
                if future.done():
                    continue
                if predicate(command):
                    future.set_result(command)
                else:
                    keep.append((predicate, future))
            if keep:
                self._waiters[command.command_id] = keep
            else:
                del self._waiters[command.command_id]
        for watcher in self._watchers:
            if watcher.overflowed or not watcher.wants(command):
                continue
            try:
                watcher.queue.put_nowait(command)
            except asyncio.QueueFull:
                watcher.overflowed = True  # the watch loop ends the stream with a status

    def waiter(self, command_id: str, predicate: Predicate) -> asyncio.Future[t.Command | None]:
        """A future set with the first published change of `command_id` matching `predicate`.

        Register it *before* reading the current status, so no change slips between.
        """
        future: asyncio.Future[t.Command | None] = asyncio.get_running_loop().create_future()
        if self.draining:
            future.set_result(None)
            return future
        self._waiters.setdefault(command_id, []).append((predicate, future))
        return future

    def drain(self) -> None:
        """Shutdown: every waiter gets None now (its caller answers with the current
        status), every watch stream ends after what it has queued."""
        self.draining = True
        for waiters in self._waiters.values():
            for _, future in waiters:
                if not future.done():
                    future.set_result(None)
        self._waiters.clear()
        for watcher in self._watchers:
            watcher.closing = Unavailable(
                "the broker is shutting down; watch again (its changes are durable: re-read "
                "current status with GetCommand/ListCommands)",
                retry_after_ms=retry_hint_ms(),
            )
            if not watcher.queue.full():
                watcher.queue.put_nowait(None)  # wake it

    def forget(self, command_id: str, future: asyncio.Future[t.Command | None]) -> None:
        waiters = self._waiters.get(command_id)
        if waiters is None:
            return
        waiters[:] = [(p, f) for p, f in waiters if f is not future]
        if not waiters:
            del self._waiters[command_id]

    async def watch(
        self,
        vehicle_ids: Collection[str],
        command_ids: Collection[str],
        *,
        visible: Predicate | None = None,
        ended: asyncio.Future[BrokerError] | None = None,
    ) -> AsyncIterator[t.Command]:
        """Changes matching the filters (all, if both are empty) and `visible` (the
        caller may see them) until the caller stops, or until `ended` is set: then the
        stream ends at once with that error (its caller's credential expired or was
        revoked), whatever is still queued."""
        if self.draining:
            raise Unavailable("the broker is shutting down", retry_after_ms=retry_hint_ms())
        watcher = _Watcher(vehicle_ids, command_ids, self._watcher_depth, visible)
        self._watchers.add(watcher)

        def end(future: asyncio.Future[BrokerError]) -> None:
            if not future.cancelled():
                watcher.ended = future.result()
                if not watcher.queue.full():
                    watcher.queue.put_nowait(None)  # wake it

        if ended is not None:
            ended.add_done_callback(end)
        try:
            while True:
                if watcher.ended is not None:
                    raise watcher.ended
                if watcher.queue.empty():
                    if watcher.closing is not None:
                        raise watcher.closing
                    if watcher.overflowed:
                        if self._refusals is not None:
                            self._refusals.count(WATCHER_BEHIND)
                        raise QuotaExceeded(
                            f"watcher fell more than {self._watcher_depth} changes behind; "
                            "reconnect and re-read current status with GetCommand/ListCommands"
                        )
                command = await watcher.queue.get()
                if command is not None:
                    yield command
        finally:
            if ended is not None:
                ended.remove_done_callback(end)
            self._watchers.discard(watcher)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)
