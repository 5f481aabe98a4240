"""Prometheus metrics, read from the domain objects at scrape time.

The hot paths only bump plain integers; this collector turns them into metric
families when Prometheus scrapes, so visibility costs nothing per command. It is handed
the parts it reads (the composition root builds it), so it imports none of the server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from broker.core import clock, lanes
from broker.v1 import types_pb2 as t

if TYPE_CHECKING:
    from broker.api.limits import PeerStreams
    from broker.core.admission import Admission
    from broker.core.audit import AuditTrail
    from broker.core.dispatch import Dispatcher
    from broker.core.events import EventHub
    from broker.core.quotas import CallerLimits, Refusals
    from broker.core.sessions import SessionRegistry, StreamGate
    from broker.core.store import Store
    from broker.core.telemetry import TelemetryGuard
    from broker.server.loops import Liveness

logger = logging.getLogger(__name__)


class BrokerCollector(Collector):
    def __init__(
        self,
        *,
        events: EventHub,
        dispatcher: Dispatcher,
        sessions: SessionRegistry,
        stream_gate: StreamGate,
        admission: Admission,
        telemetry: TelemetryGuard,
        store: Store,
        liveness: Liveness,
        audit: AuditTrail | None = None,
        refusals: Refusals | None = None,
        callers: CallerLimits | None = None,
        peers: PeerStreams | None = None,
    ) -> None:
        self.events = events
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.stream_gate = stream_gate
        self.admission = admission
        self.telemetry = telemetry
        self.store = store
        self.liveness = liveness
        self.audit = audit
        self.refusals = refusals
        self.callers = callers
        self.peers = peers

    def collect(self) -> Iterator[Any]:
        yield from self._commands()
        yield from self._streams()
        yield from self._admission()
        yield from self._telemetry()
        yield from self._store()
        yield from self._audit()
        yield from self._refusals()

    def _commands(self) -> Iterator[Any]:
        outcomes = CounterMetricFamily(
            "broker_command_status_changes",
            "Recorded command status changes (outcomes), by status",
            labels=["status"],
        )
        for status, count in sorted(self.events.status_counts.items()):
            outcomes.add_metric([t.CommandStatus.Name(status)], count)
        yield outcomes
        yield GaugeMetricFamily(
            "broker_durable_queue_depth",
            "Non-terminal commands on disk (queued, in flight or awaiting a result)",
            value=self.dispatcher.pending_total,
        )
        yield GaugeMetricFamily(
            "broker_durable_queue_in_memory_vehicles",
            "Cars whose queue is held in memory (connected, with pending commands); a "
            "parked car's queue stays on disk",
            value=self.dispatcher.queues_in_memory,
        )
        yield CounterMetricFamily(
            "broker_commands_abandoned",
            "Commands that became durable only after their sender's deadline: canceled, never sent",
            value=self.dispatcher.abandoned,
        )
        yield GaugeMetricFamily(
            "broker_command_watchers",
            "Open WatchCommands streams",
            value=self.events.watcher_count,
        )

    def _streams(self) -> Iterator[Any]:
        yield GaugeMetricFamily(
            "broker_vehicle_streams", "Live vehicle streams", value=len(self.sessions)
        )
        yield CounterMetricFamily(
            "broker_vehicle_streams_dead",
            "Vehicle streams closed because nothing was heard on them (dead links)",
            value=self.liveness.dead_links,
        )
        yield GaugeMetricFamily(
            "broker_clock_wall_offset_ms",
            "The wall clock minus broker time: how far the wall clock has been stepped",
            value=clock.current().wall_offset_ms(),
        )
        admissions = CounterMetricFamily(
            "broker_stream_admissions",
            "New vehicle streams, admitted or told to reconnect later (storm control)",
            labels=["decision"],
        )
        admissions.add_metric(["admitted"], self.stream_gate.admitted)
        admissions.add_metric(["deferred"], self.stream_gate.deferred)
        yield admissions

    def _admission(self) -> Iterator[Any]:
        admission = self.admission
        work = CounterMetricFamily(
            "broker_admission",
            "Command work offered to admission, by lane and decision",
            labels=["lane", "decision"],
        )
        for decision, by_lane in (
            ("admitted", admission.admitted),
            ("shed", admission.shed),
            ("cancelled", admission.cancelled),
            ("quota_refused", admission.quota_refused),
        ):
            for lane, count in by_lane.items():
                work.add_metric([lanes.name(lane), decision], count)
        yield work
        yield GaugeMetricFamily(
            "broker_admission_limit", "Current adaptive in-flight limit", value=admission.limit
        )
        for name, helptext, values in (
            ("broker_admission_in_flight", "Admitted work in flight", admission.in_flight),
            ("broker_admission_queued", "Work waiting for a slot", admission.queued),
            (
                "broker_admission_queue_delay_seconds",
                "Latest time work waited for a slot",
                admission.queue_delay_s,
            ),
        ):
            gauge = GaugeMetricFamily(name, helptext, labels=["lane"])
            for lane, value in values.items():
                gauge.add_metric([lanes.name(lane)], value)
            yield gauge

    def _telemetry(self) -> Iterator[Any]:
        counters = self.telemetry.counters
        for unit in ("msgs", "bytes"):
            family = CounterMetricFamily(
                f"broker_telemetry_{unit}",
                f"Inbound telemetry {unit} by what the verbosity guard did with them",
                labels=["outcome"],
            )
            for outcome in ("admitted", "coalesced", "sampled_out", "shed"):
                family.add_metric([outcome], getattr(counters, f"{outcome}_{unit}"))
            yield family
        levels = GaugeMetricFamily(
            "broker_telemetry_cars", "Connected cars by telemetry guard level", labels=["level"]
        )
        for level, count in self.telemetry.cars_by_level().items():
            levels.add_metric([level.name.lower()], count)
        yield levels
        yield GaugeMetricFamily(
            "broker_telemetry_fleet_level",
            "Fleet-wide telemetry guard level (0 normal, 1 coalesce, 2 sample, 3 shed)",
            value=int(self.telemetry.fleet_level),
        )
        yield CounterMetricFamily(
            "broker_telemetry_policy_updates",
            "Control frames sent to change a car's telemetry policy",
            value=counters.policy_updates,
        )

    def _store(self) -> Iterator[Any]:
        store = self.store
        yield GaugeMetricFamily(
            "broker_store_room_bytes",
            "Room left for more data, in the LMDB map and on its disk (the lesser)",
            value=store.room_bytes,
        )
        yield GaugeMetricFamily(
            "broker_store_reserve_bytes",
            "Below this much room new commands are refused (store_reserve_mb)",
            value=store.reserve_bytes,
        )
        yield CounterMetricFamily(
            "broker_store_space_refusals",
            "New commands refused because the store was short of room",
            value=store.space_refusals,
        )
        yield CounterMetricFamily("broker_store_commits", "LMDB group commits", value=store.commits)
        yield CounterMetricFamily(
            "broker_store_operations", "Store operations committed", value=store.operations
        )

    def _audit(self) -> Iterator[Any]:
        audit = self.audit
        if audit is None:
            return
        yield CounterMetricFamily(
            "broker_audit_lines_written", "Audit trail lines written", value=audit.written
        )
        yield CounterMetricFamily(
            "broker_audit_lines_dropped",
            "Audit trail lines lost: the disk failed or was full, or the buffer was",
            value=audit.dropped,
        )
        yield CounterMetricFamily(
            "broker_audit_denials_suppressed",
            "Denials over the per-actor audit rate, counted in a summary line instead",
            value=audit.suppressed,
        )

    def _refusals(self) -> Iterator[Any]:
        """Every refusal, by reason: one family (the parts' own counters stay too)."""
        if self.refusals is None:
            return
        counts = dict(self.refusals.counts)
        if self.peers is not None:  # counted where the adapters refuse
            counts["peer_streams"] = counts.get("peer_streams", 0) + self.peers.refused
        refusals = CounterMetricFamily(
            "broker_refusals",
            "Everything the broker refused, by reason (caller_rate, caller_queue_share, "
            "vehicle_critical_quota, overloaded, queue_budget, store_space, stream_budget, "
            "stream_budget_vehicle, watch_cap, ...)",
            labels=["reason"],
        )
        for reason, count in sorted(counts.items()):
            refusals.add_metric([reason], count)
        yield refusals
        dispatcher = self.dispatcher
        yield GaugeMetricFamily(
            "broker_dispatch_commands_in_memory",
            "Command records held in memory for connected cars (at most max_outbox_per_car "
            "queued per car, plus those on the wire)",
            value=dispatcher.commands_in_memory,
        )
        yield GaugeMetricFamily(
            "broker_dispatch_spilled_vehicles",
            "Connected cars with more queued commands than max_outbox_per_car: the rest "
            "wait on disk only",
            value=dispatcher.spilled_queues,
        )
        pending = GaugeMetricFamily(
            "broker_caller_pending_commands",
            "Non-terminal commands by sender (for caller_queue_share)",
            labels=["caller"],
        )
        for caller, count in sorted(dispatcher.pending_by_sender.items()):
            pending.add_metric([caller], count)
        yield pending
        if self.callers is not None:
            watches = GaugeMetricFamily(
                "broker_caller_watches",
                "Open WatchCommands streams by caller (max_watches_per_caller)",
                labels=["caller"],
            )
            for caller, count in sorted(self.callers.watches_by_caller.items()):
                watches.add_metric([caller], count)
            yield watches


def serve_metrics(collector: Collector, listen: str) -> Any:
    """Expose /metrics on `listen` (HOST:PORT); returns the HTTP server (call shutdown())."""
    registry = CollectorRegistry()
    registry.register(collector)
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    logger.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
