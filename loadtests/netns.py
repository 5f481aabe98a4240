"""Test hosts in network namespaces.

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

A car runs in the car's namespace as `loadtests.cars.CarsProcess(..., run_in=
hosts.run_in("car"))`, talking to `BROKER_ADDRESS`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

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
