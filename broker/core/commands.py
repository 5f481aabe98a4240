"""What CommandService does, without gRPC: validate a request, apply the command's
policy (lane, TTL), admit it, make it durable, and wait for the status asked for.

Who may do what: a command belongs to its sender (`Command.sender`). A caller sees,
watches and cancels only its own commands unless it holds a fleet-wide scope
(`Caller.reads_fleet`, `Caller.acts_fleet`); another sender's command answers NOT_FOUND,
exactly as a command that does not exist, so ids cannot be probed. A caller limited to
some vehicles (`Caller.vehicles`, a token's `vehicles` claim) can address no other.

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
from broker.core import audit, lanes
from broker.core.admission import Admission, Overloaded
from broker.core.clock import now_ms
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
from broker.core.quotas import QUEUE_BUDGET, STORE_SPACE, CallerLimits, Refusals
from broker.core.state import VehicleStates
from broker.core.store import Created, NewCommand, Store
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
#: how far in the future a signed command's issued-at may be (the sender's clock ahead)
SIGNED_CLOCK_SKEW_MS = 60_000


class Caller(NamedTuple):
    """Who calls, as the domain needs to know it."""

    #: it owns the commands it sends; its idempotency and coalesce keys never match
    #: another caller's
    name: str
    #: may ask for a higher lane than the command's own (admin or dev)
    may_raise_lane: bool = False
    #: reads and watches every sender's commands (read:fleet, admin or dev)
    reads_fleet: bool = False
    #: cancels every sender's commands (admin or dev)
    acts_fleet: bool = False
    #: the vehicles it may address: exact ids or prefixes ending in `*`; None: all
    vehicles: tuple[str, ...] | None = None

    def may_address(self, vehicle_id: str) -> bool:
        if self.vehicles is None:
            return True
        return any(
            vehicle_id.startswith(p[:-1]) if p.endswith("*") else vehicle_id == p
            for p in self.vehicles
        )

    def check_vehicle(self, vehicle_id: str) -> None:
        if not self.may_address(vehicle_id):
            raise PermissionDenied(f"{self.name} may not address vehicle {vehicle_id!r}")

    def sees(self, command: t.Command) -> bool:
        """Whether it may read or watch `command`."""
        return (self.reads_fleet or command.sender == self.name) and self.may_address(
            command.vehicle_id
        )

    def may_cancel(self, command: t.Command) -> bool:
        return (self.acts_fleet or command.sender == self.name) and self.may_address(
            command.vehicle_id
        )


def hidden(command_id: str) -> NotFound:
    """Another sender's command looks exactly like one that does not exist."""
    return NotFound(f"no command {command_id[:80]!r}")


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
        raise hidden(command_id)
    return command_id


def signed_body(request: svc.SendCommandRequest) -> t.CommandBody:
    """The body of a signed request, which replaces the request's own fields. The
    broker does not check the signature (it holds no sender key: the car does); it checks
    that the request says nothing the body does not."""
    envelope = request.signed
    try:
        body = t.CommandBody.FromString(envelope.body)
    except Exception:  # protobuf's DecodeError, or worse for hostile bytes
        raise InvalidArgument("signed.body is not a CommandBody") from None
    if body.SerializeToString() != envelope.body:  # what the car would refuse
        raise InvalidArgument(
            "signed.body is not a canonical CommandBody (each field once, in number order, "
            "none unknown or at its default)"
        )
    if not envelope.signature or not body.key_id:
        raise InvalidArgument("a signed command needs signed.signature and body.key_id")
    for what in ("vehicle_id", "name", "payload"):
        value = getattr(request, what)
        if value and value != getattr(body, what):
            raise InvalidArgument(f"{what} differs from the signed body's (leave it empty)")
    if request.ttl_ms:
        raise InvalidArgument("ttl_ms must be 0 for a signed command: its expiry is signed")
    check_id("signed command_id", body.command_id)
    return body


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
        trail: audit.AuditTrail | None = None,
        *,
        callers: CallerLimits | None = None,
        refusals: Refusals | None = None,
    ) -> None:
        self._refusals = refusals if refusals is not None else Refusals()
        self._callers = callers if callers is not None else CallerLimits(refusals=self._refusals)
        self._config = config
        #: who sent, canceled, superseded and read what (refusals are recorded at the
        #: gRPC edge, broker/api/handlers.py)
        self._audit = audit.NullAuditTrail() if trail is None else trail
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
        body = signed_body(request) if request.HasField("signed") else None
        vehicle_id, name, payload = (
            (request.vehicle_id, request.name, request.payload)
            if body is None
            else (body.vehicle_id, body.name, body.payload)
        )
        check_id("vehicle_id", vehicle_id)
        caller.check_vehicle(vehicle_id)
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidArgument(
                f"name must be 1-64 characters of a-z, 0-9 and _.- starting with a letter "
                f"(got {name[:80]!r})"
            )
        if len(payload) > config.max_payload_bytes:
            raise InvalidArgument(
                f"payload is {len(payload)} bytes; the limit is {config.max_payload_bytes}"
            )
        for what, key in (("idempotency_key", request.idempotency_key),
                          ("coalesce_key", request.coalesce_key)):  # fmt: skip
            if len(key.encode()) > KEY_MAX:
                raise InvalidArgument(f"{what} is longer than {KEY_MAX} bytes")
        policy = config.policy(name)
        lane: int = request.lane
        if lane == t.LANE_UNSPECIFIED:
            lane = policy.lane
        elif lane not in lanes.BY_VALUE:
            *others, last = [lanes.wire_name(row.value) for row in reversed(lanes.LANE_TABLE)]
            raise InvalidArgument(f"unknown lane {lane}; use {', '.join(others)} or {last}")
        elif lane > policy.lane and not caller.may_raise_lane:
            raise PermissionDenied(
                f"{name!r} runs on the {lanes.wire_name(policy.lane)} lane; raising it "
                f"to {lanes.wire_name(lane)} needs the admin scope"
            )
        max_ttl_s = config.ttl_limit_s(lane)
        ttl_ms = request.ttl_ms or int(min(policy.ttl_s, max_ttl_s) * 1000)
        if body is not None:  # the sender signed its expiry
            now = now_ms()
            ttl_ms = body.expires_at_ms - now
            if ttl_ms <= 0:
                raise InvalidArgument("the signed command has expired")
            if body.issued_at_ms > now + SIGNED_CLOCK_SKEW_MS:
                raise InvalidArgument("the signed command was issued in the future")
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
            vehicle_id=vehicle_id,
            name=name,
            payload=payload,
            lane=lane,
            ttl_ms=ttl_ms,
            idempotency_key=request.idempotency_key,
            sender=caller.name,
            coalesce_key=request.coalesce_key,
            commit_by_s=commit_by_s,
            signed=None if body is None else request.signed,
            command_id="" if body is None else body.command_id,
            expires_at_ms=0 if body is None else body.expires_at_ms,
        )

    async def send(
        self, request: svc.SendCommandRequest, caller: Caller, deadline_s: float
    ) -> svc.SendCommandResponse:
        item = self.new_command(request, caller, deadline_s)
        wait_s = (request.wait_timeout_ms / 1000) or self._config.default_wait_timeout_s
        if wait_s > self._config.max_wait_timeout_s:
            raise InvalidArgument(f"wait_timeout_ms is above {self._config.max_wait_timeout_s}s")
        self.check_queue_budget(item.lane)
        self._callers.check_send(caller.name, item.lane)
        async with self._admission.slot(item.lane, vehicle_id=item.vehicle_id, caller=caller.name):
            (result,) = await self._dispatcher.submit([item])
        if isinstance(result, BrokerError):
            raise result
        if result.deduplicated and item.lane == lanes.CRITICAL:
            self._admission.refund_critical_quota(item.vehicle_id, caller.name)
        self._record_sent(caller, result)
        response = svc.SendCommandResponse(command=result.command, deduplicated=result.deduplicated)
        if request.wait == svc.WAIT_NONE:
            return response
        wanted = TERMINAL if request.wait == svc.WAIT_RESULT else DELIVERED_OR_LATER
        command, timed_out = await self.wait(result.command, wanted, wait_s)
        response.command.CopyFrom(command)
        response.wait_timed_out = timed_out
        return response

    def _record_sent(self, caller: Caller, result: Created) -> None:
        command = result.command
        record = self._audit.record
        record(
            audit.SEND,
            caller.name,
            outcome=audit.DEDUPLICATED if result.deduplicated else audit.OK,
            vehicle_id=command.vehicle_id,
            command_id=command.command_id,
            name=command.name,
            reason="signed" if command.HasField("signed") else "",
        )
        for older in result.superseded:
            record(
                audit.SUPERSEDE,
                caller.name,
                vehicle_id=older.vehicle_id,
                command_id=older.command_id,
                name=older.name,
                reason=f"by {command.command_id}",
            )

    def _hidden(self, command_id: str, caller: Caller, method: str) -> NotFound:
        """Refuse another sender's command as if it did not exist, and record it."""
        self._audit.deny(
            caller.name, "NOT_FOUND", method, command_id=command_id,
            reason="another sender's command",
        )  # fmt: skip
        return hidden(command_id)

    def check_queue_budget(self, lane: int) -> None:
        """Degrade by lane as the durable queue fills (each lane is refused past its
        fraction of the budget: lanes.Lane.queue_budget). Short of disk or map room,
        every lane is refused (critical last)."""
        problem = self._store.space_problem(critical=lane == lanes.CRITICAL)
        if problem is not None:
            self._refusals.count(STORE_SPACE)
            raise StoreUnavailable(
                f"new commands are refused: {problem}; nothing accepted is lost",
                retry_after_ms=retry_hint_ms(2.0, 10.0),
            )
        budget = self._config.durable_queue_budget
        pending = self._dispatcher.pending_total
        if pending < budget * lanes.BY_VALUE[lane].queue_budget:
            return
        self._refusals.count(QUEUE_BUDGET)
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
        self._callers.check_batch(caller.name, count)
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
                self._callers.check_send(caller.name, item.lane, ahead=len(valid))
                if item.lane == lanes.CRITICAL:
                    take_quota(item.vehicle_id, caller.name)
                valid.append((slot, item))
            except BrokerError as exc:
                slot.error.code = exc.code
                slot.error.message = exc.message
        if not valid:
            return response
        # One durable write, admitted once, in the highest lane it carries.
        async with self._admission.slot(max(item.lane for _, item in valid)):
            results = await self._dispatcher.submit([item for _, item in valid])
        for (slot, item), result in zip(valid, results, strict=True):
            if isinstance(result, BrokerError):
                slot.error.code = result.code
                slot.error.message = result.message
            else:
                if result.deduplicated and item.lane == lanes.CRITICAL:
                    self._admission.refund_critical_quota(item.vehicle_id, caller.name)
                self._record_sent(caller, result)
                accepted = slot.accepted
                accepted.command.CopyFrom(result.command)
                accepted.command.ClearField("payload")  # keep replies small
                accepted.deduplicated = result.deduplicated
        return response

    # -- reading and canceling ------------------------------------------------------------------
    # Reads are admitted like commands (polling floods are shed before they can delay
    # an unlock's durable write): single reads on the interactive lane, listings on bulk.

    async def get(self, command_id: str, caller: Caller) -> t.Command:
        command_id = check_command_id(command_id)
        async with self._admission.slot(lanes.INTERACTIVE):
            command = await self._store.get(command_id)
        if not caller.sees(command):
            raise self._hidden(command_id, caller, "GetCommand")
        self._audit.record(
            audit.GET, caller.name, vehicle_id=command.vehicle_id, command_id=command_id,
            name=command.name,
        )  # fmt: skip
        return command

    async def cancel(self, command_id: str, caller: Caller) -> t.Command:
        command_id = check_command_id(command_id)
        if not caller.acts_fleet:  # look first: never cancel another sender's command
            async with self._admission.slot(lanes.INTERACTIVE):
                command = await self._store.get(command_id)
            if not caller.may_cancel(command):
                raise self._hidden(command_id, caller, "CancelCommand")
        try:
            canceled = await self._dispatcher.cancel(command_id)
        except BrokerError as exc:  # already sent (FAILED_PRECONDITION), or gone
            self._audit.record(
                audit.CANCEL, caller.name, outcome=exc.code, command_id=command_id,
                reason=exc.message,
            )  # fmt: skip
            raise
        self._audit.record(
            audit.CANCEL, caller.name, vehicle_id=canceled.vehicle_id, command_id=command_id,
            name=canceled.name,
        )  # fmt: skip
        return canceled

    async def list_commands(self, vehicle_id: str, limit: int, caller: Caller) -> list[t.Command]:
        check_id("vehicle_id", vehicle_id)
        caller.check_vehicle(vehicle_id)
        limit = limit or LIST_DEFAULT
        if limit > LIST_MAX:
            raise InvalidArgument(f"limit is at most {LIST_MAX}")
        sender = None if caller.reads_fleet else caller.name
        async with self._admission.slot(lanes.BULK):
            listed = await self._store.list_vehicle(vehicle_id, limit=limit, sender=sender)
        self._audit.record(
            audit.LIST, caller.name, vehicle_id=vehicle_id, reason=f"{len(listed)} commands"
        )
        return listed

    async def watch(
        self,
        vehicle_ids: list[str],
        command_ids: list[str],
        caller: Caller,
        *,
        ended: asyncio.Future[BrokerError] | None = None,
    ) -> AsyncIterator[t.Command]:
        """Status changes of the commands `caller` may see (`EventHub.watch`; `ended`
        ends the stream with its error). A watch of the whole fleet (no filter) needs a
        fleet-wide scope."""
        for vehicle_id in vehicle_ids:
            check_id("vehicle_ids", vehicle_id)
            caller.check_vehicle(vehicle_id)
        if len(vehicle_ids) + len(command_ids) > WATCH_FILTER_MAX:
            raise InvalidArgument(
                f"watch at most {WATCH_FILTER_MAX} vehicles and commands in one stream"
            )
        if not vehicle_ids and not command_ids and not caller.reads_fleet:
            raise PermissionDenied(
                f"{caller.name} may watch its own vehicles or commands only; a watch of "
                "the whole fleet needs the read:fleet scope"
            )
        visible = None if caller.reads_fleet and caller.vehicles is None else caller.sees
        with self._callers.watching(caller.name):
            self._audit.record(
                audit.WATCH,
                caller.name,
                vehicle_id=vehicle_ids[0] if len(vehicle_ids) == 1 else "",
                command_id=command_ids[0] if len(command_ids) == 1 else "",
                reason=f"{len(vehicle_ids)} vehicles, {len(command_ids)} commands"
                if vehicle_ids or command_ids
                else "the whole fleet",
            )
            async for command in self._events.watch(
                vehicle_ids, command_ids, visible=visible, ended=ended
            ):
                yield command

    async def vehicle_state(self, vehicle_id: str, caller: Caller) -> svc.VehicleState:
        check_id("vehicle_id", vehicle_id)
        caller.check_vehicle(vehicle_id)
        async with self._admission.slot(lanes.INTERACTIVE):
            state = await self._states.get(vehicle_id)
        self._audit.record(audit.STATE, caller.name, vehicle_id=vehicle_id)
        return state
