"""Helpers for the load tools: child processes, the simulated-car process, CPU accounting,
percentiles.

Also the entry point of the simulated-car process the bench starts:

    python -m loadtests._util cars --target 127.0.0.1:PORT --cars 100

connects that many `VehicleAgent`s (each executes `unlock`/`lock` at once and succeeds),
prints `cars ready N` when all are connected, and runs until its stdin closes (or
SIGTERM); it then prints one JSON line with what the cars did and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from broker.testing import LOOPBACK, PROJECT_ROOT

CARS_READY = "cars ready"
#: The bench measures the command path's speed, not the per-car critical quota (which
#: would refuse a car its 11th unlock in a minute) nor the stream gate.
UNTHROTTLED = {
    "BROKER_CRITICAL_PER_MINUTE": "1e12",
    "BROKER_CRITICAL_BURST": "1000000000",
    "BROKER_NEW_STREAMS_PER_S": "1e6",
    "BROKER_NEW_STREAMS_BURST": "1e6",
}
#: ...and the telemetry guard opened wide, so every batch is applied (ingest cost, not the
#: guard's shedding, is what gets measured).
WIDE_OPEN = {
    **UNTHROTTLED,
    "BROKER_TELEMETRY_CAR_MSGS_PER_S": "1e9",
    "BROKER_TELEMETRY_CAR_BYTES_PER_S": "1e12",
    "BROKER_TELEMETRY_FLEET_MSGS_PER_S": "1e9",
    "BROKER_TELEMETRY_FLEET_BYTES_PER_S": "1e12",
}
CARS_PER_CHANNEL = 250  # vehicle streams multiplexed on one HTTP/2 connection


# -- statistics -----------------------------------------------------------------------------


def percentile(sorted_samples: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted samples (None when there are none)."""
    if not sorted_samples:
        return None
    rank = max(1, math.ceil(q * len(sorted_samples)))
    return sorted_samples[min(rank, len(sorted_samples)) - 1]


def latency_ms(samples_s: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max of latencies given in seconds, in milliseconds."""
    ordered = sorted(samples_s)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
        "p50_ms": ms(percentile(ordered, 0.50)),
        "p99_ms": ms(percentile(ordered, 0.99)),
        "max_ms": ms(ordered[-1] if ordered else None),
    }


def hdr_ms(samples_s: Sequence[float]) -> dict[str, Any]:
    """Count and p50/p90/p99/p99.9/max of latencies in seconds, in milliseconds."""
    ordered = sorted(samples_s)
    out: dict[str, Any] = {"n": len(ordered)}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0)):
        value = percentile(ordered, q)
        out[name] = None if value is None else round(value * 1000, 2)
    return out


def cpu_seconds(pid: int | None = None) -> float | None:
    """User+system CPU seconds of a process (this one when pid is None); Linux /proc only."""
    if pid is None:
        return time.process_time()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after "pid (comm)"; utime, stime are 12, 13
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU use of some processes over an interval, in % of one core."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self._pids = pids
        self._start: dict[str, float | None] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._start = {name: cpu_seconds(pid) for name, pid in self._pids.items()}

    def stop(self) -> dict[str, float | None]:
        elapsed = time.perf_counter() - self._t0
        out: dict[str, float | None] = {}
        for name, pid in self._pids.items():
            before, after = self._start.get(name), cpu_seconds(pid)
            if before is None or after is None or elapsed <= 0:
                out[name] = None
            else:
                out[name] = round(100 * (after - before) / elapsed, 1)
        return out


class Window:
    """A warm-up, then the measured interval; CPU use is read over the measured part."""

    def __init__(self, warmup_s: float, duration_s: float, cpu: CpuMeter) -> None:
        now = time.perf_counter()
        self.start = now + warmup_s
        self.end = self.start + duration_s
        self.duration_s = duration_s
        self.cpu_percent: dict[str, float | None] = {}
        self._cpu = cpu

    def open(self) -> bool:
        return time.perf_counter() < self.end

    def measures(self, at: float) -> bool:
        return self.start <= at < self.end

    async def read_cpu(self) -> dict[str, float | None]:
        """Sleep through the window, reading CPU use over its measured part (returned)."""
        await asyncio.sleep(max(0.0, self.start - time.perf_counter()))
        self._cpu.start()
        await asyncio.sleep(max(0.0, self.end - time.perf_counter()))
        self.cpu_percent = self._cpu.stop()
        return self.cpu_percent


# -- child processes ------------------------------------------------------------------------


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def _end_process(proc: asyncio.subprocess.Process, timeout_s: float) -> float:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL; returns the seconds it took."""
    started = time.perf_counter()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return time.perf_counter() - started


class ChildProcess:
    """`python -m MODULE ARGS` talked to by lines: it prints a ready line, takes commands on
    stdin, answers on stdout, and ends when its stdin closes (SIGTERM, then SIGKILL, if it
    lingers). Its stderr goes to `log_path`."""

    def __init__(self, argv: Sequence[str], log_path: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self, ready: str, timeout_s: float) -> str:
        """Start it and wait for a stdout line beginning with `ready`, which is returned;
        on anything else it is ended and RuntimeError carries its log tail."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", *self.argv),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
            cwd=PROJECT_ROOT,
            limit=1 << 26,  # a result line carries every latency sample
        )
        line = await self.read_line(timeout_s)
        if not line.startswith(ready):
            await self.stop()
            raise RuntimeError(
                f"{self.argv[0]} {self.argv[1]} did not get ready (got {line[:200]!r}); "
                f"log tail:\n{_tail(self.log_path)}"
            )
        return line

    def send(self, line: str) -> None:
        if self.proc is not None and self.proc.stdin is not None and self.proc.returncode is None:
            with contextlib.suppress(OSError, RuntimeError):
                self.proc.stdin.write(f"{line}\n".encode())

    async def read_line(self, timeout_s: float) -> str:
        """The next stdout line ("" at its end or after `timeout_s`)."""
        assert self.proc is not None and self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        except TimeoutError:
            return ""
        return raw.decode(errors="replace").strip()

    async def read_json(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON object it prints, within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while line := await self.read_line(max(0.0, deadline - time.monotonic())):
            if line.startswith("{"):
                return dict(json.loads(line))
        raise RuntimeError(
            f"{self.argv[0]} {self.argv[1]} gave no result within {timeout_s:.0f} s; "
            f"log tail:\n{_tail(self.log_path)}"
        )

    async def stop(self, timeout_s: float = 15.0) -> list[str]:
        """Close its stdin, keep what it still prints (returned), end it if it lingers."""
        proc, lines = self.proc, []
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None and proc.stdout is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()
            with contextlib.suppress(TimeoutError, ValueError):
                rest = await asyncio.wait_for(proc.stdout.read(), timeout_s)
                lines = rest.decode(errors="replace").splitlines()
            await _end_process(proc, 5.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        return lines


class CarsProcess:
    """Simulated cars in their own process (`python -m loadtests._util cars`)."""

    def __init__(
        self,
        target: str,
        count: int,
        prefix: str,
        log_path: Path,
        *,
        connect_timeout_s: float = 60.0,
    ) -> None:
        self.count = count
        self.prefix = prefix
        self.log_path = log_path
        self.connect_timeout_s = connect_timeout_s
        self.summary: dict[str, Any] = {}
        self._child = ChildProcess(
            [
                *("loadtests._util", "cars", "--target", target, "--cars", str(count)),
                *("--prefix", prefix, "--connect-timeout", str(connect_timeout_s)),
            ],
            log_path,
        )

    @property
    def vehicle_ids(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(self.count)]

    @property
    def pid(self) -> int | None:
        return self._child.pid

    async def __aenter__(self) -> CarsProcess:
        await self._child.start(CARS_READY, self.connect_timeout_s + 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Close stdin (the cars hang up and report), SIGTERM/SIGKILL if they linger."""
        for line in await self._child.stop():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    self.summary = json.loads(line)


# -- the simulated-car process --------------------------------------------------------------


def _describe(error: Any) -> str:
    """A stream's last error: status, details and grpc core's own words, if any."""
    text = f"{error.code().name}: {error.details()}"
    core = re.search(r"grpc_call_error value: '(\w+)'", error.debug_error_string() or "")
    return f"{text} ({core[1]})" if core else text


async def _succeed(payload: bytes) -> bool:
    return True


async def stdin_reader() -> asyncio.StreamReader:
    """This process's stdin as an asyncio stream (a child's command channel)."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _stdin_closed() -> None:
    reader = await stdin_reader()
    while await reader.read(65536):
        pass


async def run_cars(target: str, count: int, prefix: str, connect_timeout_s: float) -> None:
    """Hold `count` vehicle streams that execute unlock/lock at once, until stdin closes."""

    from broker.sdk.simulator import shared_channels
    from broker.sdk.vehicle import VehicleAgent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    channels = shared_channels(target, count, CARS_PER_CHANNEL)
    agents: list[VehicleAgent] = []
    for index in range(count):
        agents.append(
            VehicleAgent(
                target,
                f"{prefix}{index}",
                channel=channels[index // CARS_PER_CHANNEL],
                firmware="bench",
                handlers={"unlock": _succeed, "lock": _succeed},
                backoff_base_s=0.05,
                backoff_cap_s=1.0,
            )
        )
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        waits = (agent.connected.wait() for agent in agents)
        await asyncio.wait_for(asyncio.gather(*waits), connect_timeout_s)
        print(f"{CARS_READY} {count}", flush=True)
        watcher = asyncio.create_task(_stdin_closed())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        stopper.cancel()
        summary = {
            "loop": "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio",
            "cars": count,
            "executed": sum(len(agent.executed) for agent in agents),
            "connects": sum(agent.connects for agent in agents),
            "still_connected": sum(agent.connected.is_set() for agent in agents),
            "stream_errors": dict(
                Counter(_describe(agent.last_error) for agent in agents if agent.last_error)
            ),
        }
        print(json.dumps(summary), flush=True)
    finally:
        await stop_agents(agents, tasks, channels)


async def stop_agents(
    agents: Sequence[Any], tasks: Sequence[asyncio.Task[Any]], channels: Sequence[Any] = ()
) -> None:
    """Stop simulated cars: each agent, then its run() task, then the shared channels."""
    for agent in agents:
        await agent.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests._util")
    sub = parser.add_subparsers(dest="role", required=True)
    cars = sub.add_parser("cars", help="simulated cars for the bench")
    cars.add_argument("--target", required=True)
    cars.add_argument("--cars", type=int, required=True)
    cars.add_argument("--prefix", default="car-")
    cars.add_argument("--connect-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    host = args.target.rpartition(":")[0]
    if host != LOOPBACK:
        parser.error(f"the bench only talks to {LOOPBACK}, not {host!r}")
    from broker.server.broker import install_event_loop_policy

    install_event_loop_policy()
    asyncio.run(run_cars(args.target, args.cars, args.prefix, args.connect_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
