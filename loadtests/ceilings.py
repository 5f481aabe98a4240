"""Bare grpc.aio ceilings for `loadtests.bench`, and the load clients it points at both.

    python -m loadtests.ceilings server                       # the bare server
    python -m loadtests.ceilings unary-client  --target 127.0.0.1:PORT --vehicles N [...]
    python -m loadtests.ceilings stream-client --target 127.0.0.1:PORT --vehicles N [...]
    python -m loadtests.ceilings handshake-client --target 127.0.0.1:PORT --vehicles N \
        --tls-ca CA --car-certs DIR [...]

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
calls answered, frames read after the first ones, streams open. With `--tls-cert` and
`--tls-key` it serves TLS (`grpc.ssl_server_credentials`, static: the bare way), with
`--tls-client-ca` too mTLS (client certificates required and verified).

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
- `handshake-client` (mTLS): one Connect stream per vehicle id of its share, each on its
  own channel (so its own connection: `grpc.use_local_subchannel_pool`) with its own
  client certificate (`--car-certs` DIR/ID.pem and DIR/ID.key, read before `go`; the
  certificate names the car, no metadata does). Before `ready` it opens its share of
  `--warm-cars` (ids PREFIXw0, ...) the same way, unmeasured. On `go`, `--concurrency`
  at a time: a new channel, Connect, Hello, wait for the Welcome; the stream then stays
  open. Once
  all are done it prints its report (streams welcomed, errors by kind, the time from
  `go` to the last Welcome, each car's connect-to-Welcome latency in microseconds, its
  CPU seconds), then holds the streams until its stdin closes, so closing them is not
  measured.

`unary-client` and `stream-client` speak TLS with `--tls-ca` (the CA of the server's
certificate), mTLS with `--tls-cert` and `--tls-key` too.
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
        sender="dev",
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


def server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """grpc's static TLS credentials from --tls-cert/--tls-key (mTLS with --tls-client-ca),
    or None (plaintext)."""
    if not args.tls_cert:
        return None
    pair = (Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())
    roots = Path(args.tls_client_ca).read_bytes() if args.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=roots, require_client_auth=roots is not None
    )


def client_channel(
    args: argparse.Namespace, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A channel to --target: TLS with --tls-ca (mTLS with --tls-cert/--tls-key too)."""
    if not args.tls_ca:
        return grpc.aio.insecure_channel(args.target, options=options)
    pem = Path(args.tls_ca).read_bytes()
    key = Path(args.tls_key).read_bytes() if args.tls_key else None
    cert = Path(args.tls_cert).read_bytes() if args.tls_cert else None
    credentials = grpc.ssl_channel_credentials(pem, key, cert)
    return grpc.aio.secure_channel(args.target, credentials, options=options)


async def serve(args: argparse.Namespace) -> None:
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
    address = f"{LOOPBACK}:{args.port}"
    credentials = server_credentials(args)
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
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
    async with client_channel(args) as channel:
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
        client_channel(args, options) for _ in range(math.ceil(len(ids) / CARS_PER_CHANNEL))
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


def car_credentials(
    args: argparse.Namespace,
) -> tuple[list[grpc.ChannelCredentials], list[grpc.ChannelCredentials]]:
    """Each car's own mTLS credentials: this client's share of the measured cars, then of
    the warm-up cars."""
    ca = Path(args.tls_ca).read_bytes()
    certs = Path(args.car_certs)

    def credential(vehicle: str) -> grpc.ChannelCredentials:
        key, cert = (certs / f"{vehicle}.key").read_bytes(), (certs / f"{vehicle}.pem").read_bytes()
        return grpc.ssl_channel_credentials(ca, key, cert)

    warm = [f"{args.prefix}w{i}" for i in range(args.shard, args.warm_cars, args.shards)]
    return [credential(vehicle) for vehicle in _vehicle_ids(args)], [
        credential(vehicle) for vehicle in warm
    ]


async def handshake_client(
    args: argparse.Namespace,
    credentials: list[grpc.ChannelCredentials],
    warm: list[grpc.ChannelCredentials],
) -> None:
    """New mTLS car streams, each on its own connection with its own certificate."""
    commands = await stdin_reader()
    hello = link.VehicleFrame(hello=link.Hello(firmware="bench")).SerializeToString()
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels: list[grpc.aio.Channel] = []
    calls: list[Any] = []
    latencies_us: list[int] = []
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(args.concurrency)

    async def open_stream(credential: grpc.ChannelCredentials) -> None:
        async with gate:
            started = time.perf_counter()
            channel = grpc.aio.secure_channel(args.target, credential, options=options)
            channels.append(channel)
            connect: Any = channel.stream_stream(
                CONNECT, response_deserializer=link.BrokerFrame.FromString
            )
            call = connect()
            calls.append(call)
            try:
                await call.write(hello)
                frame = await call.read()
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                return
            if frame is grpc.aio.EOF or not frame.HasField("welcome"):
                errors["no welcome"] += 1
                return
            latencies_us.append(round((time.perf_counter() - started) * 1e6))

    try:
        # the warm-up cars (unmeasured, held too): first connections, first imports
        await asyncio.wait_for(
            asyncio.gather(*(open_stream(credential) for credential in warm)), args.timeout
        )
        warm_errors = dict(+errors)
        errors.clear()
        latencies_us.clear()
        await _go(commands)
        cpu_before, started = time.process_time(), time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(open_stream(credential) for credential in credentials)),
            args.timeout,
        )
        elapsed = time.perf_counter() - started
        report = {
            "streams": len(credentials),
            "welcomed": len(latencies_us),
            "errors": dict(+errors),
            "elapsed_s": round(elapsed, 4),
            "latencies_us": latencies_us,
            "cpu_s": round(time.process_time() - cpu_before, 3),
            "warm_cars": len(warm),
            "warm_errors": warm_errors,
        }
        print(json.dumps(report), flush=True)
        while await commands.readline():  # hold the streams until stdin closes
            pass
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)


# -- the parent's side ---------------------------------------------------------------------------


class CeilingServer:
    """`python -m loadtests.ceilings server` as a child process (`async with`)."""

    def __init__(self, log_path: Path, args: Sequence[str] = ()) -> None:
        """`args`: the server's flags (e.g. --tls-cert/--tls-key for TLS)."""
        self._child = ChildProcess(["loadtests.ceilings", "server", *args], log_path)
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
    server.add_argument("--tls-cert", help="certificate chain (PEM): serve TLS")
    server.add_argument("--tls-key", help="its private key (PEM)")
    server.add_argument("--tls-client-ca", help="require client certificates of this CA")
    for name in ("unary-client", "stream-client", "handshake-client"):
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
        client.add_argument("--tls-ca", help="CA of the server's certificate: speak TLS")
        if name == "handshake-client":
            client.add_argument("--car-certs", required=True, help="folder of ID.pem, ID.key")
            client.add_argument("--concurrency", type=int, default=32, help="opening at once")
            client.add_argument(
                "--warm-cars",
                type=int,
                default=0,
                help="cars PREFIXw0, PREFIXw1, ... (shared by shard) opened before ready",
            )
            client.add_argument("--timeout", type=float, default=60.0, help="for all to open")
        else:
            client.add_argument("--tls-cert", help="client certificate chain (PEM): mTLS")
            client.add_argument("--tls-key", help="its private key (PEM)")
        if name == "unary-client":
            client.add_argument("--concurrency", type=int, default=16)
            client.add_argument("--wait", choices=sorted(OK_STATUSES), default="none")
            client.add_argument("--ttl", type=float, default=3600.0)
            client.add_argument("--wait-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    install_event_loop_policy()
    if args.role == "server":
        if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
            parser.error("--tls-cert and --tls-key together; --tls-client-ca needs both")
        asyncio.run(serve(args))
        return 0
    if args.target.rpartition(":")[0] != LOOPBACK:
        parser.error(f"the bench only talks to {LOOPBACK}")
    if args.role == "handshake-client":
        if not args.tls_ca:
            parser.error("handshake-client: --tls-ca is required (it speaks mTLS)")
        asyncio.run(handshake_client(args, *car_credentials(args)))  # prints its own report
        return 0
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_cert and not args.tls_ca):
        parser.error("--tls-cert and --tls-key together, and with --tls-ca")
    run = unary_client if args.role == "unary-client" else stream_client
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
