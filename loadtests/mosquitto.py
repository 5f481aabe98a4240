"""Offline drain and kill -9 loss: this broker vs Mosquitto with persistent sessions.

    python -m loadtests.mosquitto [--cars 1000 --per-car 10 --loss-wait-s 10]

The same work on both: `cars` offline receivers, `per-car` acknowledged messages queued for
each, then (a) drain: every receiver reconnects at once, timed until all are delivered;
(b) loss: the same setup, kill -9 right after the last acknowledgement, restart on the same
data, reconnect, count what comes back within a bounded wait.

- Mosquitto (Debian package `mosquitto`; `mosquitto` on PATH): persistence on, default
  autosave interval, persistent sessions (MQTT 3.1.1, clean_session=False) subscribed at
  QoS 1 to `cars/<id>/cmd`; "acknowledged" is the PUBACK. Client: `paho-mqtt`, every
  connection driven from one selector loop in this process.
- This broker: a subprocess (fsync durability, unthrottled stream gate and quota), `climate`
  commands with a payload and a long TTL sent with SendCommands batches ("acknowledged" is
  the RPC's reply); `VehicleAgent`s in this process, many per channel; delivered means
  SUCCEEDED (the car acked, executed and sent its result, recorded by the broker).

Prints a markdown table and writes bench-out/mosquitto.json. Loopback only, bounded,
temporary folders, child processes ended on exit. `loadtests.bench` runs the same
comparison (`compare`) as its offline-drain rows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import queue
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from broker.testing import LOOPBACK, PROJECT_ROOT, BrokerProcess, stop_process
from loadtests._util import CARS_PER_CHANNEL, UNTHROTTLED, cpu_seconds, stop_agents

OUT = PROJECT_ROOT / "bench-out" / "mosquitto.json"
INSTALL_MOSQUITTO = "sudo apt-get install -y mosquitto   # Debian/Ubuntu; or your OS package"
INSTALL_PAHO = f"{sys.executable} -m pip install paho-mqtt"


class Aborted(Exception):
    """The caller gave up (Ctrl-C, a time limit): stop waiting, clean up, return nothing."""


def missing() -> str | None:
    """What this comparison lacks on this machine, with how to install it; None if nothing."""
    if shutil.which("mosquitto") is None:
        return f"mosquitto is not on PATH; install it with:\n  {INSTALL_MOSQUITTO}"
    try:
        import paho.mqtt.client  # noqa: F401
    except ImportError:
        return f"paho-mqtt is not installed; install it with:\n  {INSTALL_PAHO}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# -- Mosquitto ------------------------------------------------------------------------------


class Mosquitto:
    """`mosquitto -c CONF` on 127.0.0.1, persistence in `workdir/persist`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        persist = workdir / "persist"
        persist.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} {LOOPBACK}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {persist}/\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 20\n"
            "log_dest stderr\n"
        )
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout_s: float = 10.0) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), 0.2):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not start; log:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        """kill -9: no shutdown, no persistence save (what it saved before must survive)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)


class MqttPool:
    """Many paho clients on one selector loop (no thread per client), in this thread;
    `pump` raises Aborted once `abort` is set."""

    def __init__(self, port: int, abort: threading.Event | None = None) -> None:
        import paho.mqtt.client as mqtt  # not needed unless Mosquitto is compared

        self.mqtt = mqtt
        self.port = port
        self.abort = abort or threading.Event()
        self.selector = selectors.DefaultSelector()
        self.clients: list[Any] = []
        self.received = 0
        self.connacks = 0
        self.subacks = 0
        self.pubacks = 0

    def client(self, client_id: str) -> Any:
        mqtt = self.mqtt
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.max_inflight_messages_set(0)  # unlimited: the publisher is never the limit
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _on_connect(self, *args: Any) -> None:
        self.connacks += 1

    def _on_subscribe(self, *args: Any) -> None:
        self.subacks += 1

    def _on_publish(self, *args: Any) -> None:
        self.pubacks += 1

    def _on_message(self, *args: Any) -> None:
        self.received += 1

    def connect(self, client: Any) -> None:
        client.connect(LOOPBACK, self.port, keepalive=600)
        self.clients.append(client)
        self.selector.register(client.socket(), selectors.EVENT_READ, client)

    def disconnect_all(self) -> None:
        """Unregister, then DISCONNECT (paho closes the socket once that is written)."""
        for client in self.clients:
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(sock)
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_write()
        self.clients.clear()

    def pump(self, until: Callable[[], bool], timeout_s: float) -> bool:
        """Read and write for every client until `until()` or the timeout; True if met."""
        deadline = time.monotonic() + timeout_s
        while not until():
            if self.abort.is_set():
                raise Aborted
            if time.monotonic() > deadline:
                return False
            for client in self.clients:
                if client.want_write():
                    client.loop_write()
            for key, _ in self.selector.select(0.01):
                if key.data.loop_read(64) != 0:  # the connection ended
                    with contextlib.suppress(KeyError, ValueError):
                        self.selector.unregister(key.fileobj)
        return True


def _mqtt_setup(port: int, ids: Sequence[str], per_car: int, abort: threading.Event) -> int:
    """Persistent sessions subscribed, disconnected, then `per_car` QoS1 messages each
    published and PUBACKed; returns how many were acknowledged."""
    pool = MqttPool(port, abort)
    for vehicle_id in ids:
        client = pool.client(vehicle_id)
        pool.connect(client)
        client.subscribe(f"cars/{vehicle_id}/cmd", qos=1)
    if not pool.pump(lambda: pool.subacks >= len(ids), 60):
        raise RuntimeError(f"only {pool.subacks}/{len(ids)} subscriptions acknowledged")
    pool.disconnect_all()
    time.sleep(0.5)  # mosquitto has seen every DISCONNECT: the sessions are offline
    publisher = pool.client("publisher")
    pool.connect(publisher)
    payload = json.dumps({"name": "climate", "temperature_c": 21}).encode()
    total = len(ids) * per_car
    for round_ in range(per_car):
        for vehicle_id in ids:
            publisher.publish(f"cars/{vehicle_id}/cmd", payload, qos=1)
        pool.pump(lambda r=round_: pool.pubacks >= (r + 1) * len(ids) - 200, 60)
    pool.pump(lambda: pool.pubacks >= total, 60)
    acked = pool.pubacks
    pool.disconnect_all()
    return acked


def _drain_worker(
    port: int, ids: Sequence[str], expected: int, timeout_s: float, go: Any, results: Any
) -> None:
    """One client process: reconnect `ids` once `go` is set, report when `expected` came."""
    pool = MqttPool(port)
    results.put(("ready", None))
    go.wait(60)
    cpu0 = time.process_time()
    for vehicle_id in ids:
        pool.connect(pool.client(vehicle_id))
    done = pool.pump(lambda: pool.received >= expected, timeout_s)
    finished = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    cpu = time.process_time() - cpu0
    if done:  # a moment more, to see any duplicate
        pool.pump(lambda: False, 0.2)
    pool.disconnect_all()
    results.put(
        ("done", {"finished": finished if done else None, "received": pool.received, "cpu": cpu})
    )


def _get(results: Any, timeout_s: float, abort: threading.Event) -> Any:
    """The next report of a client process, within `timeout_s`, unless aborted."""
    deadline = time.monotonic() + timeout_s
    while not abort.is_set():
        try:
            return results.get(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"an MQTT client process did not report in {timeout_s} s"
                ) from None
    raise Aborted


def _mqtt_reconnect(
    port: int,
    ids: Sequence[str],
    per_car: int,
    timeout_s: float,
    server_pid: int,
    procs: int,
    abort: threading.Event,
) -> dict[str, Any]:
    """Reconnect every session at once from `procs` client processes; time until every
    message arrived (the last process to get all of its share)."""
    # spawn, not fork: the caller may be a threaded process with gRPC running (the bench)
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    shares = [list(ids[i::procs]) for i in range(procs)]
    workers = [
        ctx.Process(
            target=_drain_worker,
            args=(port, share, len(share) * per_car, timeout_s, go, results),
            daemon=True,
        )
        for share in shares
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            _get(results, 60, abort)
        server0 = cpu_seconds(server_pid)
        started = time.perf_counter()
        go.set()
        reports = [_get(results, timeout_s + 60, abort)[1] for _ in workers]
        elapsed = time.perf_counter() - started
        server = _cpu_pct(server0, cpu_seconds(server_pid), elapsed)
    finally:
        for worker in workers:
            worker.join(0 if abort.is_set() else 10)
            if worker.is_alive():
                worker.kill()
                worker.join()
    finishes = [r["finished"] for r in reports]
    seconds = None if None in finishes else max(finishes) - started
    busy = seconds or elapsed
    return {
        "seconds": None if seconds is None else round(seconds, 3),
        "received": sum(r["received"] for r in reports),
        "client_processes": procs,
        "client_cpu_pct": round(100 * sum(r["cpu"] for r in reports) / busy, 1),
        "server_cpu_pct": server,
    }


def _cpu_pct(before: float | None, after: float | None, elapsed: float) -> float | None:
    if before is None or after is None or elapsed <= 0:
        return None
    return round(100 * (after - before) / elapsed, 1)


def run_mosquitto(
    workdir: Path,
    cars: int,
    per_car: int,
    loss_wait_s: float,
    procs: int,
    abort: threading.Event | None = None,
) -> dict[str, Any]:
    """Mosquitto's side (blocking); raises Aborted soon after `abort` is set."""
    abort = abort or threading.Event()
    ids = [f"car-{i}" for i in range(cars)]
    out: dict[str, Any] = {"system": "Mosquitto " + _mosquitto_version()}
    broker = Mosquitto(workdir / "drain")
    try:
        broker.start()
        out["acknowledged"] = _mqtt_setup(broker.port, ids, per_car, abort)
        out["drain"] = _mqtt_reconnect(broker.port, ids, per_car, 120, broker.pid, procs, abort)
    finally:
        broker.stop()
    broker = Mosquitto(workdir / "loss")
    try:
        broker.start()
        out["acked_before_kill"] = _mqtt_setup(broker.port, ids, per_car, abort)
        broker.kill()  # right after the last PUBACK
        broker.start()  # same config: same port, same persistence folder
        out["after_kill"] = _mqtt_reconnect(
            broker.port, ids, per_car, loss_wait_s, broker.pid, procs, abort
        )
    finally:
        broker.stop()
    return out


def _mosquitto_version() -> str:
    proc = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=10)
    first = (proc.stdout or proc.stderr).splitlines()[:1]
    return first[0].split("version")[-1].strip() if first else "?"


# -- this broker ----------------------------------------------------------------------------


async def _send_all(client: Any, ids: Sequence[str], per_car: int) -> set[str]:
    """`per_car` climate commands to every car, SendCommands batches of 1000; the ids of
    the accepted ones (acknowledged: the RPC answered)."""
    from broker.sdk.client import build_request

    requests = [
        build_request(v, "climate", {"temperature_c": 20 + n}, ttl_s=3600)
        for n in range(per_car)
        for v in ids
    ]
    accepted: set[str] = set()
    for start in range(0, len(requests), 1000):
        reply = await client.send_commands(requests[start : start + 1000])
        for item in reply.items:
            if item.WhichOneof("outcome") == "accepted":
                accepted.add(item.accepted.command.command_id)
    return accepted


async def _drain(
    target: str,
    client: Any,
    ids: Sequence[str],
    expected: set[str],
    timeout_s: float,
    server_pid: int,
) -> dict[str, Any]:
    """Connect every car at once; time until the cars have executed every expected command
    (Mosquitto's figure is the same moment: every message received), then until the store
    holds every result (SUCCEEDED, fsynced), swept with ListCommands.

    Nothing else talks to the broker meanwhile (no watch streams: they would add three
    messages per command that Mosquitto's side does not carry).
    """

    from broker.sdk.simulator import shared_channels
    from broker.sdk.vehicle import VehicleAgent
    from broker.v1 import types_pb2 as t

    executions = 0
    all_executed = asyncio.Event()
    if not expected:
        all_executed.set()

    async def execute(payload: bytes) -> bool:
        nonlocal executions
        executions += 1
        if executions >= len(expected):
            all_executed.set()
        return True

    agents: list[Any] = []
    server0 = cpu_seconds(server_pid)
    cpu0, started = time.process_time(), time.perf_counter()
    channels = shared_channels(target, len(ids), CARS_PER_CHANNEL)
    for index, vehicle_id in enumerate(ids):
        agents.append(
            VehicleAgent(
                target,
                vehicle_id,
                channel=channels[index // CARS_PER_CHANNEL],
                handlers={"climate": execute},
                backoff_base_s=0.05,
                backoff_cap_s=1.0,
            )
        )
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_executed.wait(), timeout_s)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    server = _cpu_pct(server0, cpu_seconds(server_pid), elapsed)
    done = all_executed.is_set()
    succeeded = 0
    deadline = time.monotonic() + (10 if done else 0)
    while True:  # every result recorded? (a sweep of the fleet takes ~0.1 s)
        succeeded = await _stored(client, ids, expected, status=t.SUCCEEDED)
        if succeeded >= len(expected) or time.monotonic() > deadline:
            break
    recorded_s = time.perf_counter() - started
    executed = [cid for agent in agents for cid in agent.executed]
    await stop_agents(agents, tasks, channels)
    return {
        "seconds": round(elapsed, 3) if done else None,
        "results_recorded_s": round(recorded_s, 3) if succeeded >= len(expected) else None,
        "succeeded": succeeded,
        "executed": len(executed),
        "executed_expected": len(set(executed) & expected),
        "executed_twice": len(executed) - len(set(executed)),
        "client_cpu_pct": round(100 * cpu / elapsed, 1),
        "server_cpu_pct": server,
    }


async def _stored(
    client: Any, ids: Sequence[str], expected: set[str], status: int | None = None
) -> int:
    """How many of `expected` the broker holds (with `status`, if given), by ListCommands."""
    found = 0
    for start in range(0, len(ids), 100):
        lists = await asyncio.gather(
            *(client.list_commands(v, 100) for v in ids[start : start + 100])
        )
        found += sum(
            c.command_id in expected and (status is None or c.status == status)
            for commands in lists
            for c in commands
        )
    return found


async def run_broker(workdir: Path, cars: int, per_car: int, loss_wait_s: float) -> dict[str, Any]:
    from broker.sdk.client import BrokerClient

    ids = [f"car-{i}" for i in range(cars)]
    out: dict[str, Any] = {"system": "this broker (fsync)"}
    broker = BrokerProcess(workdir / "drain-data", workdir / "drain.log", env=UNTHROTTLED)
    await broker.astart()
    out["loop"], out["extensions"] = broker.loop, broker.extensions
    try:
        async with BrokerClient(broker.target, max_retries=3) as client:
            accepted = await _send_all(client, ids, per_car)
            out["acknowledged"] = len(accepted)
            out["drain"] = await _drain(broker.target, client, ids, accepted, 120, broker.pid)
    finally:
        await broker.astop()
    broker = BrokerProcess(workdir / "loss-data", workdir / "loss.log", env=UNTHROTTLED)
    await broker.astart()
    try:
        async with BrokerClient(broker.target, max_retries=3) as client:
            accepted = await _send_all(client, ids, per_car)
        await broker.akill()  # right after the last acknowledged batch
        out["acked_before_kill"] = len(accepted)
        await broker.astart()  # same data folder, same port
        async with BrokerClient(broker.target, max_retries=3) as client:
            out["stored_after_restart"] = await _stored(client, ids, accepted)
            out["after_kill"] = await _drain(
                broker.target, client, ids, accepted, loss_wait_s, broker.pid
            )
    finally:
        await broker.astop()
    out["log_problems"] = broker.log_problems()[:10]
    return out


# -- both, and the report ------------------------------------------------------------------------


async def compare(
    workdir: Path, *, cars: int, per_car: int, loss_wait_s: float, mqtt_procs: int
) -> list[dict[str, Any]]:
    """The same work on Mosquitto (on a worker thread) then on this broker (in this event
    loop): [Mosquitto's figures, this broker's]. Cancelling it stops Mosquitto's side too."""
    abort = threading.Event()
    try:
        mosq = await asyncio.to_thread(
            run_mosquitto, workdir / "mosquitto", cars, per_car, loss_wait_s, mqtt_procs, abort
        )
    finally:
        abort.set()
    ours = await run_broker(workdir / "broker", cars, per_car, loss_wait_s)
    return [mosq, ours]


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """One system's drain time, what it delivered, and what kill -9 lost."""
    drain, after = result["drain"], result["after_kill"]
    recovered = after.get("received", after.get("succeeded"))
    return {
        "system": result["system"],
        "drain_s": drain["seconds"],
        # ours only: until every result was recorded durably too (Mosquitto has no results)
        "results_recorded_s": drain.get("results_recorded_s"),
        "delivered": drain.get("received", drain.get("succeeded")),
        "acknowledged": result["acknowledged"],
        "drain_cpu_pct": {"client": drain["client_cpu_pct"], "server": drain["server_cpu_pct"]},
        "acked_before_kill": result["acked_before_kill"],
        "recovered_after_kill": recovered,
        "lost": result["acked_before_kill"] - recovered,
    }


def table(results: Sequence[dict[str, Any]], total: int) -> str:
    lines = [
        "| system | drain time s | delivered | drain CPU % client / server "
        "| acknowledged before kill | recovered after kill -9 | lost |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in map(summary, results):
        cpu = r["drain_cpu_pct"]
        lines.append(
            f"| {r['system']} | {r['drain_s']} | {r['delivered']}/{total} | "
            f"{cpu['client']} / {cpu['server']} | "
            f"{r['acked_before_kill']} | {r['recovered_after_kill']} | {r['lost']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.mosquitto", description=__doc__)
    parser.add_argument("--cars", type=int, default=1000)
    parser.add_argument("--per-car", type=int, default=10)
    parser.add_argument("--loss-wait-s", type=float, default=10.0)
    parser.add_argument(
        "--mqtt-procs", type=int, default=1, help="MQTT client processes for the reconnects"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    lacking = missing()
    if lacking is not None:
        print(lacking, file=sys.stderr)
        return 2
    from broker.server.broker import install_event_loop_policy

    install_event_loop_policy()
    print(
        f"Mosquitto, then this broker: {args.cars} cars x {args.per_car} messages ...",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="mosquitto-vs-broker-") as tmp:
        results = asyncio.run(
            compare(
                Path(tmp),
                cars=args.cars,
                per_car=args.per_car,
                loss_wait_s=args.loss_wait_s,
                mqtt_procs=args.mqtt_procs,
            )
        )
    print()
    print(table(results, args.cars * args.per_car))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"cars": args.cars, "per_car": args.per_car, "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfull figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
