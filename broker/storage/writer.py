"""The one LMDB thread: every transaction of the store runs here, in group commits.

LMDB binds a write transaction to the thread that began it, and `set_mapsize` needs no
transaction open anywhere in the process; running every transaction (reads included) on
this one thread satisfies both and keeps the event loop free of blocking calls.

Group commit: the thread takes whatever operations are queued (up to `group_max`), runs
them all in one write transaction and commits once, so under load one fsync covers many
commands, and at low load a lone command waits for no timer.

A group whose commit fails (a full disk, an I/O error, a full map that cannot grow) is
run again one operation at a time, so one failed write never fails its neighbours: reads
and the writes that still fit go through, each failure gets its own explained error.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

import lmdb

from broker.core.errors import BrokerError, InvalidArgument, StoreUnavailable, retry_hint_ms

logger = logging.getLogger(__name__)
T = TypeVar("T")

Op = Callable[[Any], T]  # runs with an open lmdb write transaction


class _Job(NamedTuple, Generic[T]):
    op: Op[T]
    future: asyncio.Future[T]


class Writer:
    """Runs store operations on one thread, committing them in groups."""

    def __init__(
        self,
        env: Any,
        *,
        group_max: int,
        map_size_max: int,
        relaxed_sync_interval_s: float | None,
        before_commit: Callable[[Any], None] | None = None,
        after_commit: Callable[[], None] | None = None,
        diagnose: Callable[[BaseException], str] = str,
    ) -> None:
        """On this thread: `before_commit(txn)` after a group's operations ran, before its
        commit; `after_commit()` after every successful commit; `diagnose(exc)` explains
        a failed write (the message a refused caller gets)."""
        self._env = env
        self._before_commit = before_commit
        self._after_commit = after_commit
        self._diagnose = diagnose
        self._group_max = group_max
        self._map_size_max = map_size_max
        self._relaxed_sync_interval_s = relaxed_sync_interval_s
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lmdb-writer", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.groups_committed = 0
        self.ops_committed = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def submit(self, op: Op[T]) -> asyncio.Future[T]:
        """Queue `op`; the future resolves after the group holding it is committed."""
        assert self._loop is not None, "writer not started"
        future: asyncio.Future[T] = self._loop.create_future()
        if self._closed:
            future.set_exception(StoreUnavailable("the store is closed (broker shutting down)"))
            return future
        self._jobs.put(_Job(op, future))
        return future

    async def close(self) -> None:
        """Finish every queued job, then stop the thread. Call on the event loop."""
        if self._closed:
            return
        self._closed = True  # set on the loop, so no submit() can slip in after the sentinel
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except RuntimeError:  # the event loop is gone: nobody is waiting any more
            logger.warning("writer: event loop closed; stopping")
        except BaseException:
            logger.exception("writer thread failed; the store refuses further work")
            self._closed = True
            self._fail_leftovers()
            raise

    def _serve(self) -> None:
        interval = self._relaxed_sync_interval_s
        last_sync = time.monotonic()
        stop = False
        while not stop:
            group: list[_Job[Any]] = []
            try:
                first = self._jobs.get(timeout=interval)
            except queue.Empty:  # relaxed mode's idle wake-up: only the sync below
                first = None
            else:
                if first is None:
                    stop = True
                else:
                    group.append(first)
            while group and len(group) < self._group_max:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                group.append(job)
            if group:
                self._run_group(group)
            # Relaxed mode: commits skip fsync, so sync at least every `interval`, busy or
            # idle, to bound what a power loss can cost.
            if interval is not None and time.monotonic() - last_sync >= interval:
                self._env.sync(True)
                last_sync = time.monotonic()
        if interval is not None:
            self._env.sync(True)

    def _fail_leftovers(self) -> None:
        error = StoreUnavailable("the store's writer stopped; the broker must be restarted")
        leftovers = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                leftovers.append(job)
        if leftovers and self._loop is not None:
            self._loop.call_soon_threadsafe(_settle, leftovers, [(False, error)] * len(leftovers))

    def _run_group(self, group: list[_Job[Any]]) -> None:
        while True:
            try:
                outcomes = self._commit(group)
            except lmdb.MapFullError:
                if self._grow():
                    continue
                outcomes = [self._commit_alone(job) for job in group]
            except _OpBug:
                outcomes = [self._commit_alone(job) for job in group]
            except lmdb.Error as exc:
                logger.error("lmdb commit failed: %s", self._diagnose(exc))
                outcomes = [self._commit_alone(job) for job in group]
            break
        self.groups_committed += 1
        self.ops_committed += len(group)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle, group, outcomes)

    def _commit(self, group: list[_Job[Any]]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        txn = self._env.begin(write=True)
        try:
            for job in group:
                try:
                    outcomes.append((True, job.op(txn)))
                except BrokerError as exc:
                    # Operations raise domain errors before they write anything.
                    outcomes.append((False, exc))
                except lmdb.BadValsizeError as exc:  # a key the caller made too long
                    raise _OpBug() from exc
                except lmdb.Error:
                    raise
                except Exception as exc:
                    raise _OpBug() from exc
            if self._before_commit is not None:
                self._before_commit(txn)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        if self._after_commit is not None:
            self._after_commit()
        return outcomes

    def _commit_alone(self, job: _Job[Any]) -> tuple[bool, Any]:
        """Rerun one job of a group that failed, to isolate the culprit."""
        try:
            return self._commit([job])[0]
        except _OpBug as bug:
            if isinstance(bug.__cause__, lmdb.BadValsizeError):
                return False, InvalidArgument(f"a key is too long or empty: {bug.__cause__}")
            logger.exception("store operation failed", exc_info=bug.__cause__)
            return False, StoreUnavailable(f"store operation failed: {bug.__cause__!r}")
        except lmdb.Error as exc:
            # Nothing of it was written; the condition (full disk or map) may pass.
            return False, StoreUnavailable(
                f"{self._diagnose(exc)}; nothing accepted is lost", retry_after_ms=retry_hint_ms()
            )

    def _grow(self) -> bool:
        current = int(self._env.info()["map_size"])
        if current >= self._map_size_max:
            return False
        new_size = min(current * 2, self._map_size_max)
        try:
            self._env.set_mapsize(new_size)
        except lmdb.Error as exc:  # e.g. the disk cannot hold a larger map
            logger.error("lmdb map could not grow to %d bytes: %s", new_size, exc)
            return False
        logger.warning("lmdb map full: grew map_size from %d to %d bytes", current, new_size)
        return True


class _OpBug(Exception):
    """An operation raised something that is not a domain error."""


def _settle(group: list[_Job[Any]], outcomes: list[tuple[bool, Any]]) -> None:
    for job, (ok, value) in zip(group, outcomes, strict=True):
        if job.future.done():
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)
