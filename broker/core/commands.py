"""What CommandService does, without gRPC: validate a request, apply the command's
policy (lane, TTL), admit it, make it durable, and wait for the status asked for.

The servicer in broker/api/command_service.py parses the request, names the caller and
maps errors; everything it answers comes from `Commands`.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

from broker.config import Config
from broker.core import lanes
from broker.core.admission import Admission, Overloaded
from broker.core.dispatch import Dispatcher
from broker.core.errors import (
    BrokerError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StoreUnavailable,
    retry_hint_ms,
)
from broker.core.events import EventHub
from broker.core.lifecycle import DELIVERED_OR_LATER, TERMINAL
from broker.core.state import VehicleStates
from broker.core.store import NewCommand, Store
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
#: idempotency and coalesce keys, in bytes (LMDB keys are bytes, at most 511 of them)
KEY_MAX = 128
WAIT_MODES = frozenset(svc.WaitMode.values())
#: most vehicles and commands one WatchCommands stream may filter on
WATCH_FILTER_MAX = 10_000
#: ListCommands' page size, by default and at most
LIST_DEFAULT = 100
LIST_MAX = 1000


class Caller(NamedTuple):
    """Who sends, as the domain needs to know it."""

    #: idempotency keys are scoped to it: one caller's keys never match another's
    name: str
    #: may ask for a higher lane than the command's own (admin or dev)
    may_raise_lane: bool = False


def check_id(what: str, value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"{what} must be 1-64 characters of letters, digits and _.:- (got {value[:80]!r})"
        )
    return value


def check_command_id(command_id: str) -> str:
    if not command_id or len(command_id) > 64:
        raise InvalidArgument("command_id must be 1-64 characters")
    if not ID_PATTERN.fullmatch(command_id):
        raise NotFound(f"no command {command_id[:80]!r}")
    return command_id


class Commands:
    """CommandService over the domain objects."""

    def __init__(
        self,
        config: Config,
        store: Store,
        dispatcher: Dispatcher,
        events: EventHub,
        states: VehicleStates,
        admission: Admission,
    ) -> None:
        self._config = config
        self._store = store
        self._dispatcher = dispatcher
        self._events = events
        self._states = states
        self._admission = admission

    # -- sending -----------------------------------------------------------------------------

    def new_command(
        self, request: svc.SendCommandRequest, caller: Caller, deadline_s: float
    ) -> NewCommand:
        """Validate a request and apply its command's policy (lane, TTL, commit bound).

        `deadline_s` is the caller's deadline on the monotonic clock (0: none).
        """
        config = self._config
        check_id("vehicle_id", request.vehicle_id)
        if not NAME_PATTERN.fullmatch(request.name):
            raise InvalidArgument(
                f"name must be 1-64 characters of a-z, 0-9 and _.- starting with a letter "
                f"(got {request.name[:80]!r})"
            )
        if len(request.payload) > config.max_payload_bytes:
            raise InvalidArgument(
                f"payload is {len(request.payload)} bytes; the limit is {config.max_payload_bytes}"
            )
        for what, key in (("idempotency_key", request.idempotency_key),
                          ("coalesce_key", request.coalesce_key)):  # fmt: skip
            if len(key.encode()) > KEY_MAX:
                raise InvalidArgument(f"{what} is longer than {KEY_MAX} bytes")
        policy = config.policy(request.name)
        lane: int = request.lane
        if lane == t.LANE_UNSPECIFIED:
            lane = policy.lane
        elif lane not in lanes.BY_VALUE:
            *others, last = [lanes.wire_name(row.value) for row in reversed(lanes.LANE_TABLE)]
            raise InvalidArgument(f"unknown lane {lane}; use {', '.join(others)} or {last}")
        elif lane > policy.lane and not caller.may_raise_lane:
            raise PermissionDenied(
                f"{request.name!r} runs on the {lanes.wire_name(policy.lane)} lane; raising it "
                f"to {lanes.wire_name(lane)} needs the admin scope"
            )
        max_ttl_s = config.ttl_limit_s(lane)
        ttl_ms = request.ttl_ms or int(min(policy.ttl_s, max_ttl_s) * 1000)
        if ttl_ms > max_ttl_s * 1000:
            raise InvalidArgument(
                f"ttl of {ttl_ms / 1000:g}s is above the {max_ttl_s:g}s allowed on the "
                f"{lanes.wire_name(lane)} lane"
            )
        if request.wait not in WAIT_MODES:
            raise InvalidArgument(f"unknown wait mode {request.wait}")
        commit_by_s = deadline_s
        if lane == lanes.CRITICAL:
            bound_s = time.monotonic() + config.critical_commit_wait_s
            commit_by_s = min(commit_by_s, bound_s) if commit_by_s else bound_s
        if commit_by_s and commit_by_s <= time.monotonic():
            raise DeadlineExceeded("the call's deadline leaves no time to make it durable")
        return NewCommand(
            vehicle_id=request.vehicle_id,
            name=request.name,
            payload=request.payload,
            lane=lane,
            ttl_ms=ttl_ms,
            idempotency_key=request.idempotency_key,
            sender=caller.name,
            coalesce_key=request.coalesce_key,
            commit_by_s=commit_by_s,
        )

    async def send(
        self, request: svc.SendCommandRequest, caller: Caller, deadline_s: float
    ) -> svc.SendCommandResponse:
        item = self.new_command(request, caller, deadline_s)
        wait_s = (request.wait_timeout_ms / 1000) or self._config.default_wait_timeout_s
        if wait_s > self._config.max_wait_timeout_s:
            raise InvalidArgument(f"wait_timeout_ms is above {self._config.max_wait_timeout_s}s")
        self.check_queue_budget(item.lane)
        async with self._admission.slot(item.lane, vehicle_id=item.vehicle_id):
            (result,) = await self._dispatcher.submit([item])
        if isinstance(result, BrokerError):
            raise result
        response = svc.SendCommandResponse(command=result.command, deduplicated=result.deduplicated)
        if request.wait == svc.WAIT_NONE:
            return response
        wanted = TERMINAL if request.wait == svc.WAIT_RESULT else DELIVERED_OR_LATER
        command, timed_out = await self.wait(result.command, wanted, wait_s)
        response.command.CopyFrom(command)
        response.wait_timed_out = timed_out
        return response

    def check_queue_budget(self, lane: int) -> None:
        """Degrade by lane as the durable queue fills (each lane is refused past its
        fraction of the budget: lanes.Lane.queue_budget). Short of disk or map room,
        every lane is refused (critical last)."""
        problem = self._store.space_problem(critical=lane == lanes.CRITICAL)
        if problem is not None:
            raise StoreUnavailable(
                f"new commands are refused: {problem}; nothing accepted is lost",
                retry_after_ms=retry_hint_ms(2.0, 10.0),
            )
        budget = self._config.durable_queue_budget
        pending = self._dispatcher.pending_total
        if pending < budget * lanes.BY_VALUE[lane].queue_budget:
            return
        raise Overloaded(
            f"the durable queue holds {pending} commands (budget {budget}); "
            f"{lanes.wire_name(lane)} commands are refused until it drains",
            retry_after_ms=int(random.uniform(500, 2000)),
        )

    async def wait(
        self, command: t.Command, wanted: frozenset[int], timeout_s: float
    ) -> tuple[t.Command, bool]:
        """Wait for `command` to reach a status in `wanted`; a timeout is an answer too."""
        if command.status in wanted:
            return command, False
        future = self._events.waiter(command.command_id, lambda c: c.status in wanted)
        try:
            # The status may have moved on between the store write and the waiter.
            current = self._dispatcher.current(command.vehicle_id, command.command_id)
            if current is None:  # no longer pending in memory: terminal, ask the store
                current = await self._store.get(command.command_id)
            if current.status in wanted:
                return current, False
            reached = await asyncio.wait_for(future, timeout_s)
            if reached is not None:
                return reached, False
            # Shutting down: answer now with where the command is (it is durable).
            latest = self._dispatcher.current(command.vehicle_id, command.command_id)
            return latest or current, True
        except TimeoutError:
            return await self._store.get(command.command_id), True
        finally:
            self._events.forget(command.command_id, future)

    async def send_batch(
        self, request: svc.SendCommandsRequest, caller: Caller, deadline_s: float
    ) -> svc.SendCommandsResponse:
        count = len(request.commands)
        if count == 0 or count > self._config.max_batch:
            raise InvalidArgument(
                f"a batch holds 1 to {self._config.max_batch} commands, not {count}"
            )
        # Items are built in place in the reply (a list handed to the constructor would be
        # copied item by item).
        response = svc.SendCommandsResponse()
        items = response.items
        valid: list[tuple[svc.SendCommandsItem, NewCommand]] = []
        take_quota = self._admission.take_critical_quota
        for sub in request.commands:
            slot = items.add()
            try:
                if sub.wait != svc.WAIT_NONE:
                    raise InvalidArgument("wait modes are not allowed in a batch; use SendCommand")
                item = self.new_command(sub, caller, deadline_s)
                self.check_queue_budget(item.lane)
                if item.lane == lanes.CRITICAL:
                    take_quota(item.vehicle_id)
                valid.append((slot, item))
            except BrokerError as exc:
                slot.error.code = exc.code
                slot.error.message = exc.message
        if not valid:
            return response
        # One durable write, admitted once, in the highest lane it carries.
        async with self._admission.slot(max(item.lane for _, item in valid)):
            results = await self._dispatcher.submit([item for _, item in valid])
        for (slot, _), result in zip(valid, results, strict=True):
            if isinstance(result, BrokerError):
                slot.error.code = result.code
                slot.error.message = result.message
            else:
                accepted = slot.accepted
                accepted.command.CopyFrom(result.command)
                accepted.command.ClearField("payload")  # keep replies small
                accepted.deduplicated = result.deduplicated
        return response

    # -- reading and canceling ------------------------------------------------------------------
    # Reads are admitted like commands (polling floods are shed before they can delay
    # an unlock's durable write): single reads on the interactive lane, listings on bulk.

    async def get(self, command_id: str) -> t.Command:
        command_id = check_command_id(command_id)
        async with self._admission.slot(lanes.INTERACTIVE):
            return await self._store.get(command_id)

    async def cancel(self, command_id: str) -> t.Command:
        return await self._dispatcher.cancel(check_command_id(command_id))

    async def list_commands(self, vehicle_id: str, limit: int) -> list[t.Command]:
        check_id("vehicle_id", vehicle_id)
        limit = limit or LIST_DEFAULT
        if limit > LIST_MAX:
            raise InvalidArgument(f"limit is at most {LIST_MAX}")
        async with self._admission.slot(lanes.BULK):
            return await self._store.list_vehicle(vehicle_id, limit=limit)

    async def watch(
        self,
        vehicle_ids: list[str],
        command_ids: list[str],
        *,
        ended: asyncio.Future[BrokerError] | None = None,
    ) -> AsyncIterator[t.Command]:
        """Status changes (`EventHub.watch`; `ended` ends the stream with its error)."""
        for vehicle_id in vehicle_ids:
            check_id("vehicle_ids", vehicle_id)
        if len(vehicle_ids) + len(command_ids) > WATCH_FILTER_MAX:
            raise InvalidArgument(
                f"watch at most {WATCH_FILTER_MAX} vehicles and commands in one stream"
            )
        async for command in self._events.watch(vehicle_ids, command_ids, ended=ended):
            yield command

    async def vehicle_state(self, vehicle_id: str) -> svc.VehicleState:
        check_id("vehicle_id", vehicle_id)
        async with self._admission.slot(lanes.INTERACTIVE):
            return await self._states.get(vehicle_id)
