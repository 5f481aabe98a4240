"""Telemetry verbosity guard: budgets, the level ladder, coalescing, policies, accounting.

Cars are simulated on a virtual clock: each sends batches at its own rate (slowed by the
policy's interval when it obeys, as the vehicle SDK does), and every admit is followed by
`policy_update`, as the broker's stream reader does.
"""

from __future__ import annotations

import heapq
import itertools
import random
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.telemetry import (
    MAX_READ_PAUSE_S,
    Level,
    TelemetryGuard,
    TelemetryPolicyValues,
    Verdict,
)
from broker.v1 import types_pb2 as t
from broker.v1 import vehicle_link_pb2 as link

CAR_MSGS = 10.0
CAR_BYTES = 10_000.0
BURST_S = 2.0
HOLD_S = 10.0
COALESCE_COST = 0.25


def make_guard(**overrides: Any) -> TelemetryGuard:
    params: dict[str, Any] = {
        "car_msgs_per_s": CAR_MSGS,
        "car_bytes_per_s": CAR_BYTES,
        "fleet_msgs_per_s": 10_000.0,
        "fleet_bytes_per_s": 10_000_000.0,
        "burst_s": BURST_S,
        "hold_s": HOLD_S,
        "eval_interval_s": 1.0,
        "coalesce_cost": COALESCE_COST,
        "max_sample_n": 16,
    }
    params.update(overrides)
    return TelemetryGuard(**params)


@dataclass
class Car:
    """A simulated car: `rate` batches/s at the base policy (a number or a function of time)."""

    rate: float | Callable[[float], float]
    size_bytes: int = 500
    obeys: bool = False
    verdicts: Counter[Verdict] = field(default_factory=Counter)
    bytes_by_verdict: Counter[Verdict] = field(default_factory=Counter)
    updates: list[tuple[float, TelemetryPolicyValues]] = field(default_factory=list)
    #: verdicts after `steady_from_s`, to look at a steady state
    steady: Counter[Verdict] = field(default_factory=Counter)

    def rate_at(self, now_s: float) -> float:
        return self.rate(now_s) if callable(self.rate) else self.rate

    def levels(self) -> list[int]:
        return [_level_of(policy) for _, policy in self.updates]

    def kept_cost(self) -> tuple[float, float]:
        """Work done for this car in apply-equivalents: (messages, bytes)."""
        msgs = self.verdicts[Verdict.ADMIT] + COALESCE_COST * self.verdicts[Verdict.COALESCE]
        size = self.bytes_by_verdict[Verdict.ADMIT] + (
            COALESCE_COST * self.bytes_by_verdict[Verdict.COALESCE]
        )
        return msgs, size


def _level_of(policy: TelemetryPolicyValues) -> int:
    return (policy.interval_ms // 1000).bit_length() - 1  # base 1000 ms, doubled per level


def simulate(
    guard: TelemetryGuard,
    cars: dict[str, Car],
    *,
    until_s: float,
    jitter: float = 0.0,
    sweep_every_s: float | None = None,
    steady_from_s: float = float("inf"),
    seed: int = 1,
) -> None:
    rng = random.Random(seed)
    base_ms = guard.policy_at(Level.NORMAL).interval_ms
    interval_ms = dict.fromkeys(cars, base_ms)
    queue: list[tuple[float, str]] = [(rng.uniform(0, 0.01), vid) for vid in cars]
    if sweep_every_s is not None:
        queue.append((sweep_every_s, ""))
    heapq.heapify(queue)
    while queue:
        now, vid = heapq.heappop(queue)
        if now >= until_s:
            break
        if not vid:
            for swept, swept_policy in guard.sweep(now):
                cars[swept].updates.append((now, swept_policy))
                interval_ms[swept] = swept_policy.interval_ms
            heapq.heappush(queue, (now + (sweep_every_s or 1.0), ""))
            continue
        car = cars[vid]
        rate = car.rate_at(now)
        if car.obeys:  # slows down as much as the policy's interval grows
            rate = rate * base_ms / interval_ms[vid]
        if rate <= 0:
            heapq.heappush(queue, (now + 0.5, vid))
            continue
        verdict = guard.admit(vid, car.size_bytes, now)
        car.verdicts[verdict] += 1
        car.bytes_by_verdict[verdict] += car.size_bytes
        if now >= steady_from_s:
            car.steady[verdict] += 1
        policy = guard.policy_update(vid, now)
        if policy is not None:
            car.updates.append((now, policy))
            interval_ms[vid] = policy.interval_ms
        heapq.heappush(queue, (now + rng.uniform(1 - jitter, 1 + jitter) / rate, vid))


def assert_accounted(guard: TelemetryGuard, cars: dict[str, Car]) -> None:
    """Nothing dropped invisibly: every offered batch is counted under its verdict."""
    c = guard.counters
    offered_msgs = sum(sum(car.verdicts.values()) for car in cars.values())
    offered_bytes = sum(sum(car.bytes_by_verdict.values()) for car in cars.values())
    assert c.admitted_msgs + c.coalesced_msgs + c.sampled_out_msgs + c.shed_msgs == offered_msgs
    assert c.admitted_bytes + c.coalesced_bytes + c.sampled_out_bytes + c.shed_bytes == (
        offered_bytes
    )
    assert (c.offered_msgs, c.offered_bytes) == (offered_msgs, offered_bytes)
    for verdict, msgs, size in [
        (Verdict.ADMIT, c.admitted_msgs, c.admitted_bytes),
        (Verdict.COALESCE, c.coalesced_msgs, c.coalesced_bytes),
        (Verdict.SAMPLED_OUT, c.sampled_out_msgs, c.sampled_out_bytes),
        (Verdict.SHED, c.shed_msgs, c.shed_bytes),
    ]:
        assert sum(car.verdicts[verdict] for car in cars.values()) == msgs
        assert sum(car.bytes_by_verdict[verdict] for car in cars.values()) == size


# -- budgets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factor", "size_bytes", "expected"),
    [
        (10, 500, Level.SAMPLE),  # 10x the messages
        (100, 500, Level.SHED),  # 100x the messages (past 16 x 4 = 64x, what SAMPLE absorbs)
        (1, 10_000, Level.SAMPLE),  # 10x the bytes: verbosity, not rate
        (10, 10_000, Level.SHED),  # 100x the bytes
    ],
)
def test_a_flood_is_held_to_the_budget(factor: int, size_bytes: int, expected: Level) -> None:
    guard = make_guard()
    duration_s = 120.0
    car = Car(rate=CAR_MSGS * factor, size_bytes=size_bytes)  # ignores the policy
    simulate(guard, {"flood": car}, until_s=duration_s)

    assert_accounted(guard, {"flood": car})
    assert guard.level_of("flood") is expected
    bound_msgs = CAR_MSGS * duration_s + CAR_MSGS * BURST_S
    bound_bytes = CAR_BYTES * duration_s + CAR_BYTES * BURST_S
    assert car.verdicts[Verdict.ADMIT] <= bound_msgs
    assert car.bytes_by_verdict[Verdict.ADMIT] <= bound_bytes
    kept_msgs, kept_bytes = car.kept_cost()
    assert kept_msgs <= bound_msgs + 1e-6
    assert kept_bytes <= bound_bytes + 1e-6
    assert car.levels() and car.levels() == sorted(car.levels())  # lowered, never raised


def test_10x_keeps_using_most_of_the_budget_instead_of_shedding_everything() -> None:
    guard = make_guard()
    car = Car(rate=CAR_MSGS * 10)
    simulate(guard, {"flood": car}, until_s=120.0)
    kept_msgs, _ = car.kept_cost()
    assert kept_msgs >= 0.6 * CAR_MSGS * 120.0
    assert car.verdicts[Verdict.COALESCE] > 0 and car.verdicts[Verdict.SAMPLED_OUT] > 0


def test_a_well_behaved_car_is_untouched_while_another_floods() -> None:
    guard = make_guard()
    cars = {"flood": Car(rate=CAR_MSGS * 100), "calm": Car(rate=CAR_MSGS * 0.5)}
    simulate(guard, cars, until_s=60.0, jitter=0.1)

    calm = cars["calm"]
    assert set(calm.verdicts) == {Verdict.ADMIT}
    assert calm.updates == []
    assert guard.level_of("calm") is Level.NORMAL
    assert guard.level_of("flood") is Level.SHED
    assert guard.fleet_level is Level.NORMAL
    assert_accounted(guard, cars)


def test_cars_within_their_budgets_escalate_the_fleet_together() -> None:
    fleet_msgs = 80.0
    guard = make_guard(fleet_msgs_per_s=fleet_msgs)

    def rate(now_s: float) -> float:
        return CAR_MSGS * (0.8 if now_s < 100 else 0.05)  # 50 x 0.8 = 5x the fleet, then calm

    cars = {f"car-{i}": Car(rate=rate, obeys=True) for i in range(50)}
    simulate(guard, cars, until_s=100.0, jitter=0.1)

    assert guard.fleet_level >= Level.COALESCE
    assert guard.cars_by_level()[Level.NORMAL] == 50  # no car is over its own budget
    for car in cars.values():
        assert car.levels() and min(car.levels()) >= Level.COALESCE  # every car slowed down
    kept_msgs = sum(car.kept_cost()[0] for car in cars.values())
    assert kept_msgs <= fleet_msgs * 100.0 + fleet_msgs * BURST_S + 1e-6
    assert_accounted(guard, cars)

    simulate(guard, cars, until_s=200.0, jitter=0.1, seed=2)
    assert guard.fleet_level is Level.NORMAL
    for car in cars.values():
        assert car.updates[-1][1] == guard.policy_at(Level.NORMAL)  # all restored


# -- the ladder --------------------------------------------------------------------------------


def test_the_policy_is_lowered_within_one_evaluation() -> None:
    guard = make_guard()
    car = Car(rate=CAR_MSGS * 100)
    simulate(guard, {"flood": car}, until_s=1.5)
    assert car.updates
    first_at_s, first = car.updates[0]
    assert first_at_s < 1.0  # at once, when the burst is spent: before the first evaluation
    assert first == guard.policy_at(Level.COALESCE)
    assert car.levels()[-1] == Level.SHED  # and the first evaluation goes all the way


def test_restore_goes_one_step_per_hold_after_the_load_falls() -> None:
    guard = make_guard()

    def rate(now_s: float) -> float:
        return CAR_MSGS * (1000 if now_s < 20 else 0.1)  # even slowed 8x, it is past SAMPLE

    car = Car(rate=rate, obeys=True)
    simulate(guard, {"car": car}, until_s=120.0)

    times = [at for at, _ in car.updates]
    levels = car.levels()
    top = levels.index(Level.SHED)
    assert levels[: top + 1] == sorted(levels[: top + 1])  # up first
    assert levels[top:] == [Level.SHED, Level.SAMPLE, Level.COALESCE, Level.NORMAL]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times[top:])]
    assert all(gap >= HOLD_S for gap in gaps)  # one step at a time, a hold apart
    assert times[top + 1] >= 20.0 + HOLD_S
    assert guard.level_of("car") is Level.NORMAL
    assert guard.policy_at(Level.NORMAL) == car.updates[-1][1]


def test_a_car_that_goes_quiet_is_restored_by_the_sweep() -> None:
    guard = make_guard()

    def rate(now_s: float) -> float:
        return CAR_MSGS * 1000 if now_s < 5 else 0.0

    car = Car(rate=rate)
    simulate(guard, {"car": car}, until_s=80.0, sweep_every_s=1.0)
    levels = car.levels()
    assert levels[-4:] == [Level.SHED, Level.SAMPLE, Level.COALESCE, Level.NORMAL]
    restores = [at for at, _ in car.updates[-4:]]
    assert all(b - a >= HOLD_S for a, b in itertools.pairwise(restores))
    assert guard.sweep(100.0) == []  # nothing left to watch


@pytest.mark.parametrize("natural", [0.5, 0.95, 1.05, 1.5, 3.0, 10.0])
def test_an_obedient_car_settles_without_flapping(natural: float) -> None:
    guard = make_guard()
    car = Car(rate=CAR_MSGS * natural, obeys=True)
    simulate(guard, {"car": car}, until_s=1200.0, jitter=0.1, steady_from_s=60.0)
    levels = car.levels()
    assert levels == sorted(levels)  # never lowered then raised again
    assert len(levels) <= 2
    if natural < 1:
        assert levels == []
    # Slowed down as told, it fits: nothing of it is dropped any more.
    assert set(car.steady) <= {Verdict.ADMIT, Verdict.COALESCE}


def test_a_load_oscillating_around_the_budget_does_not_flap() -> None:
    guard = make_guard()

    def rate(now_s: float) -> float:
        return CAR_MSGS * (1.1 if int(now_s // 30) % 2 else 0.9)

    car = Car(rate=rate)  # ignores the policy
    simulate(guard, {"car": car}, until_s=1200.0, jitter=0.05)
    assert len(car.updates) <= 1


def test_sampling_keeps_one_in_n_and_n_grows_with_the_overload() -> None:
    for factor, n in [(14, 4), (38, 10)]:  # N = ceil(factor * coalesce_cost)
        guard = make_guard()
        car = Car(rate=CAR_MSGS * factor)
        simulate(guard, {"car": car}, until_s=60.0, steady_from_s=10.0)
        steady = car.steady
        offered = sum(steady.values())
        assert steady[Verdict.SHED] == 0
        assert steady[Verdict.ADMIT] == 0
        kept = steady[Verdict.COALESCE]
        assert abs(kept - offered / n) <= 2, (factor, kept, offered)
        assert guard.level_of("car") is Level.SAMPLE


def test_shed_counts_equal_the_dropped_volume_exactly() -> None:
    guard = make_guard()
    cars = {
        "a": Car(rate=CAR_MSGS * 300, size_bytes=123),
        "b": Car(rate=CAR_MSGS * 7, size_bytes=4567),
        "c": Car(rate=CAR_MSGS * 0.3, size_bytes=89),
    }
    simulate(guard, cars, until_s=30.0, jitter=0.3)
    dropped = {Verdict.SAMPLED_OUT, Verdict.SHED}
    c = guard.counters
    assert c.shed_msgs + c.sampled_out_msgs == sum(
        n for car in cars.values() for v, n in car.verdicts.items() if v in dropped
    )
    assert c.shed_bytes + c.sampled_out_bytes == sum(
        n for car in cars.values() for v, n in car.bytes_by_verdict.items() if v in dropped
    )
    assert c.shed_msgs > 0
    assert_accounted(guard, cars)


# -- coalescing --------------------------------------------------------------------------------


def _signal(name: str, number: float, at_ms: int) -> Any:
    return link.Signal(name=name, value=t.Value(number=number), reported_at_ms=at_ms)


def test_coalescing_keeps_the_latest_value_per_signal() -> None:
    guard = make_guard()
    guard.coalesce("car", [_signal("speed", 1, 100), _signal("soc", 50, 100)], 1_000)
    guard.coalesce("car", [_signal("speed", 3, 300), _signal("soc", 49, 90)], 1_001)  # soc older
    guard.coalesce("car", [_signal("speed", 2, 200)], 1_002)  # late arrival, older value
    guard.coalesce("car", [_signal("speed", 4, 300)], 1_003)  # same time: the later arrival wins
    guard.coalesce("car", [_signal("gear", 1, 0)], 5_000)  # unstamped: counts as received
    guard.coalesce("car", [_signal("gear", 2, 4_000)], 5_001)
    guard.coalesce("other", [_signal("speed", 9, 1)], 1_000)

    taken: dict[str, list[Any]] = guard.take_coalesced()  # the Signal messages given
    latest = {s.name: (s.value.number, s.reported_at_ms) for s in taken["car"]}
    assert latest == {"speed": (4, 300), "soc": (50, 100), "gear": (1, 0)}
    assert [s.value.number for s in taken["other"]] == [9]
    assert guard.counters.signals_superseded == 5
    assert guard.take_coalesced() == {}


def test_a_coalescing_buffer_holds_a_bounded_number_of_names() -> None:
    guard = make_guard(max_signals_per_car=3)
    guard.coalesce("car", [_signal(f"s{i}", i, 1) for i in range(5)], 1)
    guard.coalesce("car", [_signal("s0", 10, 2)], 2)  # a held name still updates
    taken: dict[str, list[Any]] = guard.take_coalesced()
    assert sorted((s.name, s.value.number) for s in taken["car"]) == [
        ("s0", 10),
        ("s1", 1),
        ("s2", 2),
    ]
    assert guard.counters.signals_dropped == 2


# -- policies, lifecycle, memory ---------------------------------------------------------------


def test_policies_slow_the_car_and_lower_its_verbosity_per_level() -> None:
    guard = make_guard(base_interval_ms=500, base_verbosity=2, interval_step=2)
    assert [guard.policy_at(level) for level in Level] == [
        TelemetryPolicyValues(500, 2, 10_000),
        TelemetryPolicyValues(1000, 1, 10_000),
        TelemetryPolicyValues(2000, 0, 10_000),
        TelemetryPolicyValues(4000, 0, 10_000),
    ]
    proto = link.TelemetryPolicy(**guard.policy_at(Level.SHED)._asdict())
    assert (proto.interval_ms, proto.verbosity, proto.max_bytes_per_second) == (4000, 0, 10_000)


def test_the_welcome_policy_follows_the_fleet_level() -> None:
    guard = make_guard(fleet_msgs_per_s=5.0)
    assert guard.welcome_policy("new", 0.0) == guard.policy_at(Level.NORMAL)
    assert len(guard) == 0  # a car welcomed at NORMAL costs no state until it sends
    for i in range(200):
        guard.admit(f"car-{i % 4}", 100, 0.01 * i)
    assert guard.fleet_level > Level.NORMAL
    assert guard.welcome_policy("late", 2.0) == guard.policy_at(guard.fleet_level)
    assert guard.policy_update("late", 2.0) is None  # it was told already


def test_forget_frees_the_car_and_returns_what_it_had_not_flushed() -> None:
    guard = make_guard()
    for i in range(500):
        guard.admit("car", 100, i * 0.001)
    assert guard.level_of("car") > Level.NORMAL
    guard.coalesce("car", [_signal("speed", 1, 1)], 1)
    assert guard.policy_update("car", 1.0) is not None

    unflushed = guard.forget("car")
    assert [s.name for s in unflushed] == ["speed"]
    assert len(guard) == 0
    assert sum(guard.cars_by_level().values()) == 0
    assert guard.take_coalesced() == {}
    assert guard.sweep(100.0) == []
    assert guard.policy_update("car", 100.0) is None
    assert guard.forget("car") == []
    assert guard.admit("car", 100, 100.0) is Verdict.ADMIT  # a fresh start


def test_per_car_state_is_small() -> None:
    guard = make_guard()
    ids = [f"vehicle-{i:06d}" for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, vehicle_id in enumerate(ids):
            guard.admit(vehicle_id, 300, i * 1e-4)
        per_car = (tracemalloc.get_traced_memory()[0] - before) / len(ids)
    finally:
        tracemalloc.stop()
    assert per_car < 400, per_car  # 100k cars: under 40 MB
    for vehicle_id in ids:
        guard.forget(vehicle_id)
    assert len(guard) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"car_msgs_per_s": 0},
        {"fleet_bytes_per_s": -1},
        {"coalesce_cost": 1.0},
        {"max_sample_n": 1},
        {"restore_below": 0},
        {"hold_s": -1},
        {"interval_step": 0},
    ],
)
def test_bad_settings_are_refused_by_name(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_guard(**bad)


# -- the accounting invariant, for any arrival sequence -----------------------------------------

_steps = st.lists(
    st.tuples(
        st.sampled_from(["admit"] * 6 + ["policy", "sweep", "forget", "take"]),
        st.integers(0, 4),  # which car
        st.integers(0, 30_000),  # batch size
        st.floats(0, 3.0, allow_nan=False),  # time since the previous step
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(steps=_steps, fleet_msgs=st.sampled_from([5.0, 30.0, 1000.0]))
def test_every_batch_is_accounted_and_the_fleet_budget_holds(
    steps: list[tuple[str, int, int, float]], fleet_msgs: float
) -> None:
    fleet_bytes = 50_000.0
    guard = make_guard(fleet_msgs_per_s=fleet_msgs, fleet_bytes_per_s=fleet_bytes, hold_s=2.0)
    now = 0.0
    offered = [0, 0]
    kept = [0.0, 0.0]
    verdict_totals: Counter[Verdict] = Counter()
    car_kept: dict[str, tuple[float, float, float]] = {}  # since (re)start: born_s, msgs, bytes
    for action, car, size, dt in steps:
        now += dt
        vehicle_id = f"car-{car}"
        if action == "admit":
            verdict = guard.admit(vehicle_id, size, now)
            verdict_totals[verdict] += 1
            offered[0] += 1
            offered[1] += size
            weight = {Verdict.ADMIT: 1.0, Verdict.COALESCE: COALESCE_COST}.get(verdict, 0.0)
            kept[0] += weight
            kept[1] += weight * size
            born_s, msgs, size_kept = car_kept.get(vehicle_id, (now, 0.0, 0.0))
            car_kept[vehicle_id] = (born_s, msgs + weight, size_kept + weight * size)
            assert msgs + weight <= CAR_MSGS * (now - born_s + BURST_S) + 1e-6
            assert size_kept + weight * size <= CAR_BYTES * (now - born_s + BURST_S) + 1e-6
        elif action == "policy":
            guard.policy_update(vehicle_id, now)
        elif action == "sweep":
            guard.sweep(now)
        elif action == "forget":
            guard.forget(vehicle_id)
            car_kept.pop(vehicle_id, None)
        else:
            guard.take_coalesced()

        c = guard.counters
        assert [c.offered_msgs, c.offered_bytes] == offered
        assert c.admitted_msgs == verdict_totals[Verdict.ADMIT]
        assert c.coalesced_msgs == verdict_totals[Verdict.COALESCE]
        assert c.sampled_out_msgs == verdict_totals[Verdict.SAMPLED_OUT]
        assert c.shed_msgs == verdict_totals[Verdict.SHED]
        assert sum(guard.cars_by_level().values()) == len(guard) <= 5
        # The fleet bucket starts full at the first call (t = 0 here).
        assert kept[0] <= fleet_msgs * (now + BURST_S) + 1e-6
        assert kept[1] <= fleet_bytes * (now + BURST_S) + 1e-6


@settings(max_examples=200, deadline=None)
@given(steps=_steps, fleet_msgs=st.sampled_from([5.0, 30.0, 1000.0]))
def test_offer_is_admit_then_policy_update(
    steps: list[tuple[str, int, int, float]], fleet_msgs: float
) -> None:
    """The stream reader's one call per batch decides exactly what the two calls would."""
    one = make_guard(fleet_msgs_per_s=fleet_msgs, hold_s=2.0)
    two = make_guard(fleet_msgs_per_s=fleet_msgs, hold_s=2.0)
    now = 0.0
    for action, car, size, dt in steps:
        now += dt
        vehicle_id = f"car-{car}"
        if action == "admit":
            assert one.offer(vehicle_id, size, now) == (
                two.admit(vehicle_id, size, now),
                two.policy_update(vehicle_id, now),
            )
        elif action == "policy":
            assert one.policy_update(vehicle_id, now) == two.policy_update(vehicle_id, now)
        elif action == "sweep":
            assert one.sweep(now) == two.sweep(now)
        elif action == "forget":
            assert one.forget(vehicle_id) == two.forget(vehicle_id)
        else:
            assert one.take_coalesced() == two.take_coalesced()
        assert one.counters == two.counters


def test_a_car_within_budget_is_never_paused_and_a_flooding_one_is_read_at_budget_pace() -> None:
    guard = make_guard()
    now = 0.0
    for _ in range(50):  # one batch a second: within CAR_MSGS per second
        now += 1.0
        guard.offer("calm", 100, now)
        assert guard.read_pause_s("calm") == 0.0
    paused = []
    for _ in range(200):  # a flood: a batch every millisecond
        now += 0.001
        verdict, _ = guard.offer("flood", 100, now)
        if verdict is not Verdict.ADMIT:
            paused.append(guard.read_pause_s("flood"))
    # Dry buckets pause reading until one batch's worth refills (a 1-in-N sampled batch
    # costs no tokens, so it may need none), never longer than MAX_READ_PAUSE_S.
    assert all(0 <= p <= MAX_READ_PAUSE_S for p in paused)
    assert max(paused) >= 0.25 / CAR_MSGS * 0.9
    assert guard.read_pause_s("never-seen") == 0.0


def test_coalesced_buffers_are_taken_a_slice_at_a_time_and_a_car_going_keeps_its_own() -> None:
    guard = make_guard()
    for n in range(3):
        guard.coalesce(f"car-{n}", [_signal("speed", n, 100 + n)], 1_000 + n)
    assert guard.coalescing_cars == 3
    first = guard.take_coalesced(2)
    assert list(first) == ["car-0", "car-1"]  # oldest first
    assert [s.value.number for s in guard.forget("car-2")] == [2]  # not taken: its own
    assert guard.take_coalesced() == {} and guard.coalescing_cars == 0
