"""The LMDB writer thread: group commits, per-operation errors, closing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import lmdb
import pytest

from broker.core.errors import NotFound, StoreUnavailable
from broker.storage.writer import Writer


@pytest.fixture
def env(tmp_path: Path) -> Any:
    environment = lmdb.open(str(tmp_path / "db"), map_size=16 << 20, max_dbs=2, sync=False)
    yield environment
    environment.close()


@pytest.fixture
async def writer(env: Any) -> AsyncIterator[Writer]:
    instance = Writer(env, group_max=8, map_size_max=16 << 20, relaxed_sync_interval_s=None)
    instance.start(asyncio.get_running_loop())
    yield instance
    await instance.close()


def put(key: bytes) -> Callable[[Any], bytes]:
    def op(txn: Any) -> bytes:
        txn.put(key, b"1")
        return key

    return op


async def hold_the_writer(writer: Writer) -> tuple[asyncio.Future[None], threading.Event]:
    """Occupy the writer thread until the returned event is set, so later jobs queue up."""
    running, release = threading.Event(), threading.Event()

    def op(txn: Any) -> None:
        running.set()
        release.wait(5)

    held = writer.submit(op)
    assert await asyncio.to_thread(running.wait, 5)
    return held, release


async def test_queued_jobs_commit_in_groups_of_at_most_group_max(writer: Writer, env: Any) -> None:
    held, release = await hold_the_writer(writer)
    futures = [writer.submit(put(b"k%02d" % i)) for i in range(20)]
    release.set()
    await held
    assert await asyncio.gather(*futures) == [b"k%02d" % i for i in range(20)]
    # The holder's group, then 20 queued jobs in groups of 8, 8 and 4.
    assert (writer.groups_committed, writer.ops_committed) == (4, 21)
    with env.begin() as txn:
        assert sum(1 for _ in txn.cursor()) == 20


async def test_a_failing_operation_fails_alone(
    writer: Writer, env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(txn: Any) -> None:
        txn.put(b"broken", b"1")
        raise RuntimeError("bug in an operation")

    def not_found(txn: Any) -> None:
        raise NotFound("no such thing")

    held, release = await hold_the_writer(writer)
    futures = [writer.submit(op) for op in (put(b"a"), broken, put(b"c"), not_found)]
    release.set()
    await held
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert outcomes[0] == b"a" and outcomes[2] == b"c"
    assert isinstance(outcomes[1], StoreUnavailable)
    assert "bug in an operation" in outcomes[1].message
    assert isinstance(outcomes[3], NotFound)
    with env.begin() as txn:
        assert [k for k, _ in txn.cursor()] == [b"a", b"c"]  # the broken write rolled back
    assert any("store operation failed" in r.getMessage() for r in caplog.records)


async def test_close_commits_what_was_queued_then_refuses(writer: Writer, env: Any) -> None:
    futures = [writer.submit(put(b"k%d" % i)) for i in range(5)]
    await writer.close()
    assert await asyncio.gather(*futures) == [b"k%d" % i for i in range(5)]
    with pytest.raises(StoreUnavailable, match="closed"):
        await writer.submit(put(b"late"))
    with env.begin() as txn:
        assert txn.get(b"late") is None
