"""The outage drills: replay what took the command path down, and check it holds now.

    python -m loadtests.drills verbosity-storm   [--cars 300 --phase-s 10]
    python -m loadtests.drills crash-and-replant [--cars 300 --kills 2]
    python -m loadtests.drills offline-hour
    python -m loadtests.drills stale-position
    python -m loadtests.drills link-loss         [--down-s 120]   (root: network namespaces)
    python -m loadtests.drills all

Each drill starts a real broker subprocess on 127.0.0.1 (link-loss: inside a network
namespace it makes, see loadtests/netns.py; fresh LMDB in a temp folder),
drives it with simulated cars and a service client from this process, prints a verdict
table and exits non-zero when a check fails. Everything is bounded in time and count.
`tests/e2e/test_drills.py` runs the same drills at CI scale.

Latency figures (unlock p50/p99 unloaded vs during a storm) are reported, not judged by
the CI versions: timing targets belong to benchmarks, not to tests on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from broker.core.lifecycle import TERMINAL
from broker.sdk.client import BrokerClient, BrokerRpcError
from broker.sdk.simulator import SimulatedFleet
from broker.sdk.vehicle import car_channel_options
from broker.security.tokens import TokenMinter
from broker.testing import LOOPBACK, AuthKeys, BrokerProcess
from broker.v1 import types_pb2 as t
from loadtests import netns
from loadtests._util import ChildProcess, latency_ms
from loadtests.cars import CarsProcess


@dataclass
class Verdict:
    """The outcome of one drill: checks that pass or fail, figures to report, and the raw
    latencies (seconds) behind them by phase (`loadtests.bench` reports their percentiles)."""

    drill: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks.append((name, bool(passed), detail))

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def table(self) -> str:
        lines = [f"## {self.drill}", "", "| check | verdict | detail |", "|---|---|---|"]
        for name, ok, detail in self.checks:
            lines.append(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |")
        if self.figures:
            lines += ["", "| figure | value |", "|---|--:|"]
            lines += [f"| {key} | {value} |" for key, value in self.figures.items()]
        return "\n".join(lines)


class Drill:
    """A broker subprocess (with metrics) in a temp folder, and helpers around it."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.broker = BrokerProcess(
            workdir / "data",
            workdir / "broker.log",
            args=["--metrics", f"{LOOPBACK}:0"],
            env=env,
        )
        self.client: BrokerClient | None = None

    async def start(self) -> BrokerClient:
        await self.broker.astart()
        self.client = BrokerClient(self.broker.target, max_retries=0)
        return self.client

    async def restart(self) -> None:
        target = self.broker.target
        await self.broker.astart()
        if self.broker.target != target:  # cars and client must find it where it was
            raise RuntimeError(f"restarted broker moved from {target} to {self.broker.target}")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        await self.broker.astop()

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        def fetch() -> str:
            url = f"http://{self.broker.metrics_target}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                return str(reply.read().decode())

        samples = {}
        for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


async def _timed_unlocks(
    client: BrokerClient, vehicle_ids: Sequence[str], count: int, rng: random.Random
) -> tuple[list[float], collections.Counter[str]]:
    """`count` unlocks (wait=result) to random connected cars, a few at a time."""
    latencies: list[float] = []
    outcomes: collections.Counter[str] = collections.Counter()
    targets = rng.sample(list(vehicle_ids), min(count, len(vehicle_ids)))

    async def one(vehicle_id: str) -> None:
        started = time.perf_counter()
        try:
            reply = await client.send_command(vehicle_id, "unlock", wait="result", timeout_s=20)
        except BrokerRpcError as exc:
            outcomes[exc.code] += 1
            return
        latencies.append(time.perf_counter() - started)
        outcomes[t.CommandStatus.Name(reply.command.status)] += 1

    for start in range(0, len(targets), 4):
        await asyncio.gather(*(one(v) for v in targets[start : start + 4]))
        await asyncio.sleep(0.05)
    return latencies, outcomes


# -- verbosity storm ------------------------------------------------------------------------


class SimProcess:
    """`broker vehicle-sim` in its own process, so the cars' CPU is not the drill's."""

    def __init__(self, target: str, cars: int, prefix: str, *, rogue: bool) -> None:
        self._child = ChildProcess(
            [
                "broker.cli", "vehicle-sim", "--target", target, "--vehicles", str(cars),
                "--id-prefix", prefix, "--telemetry-hz", "1",
                *(["--ignore-policy"] if rogue else []),
            ],
            None,  # its log goes where the drill's does
        )  # fmt: skip
        self.ids = [f"{prefix}{i}" for i in range(cars)]

    async def start(self, timeout_s: float = 120) -> None:
        await self._child.spawn()
        deadline = time.monotonic() + timeout_s
        while line := await self._child.read_line(max(0.0, deadline - time.monotonic())):
            if "cars connected" in line:
                return
        raise RuntimeError("vehicle-sim exited or timed out before its cars connected")

    def storm_up(self) -> None:
        assert self._child.proc is not None
        self._child.proc.send_signal(signal.SIGUSR1)

    async def stop(self) -> None:
        """SIGTERM (vehicle-sim does not read its stdin), SIGKILL after 15 s."""
        await self._child.stop(timeout_s=0, grace_s=15)


async def verbosity_storm(
    workdir: Path,
    *,
    cars: int = 300,
    unlocks_per_phase: int = 60,
    settle_s: float = 3.0,
    storms: int = 2,
    seed: int = 1,
) -> Verdict:
    """Telemetry rate and verbosity jump 10x then 100x while a service sends unlocks.

    Half the fleet obeys the broker's telemetry policy; the other half ignores it, as the
    firmware behind the real outage did, so the broker must shed rather than rely on
    cooperation.
    """
    verdict = Verdict("verbosity-storm")
    rng = random.Random(seed)
    drill = Drill(workdir)
    client = await drill.start()
    target = drill.broker.target
    sims = [
        SimProcess(target, cars - cars // 2, "obeying-", rogue=False),
        SimProcess(target, cars // 2, "rogue-", rogue=True),
    ]
    # Unlocks go to the obeying cars: a rogue car's own process is flooded by its own
    # telemetry (as a real car's modem would be); the broker is what is under test here.
    ids = sims[0].ids
    try:
        for sim in sims:
            await sim.start()
        await asyncio.sleep(settle_s)
        base_latencies, base_outcomes = await _timed_unlocks(client, ids, unlocks_per_phase, rng)
        phases = [("unloaded", base_latencies, base_outcomes)]
        before = await drill.metrics()
        storm_started = time.monotonic()
        first_control_s: float | None = None
        for level in range(1, storms + 1):
            for sim in sims:
                sim.storm_up()
            deadline = time.monotonic() + settle_s
            while time.monotonic() < deadline:
                if first_control_s is None:
                    now = await drill.metrics()
                    if _value(now, "broker_telemetry_policy_updates_total") > _value(
                        before, "broker_telemetry_policy_updates_total"
                    ):
                        first_control_s = time.monotonic() - storm_started
                await asyncio.sleep(0.2)
            latencies, outcomes = await _timed_unlocks(client, ids, unlocks_per_phase, rng)
            phases.append((f"storm x{10**level}", latencies, outcomes))
        metrics = await drill.metrics()
    finally:
        for sim in sims:
            await sim.stop()
        await drill.close()

    total: collections.Counter[str] = collections.Counter()
    for name, latencies, outcomes in phases:
        total.update(outcomes)
        verdict.samples[name] = latencies
        figures = latency_ms(latencies)
        verdict.figures[f"unlock p50 / p99 ms, {name}"] = (
            f"{figures['p50_ms']} / {figures['p99_ms']}"
        )
    sent = unlocks_per_phase * len(phases)
    verdict.check(
        "every unlock within its TTL SUCCEEDED",
        total["SUCCEEDED"] == sent,
        f"{total['SUCCEEDED']}/{sent} {dict(total)}",
    )
    verdict.check(
        "zero INTERNAL/UNKNOWN statuses",
        total["INTERNAL"] == 0 and total["UNKNOWN"] == 0,
        str(dict(total)),
    )
    verdict.check(
        "cars told to lower telemetry within seconds",
        first_control_s is not None and first_control_s <= settle_s,
        f"first Control frame {first_control_s and round(first_control_s, 2)} s into the storm",
    )

    def telemetry(outcome: str) -> float:
        return _value(metrics, "broker_telemetry_msgs_total", outcome=outcome)

    dropped = telemetry("shed") + telemetry("sampled_out")
    verdict.check(
        "sheds visible in metrics",
        dropped > 0,
        f"admitted {telemetry('admitted'):.0f}, coalesced {telemetry('coalesced'):.0f}, "
        f"sampled out {telemetry('sampled_out'):.0f}, shed {telemetry('shed'):.0f}",
    )
    critical_shed = _value(metrics, "broker_admission_total", decision="shed", lane="critical")
    verdict.check("critical lane never shed", critical_shed == 0, f"{critical_shed:.0f}")
    verdict.figures["Control frames sent"] = int(
        _value(metrics, "broker_telemetry_policy_updates_total")
    )
    p99_base = latency_ms(base_latencies)["p99_ms"]
    p99_storm = max((latency_ms(lat)["p99_ms"] or 0.0) for _, lat, _ in phases[1:])
    if p99_base:
        verdict.figures["unlock p99 storm / unloaded"] = round(p99_storm / p99_base, 2)
    return verdict


def _value(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


# -- crash and replant ------------------------------------------------------------------------


async def crash_and_replant(
    workdir: Path,
    *,
    cars: int = 300,
    kills: int = 2,
    load_s: float = 4.0,
    down_s: float = 1.5,
    backoff_cap_s: float = 30.0,
    seed: int = 2,
) -> Verdict:
    """kill -9 the broker under mixed load, twice; restart on the same data each time."""
    verdict = Verdict("crash-and-replant")
    rng = random.Random(seed)
    drill = Drill(workdir)
    client = await drill.start()
    ids = [f"replant-{i}" for i in range(cars)]
    offline = [f"parked-{i}" for i in range(cars // 4)]
    fleet = SimulatedFleet(
        drill.broker.target, ids, telemetry_hz=0.5, rng=rng, backoff_cap_s=backoff_cap_s
    )
    accepted: dict[str, str] = {}  # command_id -> vehicle_id, every SendCommand that answered
    short_ttl: set[str] = set()
    refused: collections.Counter[str] = collections.Counter()
    absorb_s: list[float] = []
    alive = True

    async def load() -> None:
        payloads = {
            "unlock": None,
            "lock": None,
            "climate": {"temperature_c": 21},
            "charge_limit": {"limit_pct": 80},
        }
        while alive:
            vehicle = rng.choice(ids + offline)
            name = rng.choice(list(payloads))
            ttl = rng.choice([2.0, 600.0])
            try:
                reply = await client.send_command(vehicle, name, payloads[name], ttl_s=ttl)
            except BrokerRpcError as exc:
                refused[exc.code] += 1
                await asyncio.sleep(0.05)
                continue
            accepted[reply.command.command_id] = vehicle
            if ttl < 10:
                short_ttl.add(reply.command.command_id)
            await asyncio.sleep(0.005)

    try:
        await fleet.start()
        await fleet.wait_connected(timeout_s=120)
        senders = [asyncio.create_task(load()) for _ in range(4)]
        for _ in range(kills):
            await asyncio.sleep(load_s)
            await drill.broker.akill()
            await asyncio.sleep(down_s)
            restarted = time.monotonic()
            await drill.restart()
            await fleet.wait_connected(timeout_s=120)
            absorb_s.append(round(time.monotonic() - restarted, 2))
        await asyncio.sleep(load_s)
        alive = False
        await asyncio.gather(*senders)
        final = await _wait_settled(client, accepted, timeout_s=60)
        executed = collections.Counter(
            command_id for car in fleet.cars for command_id in car.agent.executed
        )
        health_after = drill.broker.running
    finally:
        alive = False
        await fleet.stop()
        await drill.close()

    lost = [cid for cid in accepted if cid not in final]
    statuses = collections.Counter(t.CommandStatus.Name(c.status) for c in final.values())
    verdict.figures["commands accepted"] = len(accepted)
    verdict.figures["final statuses"] = dict(statuses)
    verdict.figures["refused (car quota, overload, or broker down)"] = dict(refused)
    verdict.figures["reconnect storm absorbed in s (per restart)"] = absorb_s
    verdict.check("zero accepted commands lost", not lost, f"{len(lost)} of {len(accepted)}")
    expired_run = [cid for cid, c in final.items() if c.status == t.EXPIRED and executed[cid]]
    verdict.check("expired commands never executed", not expired_run, f"{len(expired_run)}")
    twice = [cid for cid, n in executed.items() if n > 1]
    verdict.check("no command executed twice", not twice, f"{len(twice)}")
    unfinished = [cid for cid, c in final.items() if c.status not in TERMINAL]
    parked = [cid for cid in unfinished if accepted[cid] in offline]
    verdict.check(
        "every command to a connected car finished",
        len(unfinished) == len(parked),
        f"{len(unfinished) - len(parked)} unfinished (plus {len(parked)} waiting for parked cars)",
    )
    verdict.check(
        "broker stayed up through every reconnect storm",
        health_after and len(absorb_s) == kills,
        f"{len(absorb_s)} restarts, all {cars} cars back each time",
    )
    return verdict


async def _wait_settled(
    client: BrokerClient, accepted: dict[str, str], timeout_s: float
) -> dict[str, Any]:
    """Read every accepted command until those to connected cars are terminal."""
    deadline = time.monotonic() + timeout_s
    final: dict[str, Any] = {}
    while True:
        pending = [cid for cid in accepted if cid not in final or final[cid].status not in TERMINAL]
        for start in range(0, len(pending), 200):
            chunk = pending[start : start + 200]
            replies = await asyncio.gather(
                *(client.get_command(cid) for cid in chunk), return_exceptions=True
            )
            for cid, reply in zip(chunk, replies, strict=True):
                if not isinstance(reply, BaseException):
                    final[cid] = reply
        waiting = [
            cid
            for cid in accepted
            if cid not in final
            or (final[cid].status not in TERMINAL and not accepted[cid].startswith("parked-"))
        ]
        if not waiting or time.monotonic() > deadline:
            return final
        await asyncio.sleep(0.5)


# -- the offline hour -------------------------------------------------------------------------


async def offline_hour(workdir: Path, *, ttl_s: float = 2.0, settings: int = 5) -> Verdict:
    """A car offline past an unlock's TTL; climate settings coalesced to the last one.

    The hour is scaled down to `ttl_s`: what matters is that the car comes back after the
    TTL, not how long the TTL is.
    """
    verdict = Verdict("offline-hour")
    drill = Drill(workdir)
    client = await drill.start()
    fleet = SimulatedFleet(drill.broker.target, ["owner-car"])
    try:
        unlock = await client.send_command("owner-car", "unlock", ttl_s=ttl_s)
        climate_ids = []
        for index in range(settings):
            reply = await client.send_command(
                "owner-car", "climate", {"temperature_c": 18 + index}, coalesce_key="climate"
            )
            climate_ids.append(reply.command.command_id)
        await asyncio.sleep(ttl_s + 1.0)
        await fleet.start()
        await fleet.wait_connected(timeout_s=30)
        await asyncio.sleep(1.5)
        unlock_final = await client.get_command(unlock.command.command_id)
        climates = [await client.get_command(cid) for cid in climate_ids]
        car = fleet.cars[0]
    finally:
        await fleet.stop()
        await drill.close()
    verdict.check(
        "unlock past its TTL is EXPIRED",
        unlock_final.status == t.EXPIRED,
        t.CommandStatus.Name(unlock_final.status),
    )
    verdict.check(
        "the expired unlock never executed",
        unlock.command.command_id not in car.agent.executed and car.state["locked"] is True,
        f"car locked={car.state['locked']}",
    )
    statuses = [t.CommandStatus.Name(c.status) for c in climates]
    verdict.check(
        "only the last climate setting executed",
        statuses == ["SUPERSEDED"] * (settings - 1) + ["SUCCEEDED"]
        and [cid for cid in car.agent.executed if cid in climate_ids] == climate_ids[-1:],
        f"{statuses}; car at {car.state['climate_c']} C",
    )
    return verdict


# -- stale position ---------------------------------------------------------------------------


async def stale_position(workdir: Path) -> Verdict:
    """While a car is disconnected its state reads as last-seen-at, never as current."""
    verdict = Verdict("stale-position")
    drill = Drill(workdir)
    client = await drill.start()
    fleet = SimulatedFleet(drill.broker.target, ["moving-car"], telemetry_hz=5)
    try:
        await fleet.start()
        await fleet.wait_connected(timeout_s=30)
        await asyncio.sleep(1.5)
        live = await client.get_vehicle_state("moving-car")
        await fleet.stop()
        await asyncio.sleep(1.0)
        gone = await client.get_vehicle_state("moving-car")
        await asyncio.sleep(1.0)
        later = await client.get_vehicle_state("moving-car")
    finally:
        await fleet.stop()
        await drill.close()
    verdict.check(
        "connected car reads as current",
        live.connected and live.connected_since_ms > 0 and "lat" in live.fields,
        f"connected={live.connected}",
    )
    verdict.check(
        "disconnected car reads as last seen, not current",
        not gone.connected and gone.connected_since_ms == 0 and gone.last_seen_ms > 0,
        f"connected={gone.connected} last_seen_ms={gone.last_seen_ms}",
    )
    position = gone.fields.get("lat")
    verdict.check(
        "its position carries the time it was reported",
        position is not None and 0 < position.reported_at_ms <= gone.last_seen_ms,
        f"reported_at_ms={position.reported_at_ms if position else None}",
    )
    verdict.check(
        "nothing makes the old position look newer",
        later.fields["lat"].reported_at_ms == position.reported_at_ms if position else False,
        "same reported_at a second later",
    )
    return verdict


# -- link loss ----------------------------------------------------------------------------------

#: the broker's HTTP/2 keepalive (broker.server.server_options): a ping every 20 s, the
#: connection dropped 10 s after one goes unanswered
KEEPALIVE_BOUND_S = 30.0


async def link_loss(
    workdir: Path,
    *,
    down_s: float = 120.0,
    keepalive_s: float = 10.0,
    heartbeat_interval_s: float = 30.0,
    liveness_timeout_s: float = 75.0,
    idle_s: float = 35.0,
) -> Verdict:
    """A car's link dies without FIN or RST for `down_s`, then comes back (defaults: the
    SDK's and the broker's own settings). The broker must see the car gone within 30 s
    (its HTTP/2 keepalive, 20 s + 10 s) or its liveness timeout plus one check interval,
    whichever is sooner, queue an unlock sent meanwhile, and the car must reconnect by
    itself and run that unlock exactly once. The car is idle for `idle_s` before the cut
    (as a parked car is: nothing of its own in flight for TCP to time out).
    """
    verdict = Verdict("link-loss")
    reason = netns.unavailable()
    if reason is not None:
        verdict.check("network namespaces available", False, reason)
        return verdict
    keys = AuthKeys.create(workdir / "keys")
    with netns.Hosts() as hosts:
        broker = BrokerProcess(
            workdir / "data",
            workdir / "broker.log",
            keys=keys,
            host="0.0.0.0",  # inside its own namespace: the car's link and ours
            prefix=hosts.run_in("broker"),
            env={
                "BROKER_HEARTBEAT_INTERVAL_S": str(heartbeat_interval_s),
                "BROKER_LIVENESS_TIMEOUT_S": str(liveness_timeout_s),
                # a private veth link this drill made, between namespaces of this machine
                "BROKER_PLAINTEXT_ON_PRIVATE_NETWORK": "1",
            },
        )
        await broker.astart()
        minter = TokenMinter(keys.service_key, service="drill", scopes=("send", "read"))
        client = BrokerClient(f"{netns.BROKER_FROM_ROOT}:{broker.port}", token=minter)
        car = CarsProcess(
            f"{netns.BROKER_ADDRESS}:{broker.port}",
            1,
            "cell-car-",
            workdir / "car.log",
            channel_options=car_channel_options(keepalive_s),
            events=True,
            vehicle_key=keys.vehicle_key,
            run_in=hosts.run_in("car"),
        )
        try:
            await car.start()
            await _link_loss_phases(verdict, client, car, hosts, down_s, liveness_timeout_s, idle_s)
        finally:
            if hosts.cut_now:
                hosts.restore()
            await car.stop()
            await client.close()
            await broker.astop()
    # The heartbeat check logs what it closes; otherwise the transport found it first
    # (grpc's keepalive or TCP_USER_TIMEOUT, when the broker had unacknowledged data).
    verdict.figures["stream ended by"] = (
        "heartbeat check" if "vehicle streams silent" in broker.logs(10**7) else "transport"
    )
    verdict.figures["settings"] = (
        f"idle {idle_s:g} s, then down {down_s:g} s; car keepalive {keepalive_s:g} s, "
        f"heartbeat {heartbeat_interval_s:g} s, liveness timeout {liveness_timeout_s:g} s"
    )
    return verdict


async def _link_loss_phases(
    verdict: Verdict,
    client: BrokerClient,
    car: CarsProcess,
    hosts: netns.Hosts,
    down_s: float,
    liveness_timeout_s: float,
    idle_s: float,
) -> None:
    vehicle = car.vehicle_ids[0]
    first = await car.wait("connected", 1, 30)
    verdict.check("the car connects through its namespace", first is not None)
    if first is None:
        return
    before = await client.send_command(vehicle, "unlock", wait="result", timeout_s=10)
    verdict.check(
        "an unlock before the cut succeeds", before.command.status == t.SUCCEEDED,
        t.CommandStatus.Name(before.command.status),
    )  # fmt: skip
    await asyncio.sleep(idle_s)
    hosts.cut()
    cut_at = time.monotonic()
    gone_after_s = None
    while time.monotonic() - cut_at < down_s:
        if gone_after_s is None:
            state = await client.get_vehicle_state(vehicle)
            if not state.connected:
                gone_after_s = time.monotonic() - cut_at
        await asyncio.sleep(0.25)
    bound_s = min(KEEPALIVE_BOUND_S, liveness_timeout_s * 1.125) + 1
    verdict.check(
        f"the broker sees the car gone within {bound_s:g} s",
        gone_after_s is not None and gone_after_s <= bound_s,
        f"after {gone_after_s:.1f} s" if gone_after_s is not None else "never",
    )
    lost = car.of("lost")
    if lost:
        verdict.figures["car noticed the dead link after s"] = round(lost[0]["seen_at"] - cut_at, 1)
    queued = await client.send_command(vehicle, "unlock", ttl_s=down_s + 120)
    verdict.check(
        "an unlock sent during the cut is queued",
        queued.command.status == t.QUEUED,
        t.CommandStatus.Name(queued.command.status),
    )
    hosts.restore()
    restored_at = time.monotonic()
    back = await car.wait("connected", 2, 120)
    verdict.check(
        "the car reconnects by itself after the link returns",
        back is not None,
        f"after {back['seen_at'] - restored_at:.1f} s" if back else "not within 120 s",
    )
    if back is not None:
        verdict.figures["reconnected after the link returned, s"] = round(
            back["seen_at"] - restored_at, 1
        )
    command_id = queued.command.command_id
    ran = await car.wait("executed", 2, 30)
    final = await client.get_command(command_id)
    runs = [e for e in car.of("executed") if e["command_id"] == command_id]
    verdict.check(
        "the queued unlock ran exactly once",
        final.status == t.SUCCEEDED and len(runs) == 1 and ran is not None,
        f"{t.CommandStatus.Name(final.status)}, executed {len(runs)}x",
    )
    if gone_after_s is not None:
        verdict.figures["broker saw the car gone after s"] = round(gone_after_s, 1)


DRILLS: dict[str, Callable[..., Awaitable[Verdict]]] = {
    "verbosity-storm": verbosity_storm,
    "crash-and-replant": crash_and_replant,
    "offline-hour": offline_hour,
    "stale-position": stale_position,
    "link-loss": link_loss,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.drills", description=__doc__)
    parser.add_argument("drill", choices=[*DRILLS, "all"])
    parser.add_argument("--cars", type=int, help="simulated cars (storm, crash)")
    parser.add_argument("--kills", type=int, help="kill -9 count (crash)")
    parser.add_argument("--unlocks", type=int, help="unlocks per phase (storm)")
    parser.add_argument("--down-s", type=float, help="how long the link is cut (link-loss)")
    parser.add_argument("--time-limit-s", type=float, default=600, help="stop after this long")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> list[Verdict]:
    names = list(DRILLS) if args.drill == "all" else [args.drill]
    verdicts = []
    for name in names:
        options: dict[str, Any] = {}
        if args.cars and name in ("verbosity-storm", "crash-and-replant"):
            options["cars"] = args.cars
        if args.kills and name == "crash-and-replant":
            options["kills"] = args.kills
        if args.unlocks and name == "verbosity-storm":
            options["unlocks_per_phase"] = args.unlocks
        if args.down_s and name == "link-loss":
            options["down_s"] = args.down_s
        with tempfile.TemporaryDirectory(prefix=f"drill-{name}-") as workdir:
            verdict = await asyncio.wait_for(
                DRILLS[name](Path(workdir), **options), args.time_limit_s
            )
        print(verdict.table(), end="\n\n", flush=True)
        verdicts.append(verdict)
    return verdicts


def main(argv: Sequence[str] | None = None) -> int:
    verdicts = asyncio.run(run(parse_args(argv)))
    return 0 if all(v.passed for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
