"""Per-caller limits, and the one count of every refusal the broker makes.

A caller is a service principal (`Caller.name`, e.g. `service:fleet-app`). Whatever one
caller does, the others must keep their share of the broker, so each caller has:

* **a send rate**: a token bucket per caller (`caller_rate_per_s`, `caller_burst`) over
  the commands it sends on the interactive and bulk lanes (one token per command; a batch
  takes one per item, and is refused whole, for the price of one check, while the
  bucket could not pay for all of it: `check_batch`);
* **its own critical rate**: a second bucket (`caller_critical_rate_per_s`,
  `caller_critical_burst`) for the critical lane alone. An unlock must get through any
  flood, the caller's own included, so critical work never spends (nor waits for) the
  tokens of the other lanes; but one caller must not flood critical either, so it has a
  bucket of its own instead of none. Beside it stands the critical quota per (caller,
  car) in broker/core/admission.py;
* **a share of the durable queue**: a caller may hold at most `caller_queue_share` x
  `durable_queue_budget` non-terminal commands, degraded by lane as the broker-wide
  budget is (`lanes.Lane.queue_budget`: bulk is refused from 80 % of the share,
  interactive at 100 %, critical never for depth: its rate and the per-car quota bound
  it, and its TTL is capped by `critical_max_ttl_s`). The broker-wide budget
  (`Commands.check_queue_budget`) still applies to everyone;
* **a cap on open WatchCommands streams** (`max_watches_per_caller`).

Every default can be changed for one caller (`[callers."service:NAME"]` in the TOML
config). Refusals are `CallerQuotaExceeded` (RESOURCE_EXHAUSTED: the caller's own quota,
not the broker's overload) with a retry hint, naming the limit and the caller; other
callers are untouched by them. Check the broker-wide budget first: when the whole queue
is full that is the broker's overload (UNAVAILABLE), and it spends no caller's tokens.

Buckets are `(tokens, updated_at, full_at)` tuples in dicts kept in update order: a
bucket that has refilled holds nothing a new one would not, and is forgotten; past
`max_buckets` the least recently used is dropped as well, so a flood of distinct names
cannot grow memory without bound (a looping caller is always the most recent).

`Refusals` counts every refusal by a stable reason string (the metric
`broker_refusals_total{reason}`); each part that refuses holds the same instance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from broker.core import lanes
from broker.core.errors import QuotaExceeded, retry_hint_ms

if TYPE_CHECKING:
    from broker.config import Config

# -- refusal reasons (stable: they are metric label values) ---------------------------------

#: a caller's send rate (interactive and bulk lanes)
CALLER_RATE = "caller_rate"
#: a caller's critical-lane rate
CALLER_CRITICAL_RATE = "caller_critical_rate"
#: a caller holds its share of the durable queue
CALLER_QUEUE_SHARE = "caller_queue_share"
#: a caller has its most WatchCommands streams open
WATCH_CAP = "watch_cap"
#: the critical quota of one (caller, car) pair (broker/core/admission.py)
VEHICLE_CRITICAL_QUOTA = "vehicle_critical_quota"
#: shed by admission: the adaptive limit had no room within the CoDel target
OVERLOADED = "overloaded"
#: refused because the broker is shutting down
SHUTTING_DOWN = "shutting_down"
#: the broker-wide durable-queue budget of the command's lane (Commands.check_queue_budget)
QUEUE_BUDGET = "queue_budget"
#: the store is short of room (disk or map)
STORE_SPACE = "store_space"
#: not durable before its sender's deadline (or the critical commit bound): nothing
#: written, or written too late and abandoned
COMMIT_DEADLINE = "commit_deadline"
#: a new vehicle stream deferred by the fleet-wide stream budget (storm control)
STREAM_BUDGET = "stream_budget"
#: a new vehicle stream deferred by its own car's stream budget
STREAM_BUDGET_VEHICLE = "stream_budget_vehicle"
#: too many open calls from one peer address (broker/api/limits.py)
PEER_STREAMS = "peer_streams"
#: a watcher ended for falling too far behind (broker/core/events.py)
WATCHER_BEHIND = "watcher_behind"

REASONS: tuple[str, ...] = (
    CALLER_RATE, CALLER_CRITICAL_RATE, CALLER_QUEUE_SHARE, WATCH_CAP, VEHICLE_CRITICAL_QUOTA,
    OVERLOADED, SHUTTING_DOWN, QUEUE_BUDGET, STORE_SPACE, COMMIT_DEADLINE, STREAM_BUDGET,
    STREAM_BUDGET_VEHICLE, PEER_STREAMS, WATCHER_BEHIND,
)  # fmt: skip

#: bucket maps hold at most this many entries (each ~200 bytes)
MAX_BUCKETS = 10_000
#: the largest fraction of a share any lane refused for depth may fill (interactive's)
_DEEPEST_QUEUE_BUDGET = max(
    lane.queue_budget for lane in lanes.LANE_TABLE if lane.queue_budget != math.inf
)


class Refusals:
    """Refusals by reason: `count(reason)` where a refusal is made; read at scrape time.

    Reasons are the constants above (`REASONS`): a fixed set, so the metric's label set
    stays bounded. Event-loop only, like every counter of the domain.
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(REASONS, 0)

    def count(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def __getitem__(self, reason: str) -> int:
        return self.counts.get(reason, 0)


class CallerQuotaExceeded(QuotaExceeded):
    """A caller is over one of its own limits; `reason` names which (a `REASONS` value)."""

    retry_after_ms: int

    def __init__(self, message: str, *, reason: str, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CallerPolicy:
    """One caller's limits (the config's defaults, or its `[callers.NAME]` override)."""

    #: commands a second on the interactive and bulk lanes, and the burst
    rate_per_s: float = 2000.0
    burst: float = 5000.0
    #: commands a second on the critical lane, and the burst
    critical_rate_per_s: float = 100.0
    critical_burst: float = 500.0
    #: the fraction of `durable_queue_budget` it may hold (non-terminal commands)
    queue_share: float = 0.5
    #: WatchCommands streams it may have open at once
    max_watches: int = 1000

    def check(self, where: str) -> None:
        for name in ("rate_per_s", "burst", "critical_rate_per_s", "critical_burst",
                     "max_watches"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}{name}: must be positive, got {getattr(self, name)!r}")
        if not 0 < self.queue_share <= 1:
            raise ValueError(f"{where}queue_share: must be in (0, 1], got {self.queue_share!r}")


class TokenBuckets:
    """Token buckets by key, bounded in number: `take` one or more tokens or learn the wait.

    A bucket starts full (`burst`) and refills at `rate_per_s`. A take of more than the
    burst (a batch larger than it) passes when the bucket is full and leaves it in debt,
    so the long-run rate holds. Buckets that have refilled are forgotten, and past
    `max_buckets` the least recently used is dropped too (it comes back full).
    """

    __slots__ = ("_buckets", "_clock", "max_buckets")

    def __init__(
        self, *, max_buckets: int = MAX_BUCKETS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # key -> (tokens, updated_at, full_at); insertion order is update order
        self._buckets: dict[object, tuple[float, float, float]] = {}
        self._clock = clock
        self.max_buckets = max_buckets

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: object, rate_per_s: float, burst: float, count: float = 1) -> float:
        """Take `count` tokens: 0.0 if taken, else the seconds until they could be."""
        now = self._clock()
        buckets = self._buckets
        self._forget_full(now)
        tokens, updated_at, _ = buckets.pop(key, (burst, now, now))
        tokens = min(burst, tokens + (now - updated_at) * rate_per_s)
        need = min(count, burst)
        if tokens < need:
            buckets[key] = (tokens, now, now + (burst - tokens) / rate_per_s)
            return (need - tokens) / rate_per_s
        tokens -= count
        buckets[key] = (tokens, now, now + (burst - tokens) / rate_per_s)
        while len(buckets) > self.max_buckets:
            del buckets[next(iter(buckets))]
        return 0.0

    def wait_s(self, key: object, rate_per_s: float, burst: float, count: float = 1) -> float:
        """The seconds until `count` tokens could be taken (0.0: now); takes nothing."""
        found = self._buckets.get(key)
        if found is None:
            return 0.0
        tokens, updated_at, _ = found
        tokens = min(burst, tokens + (self._clock() - updated_at) * rate_per_s)
        need = min(count, burst)
        return 0.0 if tokens >= need else (need - tokens) / rate_per_s

    def give_back(self, key: object, burst: float, count: float = 1) -> None:
        """Return tokens taken for work that turned out to cost nothing (up to the burst)."""
        found = self._buckets.get(key)
        if found is not None:
            tokens, updated_at, full_at = found
            self._buckets[key] = (min(burst, tokens + count), updated_at, full_at)

    def _forget_full(self, now: float) -> None:
        """Drop the oldest buckets while they have refilled (they hold nothing)."""
        buckets = self._buckets
        while buckets:
            key, (_, _, full_at) = next(iter(buckets.items()))
            if now < full_at:
                return
            del buckets[key]


class _Watch:
    """`with limits.watching(caller):` one open WatchCommands stream of `caller`."""

    __slots__ = ("_caller", "_limits", "_open")

    def __init__(self, limits: CallerLimits, caller: str) -> None:
        self._limits = limits
        self._caller = caller
        self._open = False

    def __enter__(self) -> _Watch:
        self._limits.open_watch(self._caller)
        self._open = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._open:
            self._open = False
            self._limits.close_watch(self._caller)


class CallerLimits:
    """Each caller's send rates, share of the durable queue and open watches.

    `pending_of(caller)` is how many non-terminal commands the caller holds now
    (`Dispatcher.pending_of`). Use from the event loop only.
    """

    def __init__(
        self,
        *,
        default: CallerPolicy | None = None,
        overrides: Mapping[str, CallerPolicy] | None = None,
        durable_queue_budget: int = 2_000_000,
        pending_of: Callable[[str], int] = lambda caller: 0,
        refusals: Refusals | None = None,
        max_buckets: int = MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = default if default is not None else CallerPolicy()
        self.default.check("caller limits: ")
        self.overrides = dict(overrides or {})
        for name, policy in self.overrides.items():
            policy.check(f"callers.{name}.")
        self.durable_queue_budget = durable_queue_budget
        self.refusals = refusals if refusals is not None else Refusals()
        self._pending_of = pending_of
        self._buckets = TokenBuckets(max_buckets=max_buckets, clock=clock)
        self._watches: dict[str, int] = {}

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        pending_of: Callable[[str], int],
        refusals: Refusals | None = None,
    ) -> CallerLimits:
        return cls(
            default=config.caller_policy(""),
            overrides={name: config.caller_policy(name) for name in config.callers},
            durable_queue_budget=config.durable_queue_budget,
            pending_of=pending_of,
            refusals=refusals,
        )

    def policy(self, caller: str) -> CallerPolicy:
        return self.overrides.get(caller, self.default)

    @property
    def buckets(self) -> int:
        """Rate buckets held (bounded by `max_buckets`)."""
        return len(self._buckets)

    # -- sending -----------------------------------------------------------------------------

    def queue_share_limit(self, caller: str, lane: int) -> float:
        """How many non-terminal commands `caller` may hold before `lane` is refused."""
        share = self.policy(caller).queue_share * self.durable_queue_budget
        return share * lanes.BY_VALUE[lane].queue_budget

    def check_send(self, caller: str, lane: int, count: int = 1, *, ahead: int = 0) -> None:
        """Take `count` commands of `lane` from `caller`'s limits, or raise
        `CallerQuotaExceeded` (and take nothing). The queue share is looked at first
        (a refusal there spends no rate), then the lane's rate bucket.

        `ahead`: commands of the same call passed already and not submitted yet (the
        items before this one in a batch), counted against the share as if held.
        """
        policy = self.policy(caller)
        if lane != lanes.CRITICAL:
            held = self._pending_of(caller) + ahead
            limit = self.queue_share_limit(caller, lane)
            if held + count > limit:
                self.refusals.count(CALLER_QUEUE_SHARE, count)
                raise CallerQuotaExceeded(
                    f"caller {caller!r} holds {held} commands not yet finished, its share of "
                    f"the durable queue ({policy.queue_share:g} of {self.durable_queue_budget}"
                    f"; {lanes.wire_name(lane)} commands are refused from {math.floor(limit)}"
                    "); retry once some have finished",
                    reason=CALLER_QUEUE_SHARE,
                    retry_after_ms=retry_hint_ms(1.0, 3.0),
                )
            rate, burst, reason = policy.rate_per_s, policy.burst, CALLER_RATE
            key: object = caller
        else:
            rate, burst = policy.critical_rate_per_s, policy.critical_burst
            reason, key = CALLER_CRITICAL_RATE, (caller, lanes.CRITICAL)
        wait_s = self._buckets.take(key, rate, burst, count)
        if wait_s:
            self.refusals.count(reason, count)
            wait_ms = max(1, math.ceil(wait_s * 1000))
            what = "critical " if lane == lanes.CRITICAL else ""
            raise CallerQuotaExceeded(
                f"caller {caller!r} is over its {what}send rate ({rate:g} commands/s, burst "
                f"{burst:g}); retry in {wait_ms} ms",
                reason=reason,
                retry_after_ms=wait_ms,
            )

    def check_batch(self, caller: str, count: int) -> None:
        """Refuse a whole SendCommands call of `count` items at once, before they are
        parsed and checked one by one, unless `caller`'s send rate could pay for all of
        them now: a caller flooding batches is refused for the price of one check, not
        one per item, and a batch is taken whole or told how long to wait for room.
        Refused whole too while the caller holds its whole share of the durable queue.
        Takes nothing (each item still takes its own with `check_send`). Critical items
        count too: send an unlock with SendCommand, which has the critical bucket."""
        policy = self.policy(caller)
        held = self._pending_of(caller)
        share = policy.queue_share * self.durable_queue_budget
        if held >= share * _DEEPEST_QUEUE_BUDGET:
            self.refusals.count(CALLER_QUEUE_SHARE, count)
            raise CallerQuotaExceeded(
                f"caller {caller!r} holds {held} commands not yet finished, its whole share "
                f"of the durable queue ({policy.queue_share:g} of {self.durable_queue_budget}); "
                "retry once some have finished",
                reason=CALLER_QUEUE_SHARE,
                retry_after_ms=retry_hint_ms(1.0, 3.0),
            )
        wait_s = self._buckets.wait_s(caller, policy.rate_per_s, policy.burst, count)
        if wait_s:
            self.refusals.count(CALLER_RATE, count)
            wait_ms = max(1, math.ceil(wait_s * 1000))
            raise CallerQuotaExceeded(
                f"caller {caller!r} is over its send rate ({policy.rate_per_s:g} commands/s, "
                f"burst {policy.burst:g}): no room for a batch of {count}; retry in {wait_ms} ms",
                reason=CALLER_RATE,
                retry_after_ms=wait_ms,
            )

    # -- watching ----------------------------------------------------------------------------

    def watching(self, caller: str) -> _Watch:
        """`with limits.watching(caller): ...` around one WatchCommands stream; entering
        raises `CallerQuotaExceeded` past the caller's cap."""
        return _Watch(self, caller)

    def open_watch(self, caller: str) -> None:
        """Count one more open watch of `caller`, or raise past its cap. Pair with
        `close_watch` (or use `watching`)."""
        open_now = self._watches.get(caller, 0)
        cap = self.policy(caller).max_watches
        if open_now >= cap:
            self.refusals.count(WATCH_CAP)
            raise CallerQuotaExceeded(
                f"caller {caller!r} has {open_now} WatchCommands streams open, its most; "
                "close one, or watch more vehicles and commands in one stream",
                reason=WATCH_CAP,
                retry_after_ms=retry_hint_ms(1.0, 3.0),
            )
        self._watches[caller] = open_now + 1

    def close_watch(self, caller: str) -> None:
        left = self._watches.get(caller, 0) - 1
        if left > 0:
            self._watches[caller] = left
        else:
            self._watches.pop(caller, None)

    def watches(self, caller: str) -> int:
        """Open watches of `caller`."""
        return self._watches.get(caller, 0)

    @property
    def watches_by_caller(self) -> dict[str, int]:
        """Open watches by caller (a copy, for metrics)."""
        return dict(self._watches)
