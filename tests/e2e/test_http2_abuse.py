"""Raw HTTP/2 floods from a peer with no credential (loadtests/h2flood.py sends them with
the `h2` package), against a real broker subprocess: its RSS stays within +100 MB, a
healthy car's unlocks still succeed, and streams that never send a message are answered.

Before this was fixed (pending-request caps raised to 100,000/200,000, unary handlers run
only once the message arrived): 200,000 rapid-reset pairs took the broker from 48 MB to
1.65 GB and an unlock to 12.6 s; 20,000 header-only streams cost +418 MB and none was
answered within 30 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from broker.testing import LOOPBACK, BrokerProcess, status_kb
from loadtests import h2flood

RSS_BUDGET_MB = 100
FIRST_MESSAGE_TIMEOUT_S = 2.0


def rss_mb(broker: BrokerProcess) -> float:
    return status_kb(broker.pid)["VmRSS"] / 1024


async def flood_with_canary(
    broker: BrokerProcess, keys: Any, flood: Callable[[], h2flood.FloodResult]
) -> tuple[h2flood.FloodResult, float, float, list[float], list[str]]:
    """Run `flood` on a thread while the canary car gets unlocks; then one more unlock
    after the flood. Returns (flood result, RSS before, RSS after in MB, unlock latencies,
    refused tries)."""
    stop = asyncio.Event()
    car = asyncio.create_task(h2flood.canary(broker.target, keys, stop))
    await asyncio.sleep(1.0)  # the car connected, a few unlocks done
    before = rss_mb(broker)
    result = await asyncio.to_thread(flood)
    after = rss_mb(broker)
    await asyncio.sleep(0.5)  # unlocks sent after the flood
    stop.set()
    latencies, failures = await asyncio.wait_for(car, 30)
    print(
        f"{result.as_dict()} rss {before:.1f} -> {after:.1f} MB; canary "
        f"{len(latencies)} unlocks, max {max(latencies, default=0) * 1000:.0f} ms, "
        f"refused tries {failures}"
    )
    return result, before, after, latencies, failures


async def test_rapid_reset_leaves_memory_bounded_and_the_car_served(
    spawn: Callable[..., BrokerProcess], auth_keys: Any
) -> None:
    broker = spawn(env=h2flood.CANARY_QUOTA)
    result, before, after, latencies, _ = await flood_with_canary(
        broker,
        auth_keys,
        lambda: h2flood.rapid_reset(LOOPBACK, broker.port, pairs=200_000, duration_s=20),
    )
    assert result.sent >= 50_000, result
    assert after - before < RSS_BUDGET_MB, (before, after)
    assert latencies, "no unlock succeeded during or after the flood"
    assert broker.running


async def test_header_only_streams_are_answered_within_the_bound(
    spawn: Callable[..., BrokerProcess], auth_keys: Any
) -> None:
    broker = spawn(
        env={
            **h2flood.CANARY_QUOTA,
            "BROKER_FIRST_MESSAGE_TIMEOUT_S": str(FIRST_MESSAGE_TIMEOUT_S),
        }
    )

    def both() -> h2flood.FloodResult:
        # No credential: refused as soon as the HEADERS arrive.
        anonymous = h2flood.header_only(LOOPBACK, broker.port, streams=10_000, hold_s=10)
        assert (anonymous.answered, anonymous.unanswered) == (10_000, 0), anonymous
        assert anonymous.slowest_answer_s is not None and anonymous.slowest_answer_s < 5
        # A valid token but never a message: ended after first_message_timeout_s.
        token = auth_keys.service_token("send", "read")
        started = time.monotonic()
        silent = h2flood.header_only(
            LOOPBACK,
            broker.port,
            streams=500,
            hold_s=FIRST_MESSAGE_TIMEOUT_S + 10,
            metadata=[("authorization", f"Bearer {token}")],
        )
        print(f"authenticated, never a message: {silent.as_dict()}")
        assert (silent.answered, silent.unanswered) == (500, 0), silent
        assert silent.slowest_answer_s is not None
        assert silent.slowest_answer_s >= FIRST_MESSAGE_TIMEOUT_S * 0.9
        assert silent.slowest_answer_s < FIRST_MESSAGE_TIMEOUT_S + 5
        assert time.monotonic() - started < FIRST_MESSAGE_TIMEOUT_S + 10
        return anonymous

    _, before, after, latencies, _ = await flood_with_canary(broker, auth_keys, both)
    assert after - before < RSS_BUDGET_MB, (before, after)
    assert latencies, "no unlock succeeded during or after the flood"
