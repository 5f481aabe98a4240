"""Per-caller limits: send rates (critical apart), the share of the durable queue, the
watch cap, bounded bucket maps, per-caller overrides from the config, refusal counts.

Time is a fake clock the tests move by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import load_config
from broker.core.errors import InvalidArgument, QuotaExceeded
from broker.core.lanes import BULK, CRITICAL, INTERACTIVE
from broker.core.quotas import (
    CALLER_CRITICAL_RATE,
    CALLER_QUEUE_SHARE,
    CALLER_RATE,
    REASONS,
    WATCH_CAP,
    CallerLimits,
    CallerPolicy,
    CallerQuotaExceeded,
    Refusals,
    TokenBuckets,
)


class FakeClock:
    def __init__(self) -> None:
        self.s = 0.0

    def __call__(self) -> float:
        return self.s


def limits(clock: FakeClock, pending: dict[str, int] | None = None, **kwargs: Any) -> CallerLimits:
    held = pending if pending is not None else {}
    small = CallerPolicy(
        rate_per_s=10,
        burst=20,
        critical_rate_per_s=2,
        critical_burst=4,
        queue_share=0.25,
        max_watches=2,
    )
    kwargs.setdefault("default", small)
    return CallerLimits(
        durable_queue_budget=1000, pending_of=lambda c: held.get(c, 0), clock=clock, **kwargs
    )


def refused(call: Any, *args: Any, **kwargs: Any) -> CallerQuotaExceeded:
    with pytest.raises(CallerQuotaExceeded) as info:
        call(*args, **kwargs)
    return info.value


# -- rates ----------------------------------------------------------------------------------


def test_a_caller_over_its_rate_is_refused_and_others_are_untouched() -> None:
    clock = FakeClock()
    callers = limits(clock)
    for _ in range(20):
        callers.check_send("service:rogue", INTERACTIVE)
    error = refused(callers.check_send, "service:rogue", BULK)
    assert isinstance(error, QuotaExceeded) and error.code == "RESOURCE_EXHAUSTED"
    assert error.reason == CALLER_RATE
    assert "service:rogue" in error.message and "send rate" in error.message
    assert error.retry_after_ms == 100  # 10 a second: the next token in 100 ms
    for _ in range(20):
        callers.check_send("service:fleet-app", INTERACTIVE)  # its own bucket
    clock.s += 0.1
    callers.check_send("service:rogue", INTERACTIVE)
    assert callers.refusals[CALLER_RATE] == 1


def test_critical_has_a_bucket_of_its_own() -> None:
    """A flood of the other lanes never holds an unlock back; critical is bounded too."""
    clock = FakeClock()
    callers = limits(clock)
    for _ in range(20):
        callers.check_send("service:app", BULK)
    refused(callers.check_send, "service:app", INTERACTIVE)
    for _ in range(4):
        callers.check_send("service:app", CRITICAL)  # the flood did not spend these
    error = refused(callers.check_send, "service:app", CRITICAL)
    assert error.reason == CALLER_CRITICAL_RATE and "critical send rate" in error.message
    assert error.retry_after_ms == 500
    callers.check_send("service:other", CRITICAL)


def test_a_batch_takes_one_token_per_item_and_one_larger_than_the_burst_leaves_debt() -> None:
    clock = FakeClock()
    callers = limits(clock)
    callers.check_send("service:app", BULK, 15)
    refused(callers.check_send, "service:app", BULK, 6)  # 5 left
    callers.check_send("service:app", BULK, 5)
    clock.s += 2  # full again (20)
    callers.check_send("service:app", BULK, 50)  # larger than the burst: passes when full
    error = refused(callers.check_send, "service:app", BULK)
    assert error.retry_after_ms == 3100  # 30 in debt, then one more: 3.1 s at 10 a second


def test_a_batch_is_refused_whole_while_the_rate_cannot_pay_for_it() -> None:
    """One check instead of one refusal per item for a caller flooding batches."""
    clock = FakeClock()
    callers = limits(clock)
    callers.check_batch("service:app", 20)  # takes nothing
    callers.check_send("service:app", BULK, 15)
    error = refused(callers.check_batch, "service:app", 6)
    assert error.reason == CALLER_RATE and "batch of 6" in error.message
    assert error.retry_after_ms == 100  # one more token
    assert callers.refusals[CALLER_RATE] == 6
    callers.check_batch("service:app", 5)
    callers.check_batch("service:other", 20)
    clock.s += 2
    callers.check_batch("service:app", 500)  # larger than the burst: a full bucket will do


def test_a_batch_is_refused_whole_while_its_caller_holds_its_whole_share() -> None:
    clock = FakeClock()
    pending = {"service:app": 249}
    callers = limits(clock, pending)
    callers.check_batch("service:app", 100)  # room for one: its items are judged one by one
    pending["service:app"] = 250
    error = refused(callers.check_batch, "service:app", 100)
    assert error.reason == CALLER_QUEUE_SHARE and "whole share" in error.message


# -- the share of the durable queue ---------------------------------------------------------


def test_a_caller_holding_its_share_is_refused_and_others_are_not() -> None:
    clock = FakeClock()
    pending = {"service:rogue": 250, "service:app": 10}  # a share is 0.25 x 1000
    callers = limits(clock, pending)
    error = refused(callers.check_send, "service:rogue", INTERACTIVE)
    assert error.reason == CALLER_QUEUE_SHARE and error.code == "RESOURCE_EXHAUSTED"
    assert "service:rogue" in error.message and "share of the durable queue" in error.message
    assert error.retry_after_ms is not None and 1000 <= error.retry_after_ms <= 3000
    callers.check_send("service:rogue", CRITICAL)  # never refused for depth
    callers.check_send("service:app", INTERACTIVE)
    assert callers.refusals[CALLER_QUEUE_SHARE] == 1


def test_the_share_degrades_by_lane_as_the_budget_does() -> None:
    clock = FakeClock()
    pending = {"service:app": 200}  # 80 % of its share of 250
    callers = limits(clock, pending)
    refused(callers.check_send, "service:app", BULK)
    callers.check_send("service:app", INTERACTIVE)
    assert callers.queue_share_limit("service:app", BULK) == 200
    assert callers.queue_share_limit("service:app", INTERACTIVE) == 250
    # A batch that would take it past the share is refused whole, and spends no rate.
    pending["service:app"] = 240
    refused(callers.check_send, "service:app", INTERACTIVE, 11)
    for _ in range(19):
        callers.check_send("service:app", INTERACTIVE)  # 20 - the 1 taken above


def test_items_of_one_batch_count_against_the_share_before_they_are_written() -> None:
    clock = FakeClock()
    callers = limits(clock, {"service:app": 245})
    for ahead in range(5):
        callers.check_send("service:app", INTERACTIVE, ahead=ahead)
    refused(callers.check_send, "service:app", INTERACTIVE, ahead=5)


# -- watches ---------------------------------------------------------------------------------


def test_watches_are_capped_per_caller() -> None:
    callers = limits(FakeClock())
    with callers.watching("service:app"), callers.watching("service:app"):
        error = refused(callers.open_watch, "service:app")
        assert error.reason == WATCH_CAP and "2 WatchCommands streams open" in error.message
        with callers.watching("service:other"):
            assert callers.watches_by_caller == {"service:app": 2, "service:other": 1}
    assert callers.watches("service:app") == 0
    assert callers.watches_by_caller == {}  # nothing kept for callers with none open
    with callers.watching("service:app"):
        pass
    assert callers.refusals[WATCH_CAP] == 1


def test_a_refused_watch_holds_nothing() -> None:
    callers = limits(FakeClock())
    callers.open_watch("service:app")
    callers.open_watch("service:app")
    with pytest.raises(CallerQuotaExceeded), callers.watching("service:app"):
        pass
    callers.close_watch("service:app")
    callers.close_watch("service:app")
    assert callers.watches("service:app") == 0


# -- overrides, bounds, counts ---------------------------------------------------------------


def test_one_caller_may_have_its_own_limits() -> None:
    clock = FakeClock()
    pending = {"service:bulk-loader": 900}
    callers = limits(
        clock,
        pending,
        overrides={"service:bulk-loader": CallerPolicy(rate_per_s=1000, burst=1000, queue_share=1)},
    )
    callers.check_send("service:bulk-loader", INTERACTIVE, 100)
    refused(callers.check_send, "service:bulk-loader", INTERACTIVE, 101)  # its share: 1000
    callers.check_send("service:app", INTERACTIVE, 20)  # the default burst: 20
    refused(callers.check_send, "service:app", INTERACTIVE)


def test_bucket_maps_stay_bounded_under_a_flood_of_names() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(max_buckets=100, clock=clock)
    for i in range(10_000):
        assert buckets.take(f"caller-{i}", 1.0, 5.0) == 0.0
        clock.s += 0.0001
    assert len(buckets) == 100
    clock.s += 10  # refilled: forgotten at the next take
    buckets.take("last", 1.0, 5.0)
    assert len(buckets) == 1


def test_a_looping_key_is_never_the_one_pushed_out() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(max_buckets=10, clock=clock)
    for i in range(100):
        buckets.take("looper", 0.001, 5.0)
        buckets.take(f"other-{i}", 1.0, 5.0)
    assert buckets.take("looper", 0.001, 5.0) > 0  # still spent: not reset by eviction


def test_wait_s_looks_without_taking() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(clock=clock)
    assert buckets.wait_s("k", 1.0, 2.0) == 0.0 and len(buckets) == 0
    buckets.take("k", 1.0, 2.0, 2)
    assert buckets.wait_s("k", 1.0, 2.0) == 1.0
    clock.s += 0.5
    assert buckets.wait_s("k", 1.0, 2.0) == 0.5
    assert buckets.wait_s("k", 1.0, 2.0, 5) == 1.5  # more than the burst: a full bucket


def test_give_back_returns_a_token_up_to_the_burst() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(clock=clock)
    buckets.take("k", 1.0, 1.0)
    assert buckets.take("k", 1.0, 1.0) > 0
    buckets.give_back("k", 1.0)
    assert buckets.take("k", 1.0, 1.0) == 0.0
    buckets.give_back("k", 1.0)
    buckets.give_back("k", 1.0)  # never past the burst
    assert buckets.take("k", 1.0, 1.0) == 0.0
    assert buckets.take("k", 1.0, 1.0) > 0


def test_refusals_are_counted_by_a_fixed_set_of_reasons() -> None:
    refusals = Refusals()
    assert set(refusals.counts) == set(REASONS)
    refusals.count(CALLER_RATE, 3)
    assert refusals[CALLER_RATE] == 3 and refusals["nothing"] == 0
    assert len(set(REASONS)) == len(REASONS)


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="queue_share"):
        CallerLimits(default=CallerPolicy(queue_share=0))
    with pytest.raises(ValueError, match=r"callers\.x\.rate_per_s"):
        CallerLimits(overrides={"x": CallerPolicy(rate_per_s=0)})


# -- the config ------------------------------------------------------------------------------

SECRET_ENV = {
    "BROKER_AUTH_VEHICLE_KEYS": "keys/vehicle.public.pem",
    "BROKER_AUTH_SERVICE_KEYS": "keys/service.public.pem",
}


def test_per_caller_overrides_from_toml(tmp_path: Path) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text(
        'caller_rate_per_s = 50\n[callers."service:fleet-app"]\nrate_per_s = 500\n'
        "queue_share = 0.9\nmax_watches = 5000\n"
    )
    config = load_config({}, config_file=toml, environ=SECRET_ENV)
    app = config.caller_policy("service:fleet-app")
    assert (app.rate_per_s, app.queue_share, app.max_watches) == (500, 0.9, 5000)
    assert app.burst == config.caller_burst  # keys not given keep the default
    assert config.caller_policy("service:other").rate_per_s == 50
    callers = CallerLimits.from_config(config, pending_of=lambda caller: 0)
    assert callers.policy("service:fleet-app") == app
    assert callers.policy("service:other") == config.caller_policy("")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[callers."service:a"]\nspeed = 1\n', "unknown"),
        ('[callers."service:a"]\nqueue_share = 2\n', "queue_share"),
        ('[callers."service:a"]\nrate_per_s = "fast"\n', "rate_per_s"),
        ("callers = 3\n", "callers"),
        ("caller_queue_share = 0\n", "queue_share"),
        ("max_outbox_per_car = 0\n", "max_outbox_per_car"),
    ],
)
def test_bad_caller_settings_are_refused_clearly(tmp_path: Path, text: str, needle: str) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text(text)
    with pytest.raises(InvalidArgument, match=needle):
        load_config({}, config_file=toml, environ=SECRET_ENV)


def test_the_defaults_never_bother_a_normal_fleet() -> None:
    config = load_config({}, environ=SECRET_ENV)
    default = config.caller_policy("service:fleet-app")
    assert default.rate_per_s >= 1000 and default.critical_rate_per_s >= 50
    assert default.queue_share * config.durable_queue_budget >= 500_000
    assert default.max_watches >= 1000
    assert config.max_outbox_per_car >= 64
