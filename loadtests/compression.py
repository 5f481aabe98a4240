"""Is gRPC message compression worth it for telemetry? Measure both sides of the trade.

    python -m loadtests.compression [--cars 50 --seconds 8 --signals 40]

For each setting (off, gzip, deflate) it starts a fresh broker subprocess on 127.0.0.1
with telemetry budgets opened wide (so every batch is applied: we measure ingest cost,
not the guard), streams telemetry from misbehaving cars (no pacing) for a fixed time,
and prints: batches/s ingested, broker CPU per batch, and bytes per batch on the wire
(the serialized frame, compressed as grpc would). Compression buys bandwidth with
broker CPU; the table says how much of each, on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import random
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from broker.core.clock import now_ms
from broker.sdk.vehicle import VehicleAgent, signals
from broker.testing import BrokerProcess
from broker.v1 import vehicle_link_pb2 as link
from loadtests._util import WIDE_OPEN, cpu_seconds, stop_agents

SETTINGS = {"off": None, "gzip": grpc.Compression.Gzip, "deflate": grpc.Compression.Deflate}


def batch_values(rng: random.Random, count: int) -> dict[str, float]:
    """A plausible verbose batch: named diagnostic signals with noisy float readings."""
    return {f"diag.sensor_{i:03d}": round(rng.gauss(50, 10), 3) for i in range(count)}


async def run_setting(
    workdir: Path, setting: str, cars: int, seconds: float, count: int
) -> dict[str, Any]:
    broker = BrokerProcess(workdir / setting, workdir / f"{setting}.log", env=WIDE_OPEN)
    await broker.astart()
    rng = random.Random(3)
    agents = [
        VehicleAgent(broker.target, f"zip-{i}", obey_policy=False, compression=SETTINGS[setting])
        for i in range(cars)
    ]
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    sent = 0
    try:
        await asyncio.wait_for(asyncio.gather(*(a.connected.wait() for a in agents)), 60)
        cpu_before = cpu_seconds(broker.pid)
        deadline = time.monotonic() + seconds

        async def stream(agent: VehicleAgent) -> None:
            nonlocal sent
            while time.monotonic() < deadline:
                await agent.send_telemetry(signals(batch_values(rng, count), now_ms()))
                sent += 1

        started = time.monotonic()
        await asyncio.gather(*(stream(agent) for agent in agents))
        elapsed = time.monotonic() - started
        cpu_after = cpu_seconds(broker.pid)
    finally:
        await stop_agents(agents, tasks)
        await broker.astop()
    frame = link.VehicleFrame(
        telemetry=link.TelemetryBatch(signals=signals(batch_values(rng, count), now_ms()))
    ).SerializeToString()
    wire = {
        "off": len(frame),
        "gzip": len(gzip.compress(frame)),
        "deflate": len(zlib.compress(frame)),
    }[setting]
    cpu = (cpu_after or 0.0) - (cpu_before or 0.0)
    return {
        "setting": setting,
        "batches_per_s": round(sent / elapsed),
        "broker_cpu_us_per_batch": round(cpu / max(sent, 1) * 1e6, 1),
        "broker_cpu_pct": round(cpu / elapsed * 100),
        "bytes_per_batch": wire,
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="compression-") as workdir:
        for setting in SETTINGS:
            rows.append(
                await run_setting(Path(workdir), setting, args.cars, args.seconds, args.signals)
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.compression", description=__doc__)
    parser.add_argument("--cars", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--signals", type=int, default=40, help="signals per batch")
    rows = asyncio.run(main_async(parser.parse_args(argv)))
    print("| compression | batches/s | broker CPU µs/batch | broker CPU % | bytes/batch |")
    print("|---|--:|--:|--:|--:|")
    for row in rows:
        print(
            f"| {row['setting']} | {row['batches_per_s']:,} | {row['broker_cpu_us_per_batch']} "
            f"| {row['broker_cpu_pct']} | {row['bytes_per_batch']:,} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
