"""Prometheus metrics, read from the domain objects at scrape time.

The hot paths only bump plain integers; this collector turns them into metric
families when Prometheus scrapes, so visibility costs nothing per command.
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
    from broker.server.broker import Broker

logger = logging.getLogger(__name__)


class BrokerCollector(Collector):
    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def collect(self) -> Iterator[Any]:
        broker = self._broker
        outcomes = CounterMetricFamily(
            "broker_command_status_changes",
            "Recorded command status changes (outcomes), by status",
            labels=["status"],
        )
        for status, count in sorted(broker.events.status_counts.items()):
            outcomes.add_metric([t.CommandStatus.Name(status)], count)
        yield outcomes
        yield GaugeMetricFamily(
            "broker_durable_queue_depth",
            "Non-terminal commands on disk (queued, in flight or awaiting a result)",
            value=broker.dispatcher.pending_total,
        )
        yield GaugeMetricFamily(
            "broker_durable_queue_in_memory_vehicles",
            "Cars whose queue is held in memory (connected, with pending commands); a "
            "parked car's queue stays on disk",
            value=broker.dispatcher.queues_in_memory,
        )
        yield GaugeMetricFamily(
            "broker_vehicle_streams", "Live vehicle streams", value=len(broker.sessions)
        )
        yield GaugeMetricFamily(
            "broker_command_watchers",
            "Open WatchCommands streams",
            value=broker.events.watcher_count,
        )
        admissions = CounterMetricFamily(
            "broker_stream_admissions",
            "New vehicle streams, admitted or told to reconnect later (storm control)",
            labels=["decision"],
        )
        admissions.add_metric(["admitted"], broker.stream_gate.admitted)
        admissions.add_metric(["deferred"], broker.stream_gate.deferred)
        yield admissions
        admission = broker.admission
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
        counters = broker.telemetry.counters
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
        for level, count in broker.telemetry.cars_by_level().items():
            levels.add_metric([level.name.lower()], count)
        yield levels
        yield GaugeMetricFamily(
            "broker_telemetry_fleet_level",
            "Fleet-wide telemetry guard level (0 normal, 1 coalesce, 2 sample, 3 shed)",
            value=int(broker.telemetry.fleet_level),
        )
        yield CounterMetricFamily(
            "broker_telemetry_policy_updates",
            "Control frames sent to change a car's telemetry policy",
            value=counters.policy_updates,
        )
        store = broker.store
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
        yield CounterMetricFamily(
            "broker_commands_abandoned",
            "Commands that became durable only after their sender's deadline: canceled, never sent",
            value=broker.dispatcher.abandoned,
        )
        yield CounterMetricFamily(
            "broker_vehicle_streams_dead",
            "Vehicle streams closed because nothing was heard on them (dead links)",
            value=broker.dead_links,
        )
        yield GaugeMetricFamily(
            "broker_clock_wall_offset_ms",
            "The wall clock minus broker time: how far the wall clock has been stepped",
            value=clock.current().wall_offset_ms(),
        )
        writer = store.writer
        yield CounterMetricFamily(
            "broker_store_commits", "LMDB group commits", value=writer.groups_committed
        )
        yield CounterMetricFamily(
            "broker_store_operations", "Store operations committed", value=writer.ops_committed
        )


def serve_metrics(broker: Broker, listen: str) -> Any:
    """Expose /metrics on `listen` (HOST:PORT); returns the HTTP server (call shutdown())."""
    registry = CollectorRegistry()
    registry.register(BrokerCollector(broker))
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    logger.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
