"""Command-path benchmark: what one broker process does on this machine, beside its ceiling.

    python -m loadtests.bench            # `make bench`: a little over a minute
    python -m loadtests.bench --quick    # ~20 s smoke run; --help for the knobs

Everything runs on 127.0.0.1 and is cleaned up on exit: a broker subprocess
(`broker serve --insecure-dev`, a fresh LMDB folder, fsync durability unless told
otherwise), simulated cars in a second subprocess, the load client in this one.
It prints a markdown table and writes the same figures, with more detail, to
bench-out/bench.json (broker and car logs land in bench-out/ too).

The rows:

1. `SendCommand wait=result`: the whole round trip to a connected car: durable enqueue,
   delivery on the car's stream, the car's ack and result recorded durably, then the
   reply. A closed loop with a fixed number of `unlock` calls in flight, round-robin
   over the cars (each car executes at once and succeeds).
2. `SendCommand wait=none`: the same calls answered once the command is durable (the
   broker still delivers them to the cars meanwhile).
3. `SendCommands batch N`: batch enqueue to offline cars (nothing is delivered); one batch
   in flight, so each batch is one LMDB write transaction...
4. `raw py-lmdb batch N`: ...beside py-lmdb doing the same writes in this process: per
   command the record (24-byte key, a value as long as the broker's record) and the two
   index entries the store writes with it (`by_vehicle`, `timers`; see
   `Store._create_one`), plus the sequence counter once per batch; one write transaction
   per batch, the same sync mode. `broker/raw` is the ratio the team tracks.

How to read it: `rate` counts calls (rows 1-2) or commands (rows 3-4) completed inside the
measured window, after a warm-up. p50/p99 are nearest-rank over the latencies
(time.perf_counter) of the successful calls (rows 1-2) or batches (rows 3-4) started in the
window. `errors` counts calls started in the window that failed, by gRPC status code, and
those answered with another command status than expected (`SUCCEEDED` for wait=result,
`ACCEPTED`/`QUEUED` for wait=none) as `command <STATUS>` or `wait timed out at <STATUS>`;
for batches, refused items by code. `CPU %` is each process's CPU time over the window in %
of one core, as broker/cars/client ("-": not in that row); one near 100 % is what limits
the row. Notes under the table flag broker log warnings and car stream reconnects.
Figures compare only on the same machine and disk; nothing here asserts a target.
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
from collections.abc import Awaitable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import lmdb

from broker.client import BrokerClient, BrokerRpcError, build_request
from broker.config import Config
from broker.server import install_event_loop_policy
from broker.v1 import types_pb2 as t
from broker_ext._compat import extensions_summary
from loadtests._util import UNTHROTTLED, CarsProcess, CpuMeter, latency_ms
from loadtests.broker_process import BrokerProcess

T = TypeVar("T")
COMMAND = "unlock"
#: Safety cap on calls (or batches) per measurement, far above what a run can reach; the
#: loops end on time first.
MAX_CALLS = 5_000_000
OK_STATUSES = {"result": {t.SUCCEEDED}, "none": {t.ACCEPTED, t.QUEUED}}


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description="Measure SendCommand round trips and batch enqueue against raw LMDB.",
    )
    add = parser.add_argument
    add(
        "--quick",
        action="store_true",
        help="~20 s smoke run: --duration 2 --warmup 0.5 --cars 20 --wait-timeout 3 unless given",
    )
    add("--duration", type=float, help="measured seconds per row (default 10)")
    add("--warmup", type=float, help="unmeasured seconds before each row (default 1)")
    add("--concurrency", type=int, default=32, help="SendCommand calls in flight")
    add("--cars", type=int, help="connected simulated cars (default 100)")
    add("--batch-sizes", default="64,512", help="comma-separated SendCommands batch sizes")
    add("--parked-cars", type=int, default=1000, help="offline vehicle ids batches go to")
    add(
        "--record-bytes",
        type=int,
        default=200,
        help="pad batch payloads so one stored record is about this long",
    )
    add(
        "--batch-ttl",
        type=float,
        default=3600,
        help="TTL of batch commands (s); longer than the run, so nothing expires",
    )
    add(
        "--wait-timeout",
        type=float,
        help="seconds a wait=result call waits for the car; bounds RPC deadlines too (default 10)",
    )
    add(
        "--durability",
        choices=["fsync", "relaxed"],
        default="fsync",
        help="broker durability; the raw LMDB rows use the same sync mode",
    )
    add("--out", type=Path, default=Path("bench-out"), help="folder for bench.json and logs")
    add("--tmp-dir", type=Path, help="parent of the temporary LMDB folders (default: system)")
    args = parser.parse_args(argv)
    quick = {"duration": 2.0, "warmup": 0.5, "cars": 20, "wait_timeout": 3.0}
    full = {"duration": 10.0, "warmup": 1.0, "cars": 100, "wait_timeout": 10.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.batch_sizes = [int(size) for size in args.batch_sizes.split(",") if size]
    except ValueError:
        parser.error("--batch-sizes: comma-separated integers")
    max_batch = Config().max_batch
    if not args.batch_sizes or not all(0 < size <= max_batch for size in args.batch_sizes):
        parser.error(f"--batch-sizes: each within 1..{max_batch} (the broker's max_batch)")
    for name in ("duration", "concurrency", "cars", "parked_cars", "wait_timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


def time_budget_s(args: argparse.Namespace) -> float:
    """A hard stop for the whole run: every row plus generous start/stop allowances."""
    rows = 2 + 2 * len(args.batch_sizes)
    return float(rows * (args.warmup + args.duration) + 4 * args.wait_timeout + 60)


# -- measurement windows --------------------------------------------------------------------


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

    async def read_cpu(self) -> None:
        await asyncio.sleep(max(0.0, self.start - time.perf_counter()))
        self._cpu.start()
        await asyncio.sleep(max(0.0, self.end - time.perf_counter()))
        self.cpu_percent = self._cpu.stop()


async def within(seconds: float, what: str, work: Awaitable[T]) -> T:
    """Await `work`, or fail the run with a clear message if it hangs."""
    try:
        return await asyncio.wait_for(work, seconds)
    except TimeoutError:
        raise RuntimeError(f"{what} did not finish within {seconds:.0f} s") from None


def _outcome(wait: str, reply: Any) -> str | None:
    """None for an expected reply, else what to count it as."""
    if reply.wait_timed_out:
        return f"wait timed out at {t.CommandStatus.Name(reply.command.status)}"
    if reply.command.status not in OK_STATUSES[wait]:
        return f"command {t.CommandStatus.Name(reply.command.status)}"
    return None


# -- 1, 2: SendCommand to connected cars -------------------------------------------------------


async def measure_send_command(
    target: str,
    vehicle_ids: Sequence[str],
    *,
    wait: str,
    concurrency: int,
    window: Window,
    wait_timeout_s: float,
) -> dict[str, Any]:
    """Closed loop of `unlock` SendCommands with `wait`, `concurrency` calls in flight."""
    cars = itertools.cycle(vehicle_ids)
    calls = itertools.count()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    completed = 0
    wait_s = wait_timeout_s if wait != "none" else None

    async with BrokerClient(target, timeout_s=wait_timeout_s) as client:

        async def caller() -> None:
            nonlocal completed
            while window.open() and next(calls) < MAX_CALLS:
                started = time.perf_counter()
                try:
                    reply = await client.send_command(
                        next(cars), COMMAND, wait=wait, timeout_s=wait_s
                    )
                    problem = _outcome(wait, reply)
                except BrokerRpcError as exc:
                    problem = exc.code
                finished = time.perf_counter()
                if problem is not None:
                    if window.measures(started):
                        errors[problem] += 1
                    continue
                if window.measures(finished):
                    completed += 1
                if window.measures(started):
                    latencies.append(finished - started)

        await asyncio.gather(window.read_cpu(), *(caller() for _ in range(concurrency)))
    return {
        "rate_per_s": round(completed / window.duration_s, 1),
        "unit": "calls/s",
        "ok_in_window": completed,
        **latency_ms(latencies),
        "errors": dict(+errors),
        "cpu_percent": window.cpu_percent,
    }


# -- 3: SendCommands batches to offline cars ---------------------------------------------------


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
                if ok and not record_bytes:
                    record_bytes = ok[0].accepted.command.ByteSize()
                if window.measures(started):
                    latencies.append(finished - started)
                    errors.update(i.error.code for i in reply.items if i.HasField("error"))
                if window.measures(finished):
                    accepted += len(ok)

    await asyncio.gather(window.read_cpu(), send_batches())
    return {
        "batch_size": batch_size,
        "rate_per_s": round(accepted / window.duration_s, 1),
        "unit": "commands/s",
        "accepted_in_window": accepted,
        "record_bytes": record_bytes,
        **latency_ms(latencies),
        "errors": dict(+errors),
        "cpu_percent": window.cpu_percent,
    }


# -- 4: raw py-lmdb, the same writes ------------------------------------------------------------


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
            commands, by_vehicle, timers, meta = (
                env.open_db(name, txn=txn)
                for name in (b"commands", b"by_vehicle", b"timers", b"meta")
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
                            # Key shapes as in broker/store.py and broker_ext/_codec_py.py.
                            command_id = f"{now_ms:012x}{os.urandom(6).hex()}".encode()
                            txn.put(command_id, value, db=commands)
                            txn.put(next(cars) + seq.to_bytes(8, "big"), command_id, db=by_vehicle)
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
        "unit": "commands/s",
        "written_in_window": written,
        "record_bytes": record_bytes,
        "puts_per_command": 3,
        **latency_ms(latencies),
        "errors": {},
        "cpu_percent": cpu_percent,
    }


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


def bench_broker(args: argparse.Namespace, data_dir: Path, log_path: Path) -> BrokerProcess:
    """An --insecure-dev broker at the bench's durability, without quotas in the way."""
    return BrokerProcess(
        data_dir, log_path, args=["--durability", args.durability], env=UNTHROTTLED
    )


async def run_connected_rows(
    args: argparse.Namespace, workdir: Path, results: dict[str, Any]
) -> None:
    """Rows 1-2: one broker, the simulated cars, SendCommand with wait=result then none."""
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(
            bench_broker(args, workdir / "online", args.out / "broker-online.log")
        )
        cars = await stack.enter_async_context(
            CarsProcess(broker.target, args.cars, "car-", args.out / "cars.log")
        )
        results["environment"].update(broker_loop=broker.loop, broker_extensions=broker.extensions)
        pids = {"broker": broker.pid, "cars": cars.pid, "client": None}
        for wait in ("result", "none"):
            row = await within(
                args.warmup + args.duration + 2 * args.wait_timeout + 5,
                f"SendCommand wait={wait}",
                measure_send_command(
                    broker.target,
                    cars.vehicle_ids,
                    wait=wait,
                    concurrency=args.concurrency,
                    window=Window(args.warmup, args.duration, CpuMeter(pids)),
                    wait_timeout_s=args.wait_timeout,
                ),
            )
            row.update(wait=wait, cars=args.cars, concurrency=args.concurrency)
            results["send_command"].append(row)
        await cars.stop()
        await broker.astop()
    _note_processes(results, broker, cars)
    results["cars"] = cars.summary


async def run_batch_rows(
    args: argparse.Namespace, workdir: Path, size: int, results: dict[str, Any]
) -> None:
    """Rows 3-4 for one batch size: a fresh broker, then raw py-lmdb on a fresh folder.

    Each starts from an empty LMDB; the raw rows run after the broker has exited, so they
    have the disk and the cores to themselves as the broker had.
    """
    parked = [f"parked-{i:04d}" for i in range(args.parked_cars)]
    log = args.out / f"broker-batch-{size}.log"
    async with bench_broker(args, workdir / f"batch-{size}", log) as broker:
        row = await within(
            args.warmup + args.duration + args.wait_timeout + 5,
            f"SendCommands batch {size}",
            measure_send_commands_batches(
                broker.target,
                parked,
                batch_size=size,
                payload=padded_payload(args.record_bytes, args.batch_ttl),
                ttl_s=args.batch_ttl,
                rpc_timeout_s=args.wait_timeout,
                window=Window(
                    args.warmup, args.duration, CpuMeter({"broker": broker.pid, "client": None})
                ),
            ),
        )
        await broker.astop()
    _note_processes(results, broker, None)
    abandon = threading.Event()
    try:
        raw = await asyncio.to_thread(
            measure_raw_lmdb_batches,
            workdir / f"raw-{size}",
            parked,
            batch_size=size,
            record_bytes=row["record_bytes"] or args.record_bytes,
            ttl_s=args.batch_ttl,
            sync=args.durability == "fsync",
            warmup_s=args.warmup,
            duration_s=args.duration,
            abandon=abandon,
        )
    finally:
        abandon.set()  # on cancellation, the thread stops after its current batch
    ratio = row["rate_per_s"] / raw["rate_per_s"] if raw["rate_per_s"] else None
    row["broker_over_raw"] = None if ratio is None else round(ratio, 3)
    results["send_commands"].append(row)
    results["raw_lmdb"].append(raw)


async def run_bench(args: argparse.Namespace, client_loop: str) -> dict[str, Any]:
    """Every row, in temporary LMDB folders removed at the end (also on failure)."""
    args.out.mkdir(parents=True, exist_ok=True)
    tmp_parent = args.tmp_dir or Path(tempfile.gettempdir())
    results: dict[str, Any] = {
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "cars": args.cars,
            "batch_sizes": args.batch_sizes,
            "parked_cars": args.parked_cars,
            "durability": args.durability,
            "wait_timeout_s": args.wait_timeout,
            "quick": args.quick,
        },
        "environment": {
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "lmdb": lmdb.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "client_loop": client_loop,
            "client_extensions": extensions_summary(),
            "data_filesystem": filesystem_of(tmp_parent),
        },
        "send_command": [],
        "send_commands": [],
        "raw_lmdb": [],
        "cars": {},
        "brokers": {},
        "notes": [],
    }
    with tempfile.TemporaryDirectory(prefix="broker-bench-", dir=tmp_parent) as tmp:
        await run_connected_rows(args, Path(tmp), results)
        for size in args.batch_sizes:
            await run_batch_rows(args, Path(tmp), size, results)
    return results


def _note_processes(
    results: dict[str, Any], broker: BrokerProcess, cars: CarsProcess | None
) -> None:
    """Record how the broker went; flag what it logged and car streams that reconnected."""
    name = broker.log_path.stem
    results["brokers"][name] = broker.describe()
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


# -- the report -----------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cpu(percent: dict[str, float | None]) -> str:
    order = ("broker", "cars", "client")
    return "/".join("-" if percent.get(k) is None else f"{percent[k]:.0f}" for k in order)


def _errors(errors: dict[str, int]) -> str:
    if not errors:
        return "0"
    return ", ".join(f"{code}: {count}" for code, count in sorted(errors.items()))


def render_markdown(results: dict[str, Any]) -> str:
    settings, env = results["settings"], results["environment"]
    lines = [
        "| measurement | rate | p50 ms | p99 ms | errors | CPU % broker/cars/client | broker/raw |",
        "|---|--:|--:|--:|---|--:|--:|",
    ]

    def row(label: str, data: dict[str, Any], ratio: str = "") -> None:
        rate = f"{data['rate_per_s']:,.0f} {data['unit']}"
        lines.append(
            f"| {label} | {rate} | {_ms(data['p50_ms'])} | {_ms(data['p99_ms'])} | "
            f"{_errors(data['errors'])} | {_cpu(data['cpu_percent'])} | {ratio} |"
        )

    for data in results["send_command"]:
        label = (
            f"SendCommand {COMMAND} wait={data['wait']}, {data['cars']} connected cars, "
            f"{data['concurrency']} in flight"
        )
        row(label, data)
    for data, raw in zip(results["send_commands"], results["raw_lmdb"], strict=True):
        ratio = "-" if data["broker_over_raw"] is None else f"{data['broker_over_raw']:.2f}"
        row(f"SendCommands batch {data['batch_size']}, offline cars", data, ratio)
        row(f"raw py-lmdb batch {raw['batch_size']}, {raw['puts_per_command']} puts/cmd", raw)
    record = results["send_commands"][0]["record_bytes"] if results["send_commands"] else 0
    lines += [
        "",
        f"event loop: broker={env.get('broker_loop')}, cars={results['cars'].get('loop')}, "
        f"client={env['client_loop']} · extensions: broker={env.get('broker_extensions')}, "
        f"client={env['client_extensions']}",
        f"durability={settings['durability']} (raw LMDB sync={settings['durability'] == 'fsync'})"
        f" · record {record} B · data on {env['data_filesystem']} · {env['cpus']} CPUs · "
        f"{settings['duration_s']:g} s per row after {settings['warmup_s']:g} s warm-up",
    ]
    lines += [f"note: {note}" for note in results["notes"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    client_loop = install_event_loop_policy()

    async def bounded() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await asyncio.wait_for(run_bench(args, client_loop), time_budget_s(args))

    started = time.perf_counter()
    try:
        results = asyncio.run(bounded())
    except TimeoutError:
        print(f"error: the bench overran its {time_budget_s(args):.0f} s budget", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a child did not start (log tail in exc) or a row hung
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    report = render_markdown(results)
    print(report)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n(written to {args.out / 'bench.json'}; whole run {results['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
