"""What TLS costs, for `loadtests.bench` (the `tls-unary`, `tls-telemetry` and
`mtls-handshake` rows): the bench's certificates, and the handshake measurement.

`BenchCerts` makes, in a temporary folder of the run, a development CA
(`broker.security.tls.create_ca`), a server certificate for 127.0.0.1, and on demand one
client certificate per simulated car (URI SAN `urn:vehicle:<id>`, the identity the
broker takes on an mTLS port). Made once per run and shared by the broker and the bare
server, before anything is measured.

`measure_handshakes`: `loadtests.ceilings handshake-client` processes (the same for the
broker and for the bare server) each open their share of the cars, every car on its own
connection with its own certificate, Hello → Welcome; the server's CPU seconds
(/proc/PID/stat, all its threads) are read from `go` until the last client reports.
cars/s per core = cars welcomed / server CPU seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

from broker.security import tls
from broker.testing import LOOPBACK
from loadtests._util import ChildProcess, cpu_seconds, hdr_ms
from loadtests.ceilings import CLIENT_READY


class BenchCerts:
    """A dev CA, a 127.0.0.1 server certificate and car certificates under `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = folder / "ca.pem"
        self.server_cert = folder / "server.pem"
        self.server_key = folder / "server.key"
        self.cars_folder = folder / "cars"
        self._cars: set[str] = set()

    @classmethod
    def at(cls, folder: Path) -> BenchCerts:
        """The certificates in `folder`, made there first if they are not."""
        certs = cls(folder)
        if not certs.ca.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tls.create_ca(folder)
            tls.issue_certificate(folder, "server", server_hosts=[LOOPBACK])
        return certs

    def cars(self, vehicle_ids: list[str]) -> Path:
        """The folder holding ID.pem and ID.key for each of `vehicle_ids` (made if new)."""
        for vehicle in vehicle_ids:
            if vehicle not in self._cars:
                tls.issue_certificate(
                    self.folder, vehicle, vehicle_id=vehicle, out=self.cars_folder
                )
                self._cars.add(vehicle)
        return self.cars_folder

    def server_args(self, *, mtls: bool = False) -> list[str]:
        """The flags that make a broker (or the bare server) serve TLS, mTLS with `mtls`."""
        flags = ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)]
        return flags + (["--tls-client-ca", str(self.ca)] if mtls else [])

    def client_args(self) -> list[str]:
        """The flags that make a `loadtests.ceilings` client speak TLS to that server."""
        return ["--tls-ca", str(self.ca)]


async def measure_handshakes(
    target: str,
    server_pid: int | None,
    certs: BenchCerts,
    *,
    prefix: str,
    cars: int,
    client_procs: int,
    concurrency: int,
    warm_cars: int,
    log_dir: Path,
    timeout_s: float,
) -> dict[str, Any]:
    """`cars` new mTLS car streams on `target`, split over `client_procs` processes,
    `concurrency` opening at a time in all, after `warm_cars` unmeasured ones; the server's
    CPU from go to the last report."""
    ids = [f"{prefix}{i}" for i in range(cars)] + [f"{prefix}w{i}" for i in range(warm_cars)]
    folder = await asyncio.to_thread(certs.cars, ids)
    procs = max(1, min(client_procs, cars))
    in_flight = [max(1, concurrency // procs + (i < concurrency % procs)) for i in range(procs)]
    children = [
        ChildProcess(
            [
                *("loadtests.ceilings", "handshake-client", "--target", target),
                *("--prefix", prefix, "--vehicles", str(cars)),
                *("--shard", str(i), "--shards", str(procs)),
                *("--concurrency", str(in_flight[i]), "--timeout", str(timeout_s)),
                *("--warm-cars", str(warm_cars)),
                *(*certs.client_args(), "--car-certs", str(folder)),
            ],
            log_dir / f"handshake-client-{prefix}{i}.log",
        )
        for i in range(procs)
    ]
    try:
        await asyncio.gather(*(child.start(CLIENT_READY, 90) for child in children))
        cpu_before = cpu_seconds(server_pid)
        started = time.perf_counter()
        for child in children:
            child.send("go")
        reports = await asyncio.gather(*(child.read_json(timeout_s + 30) for child in children))
        elapsed = time.perf_counter() - started
        cpu_after = cpu_seconds(server_pid)
    finally:
        await asyncio.gather(*(child.stop() for child in children), return_exceptions=True)
    welcomed = sum(r["welcomed"] for r in reports)
    errors: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors"])
    cpu_s = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return {
        "cars": cars,
        "welcomed": welcomed,
        "errors": dict(errors),
        "elapsed_s": round(elapsed, 3),
        "cars_per_s": round(welcomed / elapsed, 1) if elapsed > 0 else None,
        "server_cpu_s": None if cpu_s is None else round(cpu_s, 3),
        "server_cpu_pct": None if cpu_s is None else round(100 * cpu_s / elapsed, 1),
        "cars_per_s_per_core": round(welcomed / cpu_s, 1) if cpu_s else None,
        "latency_ms": hdr_ms([us / 1e6 for r in reports for us in r["latencies_us"]]),
        "concurrency": sum(in_flight),
        "warm_cars": warm_cars,
        "warm_errors": dict(sum((Counter(r["warm_errors"]) for r in reports), Counter())),
        "client_cpu_pct": [
            round(100 * r["cpu_s"] / r["elapsed_s"], 1) if r["elapsed_s"] else None for r in reports
        ],
    }
