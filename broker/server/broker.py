"""Composition root: build the broker from a Config, serve it, shut it down in order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker.api.service import Servicer, telemetry_control
from broker.config import Config
from broker.core import clock
from broker.core.admission import Admission, Gradient2Limit
from broker.core.clock import now_ms
from broker.core.dispatch import Dispatcher
from broker.core.errors import BrokerError, Unavailable
from broker.core.events import EventHub
from broker.core.sessions import SessionRegistry, StreamGate
from broker.core.state import FLUSH_SLICE, VehicleStates
from broker.core.telemetry import TelemetryGuard
from broker.security.auth import Authenticator
from broker.server.metrics import serve_metrics
from broker.storage.lmdb_store import Store
from broker.v1 import command_service_pb2, vehicle_link_pb2
from broker.v1 import vehicle_link_pb2 as link

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    command_service_pb2.DESCRIPTOR.services_by_name["CommandService"].full_name,
    vehicle_link_pb2.DESCRIPTOR.services_by_name["VehicleLink"].full_name,
)


def server_options(config: Config) -> list[tuple[str, Any]]:
    """Channel args for the grpc.aio server.

    grpc core's defaults cap *pending* (not yet matched to a handler) requests, and the
    excess of a burst of new streams is cancelled: measured here, from ~1,200-1,500
    streams opened at once, ~20% of a 3,000-stream burst (clients see CANCELLED, or
    INTERNAL if they wrote first). A fleet reconnecting after an outage is exactly that
    burst. Raised well above any burst one process should take
    (tests/e2e/test_burst.py shows both sides).
    """
    return [
        ("grpc.server.max_pending_requests", 100_000),
        ("grpc.server.max_pending_requests_hard_limit", 200_000),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", 1_000_000),
        # A car's link that dies without a FIN is found by our pings within 30 s (in C,
        # next to nothing per car; the heartbeat check covers what pings cannot see,
        # a proxy in between). Cars ping every 10 s (broker.sdk.vehicle.car_channel_options):
        # allow that with room for timer jitter, or grpc answers GOAWAY too_many_pings.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 4_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]


class Broker:
    """The running broker: store, dispatcher, sessions, the gRPC server and background loops."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = Store(
            config.data_dir,
            map_size=config.map_size_mb << 20,
            map_size_max=config.map_size_max_mb << 20,
            fsync=config.durability == "fsync",
            group_max=config.group_commit_max,
            retention_ms=int(config.retention_s * 1000),
            idempotency_window_ms=int(config.idempotency_window_s * 1000),
            reserve_bytes=config.store_reserve_mb << 20,
        )
        self.sessions = SessionRegistry()
        self.events = EventHub()
        self.dispatcher = Dispatcher(self.store, self.sessions, self.events, config)
        self.states = VehicleStates(self.store, self.sessions, max_fields=config.max_state_fields)
        self.health = health.aio.HealthServicer()
        self.stream_gate = StreamGate(config.new_streams_per_s, config.new_streams_burst)
        self.admission = Admission(
            Gradient2Limit(
                initial_limit=config.admission_initial_limit,
                min_limit=config.admission_min_limit,
                max_limit=config.admission_max_limit,
            ),
            codel_target_s=config.codel_target_ms / 1000,
            codel_interval_s=config.codel_interval_ms / 1000,
            critical_per_minute=config.critical_per_minute,
            critical_burst=config.critical_burst,
        )
        self.telemetry = TelemetryGuard(
            car_msgs_per_s=config.telemetry_car_msgs_per_s,
            car_bytes_per_s=config.telemetry_car_bytes_per_s,
            fleet_msgs_per_s=config.telemetry_fleet_msgs_per_s,
            fleet_bytes_per_s=config.telemetry_fleet_bytes_per_s,
            hold_s=config.telemetry_hold_s,
            max_signals_per_car=config.max_state_fields,
        )
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopped = False
        self._metrics_server: Any = None
        self.metrics_port = 0
        #: vehicle streams closed because nothing was heard on them (dead links)
        self.dead_links = 0

    async def start(self) -> int:
        """Recover, bind, serve; returns the bound port (so `listen` may end in :0)."""
        if self.config.gc_freeze_interval_s > 0:
            # Full collections find nothing here (the state is acyclic) yet each scans every
            # unfrozen object: ~20-30 ms stalls, many a minute under a telemetry storm. Run
            # them 10x less often; gen0/gen1 keep collecting short-lived cycles as before
            # (a larger gen0 threshold, 2000, made each young collection a 5-8 ms stall).
            gc.set_threshold(700, 10, GC_FULL_EVERY)
        # Broker time goes on from the store's reference, never behind what it holds,
        # even if the wall clock was set back while the broker was down (broker/core/clock.py).
        clock.current().resume(*self.store.clock_reference)
        self.store.start(asyncio.get_running_loop())
        recovered = await self.dispatcher.recover()
        expired = await self.dispatcher.fire_timers()
        logger.info("recovered %d pending commands (%d expired or timed out)", recovered, expired)
        auth = Authenticator(self.config.auth_secret, insecure_dev=self.config.insecure_dev)
        servicer = Servicer(
            self.config,
            auth,
            self.store,
            self.dispatcher,
            self.events,
            self.states,
            self.stream_gate,
            self.telemetry,
            self.admission,
        )
        server = grpc.aio.server(options=server_options(self.config))
        server.add_generic_rpc_handlers(servicer.handlers())
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            port = server.add_insecure_port(self.config.listen)
        except RuntimeError:  # grpc >= 1.5x raises where older versions returned 0
            port = 0
        if port == 0:
            await self.store.close()
            raise Unavailable(f"could not bind {self.config.listen} (in use?)")
        await server.start()
        self.server, self.port = server, port
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_listen:
            self._metrics_server = serve_metrics(self, self.config.metrics_listen)
            self.metrics_port = int(self._metrics_server.server_port)
        self._tasks = [
            asyncio.create_task(self.dispatcher.run_timers(), name="timers"),
            asyncio.create_task(self._flush_state(), name="state-flush"),
            asyncio.create_task(self._check_liveness(), name="liveness"),
        ]
        return port

    async def _check_liveness(self) -> None:
        """Close streams whose cars went silent (dead links), and report clock steps."""
        timeout_s = self.config.liveness_timeout_s
        reported_offset_ms = 0
        while True:
            await asyncio.sleep(timeout_s / 8)
            try:
                reported_offset_ms = self._check_liveness_once(timeout_s, reported_offset_ms)
            except Exception:  # this loop must outlive any one bad session
                logger.exception("liveness check failed")

    def _check_liveness_once(self, timeout_s: float, reported_offset_ms: int) -> int:
        """One check; returns the wall-clock offset last reported."""
        closed = self.sessions.close_silent(timeout_s)
        if closed:
            self.dead_links += closed
            logger.info("closed %d vehicle streams silent for %gs", closed, timeout_s)
        offset_ms = clock.current().wall_offset_ms()
        if abs(offset_ms - reported_offset_ms) > CLOCK_STEP_REPORT_MS:
            logger.warning(
                "the wall clock is %+d ms from broker time (it was stepped); deadlines "
                "keep to broker time, which advances steadily",
                offset_ms,
            )
            return offset_ms
        return reported_offset_ms

    async def _flush_state(self) -> None:
        """Apply coalesced telemetry, persist state, and restore cars that went quiet."""
        interval = self.config.state_flush_interval_s
        sweep_every = max(1, round(5 / interval))  # restoring quiet cars needs no hurry
        freeze_s = self.config.gc_freeze_interval_s
        freeze_every = max(1, round(freeze_s / interval)) if freeze_s > 0 else 0
        for tick in itertools.count(1):
            await asyncio.sleep(interval)
            try:
                await self._flush_once(sweep=tick % sweep_every == 0)
            except Exception:  # this loop must outlive any one bad car or failed write
                logger.exception("state flush failed")
            if freeze_every and tick % freeze_every == 0:
                # Every live stream keeps thousands of objects alive; a full cyclic
                # collection scanned them all and stalled the loop (measured: 984 ms at
                # 30k cars, unlock p99 743 ms; with periodic freezing p99 29 ms). Frozen
                # objects are still freed by reference counting; only reference cycles
                # among them are not collected.
                gc.freeze()

    async def _flush_once(self, *, sweep: bool) -> None:
        received_ms = now_ms()
        # A slice of cars at a time, taken as applied: a car that goes between slices
        # takes its own buffer with it (see `_release`), so nothing is lost.
        for _ in range(0, self.telemetry.coalescing_cars, FLUSH_SLICE):
            for vehicle_id, signals in self.telemetry.take_coalesced(FLUSH_SLICE).items():
                try:
                    self.states.report(vehicle_id, signals, received_ms)
                except BrokerError as exc:
                    logger.warning("dropped coalesced telemetry of %s: %s", vehicle_id, exc.message)
            await asyncio.sleep(0)  # let unlocks through between slices of the fleet
        if sweep:
            for vehicle_id, policy in self.telemetry.sweep(time.monotonic()):
                session = self.sessions.get(vehicle_id)
                if session is not None:
                    session.send(telemetry_control(policy))
        config = self.config
        await self.states.flush(
            share=config.state_flush_interval_s / config.state_persist_interval_s,
            changed_before_ms=now_ms() - int(config.state_persist_interval_s * 1000),
        )

    async def stop(self, grace_s: float | None = None, drain_delay_s: float | None = None) -> None:
        """Health NOT_SERVING first, still serving for `drain_delay_s` (so whoever polls
        health sees it before anything is refused); then drain: waiting calls answered
        with their command's current status, watches and car streams ended, new calls
        refused, running ones given up to `grace_s`; then flush the store and close.
        Returns as soon as that is done."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace_s is None else grace_s
        delay = self.config.drain_delay_s if drain_delay_s is None else drain_delay_s
        await self.health.enter_graceful_shutdown()
        if delay > 0:
            logger.info("health is NOT_SERVING; draining in %gs", delay)
            await asyncio.sleep(delay)
        self.events.drain()
        # Tell every car to go (they reconnect with jittered backoff), then end its stream.
        live = self.sessions.all()
        drain = link.BrokerFrame(control=link.Control(drain=True))
        for session in live:
            session.send(drain)
            session.close()
        if self.server is not None:
            await self.server.stop(grace)
        self.admission.close()
        if live:
            logger.info("shutdown drained %d vehicle streams", len(live))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.states.flush()
        await self.store.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()


#: a full collection after this many young ones (CPython's default: 10)
GC_FULL_EVERY = 100
#: a change of the wall clock's offset from broker time larger than this is logged
CLOCK_STEP_REPORT_MS = 1000


def install_event_loop_policy() -> str:
    """uvloop when it is installed, else asyncio's default; returns which."""
    try:
        import uvloop
    except ImportError:
        logger.warning("uvloop is not installed; using the default asyncio event loop")
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
