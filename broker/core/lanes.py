"""The lanes: the one table that says how each class of command work is treated.

Config (lane names in TOML and CLI), admission (shares of the adaptive limit), the
durable-queue budget, TTL limits, the servicers and the SDKs all read this table. To add
a lane: give it a value in `proto/broker/v1/types.proto` (`Lane`), add a row here, and
name its maximum TTL setting in `broker/config.py` if it needs its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from broker.v1 import types_pb2


@dataclass(frozen=True)
class Lane:
    """One lane of command work."""

    #: the wire value (`broker.v1.Lane`)
    value: int
    #: the name used in config, the CLI and metrics labels
    name: str
    #: share of the adaptive in-flight limit. A lane that never waits (`queued=False`)
    #: has it *reserved*; the queued lanes split the rest of the pool in table order,
    #: the last taking what is left (at least one slot)
    share: float
    #: a queued lane may borrow idle capacity of other lanes while the pool's total use
    #: is below this fraction of it (1.0: up to the whole pool)
    borrow_ceiling: float
    #: new commands of this lane are refused (UNAVAILABLE) once the durable queue holds
    #: this fraction of `durable_queue_budget`; `math.inf`: never refused for depth
    queue_budget: float
    #: the Config setting holding the longest TTL a caller may ask for on this lane
    max_ttl_setting: str
    #: waits in a CoDel queue when there is no room (and may be shed from it); a lane
    #: that does not wait is admitted above the limit, bounded only by a per-car quota
    queued: bool = True


#: Highest priority first: the order capacity is offered in, and the order of `LANES`.
LANE_TABLE: tuple[Lane, ...] = (
    Lane(types_pb2.CRITICAL, "critical", share=0.1, borrow_ceiling=1.0,
         queue_budget=math.inf, max_ttl_setting="critical_max_ttl_s", queued=False),
    Lane(types_pb2.INTERACTIVE, "interactive", share=0.7, borrow_ceiling=1.0,
         queue_budget=1.0, max_ttl_setting="max_ttl_s"),
    Lane(types_pb2.BULK, "bulk", share=0.3, borrow_ceiling=0.8,
         queue_budget=0.8, max_ttl_setting="max_ttl_s"),
)  # fmt: skip

#: lane value -> its row
BY_VALUE: Mapping[int, Lane] = MappingProxyType({lane.value: lane for lane in LANE_TABLE})
#: lane name -> its row
BY_NAME: Mapping[str, Lane] = MappingProxyType({lane.name: lane for lane in LANE_TABLE})
#: lane name -> wire value (config, CLI, SDK)
VALUES: Mapping[str, int] = MappingProxyType({lane.name: lane.value for lane in LANE_TABLE})

CRITICAL: int = types_pb2.CRITICAL
INTERACTIVE: int = types_pb2.INTERACTIVE
BULK: int = types_pb2.BULK


def name(value: int) -> str:
    """A lane's name, or `lane <value>` for a value not in the table."""
    lane = BY_VALUE.get(value)
    return lane.name if lane is not None else f"lane {value}"


def wire_name(value: int) -> str:
    """A lane's enum name on the wire (`CRITICAL`), for messages to callers."""
    return types_pb2.Lane.Name(value) if value in BY_VALUE else str(value)
