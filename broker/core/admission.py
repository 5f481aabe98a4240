"""Adaptive admission of work: a gradient concurrency limit, lane shares, CoDel queues.

The unit admitted is one piece of *work* -- a command enqueue (one slot per SendCommand
or SendCommands), a GetCommand / GetVehicleState (interactive) or a ListCommands (bulk)
-- never a stream: a vehicle stream is open for days and holds no slot. Telemetry has its
own budgets (broker/core/telemetry.py). The lanes and their shares come from the lane
table (broker/core/lanes.py).

* `Gradient2Limit` estimates how much work may be in flight at once. It is Netflix
  concurrency-limits' Gradient2: the limit shrinks while service time sits above its
  long-run baseline and grows back while it does not.
* `Admission` splits that limit between the lanes. Critical work has a reserved share and
  is never refused by policy (it may run above the limit); only a token bucket per
  (caller, vehicle) refuses it, as the caller's own quota: one caller spending a car's
  critical quota leaves that car's other callers theirs. A repeat the store answers as
  deduplicated gives its token back (`refund_critical_quota`). Interactive and bulk work
  each have a share and may borrow what the other leaves idle; bulk borrows only below a
  ceiling and is served after interactive, so under pressure bulk yields first.
* Work that finds no room waits in a FIFO queue per lane governed by a delay target, not
  a length cap (CoDel, RFC 8289): once the head of a queue has waited longer than
  `target` for a whole `interval`, waiters are shed from the head at the control-law pace
  (`interval / sqrt(count)`). RPC callers do not slow down after one refusal the way a
  TCP flow does, so while a queue is shedding no waiter is kept longer than `interval`
  either; the queue cannot grow without bound under sustained overload.

Refusals are `BrokerError`s the servicer maps in one place: `Overloaded` (UNAVAILABLE with
`retry_after_ms` for the `grpc-retry-pushback-ms` trailer) for server-wide overload,
`VehicleQuotaExceeded` (RESOURCE_EXHAUSTED) for a (caller, car) critical quota. Nothing
here knows about gRPC. Counters and gauges are plain attributes, read at metrics scrape
time; every refusal is also counted in the shared `Refusals` (broker/core/quotas.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from broker.core import lanes
from broker.core.errors import QuotaExceeded, Unavailable
from broker.core.lanes import CRITICAL, Lane
from broker.core.quotas import (
    OVERLOADED,
    SHUTTING_DOWN,
    VEHICLE_CRITICAL_QUOTA,
    Refusals,
    TokenBuckets,
)

logger = logging.getLogger(__name__)

#: Shorter service times than this are timer noise, not a measurement (as Netflix's
#: WindowedLimit `minRttThreshold`).
MIN_RTT_S = 100e-6
#: A shed waiter is told to come back no sooner than this and no later than the maximum.
RETRY_AFTER_MIN_MS = 50
RETRY_AFTER_MAX_MS = 5000
#: Log that shedding started only after this long without shedding.
SHED_LOG_QUIET_S = 10.0
_MIN_TIMER_S = 0.001
#: critical-quota buckets held at most (one per (caller, car) that sent critical work in
#: the last refill time, 60 s by default; ~200 bytes each). Past it the least recently
#: used is dropped: with a caller's critical rate (broker/core/quotas.py, 100/s by
#: default) it takes 1,000 s to push one out, long after it would have refilled anyway
MAX_QUOTA_BUCKETS = 100_000


class Overloaded(Unavailable):
    """The broker is overloaded and shed this work; retry after `retry_after_ms`."""

    retry_after_ms: int

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)


class VehicleQuotaExceeded(QuotaExceeded):
    """A caller has used its critical-command quota for a car; the next token is
    `retry_after_ms` away."""

    retry_after_ms: int

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)


class Gradient2Limit:
    """Netflix Gradient2: a concurrency limit driven by service time against its baseline.

    Each update (one sample window) computes::

        gradient = max(0.5, min(1.0, rtt_tolerance * long_rtt / short_rtt))
        new      = limit * gradient + queue_size
        limit    = clamp(limit * (1 - smoothing) + new * smoothing, min_limit, max_limit)

    `short_rtt` is the window's average service time; `long_rtt` an exponential average
    of it over `long_window` windows (a plain average for the first 10). When `long_rtt`
    is more than twice `short_rtt` (service time has fallen back after a long overload),
    the baseline decays 5% per window so the limit recovers quickly. While less than half
    the limit is in use the limit does not move: an idle system says nothing about its
    capacity. Time is passed in, so the algorithm is testable without sleeping.
    """

    def __init__(
        self,
        *,
        initial_limit: int = 64,
        min_limit: int = 8,
        max_limit: int = 512,
        smoothing: float = 0.2,
        rtt_tolerance: float = 1.5,
        long_window: int = 600,
        queue_size: int = 4,
        window_s: float = 0.1,
        window_samples: int = 10,
    ) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, got {min_limit}, {max_limit}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if rtt_tolerance < 1:
            raise ValueError(f"rtt_tolerance must be >= 1, got {rtt_tolerance}")
        if long_window < 1 or queue_size < 0 or window_s < 0 or window_samples < 1:
            raise ValueError("long_window and window_samples >= 1; queue_size, window_s >= 0")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.smoothing = smoothing
        self.rtt_tolerance = rtt_tolerance
        self.queue_size = queue_size
        self.window_s = window_s
        self.window_samples = window_samples
        #: the estimate itself; `limit` is its integer part
        self.estimated_limit = float(min(max_limit, max(min_limit, initial_limit)))
        #: baseline service time (long-run average) and the last window's average
        self.long_rtt_s = 0.0
        self.last_rtt_s = 0.0
        self._long_factor = 2.0 / (long_window + 1)
        self._long_warmup = 10
        self._long_samples = 0
        self._window_end_s = -math.inf
        self._window_sum_s = 0.0
        self._window_count = 0
        self._window_max_in_flight = 0

    @property
    def limit(self) -> int:
        return int(self.estimated_limit)

    def observe(self, rtt_s: float, in_flight: int, now_s: float) -> None:
        """Add one service-time sample; update the limit when the sample window closes.

        A window closes once `window_s` has passed and it holds `window_samples` samples;
        its average service time and its peak in-flight count feed `update`.
        """
        if rtt_s < MIN_RTT_S:
            return
        self._window_sum_s += rtt_s
        self._window_count += 1
        self._window_max_in_flight = max(self._window_max_in_flight, in_flight)
        if now_s >= self._window_end_s and self._window_count >= self.window_samples:
            self.update(self._window_sum_s / self._window_count, self._window_max_in_flight)
            self._window_sum_s = 0.0
            self._window_count = 0
            self._window_max_in_flight = 0
            self._window_end_s = now_s + self.window_s

    def update(self, rtt_s: float, in_flight: int) -> int:
        """Apply one window's average service time and peak in-flight; return the limit."""
        short = max(rtt_s, MIN_RTT_S)
        self.last_rtt_s = short
        if self._long_samples < self._long_warmup:
            self._long_samples += 1
            self.long_rtt_s += (short - self.long_rtt_s) / self._long_samples
        else:
            self.long_rtt_s += (short - self.long_rtt_s) * self._long_factor
        long = self.long_rtt_s
        if long / short > 2:
            self.long_rtt_s = long * 0.95
        if in_flight < self.estimated_limit / 2:
            return self.limit
        gradient = max(0.5, min(1.0, self.rtt_tolerance * long / short))
        target = self.estimated_limit * gradient + self.queue_size
        smoothed = self.estimated_limit * (1 - self.smoothing) + target * self.smoothing
        self.estimated_limit = min(self.max_limit, max(self.min_limit, smoothed))
        return self.limit


class Slot:
    """`async with admission.slot(lane):` (a class, not a generator: this is the hot path)."""

    __slots__ = ("_admission", "_caller", "_lane", "_ticket", "_vehicle_id")

    def __init__(
        self, admission: Admission, lane: int, vehicle_id: str | None, caller: str
    ) -> None:
        self._admission = admission
        self._lane = lane
        self._vehicle_id = vehicle_id
        self._caller = caller
        self._ticket: Ticket | None = None

    async def __aenter__(self) -> Ticket:
        self._ticket = await self._admission.acquire(self._lane, self._vehicle_id, self._caller)
        return self._ticket

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        assert self._ticket is not None
        # Work cut short by cancellation would read as fast work: keep it out of the limit.
        cancelled = kind is not None and issubclass(kind, asyncio.CancelledError)
        self._ticket.release(record=not cancelled)


class Ticket:
    """One admitted unit of work. `release()` it when the work is done (idempotent)."""

    __slots__ = ("_admission", "admitted_at", "in_flight_at_admit", "lane", "queue_delay_s")

    def __init__(
        self, admission: Admission, lane: int, admitted_at: float, queue_delay_s: float
    ) -> None:
        self._admission: Admission | None = admission
        self.lane = lane
        self.admitted_at = admitted_at
        self.queue_delay_s = queue_delay_s
        self.in_flight_at_admit = admission.in_flight_total

    @property
    def released(self) -> bool:
        return self._admission is None

    def release(self, *, record: bool = True) -> None:
        """Free the slot. `record=False` keeps the service time out of the limit (work
        cut short by cancellation would read as fast work)."""
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release(self, record)


@dataclass(slots=True, eq=False)
class _Waiter:
    lane: int
    enqueued_at: float
    future: asyncio.Future[Ticket]


@dataclass(slots=True)
class _CoDel:
    """RFC 8289 state of one queue."""

    first_above_at: float | None = None  # when a delay above target will have lasted `interval`
    dropping: bool = False
    count: int = 0
    last_count: int = 0
    drop_next: float = 0.0


@dataclass(slots=True)
class _Lane:
    waiters: deque[_Waiter] = field(default_factory=deque)
    codel: _CoDel = field(default_factory=_CoDel)


class Admission:
    """Admits work by lane under an adaptive limit; see the module docstring.

    Use `async with admission.slot(lane, vehicle_id=..., caller=...)` around one unit of
    work, or `ticket = await admission.acquire(...)` and `ticket.release()`. Both raise
    `Overloaded` when the work is shed and `VehicleQuotaExceeded` when the caller's
    critical quota for the car is spent.

    `clock` (seconds, monotonic) and `rng` are injectable so tests can drive time; an
    internal event-loop timer evaluates the queues when no work arrives or completes.
    Use it from the event loop only; it is not thread-safe.
    """

    def __init__(
        self,
        limiter: Gradient2Limit | None = None,
        *,
        lane_table: Sequence[Lane] = lanes.LANE_TABLE,
        codel_target_s: float = 0.005,
        codel_interval_s: float = 0.1,
        critical_per_minute: float = 10.0,
        critical_burst: int = 10,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        refusals: Refusals | None = None,
        max_quota_buckets: int = MAX_QUOTA_BUCKETS,
    ) -> None:
        if not all(0 <= lane.share <= 1 and 0 < lane.borrow_ceiling <= 1 for lane in lane_table):
            raise ValueError("lane shares must be in 0..1 and borrow ceilings in (0, 1]")
        queued_lanes = [lane for lane in lane_table if lane.queued]
        if not queued_lanes or abs(sum(lane.share for lane in queued_lanes) - 1) > 1e-9:
            raise ValueError("the queued lanes' shares must add up to 1 (of the pool)")
        if not 0 < codel_target_s < codel_interval_s:
            raise ValueError("need 0 < codel_target_s < codel_interval_s")
        if critical_per_minute <= 0 or critical_burst < 1:
            raise ValueError("critical_per_minute must be positive and critical_burst >= 1")
        #: the adaptive limit; `limiter.limit` is the current limit on in-flight work
        self.limiter = limiter if limiter is not None else Gradient2Limit()
        #: lanes that never wait (their share is reserved), and those that queue, in the
        #: order capacity is offered to them
        self.reserved_lanes = tuple(lane for lane in lane_table if not lane.queued)
        self.queued_lanes = tuple(queued_lanes)
        self._reserve_share = sum(lane.share for lane in self.reserved_lanes)
        names = {lane.value: lane.name for lane in lane_table}
        self.codel_target_s = codel_target_s
        self.codel_interval_s = codel_interval_s
        self.critical_burst = critical_burst
        self._critical_rate_per_s = critical_per_minute / 60
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        # Per-lane observable state, read by the metrics collector. For every lane:
        # offered == admitted + shed + cancelled + queued (quota refusals are not offered).
        self.in_flight: dict[int, int] = dict.fromkeys(names, 0)
        self.offered: dict[int, int] = dict.fromkeys(names, 0)
        self.admitted: dict[int, int] = dict.fromkeys(names, 0)
        self.shed: dict[int, int] = dict.fromkeys(names, 0)
        self.cancelled: dict[int, int] = dict.fromkeys(names, 0)
        self.quota_refused: dict[int, int] = dict.fromkeys(names, 0)
        #: how long the last unit admitted or shed in each lane had waited
        self.queue_delay_s: dict[int, float] = dict.fromkeys(names, 0.0)
        self._lanes = {lane.value: _Lane() for lane in self.queued_lanes}
        self._names = names
        #: every refusal, by reason (shared with the other parts that refuse)
        self.refusals = refusals if refusals is not None else Refusals()
        # (caller, vehicle_id) -> its critical bucket; bounded (MAX_QUOTA_BUCKETS)
        self._buckets = TokenBuckets(max_buckets=max_quota_buckets, clock=clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf
        self._last_shed_at = -math.inf
        self._closed = False

    # -- observable state ------------------------------------------------------------------

    @property
    def limit(self) -> int:
        return self.limiter.limit

    @property
    def in_flight_total(self) -> int:
        return sum(self.in_flight.values())

    @property
    def queued(self) -> dict[int, int]:
        counts = dict.fromkeys(self._names, 0)
        for lane, state in self._lanes.items():
            counts[lane] = sum(1 for waiter in state.waiters if not waiter.future.done())
        return counts

    # -- admitting -------------------------------------------------------------------------

    async def acquire(self, lane: int, vehicle_id: str | None = None, caller: str = "") -> Ticket:
        """Admit one unit of work in `lane`, waiting in the lane's queue if there is no room.

        Critical work never waits and is never refused by the limit; with a `vehicle_id`
        it first takes a token from `caller`'s critical quota for that car. `vehicle_id`
        and `caller` are not used for the other lanes. Raises `Overloaded` or
        `VehicleQuotaExceeded`.
        """
        if lane not in self._names:
            raise ValueError(f"unknown lane {lane}")
        if self._closed:
            self.refusals.count(SHUTTING_DOWN)
            raise Unavailable("the broker is shutting down")
        if lane == CRITICAL and vehicle_id is not None:
            self.take_critical_quota(vehicle_id, caller)
        now = self._clock()
        self.offered[lane] += 1
        if lane not in self._lanes:  # a reserved lane: never waits
            return self._admit(lane, now, now)
        self._evaluate_queues(now)
        state = self._lanes[lane]
        if self._head(state) is None and self._has_room(lane):
            return self._admit(lane, now, now)
        self._loop = asyncio.get_running_loop()
        waiter = _Waiter(lane, now, self._loop.create_future())
        state.waiters.append(waiter)
        self._dispatch(now)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled():
                if future.exception() is None:  # granted, but the caller is gone
                    future.result().release(record=False)
            else:  # still queued: leave no trace in the queue
                future.cancel()
                self.cancelled[lane] += 1
                if waiter in state.waiters:
                    state.waiters.remove(waiter)
            raise

    def slot(self, lane: int, vehicle_id: str | None = None, caller: str = "") -> Slot:
        """`acquire` as a context manager: the slot is released however the block exits."""
        return Slot(self, lane, vehicle_id, caller)

    def take_critical_quota(self, vehicle_id: str, caller: str = "") -> None:
        """Take one token from `caller`'s critical bucket for `vehicle_id`, or raise
        VehicleQuotaExceeded.

        `acquire(CRITICAL, vehicle_id, caller)` calls this; call it directly per critical
        item of a batch admitted as one unit of work. Give the token back with
        `refund_critical_quota` when the store answers the command as deduplicated.
        """
        wait_s = self._buckets.take(
            (caller, vehicle_id), self._critical_rate_per_s, self.critical_burst
        )
        if wait_s:
            self.quota_refused[CRITICAL] += 1
            self.refusals.count(VEHICLE_CRITICAL_QUOTA)
            wait_ms = math.ceil(wait_s * 1000)
            who = f"{caller!r} has" if caller else "callers have"
            raise VehicleQuotaExceeded(
                f"{who} used the critical-command quota for vehicle {vehicle_id!r} "
                f"({self.critical_burst} at once, {self._critical_rate_per_s * 60:g} a minute); "
                f"retry in {wait_ms} ms",
                retry_after_ms=wait_ms,
            )

    def refund_critical_quota(self, vehicle_id: str, caller: str = "") -> None:
        """Give back the token `take_critical_quota(vehicle_id, caller)` took, for a
        command that cost nothing: the store answered it as a deduplicated repeat."""
        self._buckets.give_back((caller, vehicle_id), self.critical_burst)

    @property
    def quota_buckets(self) -> int:
        """Critical-quota buckets held (bounded by `max_quota_buckets`)."""
        return len(self._buckets)

    def poll(self) -> None:
        """Evaluate the queues now: shed what CoDel says to, admit what fits.

        The internal timer calls this; tests with an injected clock may call it directly.
        """
        self._dispatch(self._clock())

    def close(self) -> None:
        """Refuse every queued waiter and any later acquire; stop the timer."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for lane, state in self._lanes.items():
            while (waiter := self._head(state)) is not None:
                state.waiters.popleft()
                self.shed[lane] += 1
                self.refusals.count(SHUTTING_DOWN)
                waiter.future.set_exception(Unavailable("the broker is shutting down"))

    # -- internals ---------------------------------------------------------------------------

    def _admit(self, lane: int, now: float, enqueued_at: float) -> Ticket:
        self.in_flight[lane] += 1
        self.admitted[lane] += 1
        self.queue_delay_s[lane] = now - enqueued_at
        return Ticket(self, lane, now, now - enqueued_at)

    def _release(self, ticket: Ticket, record: bool) -> None:
        now = self._clock()
        self.in_flight[ticket.lane] -= 1
        if record:
            self.limiter.observe(now - ticket.admitted_at, ticket.in_flight_at_admit, now)
        self._dispatch(now)

    def _partition(self) -> tuple[int, int, dict[int, int], dict[int, int]]:
        """(pool, used, share by queued lane, borrow ceiling by queued lane) under the
        current limit.

        The reserved lanes' share of the limit is held for them; their use above it eats
        the pool the queued lanes share. Each queued lane gets its share of the pool (in
        table order, each leaving at least one slot to every lane after it); the last
        takes what is left, so no lane is ever starved while the pool has two slots.
        """
        limit = self.limiter.limit
        in_flight = self.in_flight
        reserve = math.ceil(limit * self._reserve_share)
        pool = max(1, limit - reserve)
        reserved_use = sum(in_flight[lane.value] for lane in self.reserved_lanes)
        used = sum(in_flight[lane] for lane in self._lanes) + max(0, reserved_use - reserve)
        shares: dict[int, int] = {}
        ceilings: dict[int, int] = {}
        left = pool
        last = len(self.queued_lanes) - 1
        for index, lane in enumerate(self.queued_lanes):
            if index == last:
                share = left
            else:
                share = math.floor(pool * lane.share + 0.5)
                if pool > 1:
                    share = min(left - (last - index), share)
                share = max(0, share)
            shares[lane.value] = share
            left -= share
            ceilings[lane.value] = max(1, math.floor(pool * lane.borrow_ceiling))
        return pool, used, shares, ceilings

    def _has_room(self, lane: int, *, within_share_only: bool = False) -> bool:
        pool, used, shares, ceilings = self._partition()
        if used >= pool:
            return False
        within_share = self.in_flight[lane] < shares[lane]
        return within_share or (not within_share_only and used < ceilings[lane])

    def _next_lane(self) -> int | None:
        """The lane whose head waiter gets the next free slot: each lane's share first
        (interactive, then bulk), then borrowing (interactive, then bulk)."""
        for within_share_only in (True, False):
            for lane, state in self._lanes.items():
                if self._head(state) and self._has_room(lane, within_share_only=within_share_only):
                    return lane
        return None

    def _dispatch(self, now: float) -> None:
        if not any(state.waiters for state in self._lanes.values()):
            return  # nothing queued: nothing to admit, shed or time (acquire evaluates first)
        self._evaluate_queues(now)
        while (lane := self._next_lane()) is not None:
            waiter = self._lanes[lane].waiters.popleft()
            waiter.future.set_result(self._admit(lane, now, waiter.enqueued_at))
        self._arm_timer(now)

    @staticmethod
    def _head(state: _Lane) -> _Waiter | None:
        """The oldest live waiter; waiters whose caller has gone are dropped on the way."""
        waiters = state.waiters
        while waiters and waiters[0].future.done():
            waiters.popleft()
        return waiters[0] if waiters else None

    def _evaluate_queues(self, now: float) -> None:
        for lane in reversed(self._lanes):  # lowest first
            self._codel(lane, now)

    def _codel(self, lane: int, now: float) -> None:
        """RFC 8289 on the head of one queue, evaluated at any moment rather than only at a
        dequeue (a stalled store dequeues nothing, yet its waiters must be shed early).

        Evaluating twice at the same `now` changes nothing the second time, so the timer and
        the request path may both call this.
        """
        state = self._lanes[lane]
        codel = state.codel
        if self._ok_to_drop(state, now):
            if not codel.dropping:
                self._shed(state, now)
                codel.dropping = True
                # Back in dropping soon after leaving it: resume near the rate that worked.
                recent = now - codel.drop_next < 16 * self.codel_interval_s
                delta = codel.count - codel.last_count
                codel.count = delta if delta > 1 and recent else 1
                codel.last_count = codel.count
                codel.drop_next = self._control_law(now, codel.count)
            while now >= codel.drop_next and self._ok_to_drop(state, now):
                self._shed(state, now)
                codel.count += 1
                codel.drop_next = self._control_law(codel.drop_next, codel.count)
        else:
            codel.dropping = False
        if codel.dropping:
            # No caller backs off like a TCP flow: bound every wait while shedding.
            while (head := self._head(state)) and now - head.enqueued_at >= self.codel_interval_s:
                self._shed(state, now)
            codel.dropping = self._ok_to_drop(state, now)

    def _ok_to_drop(self, state: _Lane, now: float) -> bool:
        codel = state.codel
        head = self._head(state)
        if head is None or now - head.enqueued_at < self.codel_target_s:
            codel.first_above_at = None
            return False
        if codel.first_above_at is None:
            codel.first_above_at = now + self.codel_interval_s
            return False
        return now >= codel.first_above_at

    def _control_law(self, t: float, count: int) -> float:
        return t + self.codel_interval_s / math.sqrt(count)

    def _shed(self, state: _Lane, now: float) -> None:
        waiter = state.waiters.popleft()  # callers check the head is live first
        lane = waiter.lane
        waited_s = now - waiter.enqueued_at
        self.shed[lane] += 1
        self.refusals.count(OVERLOADED)
        self.queue_delay_s[lane] = waited_s
        retry_after_ms = self._retry_after_ms(waited_s)
        if now - self._last_shed_at >= SHED_LOG_QUIET_S:
            logger.warning(
                "admission: shedding %s work (waited %.0f ms, target %.0f ms, limit %d)",
                self._names[lane], waited_s * 1000, self.codel_target_s * 1000, self.limit,
            )  # fmt: skip
        self._last_shed_at = now
        waiter.future.set_exception(
            Overloaded(
                f"the broker is overloaded: {self._names[lane]} work waited "
                f"{waited_s * 1000:.0f} ms for capacity; retry in about {retry_after_ms} ms",
                retry_after_ms=retry_after_ms,
            )
        )

    def _retry_after_ms(self, waited_s: float) -> int:
        """When a shed caller should come back: the delay it saw plus the time the work now
        queued needs at the current rate (limit / service time), never under one interval;
        jittered +-50% so shed callers do not return together."""
        queued = sum(len(state.waiters) for state in self._lanes.values())
        drain_s = queued * self.limiter.long_rtt_s / max(1, self.limit)
        base_s = max(self.codel_interval_s, waited_s + drain_s)
        retry_ms = base_s * 1000 * self._rng.uniform(0.5, 1.5)
        return int(min(RETRY_AFTER_MAX_MS, max(RETRY_AFTER_MIN_MS, retry_ms)))

    def _next_decision_at(self) -> float:
        """The earliest moment a queue's CoDel state may change with no other event."""
        due = math.inf
        for state in self._lanes.values():
            head = self._head(state)
            if head is None:
                continue
            codel = state.codel
            if codel.dropping:
                due = min(due, codel.drop_next, head.enqueued_at + self.codel_interval_s)
            elif codel.first_above_at is not None:
                due = min(due, codel.first_above_at)
            else:
                due = min(due, head.enqueued_at + self.codel_target_s)
        return due

    def _arm_timer(self, now: float) -> None:
        due = self._next_decision_at()
        if self._loop is None or self._closed or due == math.inf:
            return
        if self._timer is not None:
            if self._timer_due <= due:
                return  # fires early enough; it re-arms itself
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._loop.call_later(max(_MIN_TIMER_S, due - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = math.inf
        self.poll()
