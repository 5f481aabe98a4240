"""Fleet simulator: hold a whole fleet of simulated cars against one broker on this host.

    python -m loadtests.fleet steady          --cars 100000 [--processes 4] [--duration 60]
    python -m loadtests.fleet storm           --cars 10000   # telemetry x10 for a while
    python -m loadtests.fleet crash           --cars 10000   # kill -9, restart on the same port
    python -m loadtests.fleet reconnect-storm --cars 10000   # restart under the default gate

Starts a broker subprocess on 127.0.0.1 (fresh LMDB in a temp folder, Prometheus metrics on
a free port) and P car processes (`python -m loadtests.cars ...`), each holding N/P
`VehicleAgent`s multiplexed `--cars-per-channel` to an HTTP/2 connection and opened at
`--ramp` new streams/s in all (100k opened at once mostly end CANCELLED in grpc core and back
off). It waits until every car is connected (open rate, memory per car on both sides), then
runs the scenario while a service in this process sends unlocks (wait=result) to random
cars at `--unlocks-per-s`, open loop. It prints a markdown table and writes
bench-out/fleet-SCENARIO.json: cars held, broker RSS before/after connecting and KB per car,
open rate, telemetry messages/s ingested (from the broker's metrics), unlock latency
percentiles (p50/p90/p99/p99.9/max) per phase, and for crash/reconnect-storm the time until
every car is back and until commands flow again.

steady, storm and crash run with the stream gate and the per-car critical quota raised
(`UNTHROTTLED`); reconnect-storm keeps the default stream gate, since that is what it tests.
The telemetry fleet budget is sized for N cars at the scenario's peak rate. A
`sitecustomize` on the broker's PYTHONPATH logs its full garbage collections, reported per
phase (at 30k cars one took ~1 s and was the unlock tail, until the broker began freezing
its long-lived objects: `gc_freeze_interval_s`).

Everything is loopback only and bounded in time; the broker and the car processes are ended
on exit, on failure and on Ctrl-C/SIGTERM (car processes also exit when their stdin closes).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.testing import LOOPBACK, PROJECT_ROOT, BrokerProcess, status_kb
from loadtests._util import UNTHROTTLED, cpu_seconds, hdr_ms
from loadtests.cars import CarsProcess

SCENARIOS = ("steady", "storm", "crash", "reconnect-storm")
OUT_DIR = PROJECT_ROOT / "bench-out"
#: gRPC channel reconnect backoff of the simulated cars (grpc core's defaults are 1 s
#: initial, 120 s max; a car that saw the broker die would otherwise wait minutes).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]
#: bytes of one telemetry batch on the wire, generously (3 signals are ~80 bytes)
BATCH_BYTES = 200
#: VehicleAgent keyword arguments of the fleet's cars
FLEET_AGENT = {"firmware": "fleet", "remember_results": 16}


#: Put on the broker's PYTHONPATH: logs every full (generation 2) garbage collection and
#: any younger one over 20 ms to stderr (the broker log), so pauses can be matched to latency.
GC_PROBE = """
import gc, sys, time

_started = [0.0]


def _fleet_gc_probe(phase, info):
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _started[0]) * 1000
    if info["generation"] == 2 or ms > 20:
        sys.stderr.write(
            f"fleet-gc at={time.time():.3f} gen={info['generation']} ms={ms:.1f} "
            f"collected={info['collected']}\\n"
        )


gc.callbacks.append(_fleet_gc_probe)
"""
GC_LINE = re.compile(r"^fleet-gc at=(?P<at>[\d.]+) gen=(?P<gen>\d) ms=(?P<ms>[\d.]+)", re.M)


# -- the orchestrator ---------------------------------------------------------------------------


class Fleet:
    """The broker, the car processes, the unlock service and the measurements."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        n, scenario = args.cars, args.scenario
        peak = args.rate * (args.storm_factor if scenario == "storm" else 1.0) * n / 60
        fleet_msgs = max(5000.0, 2 * peak)
        env = {
            **UNTHROTTLED,
            "BROKER_TELEMETRY_FLEET_MSGS_PER_S": f"{fleet_msgs:g}",
            "BROKER_TELEMETRY_FLEET_BYTES_PER_S": f"{max(4e6, fleet_msgs * BATCH_BYTES):g}",
            "BROKER_DURABILITY": args.durability,
            "BROKER_HEARTBEAT_INTERVAL_S": f"{args.heartbeat_s:g}",
            "BROKER_LIVENESS_TIMEOUT_S": f"{2.5 * args.heartbeat_s:g}",
        }
        probe = workdir / "gcprobe"
        probe.mkdir(exist_ok=True)
        (probe / "sitecustomize.py").write_text(GC_PROBE)
        env["PYTHONPATH"] = str(probe)
        if scenario == "reconnect-storm":
            del env["BROKER_NEW_STREAMS_PER_S"], env["BROKER_NEW_STREAMS_BURST"]
        self.env = env
        with contextlib.suppress(OSError):  # BrokerProcess appends; one run per log
            (OUT_DIR / f"fleet-{scenario}-broker.log").unlink()
        self.broker = BrokerProcess(
            workdir / "data",
            OUT_DIR / f"fleet-{scenario}-broker.log",
            args=["--metrics", f"{LOOPBACK}:0"],
            env=env,
        )
        self.cars: list[CarsProcess] = []
        self.client: Any = None
        self.result: dict[str, Any] = {
            "scenario": scenario,
            "cars": n,
            "processes": args.processes,
            "cars_per_channel": args.cars_per_channel,
            "ramp_streams_per_s": args.ramp,
            "telemetry_batches_per_car_per_min": args.rate,
            "unlocks_per_s": args.unlocks_per_s,
            "broker_env": env,
            "host": {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()},
            "phases": [],
        }

    # -- broker metrics -----------------------------------------------------------------------

    async def metrics(self) -> dict[str, float]:
        """name{labels} -> value from the broker's /metrics ({} when it is down)."""
        return await self.broker.ametrics()

    @staticmethod
    def telemetry_msgs(metrics: dict[str, float], outcome: str | None = None) -> float:
        outcomes = [outcome] if outcome else ["admitted", "coalesced", "sampled_out", "shed"]
        return sum(
            metrics.get(f"broker_telemetry_msgs_total{{outcome={o}}}", 0.0) for o in outcomes
        )

    def broker_rss_mb(self) -> float | None:
        rss = status_kb(self.broker.pid).get("VmRSS") if self.broker.running else None
        return None if rss is None else round(rss / 1024, 1)

    # -- phases ---------------------------------------------------------------------------------

    def connected(self) -> int:
        return sum(int(car.latest.get("connected", 0)) for car in self.cars)

    async def wait_all_connected(self, timeout_s: float, since: float) -> dict[str, Any]:
        """Poll the broker's stream gauge (and the cars' own count) until all N are held."""
        n = self.args.cars
        deadline = time.monotonic() + timeout_s
        samples: list[tuple[float, float]] = []
        streams = 0.0
        while time.monotonic() < deadline:
            metrics = await self.metrics()
            streams = metrics.get("broker_vehicle_streams", 0.0)
            samples.append((time.monotonic() - since, streams))
            if streams >= n and self.connected() >= n:
                break
            if any(c.exit_code is not None for c in self.cars):
                raise RuntimeError("a car process died; see bench-out/fleet-*-cars-*.log")
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - since
        reached = {
            f"s_to_{label}": next((round(t, 2) for t, held in samples if held >= q * n), None)
            for label, q in (("50pct", 0.5), ("99pct", 0.99), ("99.9pct", 0.999))
        }
        peak = max(
            ((b - a) / (tb - ta) for (ta, a), (tb, b) in itertools.pairwise(samples)),
            default=0.0,
        )
        return {
            "held": int(streams),
            "cars_connected": self.connected(),
            "all_held": streams >= n and self.connected() >= n,
            "seconds": round(elapsed, 2),
            "open_rate_per_s": round(streams / elapsed, 1) if elapsed > 0 else None,
            "peak_open_rate_per_s": round(peak, 1),
            **reached,
        }

    async def start(self) -> None:
        from broker.sdk.client import BrokerClient

        await self.broker.astart()
        await asyncio.sleep(1.0)
        self.result["broker_rss_mb_before"] = self.broker_rss_mb()
        args = self.args
        per = math.ceil(args.cars / args.processes)
        counts = [min(per, args.cars - i * per) for i in range(args.processes)]
        self.cars = [
            CarsProcess(
                self.broker.target,
                count,
                f"fleet{i}-",
                OUT_DIR / f"fleet-{args.scenario}-cars-{i}.log",
                cars_per_channel=args.cars_per_channel,
                channel_options=CHANNEL_OPTIONS,
                agent=FLEET_AGENT,
                ramp_per_s=args.ramp / args.processes,
                report_s=1.0,
                seed=i,
            )
            for i, count in enumerate(counts)
            if count > 0
        ]
        started = time.monotonic()
        # imports done, agents built: connecting from their `start` line on
        await asyncio.gather(*(car.start() for car in self.cars))
        opening = min(car.event("start")["seen_at"] for car in self.cars)
        opened = await self.wait_all_connected(self.args.connect_timeout, opening)
        opened["spawn_s"] = round(opening - started, 2)
        self.result["connect"] = opened
        if not opened["all_held"]:
            raise RuntimeError(f"not every car connected in time: {opened}")
        await asyncio.sleep(2.0)
        rss_after = self.broker_rss_mb()
        self.result["broker_rss_mb_after"] = rss_after
        before = self.result["broker_rss_mb_before"] or 0.0
        if rss_after is not None:
            self.result["broker_kb_per_car"] = round(
                1024 * (rss_after - before) / self.args.cars, 1
            )
        self.client = BrokerClient(self.broker.target, max_retries=0, timeout_s=15)

    def random_car(self, rng: random.Random) -> str:
        car = rng.choices(self.cars, weights=[c.count for c in self.cars])[0]
        return f"{car.prefix}{rng.randrange(car.count)}"

    async def unlock_once(self, vehicle_id: str, timeout_s: float) -> tuple[str, float]:
        from broker.sdk.client import BrokerRpcError
        from broker.v1 import types_pb2 as t

        started = time.perf_counter()
        try:
            reply = await self.client.send_command(
                vehicle_id, "unlock", wait="result", timeout_s=timeout_s
            )
            outcome = t.CommandStatus.Name(reply.command.status)
        except BrokerRpcError as exc:
            outcome = exc.code
        return outcome, time.perf_counter() - started

    async def phase(self, name: str, seconds: float, rate: float) -> dict[str, Any]:
        """Telemetry at `rate` batches/min per car and open-loop unlocks for `seconds`."""
        for car in self.cars:
            car.send(f"rate {rate}")
        rng = random.Random(hash(name) & 0xFFFF)
        latencies: list[float] = []
        outcomes: collections.Counter[str] = collections.Counter()
        inflight: set[asyncio.Task[None]] = set()

        async def one() -> None:
            outcome, elapsed = await self.unlock_once(self.random_car(rng), 10.0)
            outcomes[outcome] += 1
            if outcome == "SUCCEEDED":
                latencies.append(elapsed)

        pids = {"broker": self.broker.pid, **{f"cars{i}": c.pid for i, c in enumerate(self.cars)}}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        m0, t0, wall0 = await self.metrics(), time.monotonic(), time.time()
        sent0 = sum(c.latest.get("telemetry_sent", 0) for c in self.cars)
        interval = 1 / self.args.unlocks_per_s if self.args.unlocks_per_s > 0 else math.inf
        next_at = t0
        while (now := time.monotonic()) < t0 + seconds:
            if now >= next_at:
                next_at += interval
                if len(inflight) < 1000:
                    task = asyncio.create_task(one())
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                else:
                    outcomes["not sent (1000 in flight)"] += 1
            await asyncio.sleep(min(0.05, max(0.0, next_at - time.monotonic())))
        m1, t1 = await self.metrics(), time.monotonic()
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
        if inflight:
            await asyncio.wait(inflight, timeout=12)
        elapsed = t1 - t0
        sent1 = sum(c.latest.get("telemetry_sent", 0) for c in self.cars)
        cpu = {
            k: round(100 * (cpu1[k] - cpu0[k]) / elapsed, 1)  # type: ignore[operator]
            for k in pids
            if cpu0[k] is not None and cpu1[k] is not None
        }
        offered = self.telemetry_msgs(m1) - self.telemetry_msgs(m0)
        admitted = self.telemetry_msgs(m1, "admitted") - self.telemetry_msgs(m0, "admitted")
        result = {
            "phase": name,
            "seconds": round(elapsed, 1),
            "telemetry_batches_per_car_per_min": rate,
            "held": int(m1.get("broker_vehicle_streams", 0)),
            "telemetry_sent_per_s": round((sent1 - sent0) / elapsed, 1),
            "telemetry_msgs_per_s": round(offered / elapsed, 1),
            "telemetry_admitted_per_s": round(admitted / elapsed, 1),
            "telemetry_guard": {
                o: int(self.telemetry_msgs(m1, o) - self.telemetry_msgs(m0, o))
                for o in ("admitted", "coalesced", "sampled_out", "shed")
            },
            "fleet_level": m1.get("broker_telemetry_fleet_level"),
            "unlock_outcomes": dict(outcomes),
            "unlock_ms": hdr_ms(latencies),
            "cpu_pct": cpu,
            "broker_rss_mb": self.broker_rss_mb(),
            "broker_gc": self.gc_pauses(wall0, time.time()),
        }
        self.result["phases"].append(result)
        return result

    def gc_pauses(self, since: float, until: float) -> dict[str, Any]:
        """The broker's full collections (and younger ones over 20 ms) in a time span."""
        try:
            text = self.broker.log_path.read_text(errors="replace")
        except OSError:
            return {}
        pauses = [
            (int(m["gen"]), float(m["ms"]))
            for m in GC_LINE.finditer(text)
            if since <= float(m["at"]) <= until
        ]
        full = [ms for gen, ms in pauses if gen == 2]
        return {
            "gen2_count": len(full),
            "gen2_max_ms": max(full, default=None),
            "gen2_total_ms": round(sum(full), 1),
            "younger_over_20ms": len(pauses) - len(full),
        }

    async def restart(self, kind: str) -> dict[str, Any]:
        """kill -9 (crash) or SIGTERM (a deploy) and restart on the same port; time until
        every car is back and until an unlock succeeds again."""
        n = self.args.cars
        m0 = await self.metrics()
        if kind == "crash":
            await self.broker.akill()
        else:
            await self.broker.astop()
        stopped = time.monotonic()
        await asyncio.sleep(self.args.down_s)
        port = self.broker.port
        restarted_at = time.monotonic()
        await self.broker.astart()
        if self.broker.port != port:
            raise RuntimeError(f"restarted broker moved from {port} to {self.broker.port}")
        ready = time.monotonic()
        rng = random.Random(7)

        async def first_unlock() -> float | None:
            deadline = ready + self.args.connect_timeout
            while time.monotonic() < deadline:
                outcome, _ = await self.unlock_once(self.random_car(rng), 2.0)
                if outcome == "SUCCEEDED":
                    return round(time.monotonic() - restarted_at, 2)
                await asyncio.sleep(0.1)
            return None

        probe = asyncio.create_task(first_unlock())
        back = await self.wait_all_connected(self.args.connect_timeout, restarted_at)
        commands_flow_s = await probe
        m1 = await self.metrics()
        out = {
            "kind": "kill -9" if kind == "crash" else "SIGTERM (drain), restart",
            "broker_down_s": round(restarted_at - stopped, 2),
            "broker_start_s": round(ready - restarted_at, 2),
            "all_back_s": back["seconds"] if back["all_held"] else None,
            "held": back["held"],
            "reopen_rate_per_s": back["open_rate_per_s"],
            "peak_reopen_rate_per_s": back["peak_open_rate_per_s"],
            "commands_flow_s": commands_flow_s,
            **{k: v for k, v in back.items() if k.startswith("s_to_")},
            "streams_deferred_by_gate": int(
                m1.get("broker_stream_admissions_total{decision=deferred}", 0)
            ),
            "streams_admitted_by_gate": int(
                m1.get("broker_stream_admissions_total{decision=admitted}", 0)
            ),
            "held_before": int(m0.get("broker_vehicle_streams", 0)),
            "broker_shutdown_s": self.broker.shutdown_s if kind != "crash" else None,
        }
        self.result["restart"] = out
        if not back["all_held"]:
            raise RuntimeError(f"not every car came back in time: {back} of {n}")
        return out

    async def run(self) -> None:
        args = self.args
        await self.start()
        base, d = args.rate, args.duration
        if args.scenario == "steady":
            await self.phase("steady", d, base)
        elif args.scenario == "storm":
            await self.phase("baseline", d / 2, base)
            await self.phase(f"storm x{args.storm_factor:g}", d, base * args.storm_factor)
            await self.phase("after storm", d / 2, base)
        else:
            await self.phase("before restart", d / 2, base)
            await self.restart("crash" if args.scenario == "crash" else "graceful")
            await self.phase("after restart", d / 2, base)

    async def close(self) -> None:
        for car in self.cars:
            car.send("report")
        await asyncio.sleep(0.3)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        await asyncio.gather(*(car.stop() for car in self.cars), return_exceptions=True)
        await self.broker.astop()
        self.result["car_processes"] = [self.describe_cars(car) for car in self.cars]
        self.result["broker"] = self.broker.describe()
        self.result["broker_log_problems"] = self.broker.log_problems()[-20:]

    def describe_cars(self, car: CarsProcess) -> dict[str, Any]:
        first, latest = car.event("start"), car.summary or car.latest
        before = first.get("rss_before_kb", {}).get("VmRSS", 0)
        peak = latest.get("rss_kb", {}).get("VmHWM", 0)
        errors = collections.Counter(latest.get("stream_errors", {}))
        return {
            "cars": car.count,
            "exit_code": car.exit_code,
            "rss_mb_before": round(before / 1024, 1),
            "rss_mb_peak": round(peak / 1024, 1),
            "kb_per_car": round((peak - before) / car.count, 1) if car.count and peak else None,
            "connects": latest.get("connects"),
            "executed": latest.get("executed"),
            "telemetry_sent": latest.get("telemetry_sent"),
            "telemetry_failed": latest.get("telemetry_failed"),
            "telemetry_invalid_state": latest.get("telemetry_invalid_state"),
            "cpu_s": latest.get("cpu_s"),
            "errors": dict(errors.most_common(5)),
            "stragglers": latest.get("stragglers"),
        }


def table(result: dict[str, Any]) -> str:
    n = result["cars"]
    cars = result.get("car_processes", [])
    client_kb = [c["kb_per_car"] for c in cars if c.get("kb_per_car")]
    connect = result.get("connect", {})
    rows: list[tuple[str, Any]] = [
        ("scenario", result["scenario"]),
        ("cars asked / held", f"{n} / {connect.get('held')}"),
        ("car processes x cars per channel, ramp streams/s",
         f"{result['processes']} x {result['cars_per_channel']}, {result['ramp_streams_per_s']}"),
        ("connect time s", connect.get("seconds")),
        ("open rate streams/s (mean / peak)",
         f"{connect.get('open_rate_per_s')} / {connect.get('peak_open_rate_per_s')}"),
        ("broker RSS MB before / after connect",
         f"{result.get('broker_rss_mb_before')} / {result.get('broker_rss_mb_after')}"),
        ("broker KB per car", result.get("broker_kb_per_car")),
        ("car-side KB per car (peak RSS)",
         round(sum(client_kb) / len(client_kb), 1) if client_kb else None),
    ]  # fmt: skip
    for phase in result["phases"]:
        name = phase["phase"]
        unlock = phase["unlock_ms"]
        rows += [
            (f"[{name}] held / seconds", f"{phase['held']} / {phase['seconds']}"),
            (f"[{name}] telemetry msgs/s at broker (admitted)",
             f"{phase['telemetry_msgs_per_s']} ({phase['telemetry_admitted_per_s']})"),
            (f"[{name}] telemetry guard", phase["telemetry_guard"]),
            (f"[{name}] unlock ms p50/p90/p99/p99.9/max (n)",
             f"{unlock['p50']} / {unlock['p90']} / {unlock['p99']} / {unlock['p99.9']} / "
             f"{unlock['max']} ({unlock['n']})"),
            (f"[{name}] unlock outcomes", phase["unlock_outcomes"]),
            (f"[{name}] CPU % of a core", phase["cpu_pct"]),
            (f"[{name}] broker RSS MB", phase["broker_rss_mb"]),
            (f"[{name}] broker full GCs: count / max ms / total ms",
             f"{phase['broker_gc'].get('gen2_count')} / {phase['broker_gc'].get('gen2_max_ms')}"
             f" / {phase['broker_gc'].get('gen2_total_ms')}"),
        ]  # fmt: skip
    if "restart" in result:
        r = result["restart"]
        rows += [
            ("restart", r["kind"]),
            ("broker down / start s", f"{r['broker_down_s']} / {r['broker_start_s']}"),
            ("all cars back after s (from restart)", r["all_back_s"]),
            ("50% / 99% / 99.9% back after s",
             f"{r['s_to_50pct']} / {r['s_to_99pct']} / {r['s_to_99.9pct']}"),
            ("reopen rate streams/s (mean / peak)",
             f"{r['reopen_rate_per_s']} / {r['peak_reopen_rate_per_s']}"),
            ("first unlock SUCCEEDED after s", r["commands_flow_s"]),
            ("gate admitted / deferred", f"{r['streams_admitted_by_gate']} / "
             f"{r['streams_deferred_by_gate']}"),
        ]  # fmt: skip
    if "error" in result:
        rows.append(("ERROR", result["error"]))
    lines = [f"## fleet {result['scenario']}", "", "| figure | value |", "|---|--:|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


async def orchestrate(args: argparse.Namespace) -> int:
    OUT_DIR.mkdir(exist_ok=True)
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    status = 0
    with tempfile.TemporaryDirectory(prefix="fleet-") as workdir:
        fleet = Fleet(args, Path(workdir))
        try:
            await asyncio.wait_for(fleet.run(), args.time_limit)
        except (Exception, asyncio.CancelledError) as exc:
            fleet.result["error"] = f"{type(exc).__name__}: {exc}"[:500]
            status = 1
        finally:
            await asyncio.shield(fleet.close())
    out = OUT_DIR / f"fleet-{args.scenario}.json"
    out.write_text(json.dumps(fleet.result, indent=2, default=str))
    print(table(fleet.result))
    print(f"\nwritten {out}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.fleet")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--cars", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=0, help="default: 1 per 25k cars")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per main phase")
    parser.add_argument("--cars-per-channel", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1.0, help="telemetry batches/min per car")
    parser.add_argument(
        "--heartbeat-s", type=float, default=10.0,
        help="cars' heartbeat interval (the broker's liveness timeout is 2.5x it)",
    )  # fmt: skip
    parser.add_argument("--storm-factor", type=float, default=10.0)
    parser.add_argument(
        "--ramp", type=float, default=2500.0, help="new streams/s the cars open (0: all at once)"
    )
    parser.add_argument("--unlocks-per-s", type=float, default=20.0)
    parser.add_argument("--down-s", type=float, default=1.0, help="broker down before restart")
    parser.add_argument("--connect-timeout", type=float, default=0.0, help="default: by N")
    parser.add_argument("--time-limit", type=float, default=0.0, help="default: by N, duration")
    parser.add_argument("--durability", choices=["fsync", "relaxed"], default="fsync")
    args = parser.parse_args(argv)
    from broker.server.broker import install_event_loop_policy

    install_event_loop_policy()
    if args.cars < 1:
        parser.error("--cars must be positive")
    args.processes = args.processes or max(1, math.ceil(args.cars / 25_000))
    args.connect_timeout = args.connect_timeout or max(60.0, args.cars / 500)
    args.time_limit = args.time_limit or 3 * args.connect_timeout + 3 * args.duration + 120
    try:
        return asyncio.run(orchestrate(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
