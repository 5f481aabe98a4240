"""Test hosts in network namespaces, and a car that runs inside one.

    with Hosts() as hosts:                    # needs root and `ip` (iproute2)
        hosts.run_in("broker", [...])          # argv prefix: ip netns exec <ns>
        hosts.cut()                            # the car's link drops every packet, no FIN
        hosts.restore()

Three legs, all made here and removed on exit: the broker's namespace, the car's
namespace, and this process's side (the root namespace), so the test can reach the
broker without crossing the car's link:

    root 10.231.1.1 ── 10.231.1.2 broker 10.231.0.1 ── 10.231.0.2 car

`cut()` puts a `blackhole` qdisc on both ends of the car's link: packets vanish, the
sockets stay ESTABLISHED, nobody sends FIN or RST — a NAT timeout or a dead cell. No
traffic leaves the namespaces this module made.

`python -m loadtests.netns car --target HOST:PORT --vehicle ID` is the car: a
VehicleAgent that prints one JSON line per event (connected, lost, executed) and exits
when its stdin closes; its token is signed from $BROKER_AUTH_SECRET (never argv).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

BROKER_ADDRESS = "10.231.0.1"  # the broker, as the car sees it
CAR_ADDRESS = "10.231.0.2"
BROKER_FROM_ROOT = "10.231.1.2"  # the broker, as this process sees it
ROOT_ADDRESS = "10.231.1.1"


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = f"vbprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """Two namespaces (broker, car) and the links between them and this process."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.ns = {"broker": f"vbbroker{tag}", "car": f"vbcar{tag}"}
        self._car_link = (f"vbc{tag}", f"vbcb{tag}")  # car end, broker end
        self._root_link = (f"vbr{tag}", f"vbrb{tag}")  # root end, broker end
        self.cut_now = False

    def __enter__(self) -> Hosts:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_in(self, host: str, argv: Sequence[str] = ()) -> list[str]:
        """`argv` prefixed to run in `host`'s namespace."""
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def cut(self) -> None:
        """Drop every packet both ways on the car's link (no FIN, no RST)."""
        car_end, broker_end = self._car_link
        _run("tc", "-n", self.ns["car"], "qdisc", "add", "dev", car_end, "root", "blackhole")
        _run("tc", "-n", self.ns["broker"], "qdisc", "add", "dev", broker_end, "root", "blackhole")
        self.cut_now = True

    def restore(self) -> None:
        car_end, broker_end = self._car_link
        _run("tc", "-n", self.ns["car"], "qdisc", "del", "dev", car_end, "root")
        _run("tc", "-n", self.ns["broker"], "qdisc", "del", "dev", broker_end, "root")
        self.cut_now = False

    def close(self) -> None:
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self._root_link[0]], capture_output=True)

    def _make(self) -> None:
        broker, car = self.ns["broker"], self.ns["car"]
        for name in (broker, car):
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        car_end, broker_end = self._car_link
        _ip("link", "add", car_end, "type", "veth", "peer", "name", broker_end)
        _ip("link", "set", car_end, "netns", car)
        _ip("link", "set", broker_end, "netns", broker)
        _ip("-n", car, "addr", "add", f"{CAR_ADDRESS}/30", "dev", car_end)
        _ip("-n", broker, "addr", "add", f"{BROKER_ADDRESS}/30", "dev", broker_end)
        _ip("-n", car, "link", "set", car_end, "up")
        _ip("-n", broker, "link", "set", broker_end, "up")
        root_end, broker_root_end = self._root_link
        _ip("link", "add", root_end, "type", "veth", "peer", "name", broker_root_end)
        _ip("link", "set", broker_root_end, "netns", broker)
        _ip("addr", "add", f"{ROOT_ADDRESS}/30", "dev", root_end)
        _ip("-n", broker, "addr", "add", f"{BROKER_FROM_ROOT}/30", "dev", broker_root_end)
        _ip("link", "set", root_end, "up")
        _ip("-n", broker, "link", "set", broker_root_end, "up")


def _ip(*args: str) -> None:
    _run("ip", *args)


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


# -- the car inside a namespace ----------------------------------------------------------------


class CarEvents:
    """The car child's JSON lines, as they come, with this process's monotonic time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["seen_at"] = time.monotonic()
            self.events.append(event)
            self._changed.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    async def wait(self, kind: str, count: int, timeout_s: float) -> dict[str, Any] | None:
        """The `count`-th event of `kind` (1-based), or None if it did not come in time."""
        deadline = time.monotonic() + timeout_s
        while len(self.of(kind)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.returncode is not None:
                return None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return None
        return self.of(kind)[count - 1]

    async def stop(self) -> None:
        if self.proc.stdin is not None and self.proc.returncode is None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


async def start_car(
    hosts: Hosts, target: str, vehicle_id: str, secret: str, keepalive_s: float
) -> CarEvents:
    proc = await asyncio.create_subprocess_exec(
        *hosts.run_in("car", [sys.executable, "-m", "loadtests.netns", "car"]),
        *("--target", target, "--vehicle", vehicle_id, "--keepalive", str(keepalive_s)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "BROKER_AUTH_SECRET": secret},
    )
    return CarEvents(proc)


async def _car(args: argparse.Namespace) -> None:
    from broker.sdk.vehicle import VehicleAgent
    from broker.security.auth import issue_token
    from loadtests._util import stdin_reader

    def emit(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    async def unlock(payload: bytes) -> bool:
        return True

    token = issue_token(os.environ["BROKER_AUTH_SECRET"], vehicle=args.vehicle)
    agent = VehicleAgent(
        args.target, args.vehicle, token=token, keepalive_s=args.keepalive,
        handlers={"unlock": unlock, "lock": unlock}, backoff_cap_s=args.backoff_cap,
    )  # fmt: skip
    run = asyncio.create_task(agent.run())
    stdin = await stdin_reader()
    closed = asyncio.create_task(stdin.read())
    connected, executed = False, 0
    while not closed.done() and not run.done():
        if agent.connected.is_set() != connected:
            connected = not connected
            emit("connected" if connected else "lost", connects=agent.connects)
        while executed < len(agent.executed):
            emit("executed", command_id=agent.executed[executed])
            executed += 1
        await asyncio.sleep(0.05)
    await agent.stop()
    run.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.netns", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    car = sub.add_parser("car", help="a car inside a namespace (see the module docstring)")
    car.add_argument("--target", required=True)
    car.add_argument("--vehicle", required=True)
    car.add_argument("--keepalive", type=float, default=10.0)
    car.add_argument("--backoff-cap", type=float, default=30.0)
    args = parser.parse_args(argv)
    asyncio.run(_car(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
