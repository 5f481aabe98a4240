"""Two services with their own tokens on a real broker: neither can read, list, watch,
cancel or supersede the other's commands; fleet-wide scopes see further; a token limited
to some vehicles addresses no other."""

from __future__ import annotations

import asyncio

import pytest

from broker.sdk.client import BrokerClient, BrokerRpcError
from broker.storage.audit_log import read_audit
from broker.v1 import types_pb2 as t
from tests.conftest import eventually, session_keys
from tests.e2e.harness import Running


def client(running: Running, name: str, *scopes: str, **claims: object) -> BrokerClient:
    token = session_keys().service_token(*(scopes or ("send", "read")), name=name, **claims)
    return running.client(token=token)


async def refused(call: object) -> BrokerRpcError:
    with pytest.raises(BrokerRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def test_a_second_service_cannot_touch_the_first_ones_commands(running: Running) -> None:
    app, rogue = client(running, "fleet-app"), client(running, "rogue")
    sent = await app.send_command("car-1", "unlock", {"pin": "4711"}, coalesce_key="door")
    command_id = sent.command.command_id
    assert sent.command.sender == "service:fleet-app"

    for call in (rogue.get_command(command_id), rogue.cancel_command(command_id)):
        error = await refused(call)
        assert (error.code, error.message) == ("NOT_FOUND", f"no command '{command_id}'")
    # To the rogue it does not exist; the audit trail says what was tried.
    probes = await eventually(
        lambda: read_audit(running.broker.config.data_dir / "audit", actor="service:rogue"),
        lambda lines: len(lines) >= 2,
        what="the rogue's probes in the audit trail",
    )
    assert {(p["action"], p["outcome"], p["method"], p["reason"]) for p in probes} == {
        ("deny", "NOT_FOUND", "GetCommand", "another sender's command"),
        ("deny", "NOT_FOUND", "CancelCommand", "another sender's command"),
    }
    assert await rogue.list_commands("car-1") == []
    # Its coalesce key is its own: the rogue's same key supersedes nothing of the app's.
    await rogue.send_command("car-1", "unlock", coalesce_key="door")
    assert (await app.get_command(command_id)).status == t.QUEUED
    assert [c.command_id for c in await app.list_commands("car-1")] == [command_id]

    auditor = client(running, "auditor", "read:fleet")
    assert (await auditor.get_command(command_id)).payload == b'{"pin":"4711"}'
    assert len(await auditor.list_commands("car-1")) == 2
    assert (await refused(auditor.cancel_command(command_id))).code == "PERMISSION_DENIED"
    reader = client(running, "reader", "send", "read:fleet")  # reading all is not acting
    assert (await refused(reader.cancel_command(command_id))).code == "NOT_FOUND"
    ops = client(running, "ops", "admin")
    assert (await ops.cancel_command(command_id)).status == t.CANCELED


async def test_watches_are_scoped_to_the_callers_commands(running: Running) -> None:
    app, rogue = client(running, "fleet-app"), client(running, "rogue")
    error = await refused(rogue.watch_commands().__anext__())
    assert (error.code, "read:fleet" in error.message) == ("PERMISSION_DENIED", True)

    async def first(watcher: BrokerClient, *vehicles: str) -> t.Command:
        async for command in watcher.watch_commands(vehicles):
            return command
        raise AssertionError("the watch ended")

    rogue_watch = asyncio.create_task(first(rogue, "car-1"))
    fleet_watch = asyncio.create_task(first(client(running, "auditor", "read:fleet")))
    await eventually(lambda: running.broker.events.watcher_count == 2, what="two watches")
    sent = await app.send_command("car-1", "unlock")
    assert (await asyncio.wait_for(fleet_watch, 5)).command_id == sent.command.command_id
    await asyncio.sleep(0.2)  # the rogue's watch had every chance to see it
    assert not rogue_watch.done()
    rogue_watch.cancel()


async def test_a_token_limited_to_some_vehicles_addresses_no_other(running: Running) -> None:
    acme = client(running, "acme", vehicles=["acme-*"])
    assert (await acme.send_command("acme-1", "unlock")).command.vehicle_id == "acme-1"
    for call in (
        acme.send_command("car-1", "unlock"),
        acme.list_commands("car-1"),
        acme.get_vehicle_state("car-1"),
    ):
        error = await refused(call)
        assert (error.code, error.message) == (
            "PERMISSION_DENIED",
            "service:acme may not address vehicle 'car-1'",
        )
