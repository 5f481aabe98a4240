"""Who may do what to which car, in the domain: a command belongs to its sender; fleet-wide
scopes see further; a caller limited to some vehicles addresses no other; a signed
request's body replaces its fields."""

from __future__ import annotations

import asyncio

import pytest

from broker.core.clock import now_ms
from broker.core.commands import Caller
from broker.core.errors import InvalidArgument, NotFound, PermissionDenied
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t
from tests.conftest import eventually
from tests.core.conftest import Desk, request

APP = Caller("service:app")
ROGUE = Caller("service:rogue")
AUDITOR = Caller("service:auditor", reads_fleet=True)
OPS = Caller("service:ops", may_raise_lane=True, reads_fleet=True, acts_fleet=True)
ACME = Caller("service:acme", vehicles=("acme-*", "demo-1"))


async def send(desk: Desk, caller: Caller, **fields: object) -> t.Command:
    return (await desk.commands.send(request(**fields), caller, 0.0)).command


async def test_another_senders_command_cannot_be_read_or_canceled(desk: Desk) -> None:
    mine = await send(desk, APP, payload=b'{"pin":"4711"}')
    for attempt in (desk.commands.get, desk.commands.cancel):
        with pytest.raises(NotFound, match=f"no command '{mine.command_id}'"):
            await attempt(mine.command_id, ROGUE)  # exactly as if it did not exist
    assert (await desk.commands.get(mine.command_id, APP)).status == t.QUEUED
    assert (await desk.commands.get(mine.command_id, AUDITOR)).payload == b'{"pin":"4711"}'
    assert await desk.commands.list_commands("car-1", 0, ROGUE) == []
    assert [c.command_id for c in await desk.commands.list_commands("car-1", 0, APP)] == [
        mine.command_id
    ]
    assert len(await desk.commands.list_commands("car-1", 0, AUDITOR)) == 1
    with pytest.raises(NotFound):
        await desk.commands.cancel(mine.command_id, AUDITOR)  # reading is not acting
    assert (await desk.commands.cancel(mine.command_id, OPS)).status == t.CANCELED


async def test_a_coalesce_key_supersedes_only_the_senders_own_command(desk: Desk) -> None:
    mine = await send(desk, APP, coalesce_key="door")
    await send(desk, ROGUE, coalesce_key="door")
    assert (await desk.commands.get(mine.command_id, APP)).status == t.QUEUED
    await send(desk, APP, coalesce_key="door")
    assert (await desk.commands.get(mine.command_id, APP)).status == t.SUPERSEDED


async def test_a_watch_shows_only_what_its_caller_may_see(desk: Desk) -> None:
    with pytest.raises(PermissionDenied, match="needs the read:fleet scope"):
        async for _ in desk.commands.watch([], [], APP):
            pass
    seen: dict[str, list[str]] = {"app": [], "rogue": [], "auditor": []}

    async def watch(name: str, caller: Caller, vehicles: list[str]) -> None:
        async for command in desk.commands.watch(vehicles, [], caller):
            seen[name].append(command.sender)

    tasks = [
        asyncio.create_task(watch("app", APP, ["car-1"])),
        asyncio.create_task(watch("rogue", ROGUE, ["car-1"])),
        asyncio.create_task(watch("auditor", AUDITOR, [])),
    ]
    await eventually(lambda: desk.events.watcher_count == 3, what="three watchers")
    mine = await send(desk, APP)
    await desk.commands.cancel(mine.command_id, APP)
    await send(desk, ROGUE, vehicle_id="car-2")
    await eventually(lambda: len(seen["auditor"]) == 3, what="the auditor to see all three")
    for task in tasks:
        task.cancel()
    assert seen["app"] == ["service:app", "service:app"]  # its create and cancel
    assert seen["rogue"] == []
    assert sorted(seen["auditor"]) == ["service:app", "service:app", "service:rogue"]


async def test_a_caller_limited_to_some_vehicles_addresses_no_other(desk: Desk) -> None:
    assert (await send(desk, ACME, vehicle_id="acme-7")).vehicle_id == "acme-7"
    assert (await send(desk, ACME, vehicle_id="demo-1")).vehicle_id == "demo-1"
    for vehicle in ("demo-10", "other-acme-1", "acme"):
        with pytest.raises(PermissionDenied, match=f"may not address vehicle '{vehicle}'"):
            await send(desk, ACME, vehicle_id=vehicle)
    with pytest.raises(PermissionDenied):
        await desk.commands.list_commands("car-1", 0, ACME)
    with pytest.raises(PermissionDenied):
        await desk.commands.vehicle_state("car-1", ACME)
    with pytest.raises(PermissionDenied):
        async for _ in desk.commands.watch(["acme-1", "car-1"], [], ACME):
            pass


def signed_request(**body_fields: object) -> svc.SendCommandRequest:
    now = now_ms()
    body = t.CommandBody(
        key_id=b"k" * 8,
        vehicle_id="car-1",
        command_id="0123456789abcdef01234567",
        name="unlock",
        payload=b"{}",
        issued_at_ms=now,
        expires_at_ms=now + 30_000,
    )
    for name, value in body_fields.items():
        setattr(body, name, value)
    return svc.SendCommandRequest(
        signed=t.SignedCommand(body=body.SerializeToString(), signature=b"s" * 64)
    )


async def test_a_signed_request_takes_its_fields_from_the_body(desk: Desk) -> None:
    item = desk.commands.new_command(signed_request(), APP, 0.0)
    assert (item.vehicle_id, item.name, item.command_id) == (
        "car-1",
        "unlock",
        "0123456789abcdef01234567",
    )
    assert 29_000 < item.ttl_ms <= 30_000 and item.signed is not None
    once = signed_request()
    sent = await desk.commands.send(once, APP, 0.0)
    again = await desk.commands.send(once, APP, 0.0)
    assert again.deduplicated and again.command.command_id == sent.command.command_id
    assert again.command.signed == sent.command.signed


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"body": b"\xff"}, "not a CommandBody"),
        ({"body": t.CommandBody(name="a").SerializeToString() * 2}, "not a canonical"),
        ({"signature": b""}, "needs signed.signature"),
        ({"vehicle_id": "car-2"}, "vehicle_id differs from the signed body's"),
        ({"ttl_ms": 1000}, "ttl_ms must be 0"),
        ({"expires_at_ms": 1}, "has expired"),
        ({"issued_at_ms": 2**50}, "issued in the future"),
        ({"command_id": "no spaces"}, "signed command_id must be"),
        ({"expires_at_ms": 2**50}, "above the 3600s allowed"),
    ],
)
async def test_a_signed_request_that_says_something_else_is_refused(
    desk: Desk, change: dict[str, object], match: str
) -> None:
    body_fields = {k: v for k, v in change.items() if k in ("expires_at_ms", "issued_at_ms")}
    if "command_id" in change:
        body_fields["command_id"] = change["command_id"]
    sent = signed_request(**body_fields)
    if "body" in change:
        sent.signed.body = change["body"]  # type: ignore[assignment]
    if "signature" in change:
        sent.signed.signature = change["signature"]  # type: ignore[assignment]
    for name in ("vehicle_id", "ttl_ms"):
        if name in change:
            setattr(sent, name, change[name])
    with pytest.raises(InvalidArgument, match=match):
        desk.commands.new_command(sent, APP, 0.0)


async def test_a_signed_request_outside_the_callers_vehicles_is_refused(desk: Desk) -> None:
    with pytest.raises(PermissionDenied):
        desk.commands.new_command(signed_request(), ACME, 0.0)
