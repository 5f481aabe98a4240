"""The benchmark report: every figure of the broker beside its ceiling, measured in one run.

    python -m loadtests.bench                  # `make bench`: ~7 minutes on 2 cores (est.)
    python -m loadtests.bench --quick          # ~1 minute smoke run; --help for the knobs
    python -m loadtests.bench --only unary     # some rows only

It writes bench-out/report.md (the table, then the detail behind it; also printed),
bench-out/bench.json (every figure, the settings and the environment), two plots
(bench-out/latency.png, bench-out/throughput.png; `loadtests.report`) and the children's
logs. Everything runs on 127.0.0.1, each row in fresh processes over fresh temporary LMDB
folders, all ended and removed on exit, on failure and on Ctrl-C/SIGTERM; a row that fails
is reported as failed and the others still run.

The ceilings: a bare grpc.aio server (`loadtests.ceilings`: uvloop, the broker's server
options, the broker's method names answered with canned replies and no work), raw py-lmdb
doing the store's writes, Mosquitto doing the same drain. The load clients are the same
processes whichever server they load. Columns: our figure, the ceiling's, ours / ceiling,
the target, and whether it is met.

Rows, and how to read them:

1. `streams held` and `KB per connected car`: `--streams` simulated cars
   (`loadtests.cars`: VehicleAgents, 250 to an HTTP/2 connection) send Hello and stay
   idle on the bare server, then on a broker. KB per car: the server's VmRSS
   (/proc/PID/status) once all are connected and 2 s settled, minus before any, over the
   count. Held: the bare server's count of open streams, the broker's
   `broker_vehicle_streams`. The >= 100k target needs more than this bench holds:
   `python -m loadtests.fleet steady --cars 100000 --processes 4` measures it.
2. `telemetry ingest per core`: `--client-procs` stream-client processes write prebuilt
   3-signal telemetry frames over `--telemetry-streams` streams as fast as flow control
   allows. Counted by the server: the frames the bare server read; what the broker's
   telemetry guard took in (admitted + coalesced, from its /metrics), with its budgets
   raised (`WIDE_OPEN`) so nothing should be shed (shed and sampled out are in the
   detail). msgs/s over the window divided by the server's CPU in cores = per core.
3. `SendCommand`: unary-client processes (`--client-procs`, the calls in flight split over
   them) in a closed loop at each of `--concurrency-levels`, three series interleaved per
   level: the bare unary server; the broker with wait=none to offline cars (pure durable
   enqueue: group commit at `--durability`, no delivery); the broker with wait=result to
   `--cars` connected cars (enqueue, delivery, the car's ack and result recorded, reply).
   The table has the highest level; the sweep table and the plots have all. Client CPU is
   shown: a client near 100 % of a core, not the server, bounds that figure.
4. `batch N`: SendCommands to offline cars, one batch in flight (one LMDB write
   transaction each), beside py-lmdb in this process doing the store's puts per command
   (record, by_vehicle, pending and timers entries, the sequence counter once per batch) in one
   write transaction per batch, in the same sync mode.
5. `offline drain` and `kill -9 loss`: `loadtests.mosquitto.compare`: `--drain-cars` x
   `--drain-per-car` queued for offline receivers, all reconnect at once, time until all
   delivered; then the same setup, kill -9 right after the last acknowledgement, restart
   on the same data, count what comes back within `--loss-wait`. Skipped, saying what to
   install, without `mosquitto` or paho-mqtt.
6. `unlock p99, 10x telemetry storm`: `loadtests.drills.verbosity_storm` with one storm
   step (half the fleet ignores the broker's telemetry policy); the ceiling column is the
   same unlocks (wait=result) before the storm.

7. `SendCommand over TLS` (`tls-unary`): the SendCommand wait=none series of row 3 at
   the highest level, four points in turn with all four servers up: the bare unary
   server in plaintext and over TLS, a broker in plaintext and one over TLS (`--tls-cert`,
   `--tls-key`; certificates from `loadtests.tlscost.BenchCerts`, a dev CA of the run).
   Both brokers are --insecure-dev like every other row, so only the transport differs;
   each client process holds one TLS connection, so this is the cost per message
   (encryption), not per handshake (row 9). The table: ours over TLS beside the bare
   server over TLS, and each one's TLS / plaintext ratio.
8. `telemetry ingest over TLS` (`tls-telemetry`): row 2 four times, each server fresh:
   bare plaintext, broker plaintext, bare over TLS, broker over TLS (same clients, with
   `--tls-ca`).
9. `new mTLS car streams per core` (`mtls-handshake`): `--handshake-cars` cars, each on
   its own connection with its own client certificate (URI SAN urn:vehicle:ID, from
   which the broker takes the car's identity; no token), Hello → Welcome, opened
   `--handshake-concurrency` at a time in all by the `--client-procs` handshake clients
   (`loadtests.ceilings handshake-client`, after a few unmeasured warm-up cars); beside a
   bare grpc.aio server requiring client certificates that answers the Hello with a
   Welcome. Per core: cars welcomed / the server's CPU seconds (/proc/PID/stat) from `go`
   to the last client's report; cars/s and connect-to-Welcome latency in the detail.
10. `SendCommand signing on vs off` (`signing`): end-to-end signed commands
   (broker/security/signing.py). The sender's CPU per command (build and serialize the
   request; on: also sign it) and the car's (parse the frame; on: also
   `CommandVerifier.check`), on one thread of this process, beside Ed25519 sign and
   verify alone. Then the broker's CPU per SendCommand, signed beside unsigned, at the
   highest level from this process: wait=none to offline cars (the envelope accepted and
   stored) and wait=result to `--cars` connected cars in this process that verify every
   signature (the envelope also rides every frame). Signed requests are signed before
   the window, so the client's signing does not bound the rate. No target: the cost.

Rates count what completed inside the measured window (after `--warmup`); latencies are
nearest-rank percentiles (time.perf_counter) of the successful calls started in it. CPU %
is CPU time over the window in % of one core. Figures compare only on the same machine:
anything else using its cores moves them (the load average is recorded).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import lmdb
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.config import Config
from broker.sdk.client import BrokerClient, BrokerRpcError, build_request, sign_request
from broker.sdk.simulator import CARS_PER_CHANNEL, shared_channels
from broker.sdk.vehicle import VehicleAgent, succeed
from broker.security.signing import CommandSigner, CommandVerifier, ReplayGuard, signed_bytes
from broker.server.broker import install_event_loop_policy
from broker.testing import LOOPBACK, BrokerProcess, status_kb
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link
from broker_ext._compat import extensions_summary
from loadtests import drills, mosquitto, report
from loadtests._util import UNTHROTTLED, WIDE_OPEN, CpuMeter, Window, hdr_ms, stop_agents
from loadtests.cars import CarsProcess
from loadtests.ceilings import CeilingServer, drive_clients
from loadtests.tlscost import BenchCerts, measure_handshakes

T = TypeVar("T")
COMMAND = "unlock"
ROWS = (
    "streams", "telemetry", "unary", "tls-unary", "tls-telemetry", "mtls-handshake", "batch",
    "storm", "drain", "signing",
)  # fmt: skip
#: Safety cap on batches per measurement, far above what a run can reach (time ends first).
MAX_CALLS = 5_000_000
GUARD_OUTCOMES = ("admitted", "coalesced", "sampled_out", "shed")
#: the bench's cars reconnect within a second (VehicleAgent keyword arguments)
BENCH_AGENT = {"firmware": "bench", "backoff_base_s": 0.05, "backoff_cap_s": 1.0}


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description="The broker beside its ceilings (bare grpc.aio, raw LMDB, Mosquitto).",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="~1 minute smoke run: smaller and shorter rows")
    add("--only", default=",".join(ROWS), help=f"comma-separated rows of: {','.join(ROWS)}")
    add("--duration", type=float, help="measured seconds per row or point (10; quick 1)")
    add("--warmup", type=float, help="unmeasured seconds before each (1; quick 0.5)")
    add("--client-procs", type=int, help="load client processes (default: cores - 1, 1..4)")
    add("--streams", type=int, help="idle streams held, row 1 (10000; quick 2000)")
    add("--telemetry-streams", type=int, help="streams writing telemetry (200; quick 100)")
    add("--concurrency-levels", help="SendCommand calls in flight (1,4,16,64)")
    add("--cars", type=int, help="connected cars for wait=result (100; quick 20)")
    add("--handshake-cars", type=int, help="new mTLS car streams, row 9 (2000; quick 500)")
    add(
        "--handshake-concurrency",
        type=int,
        default=64,
        help="mTLS car streams opening at once, in all (row 9)",
    )
    add("--batch-sizes", help="SendCommands batch sizes (64,512; quick 64)")
    add("--parked-cars", type=int, default=1000, help="offline vehicle ids")
    add(
        "--record-bytes",
        type=int,
        default=200,
        help="pad batch payloads so one stored record is about this long",
    )
    add(
        "--ttl",
        type=float,
        default=3600,
        help="TTL of commands to offline cars (s); longer than the run, so nothing expires",
    )
    add("--wait-timeout", type=float, help="seconds a wait=result call waits (10; quick 3)")
    add(
        "--durability",
        choices=["fsync", "relaxed"],
        default="fsync",
        help="broker durability; the raw LMDB rows use the same sync mode",
    )
    add("--drain-cars", type=int, help="offline receivers in the drain rows (1000; quick 200)")
    add("--drain-per-car", type=int, default=10, help="messages queued for each")
    add("--loss-wait", type=float, help="seconds to wait for recovered messages (10; quick 3)")
    add("--mqtt-procs", type=int, default=1, help="MQTT client processes for the reconnects")
    add("--storm-cars", type=int, help="cars in the storm row (300; quick 60)")
    add("--storm-unlocks", type=int, help="unlocks per storm phase (150; quick 30)")
    add("--out", type=Path, default=Path("bench-out"), help="folder for the report and logs")
    add("--tmp-dir", type=Path, help="parent of the temporary LMDB folders (default: system)")
    args = parser.parse_args(argv)
    quick = {
        "duration": 1.0, "warmup": 0.5, "streams": 2000, "telemetry_streams": 100,
        "concurrency_levels": "1,4,16,64", "cars": 20, "batch_sizes": "64",
        "wait_timeout": 3.0, "drain_cars": 200, "loss_wait": 3.0, "storm_cars": 60,
        "storm_unlocks": 30, "handshake_cars": 500,
    }  # fmt: skip
    full = {
        "duration": 10.0, "warmup": 1.0, "streams": 10_000, "telemetry_streams": 200,
        "concurrency_levels": "1,4,16,64", "cars": 100, "batch_sizes": "64,512",
        "wait_timeout": 10.0, "drain_cars": 1000, "loss_wait": 10.0, "storm_cars": 300,
        "storm_unlocks": 150, "handshake_cars": 2000,
    }  # fmt: skip
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.client_procs is None:
        args.client_procs = max(1, min(4, (os.cpu_count() or 2) - 1))
    try:
        args.only = [row for row in args.only.split(",") if row]
        args.batch_sizes = [int(size) for size in args.batch_sizes.split(",") if size]
        args.concurrency_levels = sorted(
            {int(level) for level in args.concurrency_levels.split(",") if level}
        )
    except ValueError:
        parser.error("--batch-sizes, --concurrency-levels: comma-separated integers")
    if not args.only or set(args.only) - set(ROWS):
        parser.error(f"--only: comma-separated, from {','.join(ROWS)}")
    max_batch = Config().max_batch
    if not args.batch_sizes or not all(0 < size <= max_batch for size in args.batch_sizes):
        parser.error(f"--batch-sizes: each within 1..{max_batch} (the broker's max_batch)")
    if not args.concurrency_levels or args.concurrency_levels[0] <= 0:
        parser.error("--concurrency-levels: positive integers")
    positive = (
        "duration", "client_procs", "streams", "telemetry_streams", "cars", "parked_cars",
        "wait_timeout", "drain_cars", "drain_per_car", "loss_wait", "mqtt_procs",
        "storm_cars", "storm_unlocks", "handshake_cars", "handshake_concurrency",
    )  # fmt: skip
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def row_limits_s(args: argparse.Namespace) -> dict[str, float]:
    """A hard stop per row: generous start, connect and stop allowances around its work."""
    window = args.warmup + args.duration
    connect = max(60.0, args.streams / 200)
    return {
        "streams": 2 * (connect + 60),
        "telemetry": 2 * (window + 120),
        "unary": len(args.concurrency_levels) * 3 * (window + args.wait_timeout + 100) + 60,
        "tls-unary": 4 * (window + args.wait_timeout + 100) + 60,
        "tls-telemetry": 4 * (window + 120),
        "mtls-handshake": 2 * (handshake_timeout_s(args) + 120),
        "batch": len(args.batch_sizes) * 2 * (window + args.wait_timeout + 40),
        "storm": 300,
        "drain": 600 + 4 * args.loss_wait,
        "signing": 8 * (window + args.wait_timeout + 30) + 180,
    }


def handshake_timeout_s(args: argparse.Namespace) -> float:
    """How long the mTLS cars of row 9 may take to open, generously (20 cars/s)."""
    return max(60.0, args.handshake_cars / 20)


# -- helpers --------------------------------------------------------------------------------


async def within(seconds: float, what: str, work: Awaitable[T]) -> T:
    """Await `work`, or fail with a clear message if it hangs."""
    try:
        return await asyncio.wait_for(work, seconds)
    except TimeoutError:
        raise RuntimeError(f"{what} did not finish within {seconds:.0f} s") from None


def bench_broker(
    args: argparse.Namespace,
    name: str,
    workdir: Path,
    env: dict[str, str] = UNTHROTTLED,
    extra: Sequence[str] = (),
) -> BrokerProcess:
    """An --insecure-dev broker with metrics, at the bench's durability, its quotas and
    stream gate out of the way (the bench measures speed, not policy); `extra`: more
    serve flags (e.g. TLS)."""
    return BrokerProcess(
        workdir / name,
        args.out / f"broker-{name}.log",
        args=["--durability", args.durability, "--metrics", f"{LOOPBACK}:0", *extra],
        env=env,
    )


def split(total: int, parts: int) -> list[int]:
    """`total` as `parts` near-equal positive shares (fewer parts if total is smaller)."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


def _note_processes(
    results: dict[str, Any], broker: BrokerProcess, cars: CarsProcess | None = None
) -> None:
    """Record how a broker went; flag what it logged and car streams that reconnected."""
    name = broker.log_path.stem
    results["brokers"][name] = broker.describe()
    results["environment"].setdefault("broker_loop", broker.loop)
    results["environment"].setdefault("broker_extensions", broker.extensions)
    notes: list[str] = results["notes"]
    problems = broker.log_problems()
    if problems:
        notes.append(
            f"{name} logged {len(problems)} warning/error lines, first: "
            f"{problems[0].strip()[:160]!r} (see {broker.log_path})"
        )
    if broker.exit_code not in (0, None):
        notes.append(f"{name} exited with {broker.exit_code} after {broker.shutdown_s} s")
    if cars is None:
        return
    summary = cars.summary
    if not summary:
        notes.append(f"the simulated cars did not report (see {cars.log_path})")
    elif summary["connects"] > summary["cars"]:
        notes.append(
            f"car streams reconnected {summary['connects'] - summary['cars']} times; "
            f"last stream error per car: {summary['stream_errors']}"
        )


# -- 1: streams held, memory per car -----------------------------------------------------------


async def hold_streams(
    args: argparse.Namespace,
    target: str,
    server_pid: int | None,
    held: Callable[[], Awaitable[float]],
    log: Path,
) -> dict[str, Any]:
    """`--streams` idle cars on `target`: the server's memory before and after, per car."""
    assert server_pid is not None
    await asyncio.sleep(1.0)  # the server has settled after its start
    before = status_kb(server_pid)
    started = time.perf_counter()
    cars = CarsProcess(
        target,
        args.streams,
        "idle-",
        log,
        connect_timeout_s=max(60.0, args.streams / 200),
        agent=BENCH_AGENT,
    )
    async with cars:
        connect_s = time.perf_counter() - started
        await asyncio.sleep(2.0)
        after = status_kb(server_pid)
        count = int(await held())
    per = {f: round((after[f] - before[f]) / args.streams, 2) for f in ("VmRSS", "RssAnon")}
    return {
        "streams": args.streams,
        "held": count,
        "connect_s": round(connect_s, 2),
        "rss_kb_before": before,
        "rss_kb_after": after,
        "kb_per_stream": per["VmRSS"],
        "anon_kb_per_stream": per["RssAnon"],
        "cars": cars.summary,
    }


async def run_streams_rows(args: argparse.Namespace, workdir: Path, out: dict[str, Any]) -> None:
    """Row 1: the bare server, then a broker, each fresh, holding the same idle cars."""
    row = out["streams"] = {}
    async with CeilingServer(args.out / "ceiling-streams.log") as bare:

        async def bare_held() -> float:
            return (await bare.stats())["streams"]

        log = args.out / "cars-streams-ceiling.log"
        row["ceiling"] = await hold_streams(args, bare.target, bare.pid, bare_held, log)
    broker = bench_broker(args, "streams", workdir)
    async with broker:

        async def broker_held() -> float:
            return (await broker.ametrics()).get("broker_vehicle_streams", 0.0)

        log = args.out / "cars-streams-broker.log"
        row["ours"] = await hold_streams(args, broker.target, broker.pid, broker_held, log)
    _note_processes(out, broker)


# -- 2: telemetry ingest -----------------------------------------------------------------------


async def ingest(
    args: argparse.Namespace,
    target: str,
    server_pid: int | None,
    taken_in: Callable[[], Awaitable[dict[str, float]]],
    client_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Telemetry frames as fast as flow control allows; what the server took in, per core.
    `client_args`: more flags of the stream clients (e.g. TLS)."""
    shares = split(args.telemetry_streams, args.client_procs)
    argvs = [
        [
            *("--prefix", "tele-", "--vehicles", str(args.telemetry_streams)),
            *("--shard", str(i), "--shards", str(len(shares))),
            *("--warmup", str(args.warmup), "--duration", str(args.duration)),
            *client_args,
        ]
        for i in range(len(shares))
    ]

    async def during() -> tuple[dict[str, float], float | None, float]:
        await asyncio.sleep(args.warmup)
        meter = CpuMeter({"server": server_pid})
        first = await taken_in()
        meter.start()
        started = time.perf_counter()
        await asyncio.sleep(args.duration)
        last = await taken_in()
        elapsed = time.perf_counter() - started
        cpu = meter.stop()["server"]
        return {k: last[k] - first[k] for k in last}, cpu, elapsed

    reports, (counts, cpu, elapsed) = await drive_clients(
        "stream-client", target, argvs, args.out, during, timeout_s=60
    )
    rate = counts["taken_in"] / elapsed
    written = sum(r["written_in_window"] for r in reports)
    return {
        "streams": args.telemetry_streams,
        "msgs_per_s": round(rate, 1),
        "server_cpu_pct": cpu,
        "msgs_per_s_per_core": round(rate / (cpu / 100), 1) if cpu else None,
        "counted": {k: int(v) for k, v in counts.items()},
        "frame_bytes": reports[0]["frame_bytes"],
        "client_written_per_s": round(written / args.duration, 1),
        "client_cpu_pct": [r["cpu_percent"] for r in reports],
    }


def bare_taken_in(bare: CeilingServer) -> Callable[[], Awaitable[dict[str, float]]]:
    """The frames the bare server has read."""

    async def taken_in() -> dict[str, float]:
        return {"taken_in": (await bare.stats())["frames"]}

    return taken_in


def broker_taken_in(broker: BrokerProcess) -> Callable[[], Awaitable[dict[str, float]]]:
    """What the broker's telemetry guard has taken in (admitted + coalesced), by outcome."""

    async def taken_in() -> dict[str, float]:
        metrics = await broker.ametrics()
        guard = {
            o: metrics.get(f"broker_telemetry_msgs_total{{outcome={o}}}", 0.0)
            for o in GUARD_OUTCOMES
        }
        return {"taken_in": guard["admitted"] + guard["coalesced"], **guard}

    return taken_in


async def run_telemetry_rows(args: argparse.Namespace, workdir: Path, out: dict[str, Any]) -> None:
    """Row 2: the bare server, then a broker with its telemetry budgets opened wide."""
    row = out["telemetry"] = {}
    async with CeilingServer(args.out / "ceiling-telemetry.log") as bare:
        row["ceiling"] = await ingest(args, bare.target, bare.pid, bare_taken_in(bare))
    broker = bench_broker(args, "telemetry", workdir, WIDE_OPEN)
    async with broker:
        row["ours"] = await ingest(args, broker.target, broker.pid, broker_taken_in(broker))
    _note_processes(out, broker)


# -- 3: SendCommand, against bare unary ---------------------------------------------------------


async def unary_point(
    args: argparse.Namespace,
    target: str,
    pids: dict[str, int | None],
    *,
    wait: str,
    prefix: str,
    vehicles: int,
    concurrency: int,
    client_args: Sequence[str] = (),
) -> dict[str, Any]:
    """`concurrency` unlocks in flight, split over the client processes, for one window;
    `client_args`: more flags of the unary clients (e.g. TLS)."""
    shares = split(concurrency, args.client_procs)
    argvs = [
        [
            *("--prefix", prefix, "--vehicles", str(vehicles)),
            *("--shard", str(i), "--shards", str(len(shares))),
            *("--concurrency", str(share), "--wait", wait, "--ttl", str(args.ttl)),
            *("--wait-timeout", str(args.wait_timeout)),
            *("--warmup", str(args.warmup), "--duration", str(args.duration)),
            *client_args,
        ]
        for i, share in enumerate(shares)
    ]
    window = Window(args.warmup, args.duration, CpuMeter(pids))
    reports, cpu = await drive_clients(
        "unary-client", target, argvs, args.out, window.read_cpu, args.wait_timeout + 30
    )
    errors: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors"])
    latencies = [us / 1e6 for r in reports for us in r["latencies_us"]]
    return {
        "concurrency": concurrency,
        "qps": round(sum(r["completed"] for r in reports) / args.duration, 1),
        "latency_ms": hdr_ms(latencies),
        "errors": dict(errors),
        "cpu_pct": cpu,
        "client_cpu_pct": [r["cpu_percent"] for r in reports],
    }


async def run_unary_rows(args: argparse.Namespace, workdir: Path, out: dict[str, Any]) -> None:
    """Row 3: the bare server and a broker with its cars up together; per level, the bare
    series, then wait=none to offline cars, then wait=result to connected cars, so the three
    figures of a level are taken close together in time."""
    sweep: dict[str, list[dict[str, Any]]] = {"ceiling": [], "none": [], "result": []}
    out["unary"] = {"client_procs": args.client_procs, "cars": args.cars, "sweep": sweep}
    broker = bench_broker(args, "unary", workdir)
    async with contextlib.AsyncExitStack() as stack:
        bare = await stack.enter_async_context(CeilingServer(args.out / "ceiling-unary.log"))
        await stack.enter_async_context(broker)
        cars = await stack.enter_async_context(
            CarsProcess(
                broker.target, args.cars, "car-", args.out / "cars-unary.log", agent=BENCH_AGENT
            )
        )
        parked = ("parked-", args.parked_cars)
        # name: (target, pids whose CPU is read, wait mode, (vehicle id prefix, count))
        series: dict[str, tuple[str, dict[str, int | None], str, tuple[str, int]]] = {
            "ceiling": (bare.target, {"server": bare.pid}, "none", parked),
            "none": (broker.target, {"server": broker.pid}, "none", parked),
            "result": (
                broker.target,
                {"server": broker.pid, "cars": cars.pid},
                "result",
                ("car-", args.cars),
            ),
        }
        for level in args.concurrency_levels:
            for name, (target, pids, wait, (prefix, vehicles)) in series.items():
                sweep[name].append(
                    await unary_point(
                        args,
                        target,
                        pids,
                        wait=wait,
                        prefix=prefix,
                        vehicles=vehicles,
                        concurrency=level,
                    )
                )
        await cars.stop()
        await broker.astop()
    out["unary"]["cars_summary"] = cars.summary
    _note_processes(out, broker, cars)


# -- 7, 8, 9: the cost of TLS ----------------------------------------------------------------


async def bench_certs(workdir: Path) -> BenchCerts:
    """The run's dev CA and server certificate (made by the first TLS row that runs)."""
    return await asyncio.to_thread(BenchCerts.at, workdir / "certs")


async def run_tls_unary_rows(args: argparse.Namespace, workdir: Path, out: dict[str, Any]) -> None:
    """Row 7: SendCommand wait=none to offline cars at the highest level, plaintext and
    over TLS, bare and broker; all four servers up together, one point each in turn."""
    certs = await bench_certs(workdir)
    level = args.concurrency_levels[-1]
    row: dict[str, Any] = {"concurrency": level, "client_procs": args.client_procs}
    out["tls-unary"] = row
    plain = bench_broker(args, "tls-unary-plaintext", workdir)
    secure = bench_broker(args, "tls-unary-tls", workdir, extra=certs.server_args())
    async with contextlib.AsyncExitStack() as stack:
        bare_plain = await stack.enter_async_context(
            CeilingServer(args.out / "ceiling-tls-unary-plaintext.log")
        )
        bare_tls = await stack.enter_async_context(
            CeilingServer(args.out / "ceiling-tls-unary-tls.log", certs.server_args())
        )
        await stack.enter_async_context(plain)
        await stack.enter_async_context(secure)
        # (transport, side): (target, server pid, client flags)
        series: dict[tuple[str, str], tuple[str, int | None, list[str]]] = {
            ("plaintext", "ceiling"): (bare_plain.target, bare_plain.pid, []),
            ("tls", "ceiling"): (bare_tls.target, bare_tls.pid, certs.client_args()),
            ("plaintext", "ours"): (plain.target, plain.pid, []),
            ("tls", "ours"): (secure.target, secure.pid, certs.client_args()),
        }
        for (transport, side), (target, pid, client_args) in series.items():
            row.setdefault(transport, {})[side] = await unary_point(
                args,
                target,
                {"server": pid},
                wait="none",
                prefix="parked-",
                vehicles=args.parked_cars,
                concurrency=level,
                client_args=client_args,
            )
        await plain.astop()
        await secure.astop()
    _note_processes(out, plain)
    _note_processes(out, secure)


async def run_tls_telemetry_rows(
    args: argparse.Namespace, workdir: Path, out: dict[str, Any]
) -> None:
    """Row 8: row 2 in plaintext, then over TLS: per transport the bare server, then a
    broker with its telemetry budgets opened wide, each fresh."""
    certs = await bench_certs(workdir)
    row: dict[str, Any] = {"streams": args.telemetry_streams}
    out["tls-telemetry"] = row
    transports = {"plaintext": ([], []), "tls": (certs.server_args(), certs.client_args())}
    for transport, (server_args, client_args) in transports.items():
        side = row[transport] = {}
        log = args.out / f"ceiling-tls-telemetry-{transport}.log"
        async with CeilingServer(log, server_args) as bare:
            side["ceiling"] = await ingest(
                args, bare.target, bare.pid, bare_taken_in(bare), client_args
            )
        name = f"tls-telemetry-{transport}"
        broker = bench_broker(args, name, workdir, WIDE_OPEN, server_args)
        async with broker:
            side["ours"] = await ingest(
                args, broker.target, broker.pid, broker_taken_in(broker), client_args
            )
        _note_processes(out, broker)


async def run_handshake_rows(args: argparse.Namespace, workdir: Path, out: dict[str, Any]) -> None:
    """Row 9: new mTLS car streams (own connection, own certificate, Hello -> Welcome) on
    the bare mTLS server, then on a broker serving mTLS; the same certificates for both."""
    certs = await bench_certs(workdir)
    row: dict[str, Any] = {"cars": args.handshake_cars}
    out["mtls-handshake"] = row
    options: dict[str, Any] = {
        "cars": args.handshake_cars,
        "client_procs": args.client_procs,
        "concurrency": args.handshake_concurrency,
        "warm_cars": min(50, max(2, args.handshake_cars // 20)),
        "log_dir": args.out,
        "timeout_s": handshake_timeout_s(args),
    }
    mtls = certs.server_args(mtls=True)
    async with CeilingServer(args.out / "ceiling-mtls-handshake.log", mtls) as bare:
        row["ceiling"] = await measure_handshakes(
            bare.target, bare.pid, certs, prefix="hs-", **options
        )
    broker = bench_broker(args, "mtls-handshake", workdir, extra=mtls)
    async with broker:
        row["ours"] = await measure_handshakes(
            broker.target, broker.pid, certs, prefix="hs-", **options
        )
    _note_processes(out, broker)


# -- 10: end-to-end signed commands --------------------------------------------------------------


def _cpu_us_per_op(work: Callable[[int], object], count: int) -> float:
    """CPU µs of this thread per call of `work(i)`, i in 0..count-1, after a warm-up of
    `work(count)` .. `work(count + 199)` (so `work` must take 200 more)."""
    for i in range(count, count + 200):
        work(i)
    started = time.thread_time()
    for i in range(count):
        work(i)
    return round((time.thread_time() - started) / count * 1e6, 2)


def measure_signing_cpu(samples: int) -> dict[str, float]:
    """The sender's and the car's CPU per command, signing off and on, on one thread: the
    sender builds and serializes the SendCommandRequest (on: also signs it); the car parses
    the BrokerFrame (on: also runs `CommandVerifier.check`: parse the body, canonical check,
    key, signature, ids, times, replay memory). Beside them, Ed25519 sign and verify alone."""
    key = Ed25519PrivateKey.generate()
    signer = CommandSigner(key)
    verifier = CommandVerifier(
        {signer.key_id: (key.public_key(), None)},
        require_signatures=False,
        replay=ReplayGuard(max_entries=2 * samples + 500),
    )
    payload = b'{"door":"all"}'
    vehicle = "bench-car"

    def unsigned_request(i: int) -> bytes:
        return bytes(build_request(vehicle, COMMAND, payload, ttl_s=60).SerializeToString())

    def signed_request(i: int) -> bytes:
        request = sign_request(build_request(vehicle, COMMAND, payload, ttl_s=60), signer)
        return bytes(request.SerializeToString())

    def frame(i: int, signed: bool) -> bytes:
        envelope = signer.sign(vehicle, COMMAND, payload, ttl_s=600, command_id=f"c{i}")
        body = t.CommandBody.FromString(envelope.body)
        command = link.CommandFrame(
            command_id=f"c{i}",
            name=COMMAND,
            payload=payload,
            attempt=1,
            expires_at_ms=body.expires_at_ms,
            issued_at_ms=body.issued_at_ms,
            signed=envelope if signed else None,
        )
        return bytes(link.BrokerFrame(command=command).SerializeToString())

    total = samples + 200  # the warm-up's too: every signed frame is checked once
    unsigned_frames = [frame(i, False) for i in range(total)]
    signed_frames = [frame(i, True) for i in range(total)]
    data = signed_bytes(signer.sign(vehicle, COMMAND, payload, ttl_s=60).body)
    signature = key.sign(data)
    public = key.public_key()
    return {
        "samples": samples,
        "sender_off_us": _cpu_us_per_op(unsigned_request, samples),
        "sender_on_us": _cpu_us_per_op(signed_request, samples),
        "car_off_us": _cpu_us_per_op(
            lambda i: link.BrokerFrame.FromString(unsigned_frames[i]), samples
        ),
        "car_on_us": _cpu_us_per_op(
            lambda i: verifier.check(
                link.BrokerFrame.FromString(signed_frames[i]).command, vehicle
            ),
            samples,
        ),
        "ed25519_sign_us": _cpu_us_per_op(lambda i: key.sign(data), samples),
        "ed25519_verify_us": _cpu_us_per_op(lambda i: public.verify(signature, data), samples),
        "signed_request_bytes": len(signed_request(0)),
        "unsigned_request_bytes": len(unsigned_request(0)),
        "signed_frame_bytes": len(signed_frames[0]),
        "unsigned_frame_bytes": len(unsigned_frames[0]),
    }


#: the signing row's paced points run at this share of the slower closed-loop rate
PACED_SHARE = 0.7


class SignedRequests:
    """Serialized SendCommandRequests over `vehicles`, each a new command: unsigned, or
    each signed with its own command id, `pool` of them signed ahead (outside the measured
    window); past the pool they are signed as they are taken (counted in `late`)."""

    def __init__(
        self,
        vehicles: Sequence[str],
        *,
        wait: str,
        ttl_s: float,
        wait_timeout_s: float,
        signer: CommandSigner | None,
        pool: int,
    ) -> None:
        self._vehicles = vehicles
        self.wait = wait
        self._ttl_s = ttl_s
        self._timeout_s = wait_timeout_s if wait == "result" else None
        self._signer = signer
        self._turn = itertools.count()
        self.late = 0
        self._pool = [self._build(next(self._turn)) for _ in range(pool if signer else 0)]
        self._pool.reverse()

    def _build(self, turn: int) -> bytes:
        request = build_request(
            self._vehicles[turn % len(self._vehicles)], COMMAND, ttl_s=self._ttl_s,
            wait=self.wait, timeout_s=self._timeout_s,
        )  # fmt: skip
        if self._signer is not None:
            sign_request(request, self._signer)
        return bytes(request.SerializeToString())

    def take(self) -> bytes:
        if self._pool:
            return self._pool.pop()
        if self._signer is not None:
            self.late += 1
        return self._build(next(self._turn))


async def signed_point(
    args: argparse.Namespace,
    target: str,
    broker_pid: int,
    requests: SignedRequests,
    concurrency: int,
    rate: float | None = None,
) -> dict[str, Any]:
    """Up to `concurrency` SendCommands in flight from this process for one window, as
    fast as they complete or started at `rate` per second; the broker's CPU over the
    window, per call completed in it."""
    window = Window(args.warmup, args.duration, CpuMeter({"server": broker_pid, "bench": None}))
    paced_from = time.perf_counter()
    slots = itertools.count()
    ok = {"result": {t.SUCCEEDED}, "none": {t.ACCEPTED, t.QUEUED, t.DELIVERED}}[requests.wait]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    completed = 0
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        call: Any = channel.unary_unary(
            "/broker.v1.CommandService/SendCommand",
            response_deserializer=svc.SendCommandResponse.FromString,
        )

        async def caller() -> None:
            nonlocal completed
            while True:
                if rate:
                    delay = paced_from + next(slots) / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                request = requests.take()
                started = time.perf_counter()
                if started >= window.end:
                    return
                try:
                    reply = await call(request, timeout=args.wait_timeout + 5)
                    problem = None
                    if reply.wait_timed_out or reply.command.status not in ok:
                        problem = f"status {t.CommandStatus.Name(reply.command.status)}"
                        problem += f" ({reply.command.result_message[:80]})" * bool(
                            reply.command.result_message
                        )
                except grpc.aio.AioRpcError as exc:
                    problem = f"{exc.code().name}: {(exc.details() or '')[:80]}"
                finished = time.perf_counter()
                if problem is not None:
                    errors[problem] += window.measures(started)
                    continue
                if window.measures(finished):
                    completed += 1
                if window.measures(started):
                    latencies.append(finished - started)

        cpu, *_ = await asyncio.gather(window.read_cpu(), *(caller() for _ in range(concurrency)))
    server_pct = cpu.get("server")
    per_call = (
        round(server_pct / 100 * args.duration / completed * 1e6, 1)
        if server_pct is not None and completed
        else None
    )
    return {
        "paced_at": rate,
        "qps": round(completed / args.duration, 1),
        "calls": completed,
        "latency_ms": hdr_ms(latencies),
        "errors": {k: v for k, v in errors.items() if v},
        "cpu_pct": cpu,
        "server_us_per_call": per_call,
        "signed_late": requests.late,
    }


async def signing_series(
    args: argparse.Namespace,
    broker: BrokerProcess,
    signer: CommandSigner,
    vehicles: Sequence[str],
    wait: str,
    level: int,
) -> dict[str, Any]:
    """One mode of row 10: unsigned then signed, closed loop at `level` in flight; then
    both paced at the same rate, `PACED_SHARE` of the slower one's, so the broker's CPU
    per call compares like with like (a slower series spreads the broker's fixed costs,
    fsyncs and wake-ups, over fewer calls)."""
    options = {"wait": wait, "ttl_s": args.ttl, "wait_timeout_s": args.wait_timeout}

    async def point(signed: bool, rate: float | None, pool: int = 0) -> Any:
        requests = await asyncio.to_thread(
            SignedRequests, vehicles, signer=signer if signed else None, pool=pool, **options
        )
        return await signed_point(args, broker.target, broker.pid, requests, level, rate)

    side: dict[str, Any] = {"unsigned": await point(False, None)}
    # Enough signed ahead for the unsigned rate (and half again) over the window.
    pool = int(max(1000, side["unsigned"]["qps"] * (args.warmup + args.duration) * 1.5))
    side["signed"] = await point(True, None, pool)
    rate = max(1, round(PACED_SHARE * min(side["unsigned"]["qps"], side["signed"]["qps"])))
    side["paced_unsigned"] = await point(False, rate)
    side["paced_signed"] = await point(True, rate, pool)
    return side


async def run_signing_rows(args: argparse.Namespace, workdir: Path, out: dict[str, Any]) -> None:
    """Row 10: what end-to-end signing costs. The sender's and the car's CPU per command
    (`measure_signing_cpu`, this process, one thread); then the broker's CPU per
    SendCommand carrying signed envelopes against unsigned ones, at the highest level,
    from this process: wait=none to offline cars (accept and store the envelope), and
    wait=result to `--cars` connected cars in this process, each checking signatures with
    a `CommandVerifier` (the envelope also goes out in every frame). Per mode, unsigned
    then signed, one point each; signed requests are signed ahead of the window."""
    row: dict[str, Any] = {"concurrency": args.concurrency_levels[-1], "cars": args.cars}
    out["signing"] = row
    samples = 2000 if args.quick else 20000
    row["cpu"] = await asyncio.to_thread(measure_signing_cpu, samples)
    key = Ed25519PrivateKey.generate()
    signer = CommandSigner(key)
    broker = bench_broker(args, "signing", workdir)
    agents: list[VehicleAgent] = []
    tasks: list[asyncio.Task[None]] = []
    channels: list[grpc.aio.Channel] = []
    async with broker:
        try:
            car_ids = [f"signing-car-{i}" for i in range(args.cars)]
            channels = shared_channels(broker.target, len(car_ids))
            for index, vehicle_id in enumerate(car_ids):
                agent = VehicleAgent(
                    broker.target, vehicle_id, channel=channels[index // CARS_PER_CHANNEL],
                    handlers={COMMAND: succeed},
                    verifier=CommandVerifier(
                        {signer.key_id: (key.public_key(), None)}, require_signatures=False
                    ),
                    **BENCH_AGENT,
                )  # fmt: skip
                agents.append(agent)
                tasks.append(asyncio.create_task(agent.run()))
            await within(
                60, "the signing row's cars", asyncio.gather(*(a.connected.wait() for a in agents))
            )
            parked = [f"parked-{i:04d}" for i in range(args.parked_cars)]
            level = row["concurrency"]
            for wait, vehicles in (("none", parked), ("result", car_ids)):
                row[wait] = await signing_series(args, broker, signer, vehicles, wait, level)
            row["car_refusals"] = sum(len(a.refused) for a in agents)
        finally:
            await stop_agents(agents, tasks, channels)
        await broker.astop()
    _note_processes(out, broker)


def padded_payload(record_bytes: int, ttl_s: float) -> bytes:
    """A JSON payload that makes one stored `unlock` record about `record_bytes` long."""
    now = int(time.time() * 1000)
    bare = t.Command(
        command_id="0" * 24,
        vehicle_id="parked-000",
        name=COMMAND,
        lane=t.CRITICAL,
        status=t.QUEUED,
        created_at_ms=now,
        updated_at_ms=now,
        expires_at_ms=now + int(ttl_s * 1000),
        seq=1 << 20,
        payload=b'{"pad":""}',
    )
    pad = max(0, record_bytes - bare.ByteSize())
    return json.dumps({"pad": "x" * pad}, separators=(",", ":")).encode()


def batches(vehicle_ids: Sequence[str], size: int, payload: bytes, ttl_s: float) -> Iterator[Any]:
    """Endless prebuilt batches (built once, so the client adds little per call)."""
    cars = itertools.cycle(vehicle_ids)
    count = max(1, len(vehicle_ids) // size)
    prebuilt = [
        [build_request(next(cars), COMMAND, payload, ttl_s=ttl_s) for _ in range(size)]
        for _ in range(count)
    ]
    return itertools.cycle(prebuilt)


async def measure_send_commands_batches(
    target: str,
    vehicle_ids: Sequence[str],
    *,
    batch_size: int,
    payload: bytes,
    ttl_s: float,
    window: Window,
    rpc_timeout_s: float,
) -> dict[str, Any]:
    """SendCommands to offline cars, one batch in flight (one LMDB transaction each)."""
    source = batches(vehicle_ids, batch_size, payload, ttl_s)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    accepted = 0
    record_bytes = 0

    async def send_batches() -> None:
        nonlocal accepted, record_bytes
        async with BrokerClient(target, timeout_s=rpc_timeout_s) as client:
            for _ in range(MAX_CALLS):
                if not window.open():
                    break
                started = time.perf_counter()
                try:
                    reply = await client.send_commands(next(source))
                except BrokerRpcError as exc:
                    errors[exc.code] += batch_size * window.measures(started)
                    continue
                finished = time.perf_counter()
                ok = [item for item in reply.items if item.HasField("accepted")]
                if ok and not record_bytes:  # the record as stored: the reply omits the payload
                    stored = t.Command()
                    stored.CopyFrom(ok[0].accepted.command)
                    stored.payload = payload
                    record_bytes = stored.ByteSize()
                if window.measures(started):
                    latencies.append(finished - started)
                    errors.update(i.error.code for i in reply.items if i.HasField("error"))
                if window.measures(finished):
                    accepted += len(ok)

    await asyncio.gather(window.read_cpu(), send_batches())
    return {
        "batch_size": batch_size,
        "rate_per_s": round(accepted / window.duration_s, 1),
        "accepted_in_window": accepted,
        "record_bytes": record_bytes,
        "latency_ms": hdr_ms(latencies),
        "errors": dict(+errors),
        "cpu_pct": window.cpu_percent,
    }


def measure_raw_lmdb_batches(
    path: Path,
    vehicle_ids: Sequence[str],
    *,
    batch_size: int,
    record_bytes: int,
    ttl_s: float,
    sync: bool,
    warmup_s: float,
    duration_s: float,
    abandon: threading.Event,
) -> dict[str, Any]:
    """py-lmdb, one write transaction per batch, the store's puts per command (blocking)."""
    path.mkdir(parents=True)
    env = lmdb.open(
        str(path),
        map_size=Config().map_size_mb << 20,
        max_dbs=8,
        sync=sync,
        metasync=sync,
        map_async=False,
    )
    try:
        with env.begin(write=True) as txn:
            commands, by_vehicle, pending, timers, meta = (
                env.open_db(name, txn=txn)
                for name in (b"commands", b"by_vehicle", b"pending", b"timers", b"meta")
            )
        cars = itertools.cycle([vehicle.encode() + b"\x00" for vehicle in vehicle_ids])
        value = os.urandom(record_bytes)
        ttl_ms = int(ttl_s * 1000)
        seq = 0

        def write_batch() -> None:
            nonlocal seq
            now_ms = time.time_ns() // 1_000_000
            first_seq = seq
            while True:
                seq = first_seq
                try:
                    with env.begin(write=True) as txn:
                        for _ in range(batch_size):
                            seq += 1
                            # Key shapes as in the LMDB store (broker_ext/_codec_py.py)
                            command_id = f"{now_ms:012x}{os.urandom(6).hex()}".encode()
                            txn.put(command_id, value, db=commands)
                            car = next(cars)
                            txn.put(car + seq.to_bytes(8, "big"), command_id, db=by_vehicle)
                            lane = b"\xfc"  # 255 - CRITICAL: the batch sends unlocks
                            txn.put(car + lane + seq.to_bytes(8, "big"), command_id, db=pending)
                            txn.put(
                                (now_ms + ttl_ms).to_bytes(8, "big") + command_id, b"", db=timers
                            )
                        txn.put(b"seq", seq.to_bytes(8, "big"), db=meta)
                    return
                except lmdb.MapFullError:
                    env.set_mapsize(env.info()["map_size"] * 2)  # as the broker's writer does

        cpu = CpuMeter({"client": None})
        window = Window(warmup_s, duration_s, cpu)
        latencies: list[float] = []
        written = 0
        measuring = False
        for _ in range(MAX_CALLS):
            started = time.perf_counter()
            if started >= window.end or abandon.is_set():
                break
            if not measuring and window.measures(started):
                cpu.start()
                measuring = True
            write_batch()
            finished = time.perf_counter()
            if window.measures(started):
                latencies.append(finished - started)
            if window.measures(finished):
                written += batch_size
        cpu_percent = cpu.stop() if measuring else {"client": None}
    finally:
        env.close()
    return {
        "batch_size": batch_size,
        "rate_per_s": round(written / duration_s, 1),
        "written_in_window": written,
        "record_bytes": record_bytes,
        "puts_per_command": 4,
        "latency_ms": hdr_ms(latencies),
        "cpu_pct": cpu_percent,
    }


async def run_batch_rows(args: argparse.Namespace, workdir: Path, out: dict[str, Any]) -> None:
    """Row 4, per batch size: a fresh broker, then raw py-lmdb on a fresh folder after the
    broker has exited (so each has the disk and the cores to itself)."""
    rows = out["batch"] = []
    parked = [f"parked-{i:04d}" for i in range(args.parked_cars)]
    for size in args.batch_sizes:
        broker = bench_broker(args, f"batch-{size}", workdir)
        async with broker:
            ours = await measure_send_commands_batches(
                broker.target,
                parked,
                batch_size=size,
                payload=padded_payload(args.record_bytes, args.ttl),
                ttl_s=args.ttl,
                rpc_timeout_s=args.wait_timeout,
                window=Window(
                    args.warmup, args.duration, CpuMeter({"server": broker.pid, "client": None})
                ),
            )
        _note_processes(out, broker)
        abandon = threading.Event()
        try:
            raw = await asyncio.to_thread(
                measure_raw_lmdb_batches,
                workdir / f"raw-{size}",
                parked,
                batch_size=size,
                record_bytes=ours["record_bytes"] or args.record_bytes,
                ttl_s=args.ttl,
                sync=args.durability == "fsync",
                warmup_s=args.warmup,
                duration_s=args.duration,
                abandon=abandon,
            )
        finally:
            abandon.set()  # on cancellation, the thread stops after its current batch
        rows.append({"batch_size": size, "ours": ours, "ceiling": raw})


# -- 5: offline drain and kill -9 loss, beside Mosquitto ----------------------------------------


async def run_drain_rows(args: argparse.Namespace, workdir: Path, out: dict[str, Any]) -> None:
    """Row 5: `loadtests.mosquitto.compare`, or why it was skipped."""
    row = out["drain"] = {"cars": args.drain_cars, "per_car": args.drain_per_car}
    lacking = mosquitto.missing()
    if lacking is not None:
        row["skipped"] = " ".join(lacking.split())
        return
    theirs, ours = await mosquitto.compare(
        workdir / "drain",
        cars=args.drain_cars,
        per_car=args.drain_per_car,
        loss_wait_s=args.loss_wait,
        mqtt_procs=args.mqtt_procs,
    )
    row.update(
        ours=mosquitto.summary(ours), ceiling=mosquitto.summary(theirs), detail=[theirs, ours]
    )
    if ours.get("log_problems"):
        out["notes"].append(f"drain broker logged: {ours['log_problems'][0][:160]!r}")


# -- 6: unlock latency during a telemetry storm -------------------------------------------------


async def run_storm_rows(args: argparse.Namespace, workdir: Path, out: dict[str, Any]) -> None:
    """Row 6: the verbosity-storm drill, one step (x10); its checks go to the notes."""
    verdict = await drills.verbosity_storm(
        workdir / "storm", cars=args.storm_cars, unlocks_per_phase=args.storm_unlocks, storms=1
    )
    phases = {name: hdr_ms(samples) for name, samples in verdict.samples.items()}
    out["storm"] = {
        "cars": args.storm_cars,
        "unlocks_per_phase": args.storm_unlocks,
        "ours": phases.pop("storm x10"),
        "ceiling": phases.pop("unloaded"),
        "checks": [{"check": c, "passed": ok, "detail": d} for c, ok, d in verdict.checks],
        "figures": verdict.figures,
    }
    out["notes"] += [f"storm drill check failed: {c}: {d}" for c, ok, d in verdict.checks if not ok]


# -- the run --------------------------------------------------------------------------------


def filesystem_of(path: Path) -> str:
    """The mount point and type holding `path` (tmpfs would make fsync free)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and resolved.startswith(fields[1]) and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return f"{kind} ({best})"


RUNNERS: dict[str, Callable[[argparse.Namespace, Path, dict[str, Any]], Awaitable[None]]] = {
    "streams": run_streams_rows,
    "telemetry": run_telemetry_rows,
    "unary": run_unary_rows,
    "tls-unary": run_tls_unary_rows,
    "tls-telemetry": run_tls_telemetry_rows,
    "mtls-handshake": run_handshake_rows,
    "batch": run_batch_rows,
    "storm": run_storm_rows,
    "drain": run_drain_rows,
    "signing": run_signing_rows,
}


async def run_bench(args: argparse.Namespace, client_loop: str) -> dict[str, Any]:
    """The chosen rows in order, in temporary folders removed at the end (also on failure);
    a row that fails or overruns its limit is recorded under `errors` and the next runs."""
    args.out.mkdir(parents=True, exist_ok=True)
    tmp_parent = args.tmp_dir or Path(tempfile.gettempdir())
    settings = {
        k: v for k, v in vars(args).items() if k not in ("out", "tmp_dir") and v is not None
    }
    results: dict[str, Any] = {
        "settings": settings,
        "environment": {
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "lmdb": lmdb.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "client_loop": client_loop,
            "client_extensions": extensions_summary(),
            "data_filesystem": filesystem_of(tmp_parent),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "errors": {},
        "brokers": {},
        "notes": [],
    }
    limits = row_limits_s(args)
    with tempfile.TemporaryDirectory(prefix="broker-bench-", dir=tmp_parent) as tmp:
        for name in (row for row in ROWS if row in args.only):
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                await within(limits[name], name, RUNNERS[name](args, Path(tmp), results))
            except Exception as exc:  # one row's failure is reported; the others still run
                results["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            results.setdefault("row_seconds", {})[name] = round(time.perf_counter() - started, 1)
    results["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    client_loop = install_event_loop_policy()
    budget_s = sum(limits for row, limits in row_limits_s(args).items() if row in args.only)

    async def bounded() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await asyncio.wait_for(run_bench(args, client_loop), budget_s)

    started = time.perf_counter()
    try:
        results = asyncio.run(bounded())
    except TimeoutError:
        print(f"error: the bench overran its {budget_s:.0f} s budget", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    results["notes"] += report.saturation_notes(results)
    results["rows"] = report.table_rows(results)
    results["plots"] = report.plot(results, args.out)
    text = report.render_markdown(results)
    (args.out / "report.md").write_text(text + "\n")
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    print(f"\n(in {args.out}: report.md, bench.json, plots; whole run {results['elapsed_s']} s)")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
