"""Helpers for the load tools: broker settings, percentiles, CPU accounting, child
processes talked to by lines, and simulated cars held in this process.

The simulated-car process is `loadtests.cars`; brokers are `broker.testing.BrokerProcess`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from broker.testing import PROJECT_ROOT, stop_process

#: The bench measures the command path's speed, not the per-car critical quota (which
#: would refuse a car its 11th unlock in a minute) nor the stream gate.
UNTHROTTLED = {
    "BROKER_CRITICAL_PER_MINUTE": "1e12",
    "BROKER_CRITICAL_BURST": "1000000000",
    "BROKER_NEW_STREAMS_PER_S": "1e6",
    "BROKER_NEW_STREAMS_BURST": "1e6",
    # every simulated car and client of the load tools comes from one address
    "BROKER_MAX_STREAMS_PER_PEER": "0",
    # ...and one service token sends everything: per-caller limits lifted as well
    "BROKER_CALLER_RATE_PER_S": "1e9",
    "BROKER_CALLER_BURST": "1e9",
    "BROKER_CALLER_CRITICAL_RATE_PER_S": "1e9",
    "BROKER_CALLER_CRITICAL_BURST": "1e9",
    "BROKER_CALLER_QUEUE_SHARE": "1",
    "BROKER_NEW_STREAMS_PER_VEHICLE_PER_S": "1e6",
    "BROKER_NEW_STREAMS_PER_VEHICLE_BURST": "1e6",
    "BROKER_MAX_WATCHES_PER_CALLER": "1000000",
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


def log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None:
        return "(its stderr is this process's)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ChildProcess:
    """`python -m MODULE ARGS` talked to by lines: it takes commands on stdin, answers on
    stdout, and ends when its stdin closes (`stop` ends it with `stop_process` if it
    lingers). Its stderr goes to `log_path` (None: to this process's stderr).

    Its stdout is read as it comes: each line goes to `on_line` if given, else it waits
    for `read_line`. `prefix` runs it elsewhere (e.g. `ip netns exec NS`); `env` is its
    whole environment (default: this process's).
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path | None,
        *,
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.prefix = list(prefix)
        self.env = None if env is None else dict(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._on_line = on_line
        self._lines: asyncio.Queue[str] = asyncio.Queue()  # "" once its stdout has ended
        self._reader: asyncio.Task[None] | None = None
        self._stdout: asyncio.BaseTransport | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def exit_code(self) -> int | None:
        """None until it has been started and has ended."""
        return None if self.proc is None else self.proc.poll()

    @property
    def reading(self) -> bool:
        """Started, and its stdout has not ended yet."""
        return self._reader is not None and not self._reader.done()

    async def spawn(self) -> None:
        """Start it; its stdout lines are read from now on."""
        self.proc = await asyncio.to_thread(self._popen)
        assert self.proc.stdout is not None
        stdout = asyncio.StreamReader(limit=1 << 26)  # a result line carries every latency sample
        self._stdout, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdout), self.proc.stdout
        )
        self._reader = asyncio.create_task(self._read(stdout))

    def _popen(self) -> subprocess.Popen[bytes]:
        with contextlib.ExitStack() as files:
            log = None  # None: its stderr is ours
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log = files.enter_context(self.log_path.open("wb"))
            return subprocess.Popen(
                [*self.prefix, sys.executable, "-m", *self.argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=PROJECT_ROOT,
                env=self.env,
            )

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        try:
            while raw := await stdout.readline():
                line = raw.decode(errors="replace").strip()
                if not line:
                    continue
                if self._on_line is not None:
                    self._on_line(line)
                else:
                    self._lines.put_nowait(line)
        finally:
            self._lines.put_nowait("")

    async def start(self, ready: str, timeout_s: float) -> str:
        """Start it and wait for a stdout line beginning with `ready`, which is returned;
        on anything else it is ended and RuntimeError carries its log tail."""
        await self.spawn()
        line = await self.read_line(timeout_s)
        if not line.startswith(ready):
            await self.stop()
            raise RuntimeError(
                f"{self.argv[0]} {self.argv[1]} did not get ready (got {line[:200]!r}); "
                f"log tail:\n{log_tail(self.log_path)}"
            )
        return line

    def send(self, line: str) -> None:
        proc = self.proc
        if proc is not None and proc.stdin is not None and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.write(f"{line}\n".encode())
                proc.stdin.flush()

    async def read_line(self, timeout_s: float) -> str:
        """The next stdout line ("" at its end or after `timeout_s`)."""
        try:
            line = await asyncio.wait_for(self._lines.get(), timeout_s)
        except TimeoutError:
            return ""
        if not line:
            self._lines.put_nowait(line)  # the end stays the end for the next reader
        return line

    async def read_json(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON object it prints, within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while line := await self.read_line(max(0.0, deadline - time.monotonic())):
            if line.startswith("{"):
                return dict(json.loads(line))
        raise RuntimeError(
            f"{self.argv[0]} {self.argv[1]} gave no result within {timeout_s:.0f} s; "
            f"log tail:\n{log_tail(self.log_path)}"
        )

    async def stop(self, timeout_s: float = 15.0, grace_s: float = 5.0) -> None:
        """Close its stdin, wait up to `timeout_s` for it to print the rest and end, then
        `stop_process` it (SIGTERM, `grace_s`, SIGKILL). A no-op once it has ended."""
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=timeout_s)
            self._reader.cancel()  # if it waited in vain
        await asyncio.to_thread(stop_process, proc, grace_s)
        if self._stdout is not None:
            self._stdout.close()


async def stdin_reader() -> asyncio.StreamReader:
    """This process's stdin as an asyncio stream (a child's command channel)."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


# -- simulated cars in this process ----------------------------------------------------------


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
