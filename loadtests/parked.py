"""What parked cars cost the broker: memory per queued command, and a restart over them.

    python -m loadtests.parked                       # 1,000,000 commands to 100,000 parked cars
    python -m loadtests.parked --commands 200000 --cars 20000

A broker on 127.0.0.1 (fresh LMDB folder, `--durability relaxed` so the fill is quick;
the layout and the memory are the same with fsync) gets `--commands` climate commands in
SendCommands batches of 512, spread over `--cars` vehicle ids that never connect. Then it
is stopped and started again on the same folder (recovery), and one car connects and
must get all of its queue. Figures:

- broker RssAnon (heap) before and after the fill, per queued command: what the broker
  keeps in memory for a parked car's queue (RssFile, LMDB's map, is the OS page cache);
- enqueue rate; restart time until ready, RssAnon after it;
- the first car's queue delivered after the restart (its commands executed, in order).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.sdk.client import BrokerClient, build_request
from broker.sdk.vehicle import VehicleAgent
from broker.server.broker import install_event_loop_policy
from broker.testing import BrokerProcess, status_kb
from loadtests._util import UNTHROTTLED, stop_agents

BATCH = 512


async def fill(client: BrokerClient, commands: int, cars: int) -> float:
    """Queue `commands` to `cars` parked vehicle ids; returns the seconds it took."""
    payload = {"temperature_c": 21}
    requests = [build_request("x", "climate", payload, ttl_s=3600) for _ in range(BATCH)]
    started = time.perf_counter()
    for start in range(0, commands, BATCH):
        size = min(BATCH, commands - start)
        for offset, request in enumerate(requests[:size]):
            request.vehicle_id = f"parked-{(start + offset) % cars:07d}"
        reply = await client.send_commands(requests[:size])
        refused = [item.error for item in reply.items if item.HasField("error")]
        if refused:
            raise RuntimeError(f"the broker refused {len(refused)} commands: {refused[0]}")
    return time.perf_counter() - started


async def drain_one(target: str, vehicle_id: str, expected: int) -> float:
    """Connect one parked car; seconds until it has executed its whole queue."""
    done = asyncio.Event()
    agent: VehicleAgent

    async def climate(payload: bytes) -> bool:
        if len(agent.executed) >= expected:
            done.set()
        return True

    agent = VehicleAgent(target, vehicle_id, handlers={"climate": climate})
    started = time.perf_counter()
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(done.wait(), 60)
        return time.perf_counter() - started
    finally:
        await stop_agents([agent], [task])


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    env = {**UNTHROTTLED, "BROKER_DURABLE_QUEUE_BUDGET": str(max(2 * args.commands, 10))}
    broker = BrokerProcess(
        workdir / "data", workdir / "broker.log", args=["--durability", "relaxed"], env=env
    )
    out: dict[str, Any] = {"commands": args.commands, "cars": args.cars}
    async with broker:
        await asyncio.sleep(1)  # settled after start-up
        before = status_kb(broker.pid)
        async with BrokerClient(broker.target) as client:
            seconds = await fill(client, args.commands, args.cars)
        await asyncio.sleep(1)
        after = status_kb(broker.pid)
        out["enqueue_per_s"] = round(args.commands / seconds)
        out["rss_anon_mb"] = [round(before["RssAnon"] / 1024), round(after["RssAnon"] / 1024)]
        out["bytes_per_command"] = round(
            (after["RssAnon"] - before["RssAnon"]) * 1024 / args.commands, 1
        )
        await broker.astop()
        started = time.perf_counter()
        await broker.astart()
        out["restart_s"] = round(time.perf_counter() - started, 2)
        out["rss_anon_mb_after_restart"] = round(status_kb(broker.pid)["RssAnon"] / 1024)
        per_car = args.commands // args.cars + (args.commands % args.cars > 0)
        out["first_car_queue"] = per_car
        out["first_car_drained_s"] = round(
            await drain_one(broker.target, "parked-0000000", per_car), 3
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.parked", description=__doc__)
    parser.add_argument("--commands", type=int, default=1_000_000)
    parser.add_argument("--cars", type=int, default=100_000)
    args = parser.parse_args(argv)
    if args.commands <= 0 or not 0 < args.cars <= args.commands:
        parser.error("--commands > 0 and 0 < --cars <= --commands")
    install_event_loop_policy()
    with tempfile.TemporaryDirectory(prefix="broker-parked-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
