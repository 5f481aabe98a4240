"""Bare grpc.aio ceilings for `loadtests.bench`, and the load clients it points at both.

    python -m loadtests.ceilings server                       # the bare server
    python -m loadtests.ceilings unary-client  --target 127.0.0.1:PORT --vehicles N [...]
    python -m loadtests.ceilings stream-client --target 127.0.0.1:PORT --vehicles N [...]

The bench starts these as child processes (loopback only; `CeilingServer`,
`drive_clients`) and talks to them by lines; each ends when its stdin closes.

`server` is the ceiling: a grpc.aio server on the broker's event loop (uvloop) with the
broker's server options (`broker.server.server_options`). It answers the broker's own
method names and does none of the broker's work:

- `/broker.v1.CommandService/SendCommand`: returns a prebuilt `SendCommandResponse` (a
  QUEUED `unlock` command, as long as the broker's answer) without reading the request.
- `/broker.v1.VehicleLink/Connect`: reads the first frame, answers a prebuilt `Welcome`,
  then only counts the frames it reads until the stream ends. A `VehicleAgent` holds such a
  stream as it holds one to the broker, so the same simulated cars measure both.

It prints `ceiling ready on HOST:PORT`; a `stats` line on stdin answers a JSON line: unary
calls answered, frames read after the first ones, streams open.

The clients are the same for the broker and the ceiling (only `--target` differs), so a
row compares servers, not client code. Each prints `ready`, waits for `go` on stdin, runs
`--warmup` then `--duration` seconds and prints one JSON line with what it did in the
measured window and its own CPU use over it, in % of one core:

- `unary-client`: prebuilt serialized `SendCommandRequest`s (`unlock`, `--wait none` or
  `result`, one per vehicle id of its share) over one channel, `--concurrency` calls in
  flight in a closed loop; replies are parsed and their status checked. Reports calls
  completed in the window, the latency of each successful call started in it
  (microseconds) and errors by kind.
- `stream-client`: one Connect stream per vehicle id of its share (`CARS_PER_CHANNEL` to a
  channel); each sends a Hello (with the vehicle id header) and waits for the Welcome; on
  `go` each writes one prebuilt 3-signal telemetry frame after another, as fast as HTTP/2
  flow control lets its writes complete, and drains whatever the server sends. Reports the
  frames written; what the server took in is counted on the server side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from broker.config import Config
from broker.core.clock import now_ms
from broker.sdk.client import build_request
from broker.sdk.vehicle import signals
from broker.server.broker import install_event_loop_policy, server_options
from broker.testing import LOOPBACK
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from broker.wire import VEHICLE_ID_HEADER
from loadtests._util import CARS_PER_CHANNEL, ChildProcess, CpuMeter, Window, stdin_reader

T = TypeVar("T")
SERVER_READY = "ceiling ready on"
CLIENT_READY = "ready"
SEND_COMMAND = "/broker.v1.CommandService/SendCommand"
CONNECT = "/broker.v1.VehicleLink/Connect"
COMMAND = "unlock"
OK_STATUSES = {"result": {t.SUCCEEDED}, "none": {t.ACCEPTED, t.QUEUED, t.DELIVERED}}


# -- the bare server ---------------------------------------------------------------------------


def canned_reply() -> bytes:
    """A SendCommandResponse as the broker answers a wait=none unlock to an offline car."""
    now = now_ms()
    command = t.Command(
        command_id=os.urandom(12).hex(),
        vehicle_id="parked-0001",
        name=COMMAND,
        lane=t.CRITICAL,
        status=t.QUEUED,
        created_at_ms=now,
        updated_at_ms=now,
        expires_at_ms=now + 3_600_000,
        seq=1 << 20,
        idempotency_scope="dev",
    )
    return bytes(svc.SendCommandResponse(command=command).SerializeToString())


def canned_welcome() -> bytes:
    welcome = link.Welcome(
        session_id=os.urandom(8).hex(),
        server_time_ms=now_ms(),
        telemetry_policy=link.TelemetryPolicy(interval_ms=1000, verbosity=1),
        window=Config().window,
    )
    return bytes(link.BrokerFrame(welcome=welcome).SerializeToString())


async def serve(port: int) -> None:
    reply, welcome = canned_reply(), canned_welcome()
    counts = {"calls": 0, "frames": 0, "streams": 0}

    async def send_command(raw: bytes, context: Any) -> bytes:
        counts["calls"] += 1
        return reply

    async def connect(requests: Any, context: Any) -> None:
        if await context.read() is grpc.aio.EOF:
            return
        counts["streams"] += 1
        try:
            await context.write(welcome)
            while await context.read() is not grpc.aio.EOF:
                counts["frames"] += 1
        finally:
            counts["streams"] -= 1

    server = grpc.aio.server(options=server_options(Config()))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "broker.v1.CommandService",
                {"SendCommand": grpc.unary_unary_rpc_method_handler(send_command)},
            ),
            grpc.method_handlers_generic_handler(
                "broker.v1.VehicleLink",
                {"Connect": grpc.stream_stream_rpc_method_handler(connect)},
            ),
        ]
    )
    bound = server.add_insecure_port(f"{LOOPBACK}:{port}")
    await server.start()
    print(f"{SERVER_READY} {LOOPBACK}:{bound}", flush=True)
    commands = await stdin_reader()
    while line := await commands.readline():
        if line.strip() == b"stats":
            print(json.dumps(counts), flush=True)
    await server.stop(1)


# -- the clients ---------------------------------------------------------------------------------


async def _go(commands: asyncio.StreamReader) -> None:
    print(CLIENT_READY, flush=True)
    while (line := await commands.readline()) and line.strip() != b"go":
        pass
    if not line:
        raise SystemExit("stdin closed before go")


def _vehicle_ids(args: argparse.Namespace) -> list[str]:
    """This client's share of the vehicles: every `shards`-th id from `shard` on."""
    return [f"{args.prefix}{i}" for i in range(args.shard, args.vehicles, args.shards)]


async def unary_client(args: argparse.Namespace) -> dict[str, Any]:
    commands = await stdin_reader()
    timeout_s = args.wait_timeout if args.wait == "result" else None
    requests = [
        build_request(
            vehicle, COMMAND, ttl_s=args.ttl, wait=args.wait, timeout_s=timeout_s
        ).SerializeToString()
        for vehicle in _vehicle_ids(args)
    ]
    ok = OK_STATUSES[args.wait]
    latencies_us: list[int] = []
    errors: Counter[str] = Counter()
    completed = 0
    async with grpc.aio.insecure_channel(args.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        call: Any = channel.unary_unary(
            SEND_COMMAND, response_deserializer=svc.SendCommandResponse.FromString
        )
        await _go(commands)
        window = Window(args.warmup, args.duration, CpuMeter({"client": None}))

        async def caller(first: int) -> None:
            """Requests first, first + concurrency, ...: callers never share a vehicle."""
            nonlocal completed
            for turn in itertools.count():
                request = requests[(first + turn * args.concurrency) % len(requests)]
                started = time.perf_counter()
                if started >= window.end:
                    return
                try:
                    reply = await call(request, timeout=args.wait_timeout + 5)
                    problem = None
                    if reply.wait_timed_out:
                        problem = f"wait timed out at {t.CommandStatus.Name(reply.command.status)}"
                    elif reply.command.status not in ok:
                        problem = f"command {t.CommandStatus.Name(reply.command.status)}"
                except grpc.aio.AioRpcError as exc:
                    problem = exc.code().name
                finished = time.perf_counter()
                if problem is not None:
                    errors[problem] += window.measures(started)
                    continue
                if window.measures(finished):
                    completed += 1
                if window.measures(started):
                    latencies_us.append(round((finished - started) * 1e6))

        await asyncio.gather(window.read_cpu(), *(caller(i) for i in range(args.concurrency)))
    return {
        "completed": completed,
        "latencies_us": latencies_us,
        "errors": dict(+errors),
        "cpu_percent": window.cpu_percent["client"],
    }


def telemetry_frame() -> bytes:
    """One telemetry batch as a car sends it: position and battery, stamped."""
    values = {"lat": 52.52, "lon": 13.405, "battery_pct": 71.5}
    return bytes(
        link.VehicleFrame(
            telemetry=link.TelemetryBatch(signals=signals(values, now_ms()))
        ).SerializeToString()
    )


async def stream_client(args: argparse.Namespace) -> dict[str, Any]:
    commands = await stdin_reader()
    hello = link.VehicleFrame(hello=link.Hello(firmware="bench")).SerializeToString()
    frame = telemetry_frame()
    ids = _vehicle_ids(args)
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(args.target, options=options)
        for _ in range(math.ceil(len(ids) / CARS_PER_CHANNEL))
    ]
    calls: list[Any] = []
    drains: list[asyncio.Task[None]] = []

    async def drain(call: Any) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while await call.read() is not grpc.aio.EOF:
                pass

    async def open_stream(index: int, vehicle_id: str) -> None:
        connect: Any = channels[index // CARS_PER_CHANNEL].stream_stream(CONNECT)
        call = connect(metadata=((VEHICLE_ID_HEADER, vehicle_id),))
        calls.append(call)
        await call.write(hello)
        await call.read()  # the Welcome
        drains.append(asyncio.create_task(drain(call)))

    written_in_window = 0
    try:
        await asyncio.wait_for(asyncio.gather(*(open_stream(i, v) for i, v in enumerate(ids))), 60)
        await _go(commands)
        window = Window(args.warmup, args.duration, CpuMeter({"client": None}))

        async def writer(call: Any) -> None:
            nonlocal written_in_window
            while window.open():
                await call.write(frame)
                written_in_window += window.measures(time.perf_counter())

        await asyncio.gather(window.read_cpu(), *(writer(call) for call in calls))
    finally:
        for call in calls:
            call.cancel()
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        for channel in channels:
            await channel.close()
    return {
        "streams": len(calls),
        "written_in_window": written_in_window,
        "frame_bytes": len(frame),
        "cpu_percent": window.cpu_percent["client"],
    }


# -- the parent's side ---------------------------------------------------------------------------


class CeilingServer:
    """`python -m loadtests.ceilings server` as a child process (`async with`)."""

    def __init__(self, log_path: Path) -> None:
        self._child = ChildProcess(["loadtests.ceilings", "server"], log_path)
        self.target = ""

    @property
    def pid(self) -> int | None:
        return self._child.pid

    async def __aenter__(self) -> CeilingServer:
        self.target = (await self._child.start(SERVER_READY, 30)).rpartition(" ")[2]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._child.stop()

    async def stats(self) -> dict[str, int]:
        """Unary calls answered, frames read after the first ones, streams open."""
        self._child.send("stats")
        return {k: int(v) for k, v in (await self._child.read_json(10)).items()}


async def drive_clients(
    role: str,
    target: str,
    argvs: Sequence[Sequence[str]],
    log_dir: Path,
    during: Callable[[], Awaitable[T]],
    timeout_s: float,
) -> tuple[list[dict[str, Any]], T]:
    """One `role` client process per argument list, all against `target`: once every one
    is ready, say go to all, await `during()` (the caller's own measurement of the same
    window) and collect their reports. They are ended on the way out, whatever happens."""
    children = [
        ChildProcess(
            ["loadtests.ceilings", role, "--target", target, *argv], log_dir / f"{role}-{i}.log"
        )
        for i, argv in enumerate(argvs)
    ]
    try:
        await asyncio.gather(*(child.start(CLIENT_READY, 90) for child in children))
        for child in children:
            child.send("go")
        measured = await during()
        reports = await asyncio.gather(*(child.read_json(timeout_s) for child in children))
    finally:
        await asyncio.gather(*(child.stop() for child in children), return_exceptions=True)
    return reports, measured


# -- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.ceilings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server", help="the bare grpc.aio server")
    server.add_argument("--port", type=int, default=0)
    for name in ("unary-client", "stream-client"):
        client = sub.add_parser(name)
        client.add_argument("--target", required=True)
        client.add_argument("--prefix", default="car-", help="vehicle ids: PREFIX0, PREFIX1...")
        client.add_argument("--vehicles", type=int, required=True, help="vehicle ids in all")
        client.add_argument(
            "--shard", type=int, default=0, help="this client's ids: SHARD, SHARD+SHARDS, ..."
        )
        client.add_argument("--shards", type=int, default=1, help="clients sharing the ids")
        client.add_argument("--warmup", type=float, default=1.0)
        client.add_argument("--duration", type=float, default=5.0)
        if name == "unary-client":
            client.add_argument("--concurrency", type=int, default=16)
            client.add_argument("--wait", choices=sorted(OK_STATUSES), default="none")
            client.add_argument("--ttl", type=float, default=3600.0)
            client.add_argument("--wait-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    install_event_loop_policy()
    if args.role == "server":
        asyncio.run(serve(args.port))
        return 0
    if args.target.rpartition(":")[0] != LOOPBACK:
        parser.error(f"the bench only talks to {LOOPBACK}")
    run = unary_client if args.role == "unary-client" else stream_client
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
