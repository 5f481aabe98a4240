"""Simulated cars on the vehicle SDK: they execute commands, report state and telemetry."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from broker.core.clock import now_ms
from broker.sdk.vehicle import (
    Handler,
    HandlerResult,
    SignalValue,
    VehicleAgent,
    car_channel_options,
    signals,
)
from broker.security.keys import load_private_key
from broker.security.signing import CommandVerifier
from broker.security.tls import channel_credentials
from broker.security.tokens import TokenMinter

CARS_PER_CHANNEL = 500


def shared_channels(
    target: str, cars: int, per_channel: int = CARS_PER_CHANNEL
) -> list[grpc.aio.Channel]:
    """Channels for `cars` vehicle streams, `per_channel` multiplexed on each HTTP/2
    connection (car `i` uses `channels[i // per_channel]`). Each gets its own subchannel,
    so they really are separate connections, each with a car's keepalive."""
    options = [("grpc.use_local_subchannel_pool", 1), *car_channel_options()]
    return [
        grpc.aio.insecure_channel(target, options=options) for _ in range(-(-cars // per_channel))
    ]


class SimulatedCar:
    """A car's doors, engine, climate and charging, driven by commands."""

    def __init__(self, agent: VehicleAgent, rng: random.Random) -> None:
        self.agent = agent
        self.rng = rng
        #: multiplies telemetry rate and verbosity (10 or 100 replays the outage)
        self.storm_factor = 1.0
        self.state: dict[str, SignalValue] = {
            "locked": True,
            "engine_on": False,
            "climate_c": 20.0,
            "charge_limit_pct": 80.0,
            "battery_pct": round(rng.uniform(30, 95), 1),
            "lat": round(rng.uniform(47.0, 55.0), 5),
            "lon": round(rng.uniform(6.0, 15.0), 5),
        }
        agent.handlers.update(self.handlers())

    def handlers(self) -> dict[str, Handler]:
        def setter(field: str, value: SignalValue) -> Handler:
            async def handle(payload: bytes) -> HandlerResult:
                self.state[field] = value
                await self._report(field)
                return True, f"{field}={value}", b""

            return handle

        async def climate(payload: bytes) -> HandlerResult:
            return await self._from_payload(payload, "climate_c", "temperature_c", 15, 30)

        async def charge_limit(payload: bytes) -> HandlerResult:
            return await self._from_payload(payload, "charge_limit_pct", "limit_pct", 50, 100)

        return {
            "lock": setter("locked", True),
            "unlock": setter("locked", False),
            "start": setter("engine_on", True),
            "stop": setter("engine_on", False),
            "climate": climate,
            "charge_limit": charge_limit,
            "horn": setter("horn_at_ms", float(now_ms())),
        }

    async def _from_payload(
        self, payload: bytes, field: str, key: str, low: float, high: float
    ) -> HandlerResult:
        try:
            value = float(json.loads(payload or b"{}")[key])
        except (ValueError, KeyError, TypeError):
            return False, f"payload needs a numeric {key!r}", b""
        if not low <= value <= high:
            return False, f"{key} must be within {low}..{high}", b""
        self.state[field] = value
        await self._report(field)
        return True, f"{field}={value}", b""

    async def _report(self, *fields: str) -> None:
        if self.agent.connected.is_set():
            await self.agent.report_state({f: self.state[f] for f in fields})

    async def telemetry(self, hz: float) -> None:
        """Stream telemetry at `hz` (times `storm_factor`), as verbose as the policy allows.

        An obeying car also waits out the broker's interval; a misbehaving one
        (`obey_policy=False`) keeps its own pace and its full verbosity.
        """
        await self.agent.connected.wait()
        await self._report(*self.state)
        while True:
            interval = 1 / (hz * self.storm_factor)
            if self.agent.obey_policy:
                interval = max(interval, self.agent.telemetry_policy.interval_ms / 1000)
            await asyncio.sleep(interval * self.rng.uniform(0.9, 1.1))
            self.state["lat"] = round(float(self.state["lat"]) + self.rng.uniform(-1e-4, 1e-4), 6)
            self.state["lon"] = round(float(self.state["lon"]) + self.rng.uniform(-1e-4, 1e-4), 6)
            if self.agent.connected.is_set():
                try:
                    await self.agent.send_telemetry(signals(self.sample(), now_ms()))
                except (
                    ConnectionError,
                    grpc.aio.AioRpcError,
                    grpc.aio.UsageError,
                    asyncio.InvalidStateError,
                ):
                    continue  # the stream is going away; the agent reconnects

    def sample(self) -> dict[str, SignalValue]:
        """The signals of one batch: more of them at higher verbosity (and in a storm)."""
        verbosity = self.agent.telemetry_policy.verbosity if self.agent.obey_policy else 2
        values: dict[str, SignalValue] = {k: self.state[k] for k in ("lat", "lon")}
        if verbosity >= 1:
            values["battery_pct"] = self.state["battery_pct"]
        if verbosity >= 2:
            extra = 8 * self.storm_factor  # the outage: an accidental jump in verbosity
            for index in range(int(extra)):
                values[f"diag_{index}"] = round(self.rng.uniform(0, 100), 2)
        return values


class SimulatedFleet:
    """Many simulated cars, several per gRPC channel, each on its own VehicleAgent."""

    def __init__(
        self,
        target: str,
        vehicle_ids: list[str],
        *,
        vehicle_key: Path | None = None,
        tls_ca: Path | None = None,
        cert_dir: Path | None = None,
        telemetry_hz: float = 0.0,
        rng: random.Random | None = None,
        obey_policy: bool = True,
        backoff_cap_s: float = 30.0,
        verifier: Callable[[], CommandVerifier] | None = None,
    ) -> None:
        """`verifier`: makes each car's `CommandVerifier` (signed commands: the keys it
        trusts; one per car, as each holds its car's replay memory)."""
        self.target = target
        self.telemetry_hz = telemetry_hz
        self.obey_policy = obey_policy
        self.backoff_cap_s = backoff_cap_s
        self.rng = rng or random.Random(0)
        self._channels: list[grpc.aio.Channel] = []
        self.cars: list[SimulatedCar] = []
        self._vehicle_ids = vehicle_ids
        # The simulator plays the fleet's token service too: each car gets a provider
        # that mints its tokens with the vehicle signing key (a real car never holds it).
        self._vehicle_key = load_private_key(vehicle_key) if vehicle_key is not None else None
        self._tasks: list[asyncio.Task[Any]] = []
        #: TLS: trust this CA; with `cert_dir` (VEHICLE_ID.pem and .key, as `broker certs
        #: car` writes them) every car is its own mTLS connection, identified by its
        #: certificate (an identity is per connection: mTLS cars cannot share one)
        self._tls_ca = tls_ca
        self._cert_dir = cert_dir
        self._verifier = verifier

    def _credentials(self, vehicle_id: str) -> grpc.ChannelCredentials | None:
        if self._tls_ca is None:
            return None
        if self._cert_dir is None:
            return channel_credentials(self._tls_ca)
        folder = self._cert_dir
        return channel_credentials(
            self._tls_ca, folder / f"{vehicle_id}.pem", folder / f"{vehicle_id}.key"
        )

    async def start(self) -> None:
        own_connections = self._tls_ca is not None
        if not own_connections:
            self._channels = shared_channels(self.target, len(self._vehicle_ids))
        for index, vehicle_id in enumerate(self._vehicle_ids):
            key = self._vehicle_key
            agent = VehicleAgent(
                self.target,
                vehicle_id,
                token=TokenMinter(key, vehicle=vehicle_id) if key is not None else None,
                channel=None if own_connections else self._channels[index // CARS_PER_CHANNEL],
                credentials=self._credentials(vehicle_id),
                firmware="sim",
                obey_policy=self.obey_policy,
                backoff_cap_s=self.backoff_cap_s,
                verifier=self._verifier() if self._verifier is not None else None,
            )
            car = SimulatedCar(agent, self.rng)
            self.cars.append(car)
            self._tasks.append(asyncio.create_task(agent.run()))
            if self.telemetry_hz > 0:
                self._tasks.append(asyncio.create_task(car.telemetry(self.telemetry_hz)))

    async def wait_connected(self, timeout_s: float = 60.0) -> None:
        await asyncio.wait_for(
            asyncio.gather(*(car.agent.connected.wait() for car in self.cars)), timeout_s
        )

    def storm(self, factor: float) -> None:
        """Multiply every car's telemetry rate and verbosity (1 ends the storm)."""
        for car in self.cars:
            car.storm_factor = factor

    async def stop(self) -> None:
        for car in self.cars:
            await car.agent.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close()
