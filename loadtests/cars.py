"""The simulated-car process of the load tools, and `CarsProcess`, its parent's side.

    python -m loadtests.cars --target 127.0.0.1:PORT --cars 100 [--prefix car-] [...]

holds `--cars` `VehicleAgent`s (ids PREFIX0, PREFIX1, ...; each executes `unlock` and
`lock` at once and succeeds), `--cars-per-channel` multiplexed on one HTTP/2 connection,
opened at `--ramp` new streams/s (0: all at once). Each car's token is minted with the
vehicle signing key file named by $BROKER_VEHICLE_KEY when that is set (never argv). What
differs between the tools is a flag: `--channel-options` (gRPC channel args, default the
SDK's car channel),
`--agent` (VehicleAgent keyword arguments: firmware, backoff, ...), `--rate` (telemetry
batches/min per car), `--report-s` (a progress line this often), `--events` (a line per
car connected, lost, command executed).

It prints one JSON line per event, each with the counts so far (cars connected, connects,
commands executed, telemetry sent, its memory and CPU): `start` (the cars are built and
begin to connect), `ramped`, `ready` (every car has connected), `progress`, then `end`
(with the cars' stream errors and a few stragglers) when its stdin closes, on SIGTERM or
SIGINT, or once every car has given up. Commands on stdin: `rate X` (telemetry
batches/min per car), `report` (a line with the stragglers).

Loopback only (or the broker's address inside `loadtests.netns`' namespaces).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import random
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from broker.core.clock import now_ms
from broker.sdk.vehicle import VehicleAgent, car_channel_options, signals, succeed
from broker.security.keys import load_private_key
from broker.security.tokens import issue_token
from broker.server.broker import install_event_loop_policy
from broker.testing import LOOPBACK, clean_env, status_kb
from loadtests._util import (
    CARS_PER_CHANNEL,
    ChildProcess,
    log_tail,
    stdin_reader,
    stop_agents,
)
from loadtests.netns import BROKER_ADDRESS

#: the SDK's car channel (keepalive, reconnect backoff), each its own HTTP/2 connection
SDK_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    *car_channel_options(),
]
#: more cars than this exit at once after their `end` line: hanging up 25k streams one by
#: one takes longer than dying
FAST_EXIT_CARS = 2000
#: telemetry batches sent, held back by the car's policy, failed (of which: the write raced
#: the end of the stream), in every line
TELEMETRY_COUNTS = (
    "telemetry_sent",
    "telemetry_held",
    "telemetry_failed",
    "telemetry_invalid_state",
)


# -- the parent's side --------------------------------------------------------------------------


class CarsProcess:
    """`count` simulated cars in a child process (`python -m loadtests.cars`).

    `async with` starts them and waits until every one has connected (RuntimeError after
    `connect_timeout_s`); `start()` only until they begin to connect. Every line it prints
    is kept in `events`, with `seen_at` (this process's monotonic time); `stop()` closes
    its stdin (the cars hang up and print `end`, its `summary`), SIGTERM/SIGKILL if they
    linger. The other arguments are the child's flags (see the module docstring);
    `vehicle_key` (a signing key file) goes to it as $BROKER_VEHICLE_KEY, `run_in`
    prefixes its command (`Hosts.run_in`).
    """

    def __init__(
        self,
        target: str,
        count: int,
        prefix: str,
        log_path: Path,
        *,
        connect_timeout_s: float = 60.0,
        cars_per_channel: int = CARS_PER_CHANNEL,
        channel_options: Sequence[tuple[str, Any]] | None = None,
        agent: Mapping[str, Any] | None = None,
        ramp_per_s: float = 0.0,
        telemetry_per_min: float = 0.0,
        report_s: float = 0.0,
        seed: int = 0,
        events: bool = False,
        vehicle_key: Path | None = None,
        run_in: Sequence[str] = (),
    ) -> None:
        self.count = count
        self.prefix = prefix
        self.log_path = log_path
        self.connect_timeout_s = connect_timeout_s
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        argv = [
            *("loadtests.cars", "--target", target, "--cars", str(count), "--prefix", prefix),
            *("--cars-per-channel", str(cars_per_channel), "--ramp", str(ramp_per_s)),
            *("--rate", str(telemetry_per_min), "--report-s", str(report_s), "--seed", str(seed)),
            *(["--channel-options", json.dumps(channel_options)] if channel_options else []),
            *(["--agent", json.dumps(dict(agent))] if agent else []),
            *(["--events"] if events else []),
        ]
        self._child = ChildProcess(
            argv,
            log_path,
            prefix=run_in,
            env=clean_env({"BROKER_VEHICLE_KEY": str(vehicle_key)} if vehicle_key else {}),
            on_line=self._on_line,
        )

    @property
    def vehicle_ids(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(self.count)]

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def exit_code(self) -> int | None:
        """None until it has been started and has ended."""
        return self._child.exit_code

    @property
    def latest(self) -> dict[str, Any]:
        """Its last line ({} before the first)."""
        return self.events[-1] if self.events else {}

    @property
    def summary(self) -> dict[str, Any]:
        """Its `end` line ({} before it): what the cars did."""
        return {k: v for k, v in self.event("end").items() if k != "seen_at"}

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == kind]

    def event(self, kind: str) -> dict[str, Any]:
        """The first line of `kind` ({} if none came yet)."""
        return next(iter(self.of(kind)), {})

    def _on_line(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if isinstance(event, dict) and "event" in event:
            event["seen_at"] = time.monotonic()
            self.events.append(event)
            self._changed.set()

    async def wait(self, kind: str, count: int, timeout_s: float) -> dict[str, Any] | None:
        """The `count`-th line of `kind` (1-based), or None if it did not come in time or
        the process ended first."""
        deadline = time.monotonic() + timeout_s
        while len(self.of(kind)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._child.reading:
                return None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):  # every 0.5 s: has it ended?
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
        return self.of(kind)[count - 1]

    async def start(self, timeout_s: float = 120.0) -> None:
        """Start the process; return once its cars are built and begin to connect."""
        await self._child.spawn()
        if await self.wait("start", 1, timeout_s) is None:
            await self.stop()
            raise RuntimeError(
                f"the car process did not start; log tail:\n{log_tail(self.log_path)}"
            )

    async def __aenter__(self) -> CarsProcess:
        await self.start()
        if await self.wait("ready", 1, self.connect_timeout_s) is None:
            await self.stop()
            raise RuntimeError(
                f"not all {self.count} cars connected within {self.connect_timeout_s:g} s "
                f"({self.summary or self.latest}); log tail:\n{log_tail(self.log_path)}"
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def send(self, line: str) -> None:
        """A command on its stdin (`rate X`, `report`)."""
        self._child.send(line)

    async def stop(self, timeout_s: float = 20.0) -> None:
        """Close its stdin (the cars hang up and print `end`), SIGTERM/SIGKILL if they
        linger past `timeout_s`."""
        await self._child.stop(timeout_s)


# -- the car process --------------------------------------------------------------------------


def _describe(error: Any) -> str:
    """A stream's last error: status, details and grpc core's own words, if any."""
    text = f"{error.code().name}: {error.details()}"
    core = re.search(r"grpc_call_error value: '(\w+)'", error.debug_error_string() or "")
    return f"{text} ({core[1]})" if core else text


class Cars:
    """The child's cars, the telemetry they send and the lines it prints."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.stopping = asyncio.Event()
        self.started = time.monotonic()
        self.rate = args.rate
        self.telemetry = dict.fromkeys(TELEMETRY_COUNTS, 0)
        options = [tuple(option) for option in args.channel_options or SDK_CHANNEL_OPTIONS]
        key_file = os.environ.get("BROKER_VEHICLE_KEY")
        key = load_private_key(Path(key_file)) if key_file else None
        rss_before = status_kb()
        per_channel = args.cars_per_channel
        self.channels = [
            grpc.aio.insecure_channel(args.target, options=options)
            for _ in range(-(-args.cars // per_channel))
        ]
        self.agents: list[VehicleAgent] = []
        for index in range(args.cars):
            vehicle_id = f"{args.prefix}{index}"
            self.agents.append(
                VehicleAgent(
                    args.target,
                    vehicle_id,
                    token=issue_token(key, vehicle=vehicle_id) if key else None,
                    channel=self.channels[index // per_channel],
                    handlers={"unlock": succeed, "lock": succeed},
                    **args.agent,
                )
            )
        self.tasks: list[asyncio.Task[None]] = []  # each car's run()
        self._sender: asyncio.Task[None] | None = None
        self.emit("start", rss_before_kb=rss_before, rss_agents_kb=status_kb())

    def emit(self, event: str, **extra: Any) -> None:
        agents = self.agents
        line = {
            "event": event,
            "t": round(time.monotonic() - self.started, 3),
            "connected": sum(agent.connected.is_set() for agent in agents),
            "connects": sum(agent.connects for agent in agents),
            "executed": sum(len(agent.executed) for agent in agents),
            **self.telemetry,
            "rss_kb": status_kb(),
            "cpu_s": round(time.process_time(), 2),
            **extra,
        }
        print(json.dumps(line), flush=True)

    def stragglers(self) -> list[dict[str, Any]]:
        """A few cars that are not connected, and what they are doing."""
        out = []
        for index, agent in enumerate(self.agents):
            if not agent.connected.is_set():
                error = agent.last_error
                task = self.tasks[index] if index < len(self.tasks) else None
                ended: Any = False  # or how the run() task ended: the car never reconnects
                if task is not None and task.done():
                    ended = "cancelled" if task.cancelled() else repr(task.exception())[:160]
                out.append(
                    {
                        "car": agent.vehicle_id,
                        "run_task_ended": ended,
                        "in_call": agent._call is not None,
                        "write_locked": agent._write_lock.locked(),
                        "connects": agent.connects,
                        "tasks": len(agent._tasks),
                        "last_error": error and f"{error.code().name}: {error.details()}"[:160],
                    }
                )
                if len(out) >= 5:
                    break
        return out

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        if rate > 0 and self._sender is None:
            self._sender = asyncio.create_task(self.send_telemetry())

    # -- what runs until the end --

    async def connect(self) -> None:
        """Start the cars at `--ramp` new streams/s: a burst of 100k at once gets CANCELLED
        by grpc core and the cars back off. Once every car has given up (refused), stop."""
        agents, ramp = self.agents, self.args.ramp
        step = max(1, int(ramp / 20)) if ramp > 0 else len(agents)
        for first in range(0, len(agents), step):
            self.tasks.extend(asyncio.create_task(a.run()) for a in agents[first : first + step])
            await asyncio.sleep(0.05)
        self.emit("ramped")
        await asyncio.wait(self.tasks)
        self.stopping.set()

    async def ready(self) -> None:
        for agent in self.agents:
            await agent.connected.wait()
        self.emit("ready")

    async def report(self) -> None:
        while True:
            await asyncio.sleep(self.args.report_s)
            # Tens of thousands of agents per process: keep them out of full GC scans, as
            # the broker does, or a car process stall shows up as command latency.
            gc.freeze()
            self.emit("progress")

    async def watch(self) -> None:
        """A line per car that connects or loses its stream, and per command executed."""
        connected = [False] * len(self.agents)
        executed = [0] * len(self.agents)
        while True:
            for index, agent in enumerate(self.agents):
                if agent.connected.is_set() != connected[index]:
                    connected[index] = not connected[index]
                    self.emit("connected" if connected[index] else "lost", car=agent.vehicle_id)
                while executed[index] < len(agent.executed):
                    command_id = agent.executed[executed[index]]
                    self.emit("executed", car=agent.vehicle_id, command_id=command_id)
                    executed[index] += 1
            await asyncio.sleep(0.05)

    async def commands(self) -> None:
        reader = await stdin_reader()
        while line := await reader.readline():
            words = line.decode().split()
            if words[:1] == ["rate"] and len(words) == 2:
                self.set_rate(float(words[1]))
                self.emit("rate")
            elif words[:1] == ["report"]:
                self.emit("report", stragglers=self.stragglers())
        self.stopping.set()

    async def send_telemetry(self) -> None:
        """Each tick, `rate` batches/min per car go to cars picked at random (so each car
        sends at that mean rate, with jitter)."""
        agents, rng = self.agents, self.rng
        tick_s, credit, last = 0.1, 0.0, time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        while True:
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            credit += (now - last) * self.rate * len(agents) / 60
            last = now
            burst, credit = int(credit), credit - int(credit)
            for _ in range(min(burst, 20_000)):
                agent = agents[rng.randrange(len(agents))]
                if agent.connected.is_set() and len(pending) < 20_000:
                    task = asyncio.create_task(self.one_batch(agent))
                    pending.add(task)
                    task.add_done_callback(pending.discard)

    async def one_batch(self, agent: VehicleAgent) -> None:
        rng = self.rng
        values = {
            "lat": round(rng.uniform(47.0, 55.0), 5),
            "lon": round(rng.uniform(6.0, 15.0), 5),
            "battery_pct": round(rng.uniform(30, 95), 1),
        }
        try:
            if await agent.send_telemetry(signals(values, now_ms())):
                self.telemetry["telemetry_sent"] += 1
            else:  # the car's policy says wait: coalesced on the car
                self.telemetry["telemetry_held"] += 1
        except (ConnectionError, grpc.aio.AioRpcError, grpc.aio.UsageError):
            self.telemetry["telemetry_failed"] += 1
        except asyncio.InvalidStateError:  # the SDK's write raced the end of the stream
            self.telemetry["telemetry_failed"] += 1
            self.telemetry["telemetry_invalid_state"] += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        helpers = [self.connect(), self.ready(), self.commands()]
        if self.args.report_s > 0:
            helpers.append(self.report())
        if self.args.events:
            helpers.append(self.watch())
        running = [asyncio.create_task(helper) for helper in helpers]
        self.set_rate(self.rate)
        try:
            await self.stopping.wait()
        finally:
            errors = (_describe(a.last_error) for a in self.agents if a.last_error is not None)
            self.emit(
                "end",
                loop="uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio",
                cars=len(self.agents),
                stragglers=self.stragglers(),
                stream_errors=dict(collections.Counter(errors)),
            )
            if len(self.agents) > FAST_EXIT_CARS:
                os._exit(0)  # the line above is flushed
            if self._sender is not None:
                running.append(self._sender)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await stop_agents(self.agents, self.tasks, self.channels)


async def run_cars(args: argparse.Namespace) -> None:
    """The cars are made here, inside the running loop (their channels need it)."""
    await Cars(args).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.cars",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--target", required=True, help=f"the broker (or a ceiling): {LOOPBACK}:PORT")
    add("--cars", type=int, required=True)
    add("--prefix", default="car-", help="vehicle ids PREFIX0, PREFIX1, ...")
    add("--cars-per-channel", type=int, default=CARS_PER_CHANNEL)
    add("--channel-options", type=json.loads, help="JSON [[name, value], ...] (default: SDK's)")
    add("--agent", type=json.loads, default={}, help="JSON VehicleAgent keyword arguments")
    add("--ramp", type=float, default=0.0, help="new streams/s (0: all at once)")
    add("--rate", type=float, default=0.0, help="telemetry batches/min per car")
    add("--report-s", type=float, default=0.0, help="a progress line this often (0: none)")
    add("--seed", type=int, default=0)
    add("--events", action="store_true", help="a line per car connected, lost, executed")
    args = parser.parse_args(argv)
    host = args.target.rpartition(":")[0]
    if host not in (LOOPBACK, BROKER_ADDRESS):
        parser.error(f"the cars only talk to {LOOPBACK} (or {BROKER_ADDRESS} in a namespace)")
    if args.cars < 1 or args.cars_per_channel < 1:
        parser.error("--cars and --cars-per-channel must be positive")
    install_event_loop_policy()
    asyncio.run(run_cars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
