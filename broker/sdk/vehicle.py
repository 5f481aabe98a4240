"""Vehicle SDK: the car side of VehicleLink, for real agents and simulators.

    agent = VehicleAgent("127.0.0.1:50051", "car-1", token=current_token,
                         handlers={"unlock": unlock_doors})
    await agent.run()   # holds the stream, reconnecting with backoff, until stop()

`token` is a fixed token or a provider (a callable returning the current one, e.g.
`broker.security.tokens.TokenMinter` or a call to the fleet's token service). The broker
ends a stream with UNAUTHENTICATED when its token expires or is revoked; with a provider
that then has another token the agent reconnects at once with it, otherwise a refusal
(UNAUTHENTICATED, PERMISSION_DENIED) ends `run()` with the error.

A handler takes the payload bytes and returns True/False, or `(success, message, detail)`.
The agent never executes a command after its `expires_at`, and executes each command id
at most once: a re-sent id gets its first result repeated. It acks a command (CommandAck:
"received, working on it") only if its result is not ready within `ack_delay_s`; a quick
command is answered by its result alone, which tells the broker the same and more, so the
common case costs one frame and one durable write instead of two.

Signed commands: given a `verifier` (`broker.security.signing.CommandVerifier`: the
senders' public keys it trusts, for which names, and which names need a signature), the
agent checks every command before it runs it and executes the signed body's name and
payload, never the frame's. A command it refuses (unsigned where a signature is needed,
an unknown key, a bad signature, another car's, expired by this car's clock, an old
envelope under a new id, a replay) is answered `CommandResult(success=False,
message="refused: <reason>")` and its handler is never called. A re-sent id it already
answered gets that answer again, as for any command; the verifier's replay memory (ids
kept until their signed expiry) refuses an id it ran whose answer the agent no longer
remembers (`remember_results`), so a command runs at most once in either case.

Links that die silently (a NAT timeout, a cell handover: no FIN, the socket looks open
forever) are found at both ends: the agent's channel pings the broker every `keepalive_s`
and gives the connection up when a ping goes unanswered for as long again, and the agent
sends a Heartbeat whenever it has written nothing for the interval the Welcome names, so
the broker (which hears nothing from a dead car) closes its stream. The Connect call
waits for the channel to be ready, so the car is back as soon as the link is (the
channel retries at most `MAX_RECONNECT_BACKOFF_S` apart).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from broker.core.clock import now_ms, steady_ns
from broker.security.signing import CommandVerifier, Refused
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from broker.wire import VEHICLE_ID_HEADER, TokenSource, bearer, pushback_ms

logger = logging.getLogger(__name__)

HandlerResult = bool | tuple[bool, str, bytes] | None
Handler = Callable[[bytes], Awaitable[HandlerResult]]


async def succeed(payload: bytes) -> bool:
    """A command handler that executes at once and succeeds (simulators, tests)."""
    return True


SignalValue = float | int | str | bool
RESEND_WINDOW_S = 120.0
RESEND_MAX = 32
#: A command whose result is not ready this soon is acked first (see the module docstring).
ACK_DELAY_S = 0.05
#: HTTP/2 keepalive of a car's channel: a ping this often, dead after as long unanswered
KEEPALIVE_S = 10.0
#: refusals `VehicleAgent.refused` keeps (a broker sending junk must not grow memory)
REFUSED_KEPT = 1024
#: the longest a car's channel waits between attempts to reconnect
MAX_RECONNECT_BACKOFF_S = 10.0


def car_channel_options(keepalive_s: float = KEEPALIVE_S) -> list[tuple[str, int]]:
    """Channel args for a car's connection (see the module docstring). The broker's
    `grpc.http2.min_ping_interval_without_data_ms` must allow `keepalive_s`."""
    keepalive_ms = int(keepalive_s * 1000)
    return [
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # an idle car must keep pinging
        ("grpc.initial_reconnect_backoff_ms", 1000),
        ("grpc.max_reconnect_backoff_ms", int(MAX_RECONNECT_BACKOFF_S * 1000)),
    ]


def to_value(value: SignalValue) -> Any:
    if isinstance(value, bool):
        return t.Value(flag=value)
    if isinstance(value, int | float):
        return t.Value(number=float(value))
    return t.Value(text=str(value))


def signals(values: Mapping[str, SignalValue], at_ms: int) -> list[Any]:
    return [link.Signal(name=k, value=to_value(v), reported_at_ms=at_ms) for k, v in values.items()]


def full_jitter_backoff(attempt: int, base_s: float, cap_s: float) -> float:
    """AWS-style "full jitter": uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap_s, base_s * (2 ** min(attempt, 30))))


def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    """A TLS channel with `credentials`, else a plaintext one."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


class VehicleAgent:
    """One car's connection to the broker."""

    def __init__(
        self,
        target: str,
        vehicle_id: str,
        *,
        token: TokenSource = None,
        handlers: Mapping[str, Handler] | None = None,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        firmware: str = "sdk",
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 30.0,
        remember_results: int = 1024,
        obey_policy: bool = True,
        compression: grpc.Compression | None = None,
        ack_delay_s: float = ACK_DELAY_S,
        keepalive_s: float = KEEPALIVE_S,
        verifier: CommandVerifier | None = None,
    ) -> None:
        """`ack_delay_s`: 0 acks every command on receipt. `keepalive_s`: see the module
        docstring (a `channel` passed in brings its own options: `car_channel_options`).
        `verifier`: check signed commands (see the module docstring); one per car (it
        holds the car's replay memory).

        `compression`: per-call message compression for this car's stream (e.g.
        `grpc.Compression.Gzip` on a metered cellular link; off by default because on a
        fast link the CPU, not the bandwidth, is the limit — see loadtests/compression.py).
        """
        self.vehicle_id = vehicle_id
        self.handlers: dict[str, Handler] = dict(handlers or {})
        # mTLS: `credentials` carry this car's certificate (broker.security.tls
        # .channel_credentials); the broker takes the car's identity from it.
        self._channel = channel or open_channel(
            target, credentials, car_channel_options(keepalive_s)
        )
        self._owns_channel = channel is None
        self._token = token
        self._metadata: tuple[tuple[str, str], ...] = ()  # of the latest attempt
        self._firmware = firmware
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._remember_max = remember_results
        self._ack_delay_s = ack_delay_s
        #: command_id -> the future of its result frame: a re-sent id is never executed
        #: twice, whether its first run finished or is still going (dedup).
        self._results: OrderedDict[str, asyncio.Future[Any]] = OrderedDict()
        self._finished_at: dict[str, float] = {}  # command_id -> monotonic completion time
        #: gRPC allows one write in flight per stream; every frame goes through this lock.
        self._write_lock = asyncio.Lock()
        self._execution_lock = asyncio.Lock()
        self._call: Any = None
        self._stopping = False
        #: the broker's clock at the Welcome, and our monotonic time then: the broker's
        #: time now is derived from these, so a step of this car's clock changes nothing
        self._welcome_server_ms = 0
        self._welcome_at_ns = 0
        self._last_write_s = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connected = asyncio.Event()
        self.session_id = ""
        self.executed: list[str] = []  # ids whose handler actually ran, in order
        self.verifier = verifier
        #: (command id, reason) of the latest commands the verifier refused, in order
        self.refused: deque[tuple[str, str]] = deque(maxlen=REFUSED_KEPT)
        self.telemetry_policy: Any = link.TelemetryPolicy()
        self.obey_policy = obey_policy
        self._compression = compression
        self.policy_changes = 0  # Control frames that changed the telemetry policy
        self._pending_signals: dict[str, Any] = {}
        self._next_telemetry_at = 0.0
        self._byte_tokens = 0.0
        self._bytes_checked_at = time.monotonic()
        self.last_error: grpc.aio.AioRpcError | None = None
        self.connects = 0
        #: reconnects with a fresh token after the broker refused the last one
        self.renewals = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Hold the stream until `stop()`, reconnecting with exponential full-jitter backoff."""
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            delay_hint_s = 0.0
            try:
                delay_hint_s = await self.connect_once()
            except grpc.aio.AioRpcError as error:
                self.last_error = error
                delay_hint_s = _pushback_s(error)
                if error.code() == grpc.StatusCode.UNAUTHENTICATED and self._renews():
                    # The token ran out (or was revoked) and the provider has another:
                    # back at once, with a little jitter so a fleet does not come in step.
                    logger.info("vehicle %s: %s; renewing", self.vehicle_id, error.details())
                    self.renewals += 1
                    failures = 0
                    await asyncio.sleep(random.uniform(0, self._backoff_base_s))
                    continue
                if error.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    logger.error("vehicle %s refused: %s", self.vehicle_id, error.details())
                    raise
            except (asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
                # The call ended before our first write got its turn: just another failed
                # attempt (never a reason to stop reconnecting).
                logger.debug("vehicle %s connect attempt ended early: %r", self.vehicle_id, exc)
            if self._stopping:
                break
            failures = 0 if time.monotonic() - started > 30 else failures + 1
            backoff = full_jitter_backoff(failures, self._backoff_base_s, self._backoff_cap_s)
            await asyncio.sleep(max(backoff, delay_hint_s * random.uniform(1.0, 1.5)))

    def _renews(self) -> bool:
        """Whether the token provider now has a token other than the one just refused."""
        return callable(self._token) and self._stream_metadata() != self._metadata

    def _stream_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((VEHICLE_ID_HEADER, self.vehicle_id), *bearer(self._token))

    async def connect_once(self) -> float:
        """One session: Hello, Welcome, then frames until the stream ends.

        Returns a reconnect-after hint in seconds (0 if none); raises AioRpcError when the
        broker ends the stream with an error status.
        """
        connect = self._channel.stream_stream(
            "/broker.v1.VehicleLink/Connect",
            request_serializer=link.VehicleFrame.SerializeToString,
            response_deserializer=link.BrokerFrame.FromString,
        )
        self._metadata = self._stream_metadata()
        call = connect(metadata=self._metadata, compression=self._compression, wait_for_ready=True)
        self._call = call
        reconnect_after_s = 0.0
        try:
            await self._write(
                call,
                link.VehicleFrame(
                    hello=link.Hello(
                        firmware=self._firmware,
                        capabilities=sorted(self.handlers),
                        recent_command_ids=list(self._results)[-64:],
                        sends_heartbeats=True,
                    )
                ),
            )
            while True:
                frame: Any = await call.read()
                if frame is grpc.aio.EOF:
                    break
                kind = frame.WhichOneof("kind")
                if kind == "welcome":
                    welcome = frame.welcome
                    self._welcome_server_ms = welcome.server_time_ms
                    self._welcome_at_ns = steady_ns()
                    self.session_id = welcome.session_id
                    self.telemetry_policy = welcome.telemetry_policy
                    self.connects += 1
                    self.connected.set()
                    self._spawn(self._resend_recent_results(call))
                    if welcome.heartbeat_interval_ms:
                        self._spawn(self._heartbeat(call, welcome.heartbeat_interval_ms / 1000))
                elif kind == "command":
                    self._spawn(self._on_command(call, frame.command))
                elif kind == "control":
                    control = frame.control
                    which = control.WhichOneof("kind")
                    if which == "telemetry_policy":
                        self.telemetry_policy = control.telemetry_policy
                        self.policy_changes += 1
                    elif which == "reconnect_after_ms":
                        reconnect_after_s = control.reconnect_after_ms / 1000
                        break
                    elif which == "drain":
                        break
        finally:
            self.connected.clear()
            self._call = None
            call.cancel()
        return reconnect_after_s

    async def stop(self) -> None:
        self._stopping = True
        if self._call is not None:
            self._call.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._owns_channel:
            await self._channel.close()

    # -- reports -----------------------------------------------------------------------------

    async def report_state(self, values: Mapping[str, SignalValue]) -> None:
        await self._send(
            link.VehicleFrame(state=link.StateReport(fields=signals(values, now_ms())))
        )

    async def send_telemetry(self, batch: Iterable[Any]) -> bool:
        """Send telemetry signals as the broker's policy allows; True if a batch went out.

        Obeying the policy (the default): at most one batch per `interval_ms`, within
        `max_bytes_per_second`; in between, only the latest value per signal is kept and
        goes out with the next batch. With `obey_policy=False` (simulating the outage's
        misbehaving firmware) every call sends at once.
        """
        if not self.obey_policy:
            frame = link.VehicleFrame(telemetry=link.TelemetryBatch(signals=list(batch)))
            await self._send(frame)
            return True
        for signal in batch:
            self._pending_signals[signal.name] = signal
        now = time.monotonic()
        policy = self.telemetry_policy
        if now < self._next_telemetry_at or not self._pending_signals:
            return False
        frame = link.VehicleFrame(
            telemetry=link.TelemetryBatch(signals=list(self._pending_signals.values()))
        )
        size = frame.ByteSize()
        if policy.max_bytes_per_second:
            rate = policy.max_bytes_per_second
            elapsed = now - self._bytes_checked_at
            self._bytes_checked_at = now
            self._byte_tokens = min(2.0 * rate, self._byte_tokens + elapsed * rate)
            if self._byte_tokens <= 0:
                return False  # over the byte budget: keep coalescing
            # A batch may overdraw the bucket (its debt delays the next one), so even a
            # batch larger than a second's budget goes out, at the budget's average rate.
            self._byte_tokens -= size
        await self._send(frame)
        self._pending_signals.clear()
        self._next_telemetry_at = now + policy.interval_ms / 1000
        return True

    async def _send(self, frame: Any) -> None:
        call = self._call
        if call is None or not self.connected.is_set():
            raise ConnectionError(f"vehicle {self.vehicle_id} is not connected")
        await self._write(call, frame)

    async def _write(self, call: Any, frame: Any) -> None:
        async with self._write_lock:
            await call.write(frame)
            self._last_write_s = time.monotonic()

    async def _heartbeat(self, call: Any, interval_s: float) -> None:
        """Write a Heartbeat whenever nothing else went out for `interval_s`."""
        beat = link.VehicleFrame(heartbeat=link.Heartbeat())
        try:
            while self._call is call:
                await asyncio.sleep(self._last_write_s + interval_s - time.monotonic())
                if self._call is call and time.monotonic() - self._last_write_s >= interval_s:
                    await self._write(call, beat)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            return  # the stream broke; the next session starts its own

    def server_now_ms(self) -> int:
        """The broker's clock now, as of the last Welcome, advanced by the boot-time clock
        (which counts a suspended ECU's sleep; this car's wall clock is not used)."""
        return self._welcome_server_ms + (steady_ns() - self._welcome_at_ns) // 1_000_000

    # -- commands ----------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_command(self, call: Any, command: Any) -> None:
        command_id = command.command_id
        ack = link.VehicleFrame(ack=link.CommandAck(command_id=command_id))
        if self._ack_delay_s <= 0:
            acking = None
            await self._write(call, ack)
        else:
            acking = asyncio.get_running_loop().call_later(
                self._ack_delay_s, lambda: self._spawn(self._send_ack(call, ack))
            )
        try:
            result = self._results.get(command_id)
            if result is None:
                result = asyncio.get_running_loop().create_future()
                self._remember(command_id, result)
                try:
                    # One command at a time, in wire order (both locks are FIFO): an unlock
                    # followed by a lock must end locked.
                    async with self._execution_lock:
                        outcome = await self._execute(command)
                    result.set_result(outcome)
                except BaseException:  # stopped mid-command: forget it, never hang a re-send
                    self._results.pop(command_id, None)
                    result.cancel()
                    raise
                self._finished_at[command_id] = time.monotonic()
            outcome = await asyncio.shield(result)
            if acking is not None:
                acking.cancel()  # a no-op if the ack went (it is then ahead in the write lock)
            await self._write(call, link.VehicleFrame(result=outcome))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            # The stream broke; the result is kept and re-sent after the next Welcome.
            logger.debug("vehicle %s could not answer %s: %r", self.vehicle_id, command_id, exc)
        finally:
            if acking is not None:
                acking.cancel()

    async def _send_ack(self, call: Any, ack: Any) -> None:
        try:
            await self._write(call, ack)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            return  # the stream broke; the command is re-sent or its result repeated later

    async def _resend_recent_results(self, call: Any) -> None:
        """After a reconnect, repeat results that may not have reached the broker.

        Bounded to results finished in the last `RESEND_WINDOW_S` (at most
        `RESEND_MAX`), so a fleet-wide reconnect costs next to nothing; the broker
        ignores results it already has.
        """
        horizon = time.monotonic() - RESEND_WINDOW_S
        recent = [cid for cid, at in self._finished_at.items() if at >= horizon][-RESEND_MAX:]
        try:
            for command_id in recent:
                result = self._results.get(command_id)
                if result is not None and result.done():
                    await self._write(call, link.VehicleFrame(result=result.result()))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            return

    def _remember(self, command_id: str, result: asyncio.Future[Any]) -> None:
        self._results[command_id] = result
        while len(self._results) > self._remember_max:
            old_id, _ = self._results.popitem(last=False)
            self._finished_at.pop(old_id, None)

    async def _execute(self, command: Any) -> Any:
        server_now = self.server_now_ms()
        if server_now >= command.expires_at_ms:
            return self._result(command, (False, "expired before execution; not executed", b""))
        name, payload = command.name, command.payload
        if self.verifier is not None:
            # Checked (and remembered as run) here, under the execution lock, right before
            # the handler: one command at a time, so nothing runs between check and run.
            try:
                name, payload = self.verifier.check(command, self.vehicle_id)
            except Refused as refusal:
                self.refused.append((command.command_id, refusal.reason))
                logger.warning(
                    "vehicle %s refused command %s: %s",
                    self.vehicle_id,
                    command.command_id[:80],
                    refusal.reason,
                )
                return self._result(command, (False, f"refused: {refusal.reason}"[:1024], b""))
        handler = self.handlers.get(name)
        if handler is None:
            return self._result(command, (False, f"unsupported command {name[:80]!r}", b""))
        self.executed.append(command.command_id)
        try:
            outcome = await handler(payload)
        except Exception as exc:
            outcome = (False, f"handler error: {exc}", b"")
        return self._result(command, outcome)

    @staticmethod
    def _result(command: Any, outcome: HandlerResult) -> Any:
        if outcome is None or isinstance(outcome, bool):
            success, message, detail = outcome is not False, "", b""
        else:
            success, message, detail = outcome
        return link.CommandResult(
            command_id=command.command_id, success=success, message=message, detail=detail
        )


def _pushback_s(error: grpc.aio.AioRpcError) -> float:
    """The broker's retry hint in seconds (0 when it sent none)."""
    return (pushback_ms(error.trailing_metadata()) or 0) / 1000
