"""Composition root: build the broker from a Config, serve it, shut it down in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from broker.api.command_service import CommandService
from broker.api.handlers import Handlers
from broker.api.limits import PeerStreams, health_handler
from broker.api.vehicle_link import VehicleLink
from broker.config import Config
from broker.core import clock
from broker.core.admission import Admission, Gradient2Limit
from broker.core.audit import AuditTrail
from broker.core.commands import Commands
from broker.core.dispatch import Dispatcher
from broker.core.errors import Unavailable
from broker.core.events import EventHub
from broker.core.quotas import CallerLimits, Refusals
from broker.core.sessions import SessionRegistry, StreamGate
from broker.core.state import VehicleStates
from broker.core.stream import DRAIN, Links
from broker.core.telemetry import TelemetryGuard
from broker.security.auth import Authenticator
from broker.security.keys import load_trusted_keys, split_locations
from broker.security.revocation import RevocationList
from broker.security.tls import ServerTls, server_credentials, tls_files_text
from broker.security.tokens import TokenRules
from broker.server.loops import Liveness, StateFlush, tune_gc
from broker.server.metrics import BrokerCollector, serve_metrics
from broker.storage.audit_log import AuditLog
from broker.storage.lmdb_store import LmdbStore
from broker.v1 import command_service_pb2, vehicle_link_pb2

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    command_service_pb2.DESCRIPTOR.services_by_name["CommandService"].full_name,
    vehicle_link_pb2.DESCRIPTOR.services_by_name["VehicleLink"].full_name,
)


def server_options(config: Config) -> list[tuple[str, Any]]:
    """Channel args for the grpc.aio server.

    grpc core's pending-request caps (`grpc.server.max_pending_requests`, 1,000 soft /
    3,000 hard: calls that arrived but are not yet matched to a handler; past the soft
    cap new ones are refused with a rising probability) are left at grpc's defaults. They
    are what bounds a rapid-reset flood (HEADERS + RST_STREAM pairs): raised to
    100,000/200,000 the broker grew from 48 MB to 1.65 GB under 200,000 pairs, and a
    healthy car's unlock took 12.6 s (loadtests/h2flood.py). The cost is that a burst of
    new streams past the caps is cancelled in part; the car SDK reconnects with jittered
    backoff, so a reconnect storm is absorbed by the clients' retries (and spread by the
    stream gate), not by a deeper queue (tests/e2e/test_burst.py).

    `max_concurrent_streams` per connection is the config's; what a peer may hold before
    it authenticates is bounded in the handlers (broker/api/limits.py).
    """
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
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


def authenticator(config: Config) -> Authenticator:
    """Token checking from the config: public keys by role, revocations, lifetimes, skew."""
    keys = load_trusted_keys(
        {
            "vehicle": split_locations(config.auth_vehicle_keys),
            "service": split_locations(config.auth_service_keys),
        }
    )
    return Authenticator(
        keys,
        rules=TokenRules(
            clock_skew_s=config.auth_clock_skew_s,
            max_ttl_s={
                "vehicle": config.auth_vehicle_max_ttl_s,
                "service": config.auth_service_max_ttl_s,
            },
        ),
        revocations=RevocationList(
            Path(config.auth_revocation_file) if config.auth_revocation_file else None
        ),
        insecure_dev=config.insecure_dev,
    )


class Broker:
    """The running broker: store, dispatcher, sessions, the gRPC server and background loops."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # Keys and the revocation list first: a bad one stops the start before the store opens.
        self.auth = authenticator(config)
        self.store = LmdbStore(
            config.data_dir,
            map_size=config.map_size_mb << 20,
            map_size_max=config.map_size_max_mb << 20,
            fsync=config.durability == "fsync",
            group_max=config.group_commit_max,
            retention_ms=int(config.retention_s * 1000),
            idempotency_window_ms=int(config.idempotency_window_s * 1000),
            reserve_bytes=config.store_reserve_mb << 20,
        )
        # Who did what, and every refusal: JSON lines in <data_dir>/audit (the store made
        # the data folder private and holds its lock).
        self.audit_log = AuditLog(
            config.data_dir / "audit",
            retention_days=config.audit_retention_days,
            fsync=config.durability == "fsync",
            reserve_bytes=config.store_reserve_mb << 20,
        )
        self.audit: AuditTrail = self.audit_log
        self.sessions = SessionRegistry()
        #: every refusal the broker makes, by reason (broker_refusals_total)
        self.refusals = Refusals()
        self.events = EventHub(refusals=self.refusals)
        self.dispatcher = Dispatcher(
            self.store, self.sessions, self.events, config, refusals=self.refusals
        )
        #: per-caller send rates, queue shares and watch caps (broker/core/quotas.py)
        self.callers = CallerLimits.from_config(
            config, pending_of=self.dispatcher.pending_of, refusals=self.refusals
        )
        self.states = VehicleStates(self.store, self.sessions, max_fields=config.max_state_fields)
        self.health = health.aio.HealthServicer()
        self.stream_gate = StreamGate(
            config.new_streams_per_s,
            config.new_streams_burst,
            vehicle_rate_per_s=config.new_streams_per_vehicle_per_s,
            vehicle_burst=config.new_streams_per_vehicle_burst,
            refusals=self.refusals,
        )
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
            refusals=self.refusals,
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
        self.liveness = Liveness(self.sessions, config.liveness_timeout_s)

    async def start(self) -> int:
        """Recover, bind, serve; returns the bound port (so `listen` may end in :0)."""
        tune_gc(self.config)
        # Broker time goes on from the store's reference, never behind what it holds,
        # even if the wall clock was set back while the broker was down (broker/core/clock.py).
        clock.current().resume(*self.store.clock_reference)
        self.store.start(asyncio.get_running_loop())
        self.audit_log.start()
        recovered = await self.dispatcher.recover()
        expired = await self.dispatcher.fire_timers()
        logger.info("recovered %d pending commands (%d expired or timed out)", recovered, expired)
        config = self.config
        self.peers = PeerStreams(config.max_streams_per_peer)
        handlers = Handlers(
            self.auth,
            peer_certificates=bool(config.tls_client_ca_file),
            first_message_timeout_s=config.first_message_timeout_s,
            peers=self.peers,
            audit=self.audit,
        )
        commands = Commands(
            config,
            self.store,
            self.dispatcher,
            self.events,
            self.states,
            self.admission,
            self.audit,
            callers=self.callers,
            refusals=self.refusals,
        )
        links = Links(config, self.dispatcher, self.telemetry, self.states, self.stream_gate)
        server = grpc.aio.server(options=server_options(config))
        server.add_generic_rpc_handlers(
            (
                CommandService(commands, self.auth).handler(handlers),
                VehicleLink(config, handlers, links).handler(),
            )
        )
        server.add_generic_rpc_handlers(
            (health_handler(self.health, config.first_message_timeout_s),)
        )
        if config.reflection_on:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        try:
            port = self._bind(server)
        except RuntimeError:  # grpc >= 1.5x raises where older versions returned 0
            port = 0
        except Unavailable:
            await self.store.close()
            raise
        if port == 0:
            await self.store.close()
            raise Unavailable(f"could not bind {self.config.listen} (in use?)")
        await server.start()
        self.server, self.port = server, port
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_listen:
            self._metrics_server = serve_metrics(self.collector(), self.config.metrics_listen)
            self.metrics_port = int(self._metrics_server.server_port)
        flush = StateFlush(config, self.telemetry, self.states, self.sessions)
        self._tasks = [
            asyncio.create_task(self.dispatcher.run_timers(), name="timers"),
            asyncio.create_task(flush.run(), name="state-flush"),
            asyncio.create_task(self.liveness.run(), name="liveness"),
            asyncio.create_task(self.auth.run(), name="revocations"),
            asyncio.create_task(self.audit_log.run(), name="audit"),
        ]
        return port

    def _bind(self, server: grpc.aio.Server) -> int:
        """Bind the listen address: TLS (mTLS with a client CA) when configured."""
        config = self.config
        if not config.tls_cert_file:
            return server.add_insecure_port(config.listen)
        tls = ServerTls(
            Path(config.tls_cert_file),
            Path(config.tls_key_file),
            Path(config.tls_client_ca_file) if config.tls_client_ca_file else None,
        )
        try:
            credentials = server_credentials(tls)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"cannot load the TLS files ({tls_files_text(tls)}): {exc}") from None
        return server.add_secure_port(config.listen, credentials)

    def collector(self) -> BrokerCollector:
        """The Prometheus collector over this broker's parts."""
        return BrokerCollector(
            events=self.events,
            dispatcher=self.dispatcher,
            sessions=self.sessions,
            stream_gate=self.stream_gate,
            admission=self.admission,
            telemetry=self.telemetry,
            store=self.store,
            liveness=self.liveness,
            audit=self.audit,
            refusals=self.refusals,
            callers=self.callers,
            peers=getattr(self, "peers", None),
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
        for session in live:
            session.send(DRAIN)
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
        await self.audit_log.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()


def install_event_loop_policy() -> str:
    """uvloop when it is installed, else asyncio's default; returns which."""
    try:
        import uvloop
    except ImportError:
        logger.warning("uvloop is not installed; using the default asyncio event loop")
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
