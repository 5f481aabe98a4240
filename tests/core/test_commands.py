"""What CommandService does, without gRPC: validation, lane and TTL policy, the durable
queue budget by lane, waiting, batches — over the in-memory store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from broker.core.admission import Overloaded
from broker.core.commands import Caller
from broker.core.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t
from tests.conftest import eventually
from tests.core.conftest import Desk, request

APP = Caller("service:app")
ADMIN = Caller("service:ops", may_raise_lane=True)


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"vehicle_id": "bad id"}, InvalidArgument, "vehicle_id must be 1-64"),
        ({"name": "Unlock"}, InvalidArgument, "name must be"),
        ({"payload": b"x" * 16385}, InvalidArgument, "the limit is 16384"),
        ({"idempotency_key": "k" * 129}, InvalidArgument, "idempotency_key is longer"),
        ({"coalesce_key": "k" * 129}, InvalidArgument, "coalesce_key is longer"),
        ({"lane": 9}, InvalidArgument, "unknown lane 9; use BULK, INTERACTIVE or CRITICAL"),
        ({"name": "climate", "lane": t.CRITICAL}, PermissionDenied, "needs the admin scope"),
        ({"ttl_ms": 3_600_001}, InvalidArgument, "above the 3600s allowed on the CRITICAL"),
        ({"wait": 7}, InvalidArgument, "unknown wait mode 7"),
    ],
)
def test_bad_requests_are_refused_with_what_is_wrong(
    tmp_path: Path, fields: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Desk(tmp_path).commands.new_command(request(**fields), APP, 0.0)


def test_policy_fills_in_lane_and_ttl_and_scopes_keys_to_the_caller(tmp_path: Path) -> None:
    commands = Desk(tmp_path).commands
    unlock = commands.new_command(request(idempotency_key="k"), APP, 0.0)
    assert (unlock.lane, unlock.ttl_ms, unlock.sender) == (t.CRITICAL, 60_000, APP.name)
    assert unlock.commit_by_s > time.monotonic()  # critical: bounded wait for durability
    config = commands.new_command(request(name="config"), APP, 0.0)
    assert (config.lane, config.ttl_ms, config.commit_by_s) == (t.BULK, 86_400_000, 0.0)
    # a lane may be lowered by anyone, raised only by a caller allowed to
    assert commands.new_command(request(lane=t.BULK), APP, 0.0).lane == t.BULK
    assert commands.new_command(request(name="climate", lane=t.CRITICAL), ADMIN, 0.0).lane == (
        t.CRITICAL
    )
    with pytest.raises(DeadlineExceeded):
        commands.new_command(request(), APP, time.monotonic() - 1)


async def test_the_durable_queue_budget_refuses_bulk_first_and_critical_never(
    tmp_path: Path,
) -> None:
    desk = Desk(tmp_path, durable_queue_budget=10)
    desk.store.start(asyncio.get_running_loop())
    for n in range(8):  # 80% of the budget: bulk's share
        await desk.commands.send(request(vehicle_id=f"car-{n}", name="config"), APP, 0.0)
    with pytest.raises(Overloaded, match="BULK commands are refused"):
        await desk.commands.send(request(name="config"), APP, 0.0)
    for n in range(2):
        await desk.commands.send(request(vehicle_id=f"car-{n}", name="climate"), APP, 0.0)
    with pytest.raises(Overloaded, match="INTERACTIVE commands are refused"):
        await desk.commands.send(request(name="climate"), APP, 0.0)
    sent = await desk.commands.send(request(vehicle_id="car-9"), APP, 0.0)
    assert sent.command.status == t.QUEUED  # critical: never refused for depth
    await desk.store.close()


async def test_a_wait_for_an_offline_car_times_out_with_the_current_status(desk: Desk) -> None:
    sent = await desk.commands.send(request(wait=svc.WAIT_DELIVERED, wait_timeout_ms=50), APP, 0.0)
    assert sent.wait_timed_out
    assert sent.command.status == t.QUEUED


async def test_a_wait_ends_when_the_status_is_reached(desk: Desk) -> None:
    waiting = asyncio.create_task(
        desk.commands.send(request(wait=svc.WAIT_RESULT, wait_timeout_ms=5000), APP, 0.0)
    )
    (command,) = await eventually(
        lambda: desk.commands.list_commands("car-1", 0, APP), what="the command to be listed"
    )
    await desk.commands.cancel(command.command_id, APP)
    reached = await asyncio.wait_for(waiting, 5)
    assert not reached.wait_timed_out
    assert reached.command.status == t.CANCELED


async def test_a_batch_answers_each_item_in_place(desk: Desk) -> None:
    batch = svc.SendCommandsRequest(
        commands=[
            request(vehicle_id="car-1"),
            request(vehicle_id="bad id"),
            request(vehicle_id="car-2", wait=svc.WAIT_RESULT),
            request(vehicle_id="car-3", name="climate", payload=b"{}"),
        ]
    )
    answer = await desk.commands.send_batch(batch, APP, 0.0)
    kinds = [item.WhichOneof("outcome") for item in answer.items]
    assert kinds == ["accepted", "error", "error", "accepted"]
    assert answer.items[1].error.code == "INVALID_ARGUMENT"
    assert "not allowed in a batch" in answer.items[2].error.message
    assert answer.items[3].accepted.command.payload == b""  # replies are kept small
    with pytest.raises(InvalidArgument, match="a batch holds 1 to 1000 commands, not 0"):
        await desk.commands.send_batch(svc.SendCommandsRequest(), APP, 0.0)


async def test_reads_check_ids_before_asking_the_store(desk: Desk) -> None:
    with pytest.raises(InvalidArgument, match="command_id must be 1-64"):
        await desk.commands.get("", APP)
    with pytest.raises(NotFound, match="no command 'no such id'"):
        await desk.commands.get("no such id", APP)
    with pytest.raises(NotFound):
        await desk.commands.cancel("0123", APP)
    with pytest.raises(InvalidArgument, match="limit is at most 1000"):
        await desk.commands.list_commands("car-1", 1001, APP)
    with pytest.raises(InvalidArgument, match="watch at most 10000"):
        async for _ in desk.commands.watch(["car-1"] * 10_001, [], APP):
            pass
