"""The per-car outbox and session: order, batching, waking the one writer, closing."""

from __future__ import annotations

import asyncio

from broker.core.sessions import CLOSE, Outbox, Session


async def test_outbox_hands_out_in_order_and_in_bounded_batches() -> None:
    outbox = Outbox()
    for n in range(5):
        outbox.put(n)
    assert len(outbox) == 5
    assert await outbox.take(3) == [0, 1, 2]
    assert await outbox.take(3) == [3, 4]
    assert len(outbox) == 0


async def test_outbox_wakes_a_waiting_writer() -> None:
    outbox = Outbox()
    taker = asyncio.create_task(outbox.take(10))
    await asyncio.sleep(0)
    assert not taker.done()
    outbox.put("a")
    outbox.put("b")  # both arrive before the writer runs: one batch
    assert await asyncio.wait_for(taker, 1) == ["a", "b"]


async def test_outbox_survives_a_cancelled_writer() -> None:
    outbox = Outbox()
    taker = asyncio.create_task(outbox.take(1))
    await asyncio.sleep(0)
    taker.cancel()
    await asyncio.gather(taker, return_exceptions=True)
    outbox.put("x")  # no waiter left to wake; nothing raises
    assert await outbox.take(1) == ["x"]


async def test_session_close_ends_with_close_and_drops_later_frames() -> None:
    session = Session("car-1", now_ms=1)
    session.send("frame")
    session.close()
    session.send("too late")
    session.close()  # idempotent
    assert await session.outbox.take(10) == ["frame", CLOSE]
