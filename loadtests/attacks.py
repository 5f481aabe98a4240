"""The attacks of a second, untrusted internal service (and of a hostile car), replayed
against a real broker process: what each one gets now.

    python -m loadtests.attacks [--out bench-out/attacks.json]

Starts a broker on 127.0.0.1 with token auth over a temporary data folder, mints tokens
for two services ("fleet-app", the owner, and "rogue") and some cars, and tries each
attack; prints one line per attack (what was tried, what happened, whether it was held)
and writes them as JSON. Bounded: every attack is capped in count and time, and the
broker is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from broker.sdk.client import BrokerClient, BrokerRpcError, build_request
from broker.sdk.vehicle import VehicleAgent, succeed
from broker.testing import AuthKeys, BrokerProcess, status_kb
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link

Attack = Callable[["Lab"], Awaitable[dict[str, Any]]]
ATTACKS: list[tuple[str, Attack]] = []


def attack(name: str) -> Callable[[Attack], Attack]:
    def register(fn: Attack) -> Attack:
        ATTACKS.append((name, fn))
        return fn

    return register


class Lab:
    """The broker under attack and the credentials of its callers."""

    def __init__(self, broker: BrokerProcess, keys: AuthKeys, folder: Path) -> None:
        self.broker = broker
        self.keys = keys
        self.folder = folder
        self._clients: list[BrokerClient] = []

    def client(
        self, name: str, *scopes: str, on: BrokerProcess | None = None, **claims: Any
    ) -> BrokerClient:
        token = self.keys.service_token(*(scopes or ("send", "read")), name=name, **claims)
        client = BrokerClient((on or self.broker).target, token=token, max_retries=0)
        self._clients.append(client)
        return client

    def other_broker(self, name: str, env: dict[str, str]) -> BrokerProcess:
        """A second broker with other settings (stopped by `async with`)."""
        return BrokerProcess(
            self.folder / name, self.folder / f"{name}.log", keys=self.keys, env=env
        )

    def agent(self, vehicle_id: str, **kwargs: Any) -> VehicleAgent:
        return VehicleAgent(
            self.broker.target, vehicle_id, token=self.keys.vehicle_token(vehicle_id), **kwargs
        )

    async def close(self) -> None:
        for client in self._clients:
            await client.close()


def raw_stream(target: str, token: str) -> tuple[grpc.aio.Channel, Any]:
    """A car's Connect stream on the bare protocol (nothing read unless the caller reads)."""
    channel = grpc.aio.insecure_channel(target)
    call = channel.stream_stream(
        "/broker.v1.VehicleLink/Connect",
        request_serializer=link.VehicleFrame.SerializeToString,
        response_deserializer=link.BrokerFrame.FromString,
    )(metadata=(("authorization", f"Bearer {token}"),))
    return channel, call


async def outcome(call: Awaitable[Any]) -> str:
    try:
        await call
    except BrokerRpcError as error:
        return error.code
    return "OK"


@attack("read another service's command")
async def read_other(lab: Lab) -> dict[str, Any]:
    app, rogue = lab.client("fleet-app"), lab.client("rogue")
    sent = await app.send_command("atk-read", "unlock", {"pin": "4711"})
    command_id = sent.command.command_id
    got = await outcome(rogue.get_command(command_id))
    listed = len(await rogue.list_commands("atk-read"))
    return {
        "result": f"GetCommand {got}, ListCommands shows {listed} of the app's 1",
        "held": got == "NOT_FOUND" and listed == 0,
    }


@attack("watch the whole fleet")
async def watch_fleet(lab: Lab) -> dict[str, Any]:
    rogue = lab.client("rogue")
    got = await outcome(rogue.watch_commands().__anext__())
    return {"result": f"WatchCommands without a filter: {got}", "held": got == "PERMISSION_DENIED"}


@attack("cancel another service's command")
async def cancel_other(lab: Lab) -> dict[str, Any]:
    app, rogue = lab.client("fleet-app"), lab.client("rogue")
    sent = await app.send_command("atk-cancel", "unlock")
    got = await outcome(rogue.cancel_command(sent.command.command_id))
    status = (await app.get_command(sent.command.command_id)).status
    return {
        "result": f"CancelCommand {got}; the app's command is {t.CommandStatus.Name(status)}",
        "held": got == "NOT_FOUND" and status == t.QUEUED,
    }


@attack("supersede another service's unlock by its coalesce key")
async def supersede_other(lab: Lab) -> dict[str, Any]:
    app, rogue = lab.client("fleet-app"), lab.client("rogue")
    sent = await app.send_command("atk-coalesce", "unlock", coalesce_key="door")
    await rogue.send_command("atk-coalesce", "unlock", coalesce_key="door")
    status = (await app.get_command(sent.command.command_id)).status
    return {
        "result": f"the app's unlock is {t.CommandStatus.Name(status)}",
        "held": status == t.QUEUED,
    }


@attack("spend a car's critical quota with deduplicated repeats")
async def spend_quota(lab: Lab) -> dict[str, Any]:
    app, rogue = lab.client("fleet-app"), lab.client("rogue")
    repeats = [await outcome(rogue.send_command("atk-quota", "lock", idempotency_key="same"))
               for _ in range(10)]  # fmt: skip
    flood = [await outcome(rogue.send_command("atk-quota", "lock")) for _ in range(20)]
    owner = await outcome(app.send_command("atk-quota", "lock"))
    return {
        "result": f"10 repeats: {sorted(set(repeats))}; then 20 new locks from the rogue: "
        f"{flood.count('OK')} accepted, {flood.count('RESOURCE_EXHAUSTED')} refused; "
        f"the owner's lock: {owner}",
        "held": owner == "OK",
    }


@attack("fill the durable queue from one send token (budget lowered to 20,000)")
async def fill_queue(lab: Lab) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {"rogue": {}, "app": {}}

    def count(who: str, code: str, n: int = 1) -> None:
        counts[who][code] = counts[who].get(code, 0) + n

    async with lab.other_broker("fill", {"BROKER_DURABLE_QUEUE_BUDGET": "20000"}) as broker:
        rogue, app = lab.client("rogue", on=broker), lab.client("fleet-app", on=broker)
        stop_at = time.monotonic() + 8

        async def flood(k: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                batch = [build_request(f"r-{k}-{n}-{i}", "climate") for i in range(100)]
                try:
                    reply = await rogue.send_commands(batch)
                except BrokerRpcError as error:
                    count("rogue", error.code, 100)
                    await asyncio.sleep(0.01)
                    continue
                for item in reply.items:
                    count("rogue", "OK" if item.HasField("accepted") else item.error.code)

        async def own_work() -> None:
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                count("app", await outcome(app.send_command(f"a-{n}", "climate")))

        await asyncio.gather(own_work(), *(flood(k) for k in range(8)))
    refused = sum(v for k, v in counts["app"].items() if k != "OK")
    return {
        "result": f"the rogue got {counts['rogue'].get('OK', 0):,} accepted "
        f"(refused: { ({k: v for k, v in counts['rogue'].items() if k != 'OK'}) }); the other "
        f"service {counts['app'].get('OK', 0):,} accepted, {refused} refused",
        "held": refused == 0,
        "counts": counts,
    }


@attack("a connected car that never reads: 5,040 x 16 KiB commands")
async def deaf_car(lab: Lab) -> dict[str, Any]:
    broker = lab.broker
    channel, call = raw_stream(broker.target, lab.keys.vehicle_token("deaf-car"))
    await call.write(link.VehicleFrame(hello=link.Hello(firmware="deaf")))
    await call.read()  # Welcome; nothing is read after it
    app = lab.client("fleet-app")
    await asyncio.sleep(1)
    before = status_kb(broker.pid)
    sent: list[str] = []
    while len(sent) < 5040:
        batch = [build_request("deaf-car", "config", bytes(16384)) for _ in range(40)]
        reply = await app.send_commands(batch)
        sent += [item.accepted.command.command_id for item in reply.items]
    await asyncio.sleep(2)
    after = status_kb(broker.pid)
    call.cancel()
    await channel.close()
    agent = lab.agent("deaf-car", handlers={"config": succeed})
    task = asyncio.create_task(agent.run())
    deadline = time.monotonic() + 120
    while len(agent.executed) < len(sent) and time.monotonic() < deadline:  # noqa: ASYNC110 (polls the agent)
        await asyncio.sleep(0.05)
    await agent.stop()
    task.cancel()
    growth_mb = (after["RssAnon"] - before["RssAnon"]) / 1024
    in_order = agent.executed == sent
    return {
        "result": f"broker heap +{growth_mb:.1f} MB while the car did not read; then all "
        f"{len(agent.executed):,} delivered {'in order, each once' if in_order else 'WRONGLY'}",
        "held": growth_mb < 40 and in_order,
    }


@attack("5,000 watch streams from one caller")
async def many_watches(lab: Lab) -> dict[str, Any]:
    env = {"BROKER_MAX_CONCURRENT_STREAMS": "10000"}
    async with lab.other_broker("watches", env) as broker:
        clients = [lab.client("rogue", on=broker) for _ in range(5)]
        await asyncio.sleep(1)
        before = status_kb(broker.pid)
        codes: dict[str, int] = {}

        async def watch(client: BrokerClient, n: int) -> None:
            try:
                async for _ in client.watch_commands([f"w-{n}"]):
                    pass
            except BrokerRpcError as error:
                codes[error.code] = codes.get(error.code, 0) + 1

        tasks = [asyncio.create_task(watch(clients[n % 5], n)) for n in range(5000)]
        await asyncio.sleep(5)
        after = status_kb(broker.pid)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    growth_mb = (after["RssAnon"] - before["RssAnon"]) / 1024
    open_now = 5000 - sum(codes.values())
    return {
        "result": f"{open_now:,} left open, refused {codes}; broker heap +{growth_mb:.1f} MB",
        "held": open_now <= 1000,
    }


@attack("one car credential reconnecting in a loop (fleet budget 20 new streams/s)")
async def looping_car(lab: Lab) -> dict[str, Any]:
    env = {"BROKER_NEW_STREAMS_PER_S": "20", "BROKER_NEW_STREAMS_BURST": "20"}
    async with lab.other_broker("loop", env) as broker:

        async def attempt(vehicle_id: str) -> str:
            channel, call = raw_stream(broker.target, lab.keys.vehicle_token(vehicle_id))
            try:
                await call.write(link.VehicleFrame(hello=link.Hello(firmware="loop")))
                frame = await call.read()
                return "OK" if frame is not grpc.aio.EOF else (await call.code()).name
            except grpc.aio.AioRpcError as error:
                return error.code().name
            finally:
                call.cancel()
                await channel.close()

        loops: dict[str, int] = {}
        stop_at = time.monotonic() + 5
        while time.monotonic() < stop_at:
            code = await attempt("looping-car")
            loops[code] = loops.get(code, 0) + 1
        others = [await attempt(f"other-{n}") for n in range(5)]
    return {
        "result": f"the looping car: {loops}; 5 other cars: {others}",
        "held": others == ["OK"] * 5,
    }


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/attacks.json"))
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="attacks-") as tmp:
        folder = Path(tmp)
        keys = AuthKeys.create(folder / "keys")
        broker = BrokerProcess(folder / "data", folder / "broker.log", keys=keys)
        async with broker:
            lab = Lab(broker, keys, folder)
            try:
                for name, fn in ATTACKS:
                    started = time.monotonic()
                    found = await asyncio.wait_for(fn(lab), 120)
                    found.update(attack=name, seconds=round(time.monotonic() - started, 2))
                    results.append(found)
                    mark = "held " if found["held"] else "OPEN "
                    print(f"{mark} {name}: {found['result']}", flush=True)
            finally:
                await lab.close()
            results.append({"broker_rss_kb_at_end": status_kb(broker.pid).get("VmRSS")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r.get("held", True) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
