"""`eventually` (tests/conftest.py): waits on sync and async probes, fails loudly."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import eventually


async def test_returns_the_first_value_accepted_from_a_sync_probe() -> None:
    values = iter([0, 0, 3, 4])
    assert await eventually(lambda: next(values), interval_s=0) == 3


async def test_awaits_an_async_probe_and_applies_accept() -> None:
    calls = 0

    async def probe() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert await eventually(probe, lambda n: n >= 3, interval_s=0) == 3


async def test_a_probe_or_accept_that_raises_is_not_yet_held() -> None:
    attempts = iter([KeyError("absent"), 1, 2])

    def probe() -> int:
        value = next(attempts)
        if isinstance(value, Exception):
            raise value
        return value

    def accept(value: int) -> bool:
        assert value == 2, value
        return True

    assert await eventually(probe, accept, interval_s=0) == 2


async def test_a_timeout_names_the_condition_and_the_last_value_seen() -> None:
    with pytest.raises(AssertionError) as failed:
        await eventually(lambda: [1, 2], lambda v: len(v) > 5, timeout_s=0.05, what="growth")
    message = str(failed.value)
    assert message.startswith("growth did not hold within 0.05s")
    assert "the probe last returned [1, 2]" in message
    assert failed.value.__cause__ is None


async def test_a_timeout_shows_and_chains_what_was_last_raised() -> None:
    async def probe() -> int:
        raise ConnectionError("the broker is down")

    with pytest.raises(AssertionError) as failed:
        await eventually(probe, timeout_s=0.05, what="a reply")
    assert "the probe last raised ConnectionError('the broker is down')" in str(failed.value)
    assert isinstance(failed.value.__cause__, ConnectionError)


async def test_a_timeout_shows_why_accept_refused_the_last_value() -> None:
    def accept(value: int) -> bool:
        assert value > 1, f"only {value}"
        return True

    with pytest.raises(AssertionError) as failed:
        await eventually(lambda: 1, accept, timeout_s=0.05)
    message = str(failed.value)
    assert "the last value was refused with AssertionError('only 1" in message
    assert message.endswith(": 1")


async def test_a_huge_last_value_is_cut_short() -> None:
    with pytest.raises(AssertionError) as failed:
        await eventually(lambda: "x" * 100_000, lambda v: False, timeout_s=0.01)
    assert len(str(failed.value)) < 3000
    assert "(100002 characters)" in str(failed.value)


async def test_cancellation_is_not_swallowed() -> None:
    async def probe() -> int:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await eventually(probe, timeout_s=5)


def test_sync_code_runs_it_on_a_fresh_loop() -> None:
    values = iter(["", "", "ready"])
    assert asyncio.run(eventually(lambda: next(values), interval_s=0)) == "ready"
