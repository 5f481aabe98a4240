"""Locust load test: cars holding VehicleLink streams, services sending commands to them.

    locust -f loadtests/locustfile.py --headless -u 200 -r 50 -t 60s \\
        --host 127.0.0.1:50051 --csv bench-out/locust --html bench-out/locust.html

- `VehicleUser` (weight 4): one car per user (`locust-car-RUN-N`, RUN new per run).
  Holds a `Connect` stream (Hello -> Welcome), acks every command on receipt, executes it
  unless its `expires_at` has passed (loopback: this host's clock is the broker's), sends
  the result, repeats a re-sent id's first result, and streams `TelemetryBatch` frames at
  `--car-telemetry-hz`, never faster than the broker's telemetry policy allows. Obeys
  Control frames (policy, reconnect-after, drain).
- `ServiceUser` (weight 1): `SendCommand` with wait=result to a car that is online right
  now (the `VehicleUser`s of this process), with wait=delivered to an offline id
  (`locust-offline-N`: QUEUED with `wait_timed_out` is the right answer), and
  `GetCommand` on its own recent commands.

Every RPC and stream event goes to Locust's stats under its own name:

    grpc  VehicleLink/Connect (Hello->Welcome)      stream opened (time: call to Welcome)
    grpc  VehicleLink/telemetry                     batch handed to the stream (time in the
                                                    car's outbox; length: bytes)
    grpc  VehicleLink/command unlock executed       ack + result sent (time: broker
                                                    created_at -> result sent)
    grpc  VehicleLink/stream ended                  a failure: the broker ended a live stream
    grpc  VehicleLink/control ...                   Control frames received from the broker
    grpc  CommandService/SendCommand unlock online  wait=result; success = SUCCEEDED
    grpc  CommandService/SendCommand unlock offline wait=delivered; success = QUEUED, timed out
    grpc  CommandService/GetCommand

A gRPC error is a failure whose message starts with the status name (e.g.
`RESOURCE_EXHAUSTED: ...`, the per-car critical quota); a wrong answer is a failure that
says what came back. Load tests here target loopback only: any other `--host` is refused.

Against a broker started with auth (not `--insecure-dev`): set `BROKER_VEHICLE_KEY` and
`BROKER_SERVICE_KEY` to signing key files (`broker token keygen`; cars and services mint
their own tokens), or `BROKER_TOKEN` (a service token with send,read; cars then still
need the vehicle key). Paths and tokens go in the environment, never in argv.

gRPC runs on its synchronous API with `grpc.experimental.gevent.init_gevent()`, the pattern
Locust documents for gRPC: Locust has monkey-patched the standard library before it imports
this file, and the call below comes before any channel exists. Users share channels (250
cars or 50 services per HTTP/2 connection; see `Channels`). The registry of online cars is
per process; with `--processes N` each worker's services address its own cars.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from gevent.pool import Group
from gevent.queue import Queue
from locust import User, events, task
from locust.env import Environment
from locust.exception import StopTest
from locust.runners import WorkerRunner

from broker.core.clock import now_ms
from broker.sdk.client import build_request
from broker.security.keys import load_private_key
from broker.security.tokens import issue_token
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from broker.wire import PUSHBACK_KEY, VEHICLE_ID_HEADER

# Must run after gevent's monkey-patching (Locust did it) and before any gRPC object exists.
grpc_gevent.init_gevent()

logger = logging.getLogger(__name__)

REQUEST_TYPE = "grpc"
CONNECT_METHOD = "/broker.v1.VehicleLink/Connect"
SERVICE_PREFIX = "/broker.v1.CommandService/"
#: a channel of its own per group of users (not grpc's process-wide subchannel sharing)
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
#: users per shared channel (one HTTP/2 connection each), as the fleet simulator does
CARS_PER_CHANNEL = 250
SERVICES_PER_CHANNEL = 50
#: gevent threadpool workers kept free beyond one per channel
THREADPOOL_SPARE = 10
WELCOME_TIMEOUT_S = 15.0
CLOSE_GRACE_S = 0.5
RECENT_RESULTS = 64
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0
#: in car ids, so a rerun against the same broker never inherits an earlier run's queue
RUN_TAG = uuid.uuid4().hex[:6]

#: custom command-line options (also LOCUST_<NAME> environment variables): default, help
OPTIONS: dict[str, tuple[Any, str]] = {
    "car_telemetry_hz": (
        1.0,
        "telemetry batches per second per car (0: none); the broker's policy interval wins "
        "when it is longer",
    ),
    "car_exec_ms": (0.0, "how long a car takes to execute a command"),
    "send_command": ("unlock", "the command name services send"),
    "result_wait_s": (10.0, "wait_timeout of SendCommand wait=result to online cars"),
    "offline_wait_s": (0.2, "wait_timeout of SendCommand wait=delivered to offline ids"),
    "offline_ttl_s": (30.0, "TTL of the commands sent to offline ids (they expire queued)"),
    "offline_cars": (1000, "how many distinct offline ids services address"),
}


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    for name, (default, help_text) in OPTIONS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=type(default),
            default=default,
            env_var=f"LOCUST_{name.upper()}",
            help=help_text,
        )


def option(environment: Environment, name: str) -> Any:
    options = environment.parsed_options
    value = getattr(options, name, None) if options is not None else None
    return OPTIONS[name][0] if value is None else value


# -- target ------------------------------------------------------------------------------------


def loopback_target(host: str | None) -> str:
    """`--host` as a gRPC target, or ValueError unless it is HOST:PORT on loopback."""
    if not host:
        raise ValueError("no target: pass --host 127.0.0.1:PORT (the broker's gRPC port)")
    target = host.strip().rstrip("/")
    for scheme in ("grpc://", "http://"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
    name, sep, port = target.rpartition(":")
    if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--host must be HOST:PORT (e.g. 127.0.0.1:50051), got {host!r}")
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if ":" in bare and bare == name:
        raise ValueError(f"write an IPv6 --host as [::1]:PORT, got {host!r}")
    if bare.lower() != "localhost":
        try:
            loopback = ipaddress.ip_address(bare).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"refusing --host {host!r}: these load tests target loopback only "
                "(127.0.0.0/8, localhost, ::1)"
            )
    return target


@events.init.add_listener
def _refuse_non_loopback(environment: Environment, runner: Any = None, **_kw: Any) -> None:
    """Fail fast at start-up; each user checks again (the web UI can change the host)."""
    headless = bool(getattr(environment.parsed_options, "headless", False))
    if environment.host is None and (not headless or isinstance(runner, WorkerRunner)):
        return
    try:
        loopback_target(environment.host)
    except ValueError as exc:
        logger.error("%s", exc)
        raise SystemExit(2) from None


def _checked_target(user: User) -> str:
    try:
        return loopback_target(user.host)
    except ValueError as exc:
        raise StopTest(str(exc)) from None


# -- shared helpers ------------------------------------------------------------------------------


class RpcFailure(Exception):
    """What a failed request is reported with: the gRPC status name first, or the wrong answer."""


def report(
    environment: Environment,
    name: str,
    response_time_ms: float,
    *,
    length: int = 0,
    error: str | None = None,
) -> None:
    environment.events.request.fire(
        request_type=REQUEST_TYPE,
        name=name,
        response_time=response_time_ms,
        response_length=length,
        exception=RpcFailure(error) if error is not None else None,
        context={},
    )


def rpc_error_text(error: grpc.RpcError) -> str:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return f"{code.name if code else 'UNKNOWN'}: {details or ''}"


def pushback_s(error: grpc.RpcError) -> float:
    """The broker's `grpc-retry-pushback-ms` hint in seconds (0 without one)."""
    if not isinstance(error, grpc.Call):
        return 0.0
    for key, value in error.trailing_metadata() or ():
        if key == PUSHBACK_KEY and str(value).isdigit():
            return int(value) / 1000
    return 0.0


def auth_metadata(**claims: Any) -> list[tuple[str, str]]:
    """`authorization` metadata minted with the key file in $BROKER_VEHICLE_KEY or
    $BROKER_SERVICE_KEY (or $BROKER_TOKEN for services), valid for the default lifetime
    (24 h for a car, 1 h for a service: longer runs need `--ttl`-like care)."""
    role = "BROKER_SERVICE_KEY" if "service" in claims else "BROKER_VEHICLE_KEY"
    key_file = os.environ.get(role)
    if key_file:
        token = issue_token(load_private_key(Path(key_file)), **claims)
        return [("authorization", f"Bearer {token}")]
    token = os.environ.get("BROKER_TOKEN")
    if token and "service" in claims:
        return [("authorization", f"Bearer {token}")]
    return []


class OnlineCars:
    """Ids of the cars whose stream is up right now (Welcome received), with O(1) choice."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, vehicle_id: str) -> None:
        if vehicle_id not in self._index:
            self._index[vehicle_id] = len(self._ids)
            self._ids.append(vehicle_id)

    def discard(self, vehicle_id: str) -> None:
        index = self._index.pop(vehicle_id, None)
        if index is None:
            return
        last = self._ids.pop()
        if index < len(self._ids):
            self._ids[index] = last
            self._index[last] = index

    def choice(self) -> str | None:
        return random.choice(self._ids) if self._ids else None

    def __contains__(self, vehicle_id: object) -> bool:
        return vehicle_id in self._index

    def __len__(self) -> int:
        return len(self._ids)


class Channels:
    """Channels shared by groups of users.

    Under `init_gevent`, gRPC polls completion queues in gevent's threadpool (10 workers
    by default), and a poll holds its worker until an event comes: every channel with
    calls in flight holds one (a held stream holds it for good), and so does every
    *blocking* unary call (`rpc(request)` polls a queue of its own). Past the pool's size
    everything stalls for seconds, cars' acks included. So users share a few channels,
    unary calls go through `.future()` (polled by their channel's one poller), and the
    pool is grown to one worker per channel plus spares.
    """

    def __init__(self) -> None:
        self._channels: dict[tuple[str, str, int], grpc.Channel] = {}

    def get(self, target: str, kind: str, index: int) -> grpc.Channel:
        key = (target, kind, index)
        channel = self._channels.get(key)
        if channel is None:
            channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            self._channels[key] = channel
            pool = gevent.get_hub().threadpool
            pool.maxsize = max(pool.maxsize, len(self._channels) + THREADPOOL_SPARE)
        return channel

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


ONLINE = OnlineCars()
CHANNELS = Channels()
_car_numbers = itertools.count()
_service_numbers = itertools.count()


@events.quitting.add_listener
def _close_channels(**_kw: Any) -> None:
    CHANNELS.close()


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


# -- the car -------------------------------------------------------------------------------------

_CLOSE = object()


class CarStream:
    """One `Connect` call on the sync API: writes go through one outbox, read by one greenlet.

    gRPC allows one write in flight per stream; the request iterator is the only writer
    (it hands grpc the next frame once the previous one is sent), so any greenlet may
    `send` and frames keep their order.
    """

    def __init__(self, user: VehicleUser, call_factory: Any, metadata: list[tuple[str, str]]):
        self.user = user
        self.outbox: Queue[Any] = Queue()
        self.connected = False
        self.closing = False
        self.policy = link.TelemetryPolicy()
        self._call = call_factory(self._frames(), metadata=metadata)
        self._workers = Group()

    def _frames(self) -> Iterator[Any]:
        while True:
            item = self.outbox.get()
            if item is _CLOSE:
                return
            frame, on_taken = item
            if on_taken is not None:
                on_taken()
            yield frame

    def send(self, frame: Any, on_taken: Callable[[], None] | None = None) -> None:
        if not self.closing:
            self.outbox.put((frame, on_taken))

    def open(self, hello: Any) -> Any:
        """Send Hello and return the first frame (Welcome); raises grpc.RpcError."""
        self.send(hello)
        with gevent.Timeout(WELCOME_TIMEOUT_S, TimeoutError):
            return next(self._call)

    def start_reading(self) -> None:
        self._workers.spawn(self._read)

    def _read(self) -> None:
        user = self.user
        error: str | None = None
        try:
            for frame in self._call:
                kind = frame.WhichOneof("kind")
                if kind == "command":
                    self._workers.spawn(user.run_command, self, frame.command)
                elif kind == "control":
                    if self._on_control(frame.control):
                        break
                else:
                    error = f"unexpected {kind} frame after Welcome"
                    break
            else:
                error = "the broker ended the stream (OK)"
        except grpc.RpcError as exc:
            error = rpc_error_text(exc)
        finally:
            self.connected = False
            ONLINE.discard(user.vehicle_id)
        if error is not None and not self.closing:
            report(user.environment, "VehicleLink/stream ended", 0, error=error)
        self.close(grace_s=CLOSE_GRACE_S)

    def _on_control(self, control: Any) -> bool:
        """Apply a Control frame; True when it ends this stream."""
        which = control.WhichOneof("kind")
        report(self.user.environment, f"VehicleLink/control {which}", 0, length=control.ByteSize())
        if which == "telemetry_policy":
            self.policy = control.telemetry_policy
            return False
        if which == "reconnect_after_ms":
            self.user.reconnect_after(control.reconnect_after_ms / 1000)
        return True  # reconnect_after_ms or drain: this stream ends

    def close(self, grace_s: float = 0.0) -> None:
        """Half-close, let the broker end the call for up to `grace_s`, then cancel it."""
        if self.closing:
            return
        self.closing = True
        self.connected = False
        ONLINE.discard(self.user.vehicle_id)
        self.outbox.put(_CLOSE)
        if grace_s > 0 and gevent.getcurrent() not in self._workers:
            self._workers.join(timeout=grace_s)
        self._call.cancel()
        if gevent.getcurrent() not in self._workers:
            self._workers.kill(block=True, timeout=1.0)


class VehicleUser(User):
    """A car: holds its stream, executes commands, streams telemetry."""

    weight = 4

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.target = _checked_target(self)
        prefix = "locust-car-"
        if isinstance(environment.runner, WorkerRunner):
            prefix += f"w{environment.runner.worker_index}-"
        self.number = next(_car_numbers)
        self.vehicle_id = f"{prefix}{RUN_TAG}-{self.number}"
        self.telemetry_hz = float(option(environment, "car_telemetry_hz"))
        self.exec_s = float(option(environment, "car_exec_ms")) / 1000
        self.stream: CarStream | None = None
        self._failures = 0
        self._retry_at = 0.0
        #: command_id -> its first result; a re-sent id is answered from here
        self._results: OrderedDict[str, Any] = OrderedDict()
        self._rng = random.Random()
        self._lat = round(self._rng.uniform(47.0, 55.0), 5)
        self._lon = round(self._rng.uniform(6.0, 15.0), 5)
        self._battery = round(self._rng.uniform(30, 95), 1)

    def wait_time(self) -> float:
        stream = self.stream
        if stream is None or not stream.connected:
            return max(0.05, self._retry_at - time.monotonic())
        interval = 1 / self.telemetry_hz if self.telemetry_hz > 0 else 1.0
        interval = max(interval, stream.policy.interval_ms / 1000)
        return interval * self._rng.uniform(0.9, 1.1)

    def on_start(self) -> None:
        channel = CHANNELS.get(self.target, "cars", self.number // CARS_PER_CHANNEL)
        self._connect_rpc = channel.stream_stream(
            CONNECT_METHOD,
            request_serializer=link.VehicleFrame.SerializeToString,
            response_deserializer=link.BrokerFrame.FromString,
        )
        self._metadata = [
            (VEHICLE_ID_HEADER, self.vehicle_id),
            *auth_metadata(vehicle=self.vehicle_id),
        ]
        self.connect()

    def on_stop(self) -> None:
        ONLINE.discard(self.vehicle_id)
        if self.stream is not None:
            self.stream.close(grace_s=CLOSE_GRACE_S)

    # -- the stream ------------------------------------------------------------------------------

    def connect(self) -> bool:
        """Open the stream: Hello, Welcome; on a refusal, schedule the retry."""
        if time.monotonic() < self._retry_at:
            return False
        if self.stream is not None:
            self.stream.close()
        recent = list(self._results)[-RECENT_RESULTS:]
        stream = CarStream(self, self._connect_rpc, self._metadata)
        self.stream = stream
        hello = link.VehicleFrame(hello=link.Hello(firmware="locust", recent_command_ids=recent))
        started = time.perf_counter()
        name = "VehicleLink/Connect (Hello->Welcome)"
        hint_s = 0.0
        try:
            first = stream.open(hello)
            error = None if first.WhichOneof("kind") == "welcome" else "first frame is not Welcome"
        except grpc.RpcError as exc:
            error, hint_s = rpc_error_text(exc), pushback_s(exc)
            if error.startswith(("UNAUTHENTICATED", "PERMISSION_DENIED")):
                hint_s = BACKOFF_CAP_S  # retrying will not help soon: do not spin
        except StopIteration:
            error = "the broker ended the stream before Welcome"
        except TimeoutError:
            error = f"DEADLINE_EXCEEDED: no Welcome within {WELCOME_TIMEOUT_S:g}s (locust side)"
        if error is not None:
            report(self.environment, name, _elapsed_ms(started), error=error)
            stream.close()
            self._failures += 1
            backoff = self._rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**self._failures))
            self._retry_at = time.monotonic() + max(backoff, hint_s * self._rng.uniform(1.0, 1.5))
            return False
        report(self.environment, name, _elapsed_ms(started), length=first.ByteSize())
        self._failures = 0
        welcome = first.welcome
        stream.policy = welcome.telemetry_policy
        stream.connected = True
        ONLINE.add(self.vehicle_id)
        stream.start_reading()
        for command_id in recent:  # results the broker may not have received
            stream.send(link.VehicleFrame(result=self._results[command_id]))
        return True

    def reconnect_after(self, delay_s: float) -> None:
        """The broker asked this car to come back later (plus jitter)."""
        self._retry_at = time.monotonic() + delay_s * self._rng.uniform(1.0, 1.5)

    def run_command(self, stream: CarStream, command: Any) -> None:
        """Ack on receipt; execute once unless expired; send the result.

        The broker is on loopback, so this host's clock is the broker's: `expires_at_ms`
        and `issued_at_ms` are compared with it directly (a Welcome-based offset would be
        off by the Welcome's own latency).
        """
        stream.send(link.VehicleFrame(ack=link.CommandAck(command_id=command.command_id)))
        result = self._results.get(command.command_id)
        name = f"VehicleLink/command {command.name} executed"
        if result is None:
            error = None
            if now_ms() >= command.expires_at_ms:
                error = "expired before execution; not executed"
                result = link.CommandResult(
                    command_id=command.command_id, success=False, message=error
                )
            else:
                if self.exec_s > 0:
                    gevent.sleep(self.exec_s)
                result = link.CommandResult(
                    command_id=command.command_id, success=True, message="ok"
                )
            self._results[command.command_id] = result
            while len(self._results) > 4 * RECENT_RESULTS:
                self._results.popitem(last=False)
            took_ms = max(0, now_ms() - command.issued_at_ms)
            report(self.environment, name, took_ms, length=command.ByteSize(), error=error)
        else:
            report(self.environment, f"VehicleLink/command {command.name} re-sent", 0)
        stream.send(link.VehicleFrame(result=result))

    # -- tasks -----------------------------------------------------------------------------------

    @task
    def telemetry(self) -> None:
        stream = self.stream
        if stream is None or not stream.connected:
            self.connect()
            return
        if self.telemetry_hz <= 0:
            return
        frame = link.VehicleFrame(telemetry=link.TelemetryBatch(signals=self._signals(stream)))
        size = frame.ByteSize()
        queued = time.perf_counter()

        def taken() -> None:
            report(self.environment, "VehicleLink/telemetry", _elapsed_ms(queued), length=size)

        stream.send(frame, taken)

    def _signals(self, stream: CarStream) -> list[Any]:
        self._lat = round(self._lat + self._rng.uniform(-1e-4, 1e-4), 6)
        self._lon = round(self._lon + self._rng.uniform(-1e-4, 1e-4), 6)
        values = {"lat": self._lat, "lon": self._lon}
        if stream.policy.verbosity >= 1:
            values["battery_pct"] = self._battery
        if stream.policy.verbosity >= 2:
            values.update({f"diag_{i}": round(self._rng.uniform(0, 100), 2) for i in range(8)})
        at = now_ms()
        return [
            link.Signal(name=k, value=t.Value(number=v), reported_at_ms=at)
            for k, v in values.items()
        ]


# -- the service ---------------------------------------------------------------------------------


class ServiceUser(User):
    """An internal service: commands to online and offline cars, and status reads."""

    weight = 1

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.target = _checked_target(self)
        self.command = str(option(environment, "send_command"))
        self.result_wait_s = float(option(environment, "result_wait_s"))
        self.offline_wait_s = float(option(environment, "offline_wait_s"))
        self.offline_ttl_s = float(option(environment, "offline_ttl_s"))
        self.offline_cars = max(1, int(option(environment, "offline_cars")))
        self.number = next(_service_numbers)
        self._recent: deque[str] = deque(maxlen=100)
        self._pause_until = 0.0

    def wait_time(self) -> float:
        return max(random.uniform(0.5, 1.5), self._pause_until - time.monotonic())

    def on_start(self) -> None:
        channel = CHANNELS.get(self.target, "services", self.number // SERVICES_PER_CHANNEL)
        self._metadata = auth_metadata(service="locust", scopes=("send", "read"))
        self._send = channel.unary_unary(
            SERVICE_PREFIX + "SendCommand",
            request_serializer=svc.SendCommandRequest.SerializeToString,
            response_deserializer=svc.SendCommandResponse.FromString,
        )
        self._get = channel.unary_unary(
            SERVICE_PREFIX + "GetCommand",
            request_serializer=svc.GetCommandRequest.SerializeToString,
            response_deserializer=t.Command.FromString,
        )

    def _call(self, name: str, rpc: Any, request: Any, timeout_s: float) -> tuple[Any, float]:
        """One unary call; a gRPC error is reported here (reply None), the answer is not."""
        started = time.perf_counter()
        try:
            # `.future()`, not a blocking call: see `Channels`.
            reply = rpc.future(request, metadata=self._metadata, timeout=timeout_s).result()
        except grpc.RpcError as exc:
            elapsed = _elapsed_ms(started)
            report(self.environment, name, elapsed, error=rpc_error_text(exc))
            hint = pushback_s(exc)
            if hint:
                self._pause_until = time.monotonic() + hint
            return None, elapsed
        return reply, _elapsed_ms(started)

    def _request(self, vehicle_id: str, wait: str, wait_s: float, ttl_s: float | None) -> Any:
        return build_request(
            vehicle_id, self.command, ttl_s=ttl_s, wait=wait, timeout_s=wait_s,
            idempotency_key=f"locust-{uuid.uuid4().hex}",
        )  # fmt: skip

    @task(3)
    def send_online(self) -> None:
        vehicle_id = ONLINE.choice()
        if vehicle_id is None:
            self.send_offline()
            return
        name = f"CommandService/SendCommand {self.command} online"
        request = self._request(vehicle_id, "result", self.result_wait_s, None)
        reply, elapsed = self._call(name, self._send, request, self.result_wait_s + 5)
        if reply is None:
            return
        command = reply.command
        self._recent.append(command.command_id)
        error = None
        if command.status != t.SUCCEEDED:
            error = f"{t.CommandStatus.Name(command.status)}, not SUCCEEDED"
            if reply.wait_timed_out:
                where = "still online" if vehicle_id in ONLINE else "gone offline"
                error += f" after a {self.result_wait_s:g}s wait (the car is {where})"
            elif command.status_reason or command.result_message:
                error += f": {command.result_message or command.status_reason}"
        report(self.environment, name, elapsed, length=reply.ByteSize(), error=error)

    @task(1)
    def send_offline(self) -> None:
        vehicle_id = f"locust-offline-{random.randrange(self.offline_cars)}"
        name = f"CommandService/SendCommand {self.command} offline"
        request = self._request(vehicle_id, "delivered", self.offline_wait_s, self.offline_ttl_s)
        reply, elapsed = self._call(name, self._send, request, self.offline_wait_s + 5)
        if reply is None:
            return
        command = reply.command
        self._recent.append(command.command_id)
        error = None
        if command.status != t.QUEUED or not reply.wait_timed_out:
            error = (
                f"expected QUEUED with wait_timed_out, got {t.CommandStatus.Name(command.status)}"
                f" (wait_timed_out={reply.wait_timed_out})"
            )
        report(self.environment, name, elapsed, length=reply.ByteSize(), error=error)

    @task(1)
    def get_command(self) -> None:
        if not self._recent:
            return
        command_id = random.choice(self._recent)
        name = "CommandService/GetCommand"
        request = svc.GetCommandRequest(command_id=command_id)
        reply, elapsed = self._call(name, self._get, request, 5.0)
        if reply is None:
            return
        error = None if reply.command_id == command_id else "a different command came back"
        report(self.environment, name, elapsed, length=reply.ByteSize(), error=error)
