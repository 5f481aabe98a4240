"""Telemetry verbosity guard: per-car and fleet-wide budgets on inbound telemetry.

A car (or the whole fleet) that sends more telemetry than its budget climbs a ladder of
levels, each cheaper per batch than the one below:

    NORMAL    each batch is applied at once (`Verdict.ADMIT`)
    COALESCE  batches are merged into a per-car buffer, the latest value per signal, which the
              broker applies on its periodic flush (`Verdict.COALESCE`, `take_coalesced`)
    SAMPLE    1 batch in N is kept (and coalesced), the others are dropped; N follows the
              measured overload, so 1-in-N coalesced fits the budget (`Verdict.SAMPLED_OUT`)
    SHED      every batch is dropped (`Verdict.SHED`)

Budgets are token buckets in apply-equivalents: applying a batch costs 1 message and its size
in bytes, coalescing one costs `coalesce_cost` of that, and a batch sampled out or shed costs
nothing but a counter. A batch its level would keep but a bucket cannot pay for is shed, so
whatever the cars send, the telemetry work of a car stays within its budget (plus a burst of
`burst_s` seconds' worth) and that of the fleet within the fleet budget. Every batch gets
exactly one verdict and is counted under it: admitted + coalesced + sampled_out + shed equals
what was offered, in messages and in bytes.

Levels go up at once: a car leaves NORMAL the moment its bucket runs dry, and from COALESCE up
each evaluation (every `eval_interval_s`) jumps straight to the level its measured load needs.
They come down one step at a time, and only after the load has stayed low enough for `hold_s`
that it would still fit the lower level once the car speeds up again (the interval halves on
each step back, so the load is assumed to double): a hysteresis band, not a threshold, so a car
sitting at its budget does not flap. Within SAMPLE, N is re-measured at every evaluation, both
ways, so a car that slowed down as told loses nothing to sampling while its policy waits out
the hold. The fleet has a level of its own, moved the same way by the telemetry that gets past
the cars' own levels, measured against the fleet budget.

The higher of a car's level and the fleet's is also the telemetry policy the broker sends that
car in a Control frame: the interval multiplied by `interval_step` per level, the verbosity
lowered by one per level (not below 0), and the car's byte budget.

The guard does no I/O and knows nothing of gRPC or asyncio; time comes in as `now_s`, seconds
on a monotonic clock, so it is deterministic to test. Every call is O(1) except
`take_coalesced` and `sweep` (linear in what they return or look at). Wiring, in the stream
reader (before applying anything):

    verdict, policy = guard.offer(vehicle_id, len(raw_frame), now_s)  # admit + policy_update
    if verdict is Verdict.ADMIT:
        states.report(vehicle_id, batch.signals, received_ms)
    elif verdict is Verdict.COALESCE:
        guard.coalesce(vehicle_id, batch.signals, received_ms)
    if policy is not None:
        control = Control(telemetry_policy=TelemetryPolicy(**policy._asdict()))
        session.send(BrokerFrame(control=control))

and elsewhere: `welcome_policy` for the Welcome frame, `take_coalesced` in the state flush loop,
`sweep` every few seconds (restores cars that went quiet), `forget` when a stream ends.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import NamedTuple, Protocol

_UINT32_MAX = 2**32 - 1
#: the longest a flooding car's stream is left unread after one batch (its acks and
#: results queue behind its own flood, so this bounds how late they get per batch)
MAX_READ_PAUSE_S = 1.0


class Level(IntEnum):
    """How hard telemetry from a car (or the fleet) is being squeezed; higher is harder."""

    NORMAL = 0
    COALESCE = 1
    SAMPLE = 2
    SHED = 3


class Verdict(Enum):
    """What the broker does with one telemetry batch."""

    #: apply the batch now
    ADMIT = "admit"
    #: hand the batch's signals to `TelemetryGuard.coalesce`; they are applied on the next flush
    COALESCE = "coalesce"
    #: drop the batch (counted): sampling kept another one
    SAMPLED_OUT = "sampled_out"
    #: drop the batch (counted): over budget
    SHED = "shed"


class SignalLike(Protocol):
    """What coalescing needs of a signal; `broker.v1.vehicle_link_pb2.Signal` is one."""

    @property
    def name(self) -> str: ...

    @property
    def reported_at_ms(self) -> int: ...


class TelemetryPolicyValues(NamedTuple):
    """The fields of `broker.v1.TelemetryPolicy`: `TelemetryPolicy(**values._asdict())`."""

    interval_ms: int
    verbosity: int
    max_bytes_per_second: int


@dataclass(slots=True)
class TelemetryCounters:
    """Running totals since start; every offered batch lands in exactly one verdict pair."""

    admitted_msgs: int = 0
    admitted_bytes: int = 0
    coalesced_msgs: int = 0
    coalesced_bytes: int = 0
    sampled_out_msgs: int = 0
    sampled_out_bytes: int = 0
    shed_msgs: int = 0
    shed_bytes: int = 0
    #: coalesced signal values replaced by a newer value of the same signal before a flush
    signals_superseded: int = 0
    #: coalesced signals dropped because the car's buffer held `max_signals_per_car` names
    signals_dropped: int = 0
    #: telemetry policies handed out by `policy_update` and `sweep` (Welcome not included)
    policy_updates: int = 0

    @property
    def offered_msgs(self) -> int:
        return self.admitted_msgs + self.coalesced_msgs + self.sampled_out_msgs + self.shed_msgs

    @property
    def offered_bytes(self) -> int:
        return self.admitted_bytes + self.coalesced_bytes + self.sampled_out_bytes + self.shed_bytes


class _Limits(NamedTuple):
    msgs_per_s: float
    bytes_per_s: float
    burst_msgs: float
    burst_bytes: float


class _Budget:
    """Token buckets, a measurement window and a level: the fleet's, or (as `_Car`) a car's."""

    __slots__ = (
        "byte_tokens",
        "calm_since_s",
        "level",
        "msg_tokens",
        "refilled_s",
        "sample_n",
        "window_bytes",
        "window_msgs",
        "window_start_s",
    )

    def __init__(self, limits: _Limits, now_s: float) -> None:
        self.level = Level.NORMAL
        self.sample_n = 1  # keep 1 batch in sample_n while at SAMPLE
        self.msg_tokens = limits.burst_msgs
        self.byte_tokens = limits.burst_bytes
        self.refilled_s = now_s
        self.window_start_s = now_s
        self.window_msgs = 0  # offered in the current window (for the fleet: past the cars)
        self.window_bytes = 0
        self.calm_since_s: float | None = None  # since when the load would fit a level lower


class _Car(_Budget):
    __slots__ = ("fleet_seq", "last_bytes", "sample_seq", "sent_level")

    def __init__(self, limits: _Limits, now_s: float) -> None:
        super().__init__(limits, now_s)
        self.sample_seq = 0  # position in the car's own 1-in-N cycle
        self.fleet_seq = 0  # position in this car's 1-in-N cycle of the fleet's SAMPLE
        self.sent_level = Level.NORMAL  # the policy level the car was last told
        self.last_bytes = 0  # size of its latest batch: the next one is likely alike


class TelemetryGuard:
    """Per-car and fleet-wide telemetry budgets, the level ladder, and the policies to send.

    Budgets: `car_msgs_per_s`/`car_bytes_per_s` per car, `fleet_msgs_per_s`/`fleet_bytes_per_s`
    for all cars together, each with a burst of `burst_s` seconds' worth. `coalesce_cost` is
    the work of coalescing a batch relative to applying it. `max_sample_n` is the largest N of
    SAMPLE; a load that would need more is SHED. A level steps down after its load has stayed
    under `restore_below` of the lower level's capacity, allowing for the car speeding up by
    `interval_step`, for `hold_s`. The policy at NORMAL is `base_interval_ms`/`base_verbosity`.
    A car's coalescing buffer holds at most `max_signals_per_car` signal names.
    """

    def __init__(
        self,
        *,
        car_msgs_per_s: float,
        car_bytes_per_s: float,
        fleet_msgs_per_s: float,
        fleet_bytes_per_s: float,
        burst_s: float = 5.0,
        coalesce_cost: float = 0.25,
        max_sample_n: int = 32,
        eval_interval_s: float = 1.0,
        hold_s: float = 30.0,
        restore_below: float = 0.9,
        base_interval_ms: int = 1000,
        base_verbosity: int = 2,
        interval_step: int = 2,
        max_signals_per_car: int = 256,
    ) -> None:
        positive = {
            "car_msgs_per_s": car_msgs_per_s,
            "car_bytes_per_s": car_bytes_per_s,
            "fleet_msgs_per_s": fleet_msgs_per_s,
            "fleet_bytes_per_s": fleet_bytes_per_s,
            "burst_s": burst_s,
            "eval_interval_s": eval_interval_s,
            "base_interval_ms": base_interval_ms,
            "max_signals_per_car": max_signals_per_car,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name}: must be positive, got {value!r}")
        if not 0 < coalesce_cost < 1:
            raise ValueError(f"coalesce_cost: must be within (0, 1), got {coalesce_cost!r}")
        if not 0 < restore_below <= 1:
            raise ValueError(f"restore_below: must be within (0, 1], got {restore_below!r}")
        if max_sample_n < 2:
            raise ValueError(f"max_sample_n: must be at least 2, got {max_sample_n!r}")
        if interval_step < 1:
            raise ValueError(f"interval_step: must be at least 1, got {interval_step!r}")
        if hold_s < 0:
            raise ValueError(f"hold_s: must not be negative, got {hold_s!r}")
        if base_verbosity < 0:
            raise ValueError(f"base_verbosity: must not be negative, got {base_verbosity!r}")

        self._car_limits = _Limits(
            car_msgs_per_s,
            car_bytes_per_s,
            max(1.0, car_msgs_per_s * burst_s),
            car_bytes_per_s * burst_s,
        )
        self._fleet_limits = _Limits(
            fleet_msgs_per_s,
            fleet_bytes_per_s,
            max(1.0, fleet_msgs_per_s * burst_s),
            fleet_bytes_per_s * burst_s,
        )
        self._coalesce_cost = coalesce_cost
        self._max_sample_n = max_sample_n
        self._eval_interval_s = eval_interval_s
        #: an evaluation outside `admit` waits this long, so a car that sends less often
        #: than `eval_interval_s` is not measured over windows it happened to send nothing in
        self._idle_eval_s = max(eval_interval_s, hold_s)
        self._hold_s = hold_s
        self._restore_below = restore_below
        self._interval_step = interval_step
        self._max_signals = max_signals_per_car
        #: the load, in multiples of the budget, each level absorbs without shedding
        self._capacity = (1.0, 1 / coalesce_cost, max_sample_n / coalesce_cost)
        self._policies = tuple(
            TelemetryPolicyValues(
                interval_ms=min(_UINT32_MAX, base_interval_ms * interval_step**level),
                verbosity=max(0, base_verbosity - level),
                max_bytes_per_second=min(_UINT32_MAX, max(1, int(car_bytes_per_s))),
            )
            for level in Level
        )

        self.counters = TelemetryCounters()
        #: started at -inf: full buckets, and its first window is evaluated (empty) and reset
        #: at the first call, whatever the origin of the caller's clock
        self._fleet = _Budget(self._fleet_limits, -math.inf)
        self._cars: dict[str, _Car] = {}
        self._cars_at_level = [0] * len(Level)
        #: cars that are above NORMAL or were told a lowered policy: what `sweep` visits
        self._watched: set[str] = set()
        self._coalesced: dict[str, dict[str, tuple[int, SignalLike]]] = {}

    # -- the per-batch decision --------------------------------------------------------------

    def admit(self, vehicle_id: str, size_bytes: int, now_s: float) -> Verdict:
        """Decide what to do with one telemetry batch of `size_bytes` from `vehicle_id`.

        Counts the batch under its verdict; a SAMPLED_OUT or SHED batch must simply be dropped.
        """
        fleet = self._tick_fleet(now_s, self._eval_interval_s)
        car = self._cars.get(vehicle_id)
        if car is None:
            car = self._add_car(vehicle_id, now_s)
        else:
            self._tick(car, self._car_limits, now_s, self._eval_interval_s)
        car.window_msgs += 1
        car.window_bytes += size_bytes
        car.last_bytes = size_bytes

        if car.level is Level.SHED:
            return self._drop(Verdict.SHED, size_bytes)
        if car.level is Level.SAMPLE:
            seq = car.sample_seq
            car.sample_seq = seq + 1 if seq + 1 < car.sample_n else 0
            if seq:
                return self._drop(Verdict.SAMPLED_OUT, size_bytes)
        # Past the car's own level: from here on the batch is the fleet's load too.
        fleet.window_msgs += 1
        fleet.window_bytes += size_bytes
        if fleet.level is Level.SHED:
            return self._drop(Verdict.SHED, size_bytes)
        if fleet.level is Level.SAMPLE:
            seq = car.fleet_seq
            car.fleet_seq = seq + 1 if seq + 1 < fleet.sample_n else 0
            if seq:
                return self._drop(Verdict.SAMPLED_OUT, size_bytes)

        level = max(car.level, fleet.level)
        cost = 1.0 if level is Level.NORMAL else self._coalesce_cost
        car_short = not _affords(car, cost, size_bytes)
        fleet_short = not _affords(fleet, cost, size_bytes)
        if not (car_short or fleet_short):
            return self._keep(car, cost, size_bytes)
        if car_short:
            self._escalate(car)
            self._watched.add(vehicle_id)
        if fleet_short:
            self._escalate(fleet)
        cost = self._coalesce_cost
        if (
            level is Level.NORMAL
            and _affords(car, cost, size_bytes)
            and _affords(fleet, cost, size_bytes)
        ):
            return self._keep(car, cost, size_bytes)  # past budget: coalesce it
        return self._drop(Verdict.SHED, size_bytes)

    def offer(
        self, vehicle_id: str, size_bytes: int, now_s: float
    ) -> tuple[Verdict, TelemetryPolicyValues | None]:
        """`admit`, then `policy_update`, in one call: what the stream reader does per batch.

        Same outcome as the two calls (a test holds it to that), minus the second call's
        bucket refills and window checks, which at the same `now_s` change nothing.
        """
        verdict = self.admit(vehicle_id, size_bytes, now_s)
        car = self._cars[vehicle_id]  # admit added it
        level = max(car.level, self._fleet.level)
        if level is car.sent_level:
            return verdict, None
        car.sent_level = level
        self._rewatch(vehicle_id, car)
        self.counters.policy_updates += 1
        return verdict, self._policies[level]

    def read_pause_s(self, vehicle_id: str) -> float:
        """How long to leave this car's stream unread after its latest batch: until its own
        buckets afford another batch at its level (0 when they do now), at most
        `MAX_READ_PAUSE_S`.

        A car within its budget is never paused. A car sending faster is read at about its
        budget's pace; the excess waits in HTTP/2 flow control, so the car's writes slow
        down and its flood never crowds the event loop that other cars' unlocks share.
        """
        car = self._cars.get(vehicle_id)
        if car is None:
            return 0.0
        cost = 1.0 if car.level is Level.NORMAL else self._coalesce_cost
        limits = self._car_limits
        wait_s = max(
            (cost - car.msg_tokens) / limits.msgs_per_s,
            (cost * car.last_bytes - car.byte_tokens) / limits.bytes_per_s,
        )
        return min(MAX_READ_PAUSE_S, wait_s) if wait_s > 0 else 0.0

    def _keep(self, car: _Car, cost: float, size_bytes: int) -> Verdict:
        for budget in (car, self._fleet):
            budget.msg_tokens -= cost
            budget.byte_tokens -= cost * size_bytes
        counters = self.counters
        if cost == 1.0:
            counters.admitted_msgs += 1
            counters.admitted_bytes += size_bytes
            return Verdict.ADMIT
        counters.coalesced_msgs += 1
        counters.coalesced_bytes += size_bytes
        return Verdict.COALESCE

    def _drop(self, verdict: Verdict, size_bytes: int) -> Verdict:
        counters = self.counters
        if verdict is Verdict.SHED:
            counters.shed_msgs += 1
            counters.shed_bytes += size_bytes
        else:
            counters.sampled_out_msgs += 1
            counters.sampled_out_bytes += size_bytes
        return verdict

    # -- coalescing --------------------------------------------------------------------------

    def coalesce(self, vehicle_id: str, signals: Iterable[SignalLike], received_at_ms: int) -> None:
        """Merge a COALESCE batch into the car's buffer: the latest value per signal name.

        "Latest" is the greatest `reported_at_ms` (0 counts as `received_at_ms`); on a tie the
        later arrival wins, as in `VehicleStates.report`. Signals are kept as given, so
        validate them before (the flush applies them away from the car's stream).
        """
        buffer = self._coalesced.get(vehicle_id)
        if buffer is None:
            buffer = self._coalesced[vehicle_id] = {}
        counters = self.counters
        for signal in signals:
            name = signal.name
            stamp = signal.reported_at_ms or received_at_ms
            held = buffer.get(name)
            if held is None:
                if len(buffer) >= self._max_signals:
                    counters.signals_dropped += 1
                    continue
                buffer[name] = (stamp, signal)
                continue
            counters.signals_superseded += 1
            if stamp >= held[0]:
                buffer[name] = (stamp, signal)

    def take_coalesced(self, limit: int | None = None) -> dict[str, list[SignalLike]]:
        """Hand over and clear the buffers of up to `limit` cars (all by default), oldest
        first: vehicle_id -> latest signals, to apply now. A car not taken yet keeps its
        buffer, so `forget` still returns it if the car goes meanwhile."""
        coalesced = self._coalesced
        if limit is None or limit >= len(coalesced):
            taken, self._coalesced = coalesced, {}
        else:
            taken = {v: coalesced.pop(v) for v in list(itertools.islice(coalesced, limit))}
        return {
            vehicle_id: [signal for _, signal in buffer.values()]
            for vehicle_id, buffer in taken.items()
            if buffer
        }

    # -- policies ----------------------------------------------------------------------------

    def policy_at(self, level: Level) -> TelemetryPolicyValues:
        """The telemetry policy a car is told at `level`."""
        return self._policies[level]

    def welcome_policy(self, vehicle_id: str, now_s: float) -> TelemetryPolicyValues:
        """The policy for a connecting car's Welcome frame (records it as sent)."""
        fleet = self._tick_fleet(now_s, self._idle_eval_s)
        car = self._cars.get(vehicle_id)
        level = fleet.level if car is None else max(car.level, fleet.level)
        if car is None and level is not Level.NORMAL:
            car = self._add_car(vehicle_id, now_s)  # so it is restored when the fleet calms
        if car is not None:
            car.sent_level = level
            self._rewatch(vehicle_id, car)
        return self._policies[level]

    def policy_update(self, vehicle_id: str, now_s: float) -> TelemetryPolicyValues | None:
        """A new policy to send this car in a Control frame, or None if it has the right one.

        Call it after each `admit` (escalations reach the car at once) and let `sweep` call it
        for cars that stopped sending (restores).
        """
        self._tick_fleet(now_s, self._idle_eval_s)
        car = self._cars.get(vehicle_id)
        if car is None:
            return None  # never sent telemetry: it was welcomed at NORMAL and costs nothing
        return self._policy_update(vehicle_id, car, now_s)

    def _policy_update(
        self, vehicle_id: str, car: _Car, now_s: float
    ) -> TelemetryPolicyValues | None:
        self._tick(car, self._car_limits, now_s, self._idle_eval_s)
        level = max(car.level, self._fleet.level)
        if level is car.sent_level:
            return None
        car.sent_level = level
        self._rewatch(vehicle_id, car)
        self.counters.policy_updates += 1
        return self._policies[level]

    def sweep(self, now_s: float) -> list[tuple[str, TelemetryPolicyValues]]:
        """Policy updates for cars above NORMAL or on a lowered policy, sending or not.

        A car that went quiet is only evaluated here (after `hold_s` without a batch), so call
        this at least every `hold_s`; the cost is linear in the number of such cars.
        """
        self._tick_fleet(now_s, self._idle_eval_s)
        updates: list[tuple[str, TelemetryPolicyValues]] = []
        for vehicle_id in list(self._watched):
            policy = self._policy_update(vehicle_id, self._cars[vehicle_id], now_s)
            if policy is not None:
                updates.append((vehicle_id, policy))
        return updates

    # -- lifecycle and read-outs -------------------------------------------------------------

    @property
    def coalescing_cars(self) -> int:
        """Cars with coalesced signals waiting for a flush."""
        return len(self._coalesced)

    def forget(self, vehicle_id: str) -> list[SignalLike]:
        """The car's stream ended: drop its state; returns its coalesced signals not yet applied.

        Apply those before persisting the car's state (a later flush would find it detached).
        """
        car = self._cars.pop(vehicle_id, None)
        if car is not None:
            self._cars_at_level[car.level] -= 1
        self._watched.discard(vehicle_id)
        buffer = self._coalesced.pop(vehicle_id, None)
        return [signal for _, signal in buffer.values()] if buffer else []

    @property
    def fleet_level(self) -> Level:
        return self._fleet.level

    def level_of(self, vehicle_id: str) -> Level:
        """The car's own level (NORMAL for a car the guard does not hold)."""
        car = self._cars.get(vehicle_id)
        return Level.NORMAL if car is None else car.level

    def cars_by_level(self) -> dict[Level, int]:
        """How many cars are at each level of their own (the fleet's level aside)."""
        return {level: self._cars_at_level[level] for level in Level}

    def __len__(self) -> int:
        """How many cars the guard holds state for."""
        return len(self._cars)

    # -- levels ------------------------------------------------------------------------------

    def _add_car(self, vehicle_id: str, now_s: float) -> _Car:
        car = self._cars[vehicle_id] = _Car(self._car_limits, now_s)
        self._cars_at_level[Level.NORMAL] += 1
        return car

    def _rewatch(self, vehicle_id: str, car: _Car) -> None:
        if car.level is Level.NORMAL and car.sent_level is Level.NORMAL:
            self._watched.discard(vehicle_id)
        else:
            self._watched.add(vehicle_id)

    def _tick_fleet(self, now_s: float, eval_after_s: float) -> _Budget:
        fleet = self._fleet
        self._tick(fleet, self._fleet_limits, now_s, eval_after_s)
        return fleet

    def _tick(self, budget: _Budget, limits: _Limits, now_s: float, eval_after_s: float) -> None:
        """Refill the buckets; evaluate the level if the window is `eval_after_s` old."""
        elapsed_s = now_s - budget.refilled_s
        if elapsed_s > 0:
            budget.msg_tokens = min(
                limits.burst_msgs, budget.msg_tokens + elapsed_s * limits.msgs_per_s
            )
            budget.byte_tokens = min(
                limits.burst_bytes, budget.byte_tokens + elapsed_s * limits.bytes_per_s
            )
            budget.refilled_s = now_s
        if now_s - budget.window_start_s >= eval_after_s:
            self._evaluate(budget, limits, now_s)

    def _evaluate(self, budget: _Budget, limits: _Limits, now_s: float) -> None:
        started_s = budget.window_start_s
        span_s = now_s - started_s
        load = max(
            budget.window_msgs / (span_s * limits.msgs_per_s),
            budget.window_bytes / (span_s * limits.bytes_per_s),
        )
        budget.window_start_s = now_s
        budget.window_msgs = 0
        budget.window_bytes = 0
        level = budget.level
        if level is Level.NORMAL:
            return  # only an empty bucket moves NORMAL up, so a burst within it is fine
        needed = self._level_for(load)
        if needed > level:
            self._set_level(budget, needed)
            budget.sample_n = self._sample_n_for(load)
            budget.calm_since_s = None
            return
        if level is Level.SAMPLE:
            budget.sample_n = self._sample_n_for(load)
        lower = Level(level - 1)
        if load * self._interval_step > self._restore_below * self._capacity[lower]:
            budget.calm_since_s = None
            return
        if budget.calm_since_s is None:
            budget.calm_since_s = started_s
        if now_s - budget.calm_since_s >= self._hold_s:
            self._set_level(budget, lower)
            budget.sample_n = self._sample_n_for(load * self._interval_step)
            budget.calm_since_s = None  # the next step waits a whole hold at the new level

    def _escalate(self, budget: _Budget) -> None:
        """A bucket ran dry: one step up (at SAMPLE, N doubles first)."""
        budget.calm_since_s = None
        if budget.level is Level.NORMAL:
            self._set_level(budget, Level.COALESCE)
        elif budget.level is Level.COALESCE:
            self._set_level(budget, Level.SAMPLE)
            budget.sample_n = 2
        elif budget.level is Level.SAMPLE:
            if budget.sample_n * 2 > self._max_sample_n:
                self._set_level(budget, Level.SHED)
            else:
                budget.sample_n *= 2

    def _set_level(self, budget: _Budget, level: Level) -> None:
        if budget is not self._fleet:
            self._cars_at_level[budget.level] -= 1
            self._cars_at_level[level] += 1
        budget.level = level

    def _level_for(self, load: float) -> Level:
        """The lowest level that absorbs `load` (in multiples of the budget) without shedding."""
        for level, capacity in zip(Level, self._capacity, strict=False):
            if load <= capacity:
                return level
        return Level.SHED

    def _sample_n_for(self, load: float) -> int:
        """The N whose 1-in-N coalesced fits the budget; 1 once a car at SAMPLE has slowed."""
        return min(self._max_sample_n, max(1, math.ceil(load * self._coalesce_cost)))


def _affords(budget: _Budget, cost: float, size_bytes: int) -> bool:
    return budget.msg_tokens >= cost and budget.byte_tokens >= cost * size_bytes
