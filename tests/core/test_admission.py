"""Admission: the Gradient2 limit, lane shares and borrowing, CoDel queues, quotas, leaks.

Time is a fake clock the tests move by whole milliseconds; only one test (the stalled
queue shed by the internal timer) runs on the real clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import time
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import lanes
from broker.core.admission import (
    RETRY_AFTER_MAX_MS,
    RETRY_AFTER_MIN_MS,
    Admission,
    Gradient2Limit,
    Overloaded,
    Ticket,
    VehicleQuotaExceeded,
)
from broker.core.errors import QuotaExceeded, Unavailable
from broker.core.lanes import BULK, CRITICAL, INTERACTIVE
from broker.core.quotas import Refusals

# With a fixed limit of 10: 1 slot reserved for critical, a pool of 9 for the other lanes,
# of which interactive's share is 6 and bulk's 3; bulk borrows only while 7 are in use.
LIMIT = 10
POOL = 9
BULK_CEILING = 7


class FakeClock:
    def __init__(self) -> None:
        self.ms = 0

    def __call__(self) -> float:
        return self.ms / 1000


def fixed(limit: int) -> Gradient2Limit:
    return Gradient2Limit(initial_limit=limit, min_limit=limit, max_limit=limit)


def make(clock: FakeClock, **kwargs: Any) -> Admission:
    return Admission(fixed(LIMIT), clock=clock, rng=random.Random(7), **kwargs)


async def settle() -> None:
    """Let every task woken by a grant or a shed run to its next await."""
    for _ in range(5):
        await asyncio.sleep(0)


async def admit_now(admission: Admission, lane: int, count: int) -> list[Ticket]:
    tasks = [asyncio.create_task(admission.acquire(lane)) for _ in range(count)]
    await settle()
    assert all(task.done() for task in tasks), "expected immediate admission"
    return [task.result() for task in tasks]


async def enqueue(admission: Admission, lane: int, count: int) -> list[asyncio.Task[Ticket]]:
    tasks = [asyncio.create_task(admission.acquire(lane)) for _ in range(count)]
    await settle()
    assert not any(task.done() for task in tasks), "expected to wait"
    return tasks


def assert_counts_add_up(admission: Admission) -> None:
    queued = admission.queued
    for lane in lanes.BY_VALUE:
        assert admission.offered[lane] == (
            admission.admitted[lane]
            + admission.shed[lane]
            + admission.cancelled[lane]
            + queued[lane]
        ), lanes.name(lane)


# -- Gradient2Limit -------------------------------------------------------------------------


def test_limit_shrinks_when_service_time_rises_and_recovers_when_it_falls() -> None:
    limit = Gradient2Limit(initial_limit=50, min_limit=8, max_limit=200)
    for _ in range(50):
        limit.update(0.010, limit.limit)
    grown = limit.limit
    assert grown > 80  # no queuing: +queue_size * smoothing per window

    for _ in range(20):
        limit.update(0.040, limit.limit)
    shrunk = limit.limit
    assert 8 <= shrunk < grown / 2
    assert limit.long_rtt_s < 0.015  # the baseline barely followed the spike

    for _ in range(50):
        limit.update(0.010, limit.limit)
    assert limit.limit > shrunk + 30


def test_limit_baseline_recovers_fast_after_a_long_overload() -> None:
    limit = Gradient2Limit(max_limit=10_000)
    for _ in range(3000):
        limit.update(0.050, limit.limit)
    assert limit.long_rtt_s > 0.045  # a long overload became the baseline
    for _ in range(40):
        limit.update(0.010, limit.limit)
    # The exponential average alone would need hundreds of windows to come down.
    assert limit.long_rtt_s < 0.02


def test_limit_respects_min_and_max_and_ignores_an_idle_system() -> None:
    limit = Gradient2Limit(initial_limit=50, min_limit=10, max_limit=100)
    for _ in range(20):
        limit.update(0.010, limit.limit)
    for _ in range(60):
        limit.update(0.100, limit.limit)
    assert limit.limit == 10

    for _ in range(300):
        limit.update(0.010, limit.limit)
    assert limit.limit == 100

    for _ in range(50):  # app-limited: under half the limit in use, nothing is learned
        limit.update(1.0, in_flight=10)
    assert limit.limit == 100


def test_limit_updates_once_per_sample_window() -> None:
    limit = Gradient2Limit(initial_limit=20, window_s=0.1, window_samples=10)
    for _ in range(9):
        limit.observe(0.010, 20, now_s=0.0)
    limit.observe(0.00001, 20, now_s=0.0)  # below timer resolution: not a sample
    assert limit.last_rtt_s == 0.0
    limit.observe(0.020, 20, now_s=0.0)
    assert limit.last_rtt_s == pytest.approx(0.011)  # the window's average

    for _ in range(10):
        limit.observe(0.030, 20, now_s=0.05)
    assert limit.last_rtt_s == pytest.approx(0.011)  # the window is still open
    limit.observe(0.030, 20, now_s=0.11)
    assert limit.last_rtt_s == pytest.approx(0.030)


async def test_admission_feeds_service_times_to_the_limit() -> None:
    clock = FakeClock()
    limiter = Gradient2Limit(initial_limit=20, min_limit=4, max_limit=100, window_s=0)
    admission = Admission(limiter, clock=clock)

    async def round_trip(service_ms: int) -> None:
        tickets = await admit_now(admission, INTERACTIVE, admission.limit // 2 + 1)
        clock.ms += service_ms
        for ticket in tickets:
            ticket.release()

    for _ in range(40):
        await round_trip(10)
    grown = admission.limit
    assert grown > 20
    for _ in range(40):
        await round_trip(50)
    assert admission.limit < grown / 2
    assert admission.in_flight_total == 0


# -- lanes: critical, quota, shares and borrowing ----------------------------------------------


async def test_critical_is_never_refused_while_the_other_lanes_shed() -> None:
    clock = FakeClock()
    admission = make(clock, critical_burst=100)
    await admit_now(admission, INTERACTIVE, POOL)
    waiting = await enqueue(admission, INTERACTIVE, 5) + await enqueue(admission, BULK, 5)
    for clock.ms in (10, 200):  # above target, then for more than a whole interval
        admission.poll()
    await settle()
    assert all(isinstance(task.exception(), Overloaded) for task in waiting)

    tickets = [await admission.acquire(CRITICAL, f"car-{i}") for i in range(30)]
    tickets += [await admission.acquire(CRITICAL) for _ in range(30)]
    assert admission.in_flight[CRITICAL] == 60 > admission.limit
    assert admission.shed[CRITICAL] == 0
    assert all(ticket.queue_delay_s == 0 for ticket in tickets)


async def test_critical_quota_is_per_vehicle_and_refills() -> None:
    clock = FakeClock()
    admission = make(clock, critical_per_minute=6, critical_burst=2)
    await admission.acquire(CRITICAL, "car-a")
    await admission.acquire(CRITICAL, "car-a")
    with pytest.raises(VehicleQuotaExceeded) as refused:
        await admission.acquire(CRITICAL, "car-a")
    error = refused.value
    assert isinstance(error, QuotaExceeded)
    assert error.code == "RESOURCE_EXHAUSTED"
    assert 9_990 <= error.retry_after_ms <= 10_010  # 6 a minute: one token per 10 s
    assert admission.quota_refused[CRITICAL] == 1
    assert admission.offered[CRITICAL] == admission.admitted[CRITICAL] == 2

    await admission.acquire(CRITICAL, "car-b")  # another car is unaffected
    clock.ms += 10_000
    await admission.acquire(CRITICAL, "car-a")


def test_quota_buckets_of_quiet_cars_are_forgotten() -> None:
    clock = FakeClock()
    admission = make(clock, critical_per_minute=10, critical_burst=10)
    for i in range(1000):
        admission.take_critical_quota(f"car-{i}")
    clock.ms += 60_000  # a full refill: those buckets hold nothing a new one would not
    admission.take_critical_quota("car-new")
    assert len(admission._buckets) == 1


async def test_critical_quota_is_per_caller_and_car() -> None:
    """A rogue caller spending a car's quota leaves that car's owner its own."""
    clock = FakeClock()
    refusals = Refusals()
    admission = make(clock, critical_per_minute=6, critical_burst=2, refusals=refusals)
    for _ in range(2):
        await admission.acquire(CRITICAL, "car-a", "service:rogue")
    with pytest.raises(VehicleQuotaExceeded) as refused:
        await admission.acquire(CRITICAL, "car-a", "service:rogue")
    assert "'service:rogue'" in refused.value.message and "'car-a'" in refused.value.message
    async with admission.slot(CRITICAL, vehicle_id="car-a", caller="service:fleet-app"):
        pass
    admission.take_critical_quota("car-a", "service:fleet-app")
    with pytest.raises(VehicleQuotaExceeded):
        admission.take_critical_quota("car-a", "service:fleet-app")
    assert refusals["vehicle_critical_quota"] == 2 == admission.quota_refused[CRITICAL]


def test_a_deduplicated_repeat_gives_its_critical_token_back() -> None:
    clock = FakeClock()
    admission = make(clock, critical_per_minute=6, critical_burst=2)
    for _ in range(10):  # ten repeats the store answers as deduplicated
        admission.take_critical_quota("car-a", "service:app")
        admission.refund_critical_quota("car-a", "service:app")
    admission.take_critical_quota("car-a", "service:app")
    admission.take_critical_quota("car-a", "service:app")
    with pytest.raises(VehicleQuotaExceeded):
        admission.take_critical_quota("car-a", "service:app")
    admission.refund_critical_quota("car-b", "service:app")  # nothing taken: nothing happens
    admission.take_critical_quota("car-b", "service:app")


def test_quota_buckets_are_bounded_under_a_flood_of_distinct_pairs() -> None:
    clock = FakeClock()
    admission = make(clock, critical_per_minute=10, critical_burst=10, max_quota_buckets=500)
    for i in range(5000):
        admission.take_critical_quota(f"car-{i}", f"service:{i % 7}")
    assert admission.quota_buckets == 500


async def test_interactive_borrows_idle_bulk_share_and_bulk_reclaims_it() -> None:
    admission = make(FakeClock())
    interactive = await admit_now(admission, INTERACTIVE, POOL)  # share 6 + 3 borrowed
    (late_interactive,) = await enqueue(admission, INTERACTIVE, 1)
    (bulk,) = await enqueue(admission, BULK, 1)

    interactive[0].release()
    await settle()
    assert bulk.done() and not late_interactive.done()  # bulk's own share comes first
    interactive[1].release()
    await settle()
    assert late_interactive.done()


async def test_bulk_borrows_idle_interactive_share_but_leaves_headroom() -> None:
    admission = make(FakeClock())
    bulk = await admit_now(admission, BULK, BULK_CEILING)  # share 3 + 4 borrowed
    (late_bulk,) = await enqueue(admission, BULK, 1)
    await admit_now(admission, INTERACTIVE, POOL - BULK_CEILING)  # the headroom
    (interactive,) = await enqueue(admission, INTERACTIVE, 1)

    bulk[0].release()
    await settle()
    assert interactive.done() and not late_bulk.done()


async def test_bulk_is_shed_before_interactive_under_pressure() -> None:
    # Capacity: 9 slots of 9 ms work, one unit a millisecond. Offered: 1.5 a millisecond.
    clock = FakeClock()
    admission = make(clock)
    holding: deque[tuple[int, Ticket]] = deque()
    interactive_delays: list[float] = []
    bulk_queue_peak = 0

    async def arrive(lane: int) -> None:
        try:
            ticket = await admission.acquire(lane)
        except Overloaded:
            return
        if lane == INTERACTIVE:
            interactive_delays.append(ticket.queue_delay_s)
        holding.append((clock.ms + 9, ticket))

    tasks = []
    for ms in range(1500):
        clock.ms = ms
        while holding and holding[0][0] <= ms:
            holding.popleft()[1].release()
        tasks.append(asyncio.create_task(arrive(BULK)))
        if ms % 2 == 0:
            tasks.append(asyncio.create_task(arrive(INTERACTIVE)))
        await settle()
        bulk_queue_peak = max(bulk_queue_peak, admission.queued[BULK])

    assert admission.shed[INTERACTIVE] == 0
    assert max(interactive_delays) < admission.codel_target_s
    assert admission.shed[BULK] > 300
    assert admission.admitted[BULK] > 500  # bulk still gets what interactive leaves
    assert bulk_queue_peak < 150  # a delay target bounds the queue without a length cap
    assert_counts_add_up(admission)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- CoDel -------------------------------------------------------------------------------------


async def test_codel_absorbs_a_short_burst_without_shedding() -> None:
    clock = FakeClock()
    admission = make(clock)
    held = await admit_now(admission, INTERACTIVE, POOL)
    burst = await enqueue(admission, INTERACTIVE, 2 * POOL)
    clock.ms = 60  # far above the 5 ms target, but not for a whole 100 ms interval
    admission.poll()
    for step, served in ((60, burst[:POOL]), (62, burst[POOL:])):
        clock.ms = step
        for ticket in held:
            ticket.release()
        await settle()
        held = [task.result() for task in served]
    assert admission.shed[INTERACTIVE] == 0
    assert admission.admitted[INTERACTIVE] == 3 * POOL


async def test_codel_sheds_only_after_a_full_interval_above_target() -> None:
    clock = FakeClock()
    admission = make(clock)
    await admit_now(admission, INTERACTIVE, POOL)  # capacity stalls: nothing completes
    tasks = []
    for ms in range(130):
        clock.ms = ms
        tasks.append(asyncio.create_task(admission.acquire(INTERACTIVE)))
        await settle()
        if ms == 104:
            assert admission.shed[INTERACTIVE] == 0
    # Above target from 5 ms on; a full interval later the head goes.
    shed = [task.exception() for task in tasks if task.done()]
    assert shed and all(isinstance(error, Overloaded) for error in shed)
    for error in shed:
        assert isinstance(error, Overloaded)
        assert error.code == "UNAVAILABLE"
        assert RETRY_AFTER_MIN_MS <= error.retry_after_ms <= RETRY_AFTER_MAX_MS
    # While shedding, nobody waits longer than the interval.
    assert admission.queue_delay_s[INTERACTIVE] <= admission.codel_interval_s + 0.002
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert_counts_add_up(admission)


async def test_codel_drains_a_standing_queue_at_the_control_law_pace() -> None:
    # Service and arrivals both one a millisecond behind a backlog of 20: a standing
    # 20 ms queue that only shedding can shorten.
    clock = FakeClock()
    admission = make(clock)
    held = deque(await admit_now(admission, INTERACTIVE, POOL))
    shed_at: list[int] = []

    async def arrive() -> None:
        try:
            held.append(await admission.acquire(INTERACTIVE))
        except Overloaded:
            shed_at.append(clock.ms)

    tasks = [asyncio.create_task(arrive()) for _ in range(20)]
    await settle()
    for ms in range(1, 1200):
        clock.ms = ms
        held.popleft().release()
        tasks.append(asyncio.create_task(arrive()))
        await settle()

    assert 105 <= shed_at[0] <= 107
    gaps = [later - earlier for earlier, later in itertools.pairwise(shed_at)]
    for count, gap in enumerate(gaps, start=1):
        assert abs(gap - 100 / math.sqrt(count)) <= 2, (count, gaps)
    assert 14 <= len(shed_at) <= 17  # the backlog shrank to about the 5 ms target
    assert admission.queue_delay_s[INTERACTIVE] <= admission.codel_target_s + 0.001
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_stalled_queue_is_shed_by_the_timer_on_the_real_clock() -> None:
    admission = Admission(fixed(LIMIT))
    held = await admit_now(admission, INTERACTIVE, POOL)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        await asyncio.wait_for(admission.acquire(INTERACTIVE), timeout=5)
    waited = time.monotonic() - started
    assert 0.1 <= waited < 1.0  # target + interval, not the caller's deadline
    for ticket in held:
        ticket.release()
    admission.close()


# -- leaks and accounting ----------------------------------------------------------------------


async def test_cancelled_waiters_leave_no_leak() -> None:
    admission = make(FakeClock())
    held = await admit_now(admission, BULK, BULK_CEILING)
    waiting = await enqueue(admission, BULK, 5)
    waiting[0].cancel()
    waiting[2].cancel()
    await settle()
    assert admission.queued[BULK] == 3
    assert admission.cancelled[BULK] == 2

    for ticket in held:
        ticket.release()
    await settle()
    granted = [task.result() for task in waiting if not task.cancelled()]
    assert len(granted) == 3
    for ticket in granted:
        ticket.release()
    assert admission.in_flight_total == 0
    assert admission.queued[BULK] == 0
    assert_counts_add_up(admission)


async def test_a_waiter_cancelled_just_after_its_grant_gives_the_slot_back() -> None:
    admission = make(FakeClock())
    held = await admit_now(admission, INTERACTIVE, POOL)
    (waiter,) = await enqueue(admission, INTERACTIVE, 1)
    held[0].release()  # the slot is granted to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs again
    await settle()
    assert waiter.cancelled()
    assert admission.in_flight[INTERACTIVE] == POOL - 1
    for ticket in held[1:]:
        ticket.release()
    assert admission.in_flight_total == 0


async def test_slot_is_released_on_error_and_on_cancellation_and_release_is_idempotent() -> None:
    admission = make(FakeClock())
    with pytest.raises(RuntimeError):
        async with admission.slot(INTERACTIVE):
            raise RuntimeError("work failed")
    assert admission.in_flight_total == 0

    started = asyncio.Event()

    async def work() -> None:
        async with admission.slot(BULK):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(work())
    await started.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert admission.in_flight_total == 0

    ticket = await admission.acquire(CRITICAL)
    ticket.release()
    ticket.release()
    assert ticket.released
    assert admission.in_flight[CRITICAL] == 0


async def test_close_refuses_waiters_and_later_work() -> None:
    admission = make(FakeClock())
    held = await admit_now(admission, INTERACTIVE, POOL)
    (waiter,) = await enqueue(admission, INTERACTIVE, 1)
    admission.close()
    await settle()
    assert isinstance(waiter.exception(), Unavailable)
    with pytest.raises(Unavailable):
        await admission.acquire(CRITICAL)
    for ticket in held:
        ticket.release()
    assert admission.in_flight_total == 0


OPS = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "release", "advance", "cancel", "release+cancel"]),
        st.sampled_from(sorted(lanes.BY_VALUE)),
        st.integers(0, 60),
    ),
    max_size=80,
)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_every_offer_is_admitted_shed_or_cancelled_and_no_slot_leaks(
    ops: list[tuple[str, int, int]],
) -> None:
    asyncio.run(_run_ops(ops))


async def _run_ops(ops: list[tuple[str, int, int]]) -> None:
    clock = FakeClock()
    admission = Admission(fixed(4), clock=clock, rng=random.Random(0), critical_burst=2)
    held: list[Ticket] = []
    tasks: list[asyncio.Task[None]] = []

    async def arrive(lane: int, n: int) -> None:
        with contextlib.suppress(Overloaded, VehicleQuotaExceeded):
            held.append(await admission.acquire(lane, f"car-{n % 3}"))

    def cancel_one(n: int) -> None:
        pending = [task for task in tasks if not task.done()]
        if pending:
            pending[n % len(pending)].cancel()

    for kind, lane, n in ops:
        if kind == "arrive":
            tasks.append(asyncio.create_task(arrive(lane, n)))
        elif kind.startswith("release") and held:
            held.pop(n % len(held)).release()
        elif kind == "advance":
            clock.ms += n * 5
        if kind.endswith("cancel"):
            cancel_one(n)
        await settle()
        assert admission.in_flight_total == len(held)
        assert_counts_add_up(admission)

    for _ in range(1000):
        if not held and all(task.done() for task in tasks):
            break
        while held:
            held.pop().release()
        clock.ms += 1
        admission.poll()
        await settle()
    assert admission.in_flight_total == 0
    assert admission.queued == dict.fromkeys(lanes.BY_VALUE, 0)
    assert_counts_add_up(admission)
    admission.close()


@pytest.mark.parametrize("limit", [1, 2, 3, 8])
async def test_every_lane_moves_even_at_a_tiny_limit(limit: int) -> None:
    admission = Admission(fixed(limit), clock=FakeClock())
    for lane in lanes.BY_VALUE:
        async with admission.slot(lane):
            pass
    assert admission.admitted == dict.fromkeys(lanes.BY_VALUE, 1)
