"""The audit trail on a real broker: every refusal at the gRPC edge is a `deny` line with
its actor (or peer address), method and status; commands and reads are lines with their
actor; `broker audit` reads the files while the broker runs; shutdown writes the rest."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.sdk.client import BrokerClient, BrokerRpcError
from broker.security.keys import generate_key_pair, load_private_key
from broker.security.tokens import TokenMinter, issue_token
from broker.storage.audit_log import read_audit, verify_audit
from broker.testing import BrokerProcess, clean_env
from tests.conftest import eventually, session_keys
from tests.e2e.harness import Running


def folder(running: Running) -> Path:
    return running.broker.config.data_dir / "audit"


async def audit_lines(
    running: Running, accept: Callable[[list[dict[str, Any]]], Any], **filters: Any
) -> list[dict[str, Any]]:
    """The broker's audit records with `filters`, once `accept(records)` holds (they
    reach the files within a flush interval)."""
    return await eventually(
        lambda: read_audit(folder(running), **filters),
        accept,
        what=f"audit lines {filters}",
        timeout_s=5,
    )


async def refused(call: Any) -> BrokerRpcError:
    with pytest.raises(BrokerRpcError) as info:
        await call
    return info.value


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", "audit", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env=clean_env({}),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_call_without_a_token_is_a_denial_by_its_peer_address(running: Running) -> None:
    async with BrokerClient(running.target) as anonymous:
        error = await refused(anonymous.send_command("car-1", "unlock"))
    assert error.code == "UNAUTHENTICATED"
    (line,) = await audit_lines(running, bool, action="deny")
    assert line["actor"] == "peer:127.0.0.1"
    assert (line["method"], line["outcome"]) == ("SendCommand", "UNAUTHENTICATED")
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert "authorization" in line["reason"]


async def test_a_token_that_does_not_verify_names_no_one(running: Running, tmp_path: Path) -> None:
    """The claims of a token signed by an unknown key are the caller's word: the line
    names the peer, never the forged service."""
    private, _ = generate_key_pair(tmp_path / "rogue", "rogue")
    forged = issue_token(load_private_key(private), service="fleet-admin", scopes=["admin"])
    error = await refused(running.client(token=forged).get_command("c-1"))
    assert error.code == "UNAUTHENTICATED"
    (line,) = await audit_lines(running, bool, action="deny")
    assert line["actor"] == "peer:127.0.0.1" and "fleet-admin" not in json.dumps(line)
    assert forged not in json.dumps(line) and forged[:40] not in json.dumps(line)


async def test_a_missing_scope_is_a_denial_by_the_service(running: Running) -> None:
    reader = running.client("read")
    error = await refused(reader.send_command("car-1", "unlock", payload=b'{"pin":"4711"}'))
    assert error.code == "PERMISSION_DENIED"
    (line,) = await audit_lines(running, bool, action="deny")
    assert (line["actor"], line["method"], line["outcome"]) == (
        "service:tests", "SendCommand", "PERMISSION_DENIED"
    )  # fmt: skip
    assert "'send'" in line["reason"]
    assert not any("4711" in p.read_text() for p in folder(running).iterdir())  # no payload


async def test_a_car_refused_at_connect_is_a_denial(
    running: Running, cars: Callable[..., Any]
) -> None:
    bad = running.agent("car-1", token="v2.not-a-token.at-all")
    task = asyncio.create_task(bad.run())
    impostor = running.agent("car-2", token=session_keys().vehicle_token("car-1"))
    task2 = asyncio.create_task(impostor.run())
    try:
        lines = await audit_lines(
            running, lambda found: len({r["outcome"] for r in found}) == 2, action="deny"
        )
    finally:
        for t in (task, task2):
            t.cancel()
        await asyncio.gather(task, task2, return_exceptions=True)
    by_outcome = {r["outcome"]: r for r in lines}
    anonymous = by_outcome["UNAUTHENTICATED"]
    assert (anonymous["actor"], anonymous["method"]) == ("peer:127.0.0.1", "Connect")
    impostor_line = by_outcome["PERMISSION_DENIED"]
    assert (impostor_line["actor"], impostor_line["method"]) == ("vehicle:car-1", "Connect")
    assert "car-2" in impostor_line["reason"]


async def test_a_car_the_stream_gate_defers_is_a_denial_with_its_vehicle(
    start_broker: Callable[..., Any], cars: Callable[..., Any]
) -> None:
    running: Running = await start_broker(new_streams_per_s=0.01, new_streams_burst=1)
    await cars(running, "car-1")
    late = running.agent("car-2")
    task = asyncio.create_task(late.run())
    try:
        (line, *_) = await audit_lines(running, bool, action="deny", actor="vehicle:car-2")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert (line["outcome"], line["method"], line["vehicle_id"]) == (
        "UNAVAILABLE", "Connect", "car-2"
    )  # fmt: skip


async def test_a_stream_ended_by_its_expired_token_is_a_denial(
    running: Running, cars: Callable[..., Any]
) -> None:
    minter = TokenMinter(session_keys().vehicle_key, vehicle="car-1", ttl_s=2)
    agent = await cars(running, "car-1", token=minter)
    await eventually(lambda: agent.renewals, timeout_s=5, what="a renewal after expiry")
    (line, *_) = await audit_lines(running, bool, action="deny", actor="vehicle:car-1")
    assert (line["outcome"], line["method"], line["vehicle_id"]) == (
        "UNAUTHENTICATED", "Connect", "car-1"
    )  # fmt: skip
    assert "expired" in line["reason"]


async def test_a_flood_of_denials_is_recorded_in_part_and_counted_in_full(
    running: Running,
) -> None:
    flood = 300
    started = time.monotonic()
    async with BrokerClient(running.target) as anonymous:
        errors = await asyncio.gather(
            *(refused(anonymous.get_command(f"c-{i}")) for i in range(flood))
        )
    windows = math.ceil(time.monotonic() - started) + 1  # 1 s windows the flood touched
    assert {e.code for e in errors} == {"UNAUTHENTICATED"}
    await running.broker.stop(0.2)  # writes the pending summary
    lines = read_audit(folder(running), actor="peer:127.0.0.1")
    one_by_one = [r for r in lines if r["outcome"] == "UNAUTHENTICATED"]
    summaries = [r for r in lines if r["outcome"] == "suppressed"]
    assert len(one_by_one) <= 10 * windows and summaries  # at most 10 a second
    assert len(one_by_one) + sum(r["count"] for r in summaries) == flood
    assert running.broker.audit.suppressed == flood - len(one_by_one)
    assert verify_audit(folder(running)).ok


async def test_the_cli_shows_denials_while_the_broker_runs_and_verifies_the_chain(
    running: Running,
) -> None:
    await refused(running.client("read").send_command("car-1", "unlock"))
    async with BrokerClient(running.target) as anonymous:
        await refused(anonymous.list_commands("car-1"))
    await audit_lines(running, lambda found: len(found) == 2, action="deny")
    data = str(running.broker.config.data_dir)

    code, out, err = await cli("--data", data, "--action", "deny")
    assert code == 0, err
    first, second = out.splitlines()
    assert " service:tests deny PERMISSION_DENIED method=SendCommand peer=ipv4:127.0.0.1:" in first
    assert " peer:127.0.0.1 deny UNAUTHENTICATED method=ListCommands " in second
    assert first[:4].isdigit() and first[10] == "T" and "Z " in first  # ISO 8601, UTC

    code, out, err = await cli("--data", data, "--actor", "service:*", "--json", "--since", "1h")
    assert code == 0, err
    (record,) = [json.loads(line) for line in out.splitlines() if '"deny"' in line]
    assert (record["actor"], record["method"]) == ("service:tests", "SendCommand")
    stored = b"".join(p.read_bytes() for p in folder(running).iterdir()).splitlines()
    assert all(line.encode() in stored for line in out.splitlines())  # the stored bytes

    code, out, err = await cli("verify", "--data", data)
    assert (code, out.startswith("ok: ")) == (0, True), out + err

    code, out, err = await cli("--data", data, "--since", "soon")
    assert code == 2 and "INVALID_ARGUMENT" in err


async def test_shutdown_writes_every_line_and_the_metrics_count_them(running: Running) -> None:
    async with BrokerClient(running.target) as anonymous:
        await refused(anonymous.get_vehicle_state("car-1"))
    families = {f.name: f for f in running.broker.collector().collect()}
    assert "broker_audit_lines_written" in families
    await running.broker.stop(0.2)
    lines = read_audit(folder(running))
    assert (lines[0]["action"], lines[-1]["action"]) == ("start", "stop")
    assert any(r["method"] == "GetVehicleState" for r in lines if r["action"] == "deny")
    audit = running.broker.audit
    assert (audit.written, audit.dropped) == (len(lines), 0)


# -- what the domain records (broker/core/commands.py) ----------------------------------------


async def test_sends_cancels_and_supersedes_are_recorded_with_their_actor(
    running: Running,
) -> None:
    client = running.client()
    sent = await client.send_command("car-1", "unlock", idempotency_key="k1")
    again = await client.send_command("car-1", "unlock", idempotency_key="k1")
    assert again.deduplicated
    await client.cancel_command(sent.command.command_id)
    older = await client.send_command("car-1", "climate", coalesce_key="temp")
    newer = await client.send_command("car-1", "climate", coalesce_key="temp")
    ids = {older.command.command_id, newer.command.command_id}
    lines = await audit_lines(
        running,
        lambda found: {"send", "cancel", "supersede"} <= {r["action"] for r in found},
        vehicle_id="car-1",
    )
    sends = [r for r in lines if r["action"] == "send"]
    assert [r["outcome"] for r in sends][:2] == ["ok", "deduplicated"]
    assert sends[0]["command_id"] == sent.command.command_id and sends[0]["name"] == "unlock"
    (cancel,) = [r for r in lines if r["action"] == "cancel"]
    assert cancel["command_id"] == sent.command.command_id
    (supersede,) = [r for r in lines if r["action"] == "supersede"]
    assert supersede["command_id"] in ids
    assert {r["actor"] for r in lines} == {"service:tests"}
    assert not any("payload" in r for r in lines)


async def test_reads_are_recorded_with_their_actor(running: Running) -> None:
    client = running.client()
    sent = await client.send_command("car-1", "unlock")
    await client.get_command(sent.command.command_id)
    await client.list_commands("car-1")
    await client.get_vehicle_state("car-1")
    watch = client.watch_commands(["car-1"])
    first = asyncio.create_task(watch.__anext__())
    await asyncio.sleep(0.2)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    wanted = {"get", "list", "state", "watch"}
    lines = await audit_lines(
        running, lambda found: wanted <= {r["action"] for r in found}, actor="service:tests"
    )
    assert all(r["actor"] == "service:tests" for r in lines)
    (get,) = [r for r in lines if r["action"] == "get"]
    assert get["command_id"] == sent.command.command_id


async def test_every_line_has_an_actor(running: Running, cars: Callable[..., Any]) -> None:
    await cars(running, "car-1")
    client = running.client()
    await client.send_command("car-1", "unlock", wait="result", timeout_s=5)
    await refused(running.client("read").send_command("car-1", "lock"))
    await running.broker.stop(0.2)
    lines = read_audit(folder(running))
    assert lines and all(r["actor"] for r in lines)


async def test_kill_9_keeps_what_was_flushed_and_the_chain_goes_on(
    spawn: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """A broker process killed mid-stream: the lines of earlier flushes are on disk, the
    next start goes on with the chain, and `verify` finds it intact."""
    broker = spawn()
    async with BrokerClient(broker.target, max_retries=0) as anonymous:
        for i in range(5):
            await refused(anonymous.get_command(f"c-{i}"))
        await asyncio.sleep(0.6)  # three flush intervals
        for i in range(5, 8):  # these may be lost with the kill
            await refused(anonymous.get_command(f"c-{i}"))
    await broker.akill()
    audit = tmp_path / "data" / "audit"
    before = read_audit(audit, action="deny")
    assert 5 <= len(before) <= 8
    await broker.astart()
    await broker.astop()
    actions = [r["action"] for r in read_audit(audit)]
    assert actions.count("start") == 2 and actions[-1] == "stop"
    assert "stop" not in actions[: actions.index("start", 1)]  # the kill left no stop line
    report = verify_audit(audit)
    assert report.ok, report.describe()
