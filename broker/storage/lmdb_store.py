"""The durable command store on LMDB: the command lifecycle made crash-safe.

The rules (which status changes are allowed, what each writes, when a timer is due) are
`broker/core/lifecycle.py`; this module persists their records and keeps the indexes in
step. Every operation here runs inside a write transaction on the writer thread (see
`broker/storage/writer.py`) and returns only after its group is committed — fsynced in the
default durability mode — so "accepted" always means "on disk".

Databases (all keys sort bytewise):
- `commands`   command_id -> Command (protobuf; the record is the wire type; a payload
               over INLINE_PAYLOAD_MAX bytes is kept apart, in `payloads`)
- `payloads`   command_id -> payload bytes (written once: a status change rewrites the
               small record only, so draining a full store needs little room)
- `by_vehicle` vehicle_id 0x00 seq -> command_id          (ListCommands, newest first)
- `timers`     at_ms command_id -> ""                     (every command's next deadline)
- `idem`       scope 0x00 idempotency_key -> command_id (scope: the calling principal)
- `coalesce`   vehicle_id 0x00 sender 0x00 coalesce_key -> command_id (the newest holder of
               the sender's key)
- `pending`    vehicle_id 0x00 (255-lane) seq -> command_id (non-terminal commands only,
               in dispatch order: what a car gets when it connects)
- `states`     vehicle_id -> VehicleState (last known fields)
- `meta`       b"seq" -> last sequence number; b"schema" -> layout version;
               b"clock" -> the highest broker time written, the boot-time clock then
               and the boot's id (a restart resumes from it: see broker/core/clock.py)

Each command has exactly one timer, derived from its record (`lifecycle.timer_at`): its expiry
while it waits in the queue (never sent, or sent and then re-queued because its car went
away), its result deadline while it is on the wire (DELIVERED or ACKED), its purge time
once terminal. A re-queued command has no result deadline: it gets a new one only when
it is on the wire again.

Space: after commits the store measures how much room is left in the LMDB map and on the
disk (`room_bytes`). New commands are refused early while that is below the reserve, so
the status changes of what was already accepted (each rewrites its record) always fit.

Nothing here keeps commands in memory: a parked car's queue lives only on disk until the
car connects (`load_pending`), so millions of queued commands cost disk, not RAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable, Container, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

import lmdb

from broker.core import clock, lifecycle
from broker.core.clock import BOOT_ID
from broker.core.errors import BrokerError, NotFound, StoreUnavailable
from broker.core.lifecycle import TERMINAL
from broker.core.store import Created, NewCommand, new_command_id
from broker.core.store import Store as StoreInterface
from broker.storage.writer import Writer
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t
from broker_ext import codec

logger = logging.getLogger(__name__)

_SEQ_KEY = b"seq"
_CLOCK_KEY = b"clock"
_NOTHING: Mapping[int, int] = MappingProxyType({})
_SCHEMA_KEY = b"schema"
#: 2: the `pending` index exists (a folder written before it gets it built on open);
#: 3: payloads over INLINE_PAYLOAD_MAX live in `payloads` (a version before 3 would read
#: those commands with empty payloads: rolling back past it is not possible)
#: 4: coalesce keys are scoped by sender (`_coalesce_key`)
_SCHEMA = 4
#: payloads larger than this live in `payloads`, written once (see the module docstring)
INLINE_PAYLOAD_MAX = 512
#: how often (at most) the room left in the map and on the disk is measured
SPACE_CHECK_INTERVAL_S = 0.2
#: timers looked at per sweep for reclaiming while the store is short of room, and how
#: long a command must have been terminal before it may go ahead of its retention
RECLAIM_BATCH = 1000
RECLAIM_MIN_AGE_MS = 60_000


def _lock_folder(path: Path) -> IO[bytes]:
    """Make the data folder private and hold an exclusive lock on it for this process's
    lifetime.

    The folder is 0700 and every file in it 0600 whatever the umask (commands carry
    payloads such as unlock PINs), so no other local user can read the store or take
    the lock. Two brokers on one folder would each keep their own sequence counter and
    corrupt each other's indexes. The kernel drops the lock when the process dies (even
    by kill -9), so a restart never finds a stale lock.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_uid != os.geteuid():
            raise OSError(f"it belongs to another user (uid {path.stat().st_uid})")
        path.chmod(0o700)
        fd = os.open(path / "broker.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        lock_file = os.fdopen(fd, "r+b")
        for name in DATA_FILES:  # written by an older version, or with a looser umask
            with contextlib.suppress(FileNotFoundError):
                (path / name).chmod(0o600)
    except OSError as exc:
        raise StoreUnavailable(f"cannot use {path} as the data folder: {exc}") from None
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.close()
        raise StoreUnavailable(
            f"the data folder {path} is in use by another broker process"
        ) from None
    return lock_file


#: the files LMDB keeps in the data folder (created 0600: `lmdb.open(mode=...)`)
DATA_FILES = ("data.mdb", "lock.mdb")


def _pending_key(command: t.Command) -> bytes:
    return codec.pending_key(command.vehicle_id, command.lane, command.seq)


def _coalesce_key(command: t.Command | NewCommand) -> bytes:
    """Coalesce keys are the sender's own: another's never supersedes its command."""
    return codec.coalesce_key(command.vehicle_id, f"{command.sender}\x00{command.coalesce_key}")


def _idem_key(scope: str, key: str) -> bytes:
    return scope.encode() + b"\x00" + key.encode()


class LmdbStore(StoreInterface):
    """Async façade over the LMDB environment; all work runs on the writer thread."""

    def __init__(
        self,
        path: Path,
        *,
        map_size: int = 256 << 20,
        map_size_max: int = 64 << 30,
        fsync: bool = True,
        group_max: int = 1024,
        retention_ms: int = 7 * 86_400_000,
        idempotency_window_ms: int = 86_400_000,
        reserve_bytes: int = 64 << 20,
    ) -> None:
        self._path = path
        self._lock_file = _lock_folder(path)
        try:
            self._env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=9,
                sync=fsync,
                metasync=fsync,
                map_async=False,
                mode=0o600,
            )
        except lmdb.Error as exc:
            self._lock_file.close()
            raise StoreUnavailable(f"cannot open the store in {path}: {exc}") from None
        self._high_water_ms = 0
        self._high_water_steady_ns = 0
        self._high_water_boot = ""
        self._stamp_steady_ns = 0
        self._disk_bound = False
        # Named databases must be opened in a write transaction; this one runs before the
        # writer thread exists, so it grows the map itself (an older folder's first open
        # builds the pending index, which may not fit the configured map).
        while True:
            try:
                raw_seq = self._open_dbs()
                break
            except StoreUnavailable:
                self._env.close()
                self._lock_file.close()
                raise
            except lmdb.MapFullError:
                size = int(self._env.info()["map_size"])
                if size >= map_size_max:
                    self._env.close()
                    self._lock_file.close()
                    raise StoreUnavailable(
                        f"the store in {path} needs more than map_size_max_mb to open"
                    ) from None
                self._env.set_mapsize(min(size * 2, map_size_max))
        self._seq = int.from_bytes(raw_seq, "big") if raw_seq else 0
        self._retention_ms = retention_ms
        self._idempotency_window_ms = idempotency_window_ms
        self._map_size_max = map_size_max
        self._reserve_bytes = reserve_bytes
        self._page_size = int(self._env.stat()["psize"])
        #: set by operations that write timestamps: the group stamps the clock key
        self._stamp_due = False
        self._stamp_ms = 0
        self._stamp_written = 0
        self._reclaim_from = b""
        self._space_checked_at = 0.0
        self._room_bytes = map_size_max
        self._space_refusals = 0
        self._measure_space()
        self._writer = Writer(
            self._env,
            group_max=group_max,
            map_size_max=map_size_max,
            relaxed_sync_interval_s=None if fsync else 1.0,
            before_commit=self._stamp_clock,
            after_commit=self._after_commit,
            diagnose=self.diagnose,
        )

    @property
    def writer(self) -> Writer:
        return self._writer

    @property
    def commits(self) -> int:
        """Group commits (each makes many operations durable at once)."""
        return self._writer.groups_committed

    @property
    def operations(self) -> int:
        return self._writer.ops_committed

    @property
    def pending(self) -> int:
        """Non-terminal commands on disk (the durable queue's depth), as of the last commit."""
        return self._pending_count

    @property
    def clock_reference(self) -> tuple[int, int, str]:
        """`(highest broker time written, boot-time clock ns then, boot id)`, for
        `Clock.resume` (zeros and "" for a new store)."""
        return self._high_water_ms, self._high_water_steady_ns, self._high_water_boot

    def space_problem(self, *, critical: bool = False) -> str | None:
        """Why new commands must be refused now for lack of space, or None.

        Critical commands may use half of the reserve; the rest is kept for the status
        changes of commands already accepted (delivery, results, expiry).
        """
        reserve = self._reserve_bytes // 2 if critical else self._reserve_bytes
        if self._room_bytes >= reserve:
            return None
        self._space_refusals += 1
        return self._space_text()

    @property
    def room_bytes(self) -> int:
        """Room for more data, in the map (up to map_size_max) and on the disk: the lesser."""
        return self._room_bytes

    @property
    def reserve_bytes(self) -> int:
        return self._reserve_bytes

    @property
    def space_refusals(self) -> int:
        """New commands refused for lack of room (metrics)."""
        return self._space_refusals

    def _space_text(self) -> str:
        if self._disk_bound:
            return (
                f"the disk holding the store ({self._path}) is nearly full: "
                f"{self._room_bytes >> 10} KiB of room left, {self._reserve_bytes >> 10} KiB "
                "are kept for commands already accepted"
            )
        return (
            f"the store's LMDB map is nearly full ({self._room_bytes >> 10} KiB of room left "
            f"of map_size_max_mb={self._map_size_max >> 20}); terminal commands are being "
            "purged ahead of retention to make room"
        )

    def diagnose(self, exc: BaseException) -> str:
        """A failed write, explained: a full disk says so even where the OS said EIO."""
        self._space_checked_at = 0.0
        self._measure_space()
        if isinstance(exc, lmdb.MapFullError):
            return self._space_text()
        if getattr(exc, "errno", None) == errno.ENOSPC or self._room_bytes < self._reserve_bytes:
            return f"{self._space_text()} (the write failed: {exc})"
        return f"the store cannot write: {exc}"

    def _stamp_clock(self, txn: Any) -> None:
        # On the writer thread, before each commit: a group that wrote timestamps also
        # records the clock, so a restart's clock never goes behind what is stored.
        self._stamp_written = 0
        if not self._stamp_due:
            return
        self._stamp_due = False
        now_ms, steady_ns = clock.current().reference()
        stamp_ms = max(now_ms, self._stamp_ms)
        if stamp_ms > self._high_water_ms:
            value = stamp_ms.to_bytes(8, "big") + steady_ns.to_bytes(8, "big") + BOOT_ID.encode()
            txn.put(_CLOCK_KEY, value, db=self._meta)
            self._stamp_written, self._stamp_steady_ns = stamp_ms, steady_ns

    def _after_commit(self) -> None:
        if self._stamp_written:  # only now is it on disk
            self._high_water_ms = self._stamp_written
            self._high_water_steady_ns = self._stamp_steady_ns
            self._high_water_boot = BOOT_ID
        # On the writer thread after each commit: O(1), LMDB keeps the count.
        try:
            with self._env.begin(db=self._pending) as txn:
                self._pending_count = int(txn.stat(self._pending)["entries"])
        except lmdb.Error as exc:  # the commit stands; only the gauge is stale
            logger.warning("could not count pending commands: %s", exc)
        self._measure_space()

    def _measure_space(self) -> None:
        """Room for more data: in the map (up to map_size_max) and on the disk."""
        now = time.monotonic()
        near_the_reserve = self._room_bytes < 2 * self._reserve_bytes
        if now - self._space_checked_at < SPACE_CHECK_INTERVAL_S and not near_the_reserve:
            return  # far from the reserve: a burst within the interval cannot reach it
        self._space_checked_at = now
        try:
            with self._env.begin() as txn:
                used_pages = sum(
                    sum(int(stat[k]) for k in ("branch_pages", "leaf_pages", "overflow_pages"))
                    for stat in [txn.stat(db) for db in self._dbs] + [self._env.stat()]
                )
            high_water = (int(self._env.info()["last_pgno"]) + 1) * self._page_size
            disk = os.statvfs(self._path)
        except (lmdb.Error, OSError) as exc:
            logger.warning("could not measure the store's free space: %s", exc)
            return
        used = used_pages * self._page_size
        # Pages freed below the high-water mark are reused first, but a record spanning
        # several overflow pages needs a contiguous run of them, which a fragmented free
        # list may not have: count them at half. Growing past the mark needs the disk.
        freed = max(0, high_water - used) // 2
        in_map = self._map_size_max - high_water + freed
        on_disk = freed + disk.f_bavail * disk.f_frsize
        self._disk_bound = on_disk < in_map
        room = min(in_map, on_disk)
        if (room < self._reserve_bytes) != (self._room_bytes < self._reserve_bytes):
            log = logger.warning if room < self._reserve_bytes else logger.info
            log("store space: %d KiB of room (reserve %d KiB)", room >> 10,
                self._reserve_bytes >> 10)  # fmt: skip
        self._room_bytes = room

    def _open_dbs(self) -> bytes | None:
        """Open the named databases (migrating an older layout); the stored sequence."""
        with self._env.begin(write=True) as txn:
            open_db = self._env.open_db
            self._commands = open_db(b"commands", txn=txn)
            self._by_vehicle = open_db(b"by_vehicle", txn=txn)
            self._timers = open_db(b"timers", txn=txn)
            self._idem = open_db(b"idem", txn=txn)
            self._coalesce = open_db(b"coalesce", txn=txn)
            self._states = open_db(b"states", txn=txn)
            self._meta = open_db(b"meta", txn=txn)
            self._pending = open_db(b"pending", txn=txn)
            self._payloads = open_db(b"payloads", txn=txn)
            self._dbs = (
                self._commands, self._by_vehicle, self._timers, self._idem,
                self._coalesce, self._states, self._meta, self._pending, self._payloads,
            )  # fmt: skip
            raw_seq: bytes | None = txn.get(_SEQ_KEY, db=self._meta)
            raw_clock = bytes(txn.get(_CLOCK_KEY, db=self._meta) or b"")
            self._high_water_ms = int.from_bytes(raw_clock[:8], "big")
            self._high_water_steady_ns = int.from_bytes(raw_clock[8:16], "big")
            self._high_water_boot = raw_clock[16:].decode()
            raw_schema = txn.get(_SCHEMA_KEY, db=self._meta)
            schema = int.from_bytes(raw_schema, "big") if raw_schema else 1
            if schema > _SCHEMA:
                raise StoreUnavailable(
                    f"the store was written by a newer broker (layout {schema}; this one "
                    f"knows up to {_SCHEMA}): run that version"
                )
            if schema < 2:
                self._build_pending_index(txn)
            if schema < 4:
                self._scope_coalesce_keys(txn)
            if schema < _SCHEMA:
                txn.put(_SCHEMA_KEY, _SCHEMA.to_bytes(2, "big"), db=self._meta)
            self._pending_count = int(txn.stat(self._pending)["entries"])
        return raw_seq

    def _scope_coalesce_keys(self, txn: Any) -> None:
        """Schema 3 -> 4: coalesce keys move under their sender (once, on the first open)."""
        entries = list(txn.cursor(db=self._coalesce))
        for key, command_id in entries:
            txn.delete(key, db=self._coalesce)
            command = self._load(txn, bytes(command_id).decode(), with_payload=False)
            if command is not None and command.coalesce_key:
                txn.put(_coalesce_key(command), command_id, db=self._coalesce)

    def _build_pending_index(self, txn: Any) -> None:
        """Schema 1 -> 2: index every non-terminal command (once, on the first open)."""
        for _, blob in txn.cursor(db=self._commands):
            command = t.Command.FromString(blob)
            if command.status not in TERMINAL:
                txn.put(_pending_key(command), command.command_id.encode(), db=self._pending)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._writer.start(loop)

    async def close(self) -> None:
        """Commit everything queued, then close the environment."""
        await self._writer.close()
        self._env.close()
        self._lock_file.close()  # releases the folder lock

    # -- commands ----------------------------------------------------------------------

    def create(
        self,
        items: Sequence[NewCommand],
        *,
        online: Container[str],
        now_ms: int,
        deliver: Mapping[int, int] = _NOTHING,
    ) -> asyncio.Future[list[Created | BrokerError]]:
        """Enqueue commands in one write; per-item errors come back in place of a result.

        A command for a vehicle in `online` starts ACCEPTED (about to be sent), else QUEUED.
        `deliver` maps item positions to result timeouts (ms): those start DELIVERED, as if
        `mark_delivered` had run in the same transaction (the caller writes them to the car
        right after the commit, saving a second durable write).
        """

        def op(txn: Any) -> list[Created | BrokerError]:
            out: list[Created | BrokerError] = []
            for index, item in enumerate(items):
                try:
                    timeout_ms = deliver.get(index)
                    is_online = item.vehicle_id in online
                    out.append(self._create_one(txn, item, is_online, now_ms, timeout_ms))
                except BrokerError as exc:
                    out.append(exc)
            txn.put(_SEQ_KEY, self._seq.to_bytes(8, "big"), db=self._meta)
            return out

        return self._writer.submit(op)

    def _create_one(
        self,
        txn: Any,
        item: NewCommand,
        online: bool,
        now_ms: int,
        result_timeout_ms: int | None = None,
    ) -> Created:
        lifecycle.check_commit_by(item)
        if item.command_id:
            existing = self._load(txn, item.command_id)
            if lifecycle.resends(existing, item):
                return Created(existing, True, ())  # type: ignore[arg-type]
        if item.idempotency_key:
            earlier_id = txn.get(_idem_key(item.sender, item.idempotency_key), db=self._idem)
            if earlier_id is not None:
                earlier = self._load(txn, earlier_id.decode())
                window_ms = self._idempotency_window_ms
                if earlier is not None and lifecycle.repeats(
                    earlier, item, now_ms=now_ms, window_ms=window_ms
                ):
                    return Created(earlier, True, ())
        self._seq += 1
        command = lifecycle.new_record(
            item,
            command_id=item.command_id or new_command_id(now_ms),
            seq=self._seq,
            online=online,
            now_ms=now_ms,
            result_timeout_ms=result_timeout_ms,
        )
        superseded: tuple[t.Command, ...] = ()
        if item.coalesce_key:
            ckey = _coalesce_key(item)
            older_id = txn.get(ckey, db=self._coalesce)
            if older_id is not None:
                supersede = partial(lifecycle.supersede, by=command.command_id, now_ms=now_ms)
                older = self._change(txn, older_id.decode(), supersede)
                superseded = () if older is None else (older,)
            txn.put(ckey, command.command_id.encode(), db=self._coalesce)
        if item.idempotency_key:
            txn.put(
                _idem_key(item.sender, item.idempotency_key),
                command.command_id.encode(),
                db=self._idem,
            )
        command_id = command.command_id.encode()
        txn.put(codec.vehicle_key(item.vehicle_id, command.seq), command_id, db=self._by_vehicle)
        txn.put(
            codec.pending_key(item.vehicle_id, item.lane, command.seq), command_id, db=self._pending
        )
        self._save(txn, command)
        txn.put(self._timer_key(command), b"", db=self._timers)
        self._stamp(now_ms)
        return Created(command, False, superseded)

    def mark_delivered(
        self, deliveries: Sequence[tuple[str, int]], *, now_ms: int
    ) -> asyncio.Future[list[t.Command]]:
        """Record that commands go on the wire: `(command_id, result_timeout_ms)` pairs.

        Returns the commands it recorded; one not returned must not be sent (terminal, or
        past its expires_at).
        """

        def op(txn: Any) -> list[t.Command]:
            changed = []
            for command_id, result_timeout_ms in deliveries:
                deliver = partial(
                    lifecycle.deliver, now_ms=now_ms, result_timeout_ms=result_timeout_ms
                )
                command = self._change(txn, command_id, deliver)
                if command is not None:
                    changed.append(command)
            return changed

        return self._writer.submit(op)

    def mark_acked(
        self, command_id: str, *, now_ms: int, result_timeout_ms: int
    ) -> asyncio.Future[t.Command | None]:
        """The car has the command; None if the ack is stale (e.g. already terminal).

        A re-queued command the car says it has (its Hello) is back on the wire: it gets a
        new result deadline, `result_timeout_ms` from now.
        """

        ack = partial(lifecycle.ack, now_ms=now_ms, result_timeout_ms=result_timeout_ms)

        def op(txn: Any) -> t.Command | None:
            return self._change(txn, command_id, ack)

        return self._writer.submit(op)

    def record_result(
        self,
        command_id: str,
        *,
        vehicle_id: str,
        success: bool,
        message: str,
        detail: bytes,
        now_ms: int,
    ) -> asyncio.Future[t.Command | None]:
        """The car's outcome. A late result refines UNKNOWN; other terminals are final.

        None when the result is stale, unknown, or from a car the command is not for.
        """
        result = partial(
            lifecycle.result,
            vehicle_id=vehicle_id,
            success=success,
            message=message,
            detail=detail,
            now_ms=now_ms,
        )

        def op(txn: Any) -> t.Command | None:
            return self._change(txn, command_id, result)

        return self._writer.submit(op)

    def requeue(
        self, command_ids: Sequence[str], *, now_ms: int
    ) -> asyncio.Future[list[t.Command]]:
        """The car went away: commands sent but not acked wait for it again (attempt kept,
        result deadline cleared: they are re-sent, with a new one, when it is back)."""
        requeue = partial(lifecycle.requeue, now_ms=now_ms)

        def op(txn: Any) -> list[t.Command]:
            changed = []
            for command_id in command_ids:
                command = self._change(txn, command_id, requeue)
                if command is not None:
                    changed.append(command)
            return changed

        return self._writer.submit(op)

    def abandon(
        self, command_ids: Sequence[str], *, now_ms: int
    ) -> asyncio.Future[list[t.Command]]:
        """Commands whose sender gave up before they were durable: never to be sent.

        They end CANCELED and their idempotency keys are released, so the sender's retry
        with the same key creates the command afresh instead of finding this one.
        """
        abandon = partial(lifecycle.abandon, now_ms=now_ms)

        def op(txn: Any) -> list[t.Command]:
            changed = []
            for command_id in command_ids:
                command = self._change(txn, command_id, abandon)
                if command is not None:
                    self._release_idempotency_key(txn, command)
                    changed.append(command)
            return changed

        return self._writer.submit(op)

    def cancel(self, command_id: str, *, now_ms: int) -> asyncio.Future[t.Command]:
        """Cancel a command not yet sent; NotFound, or FailedPrecondition once sent."""
        cancel = partial(lifecycle.cancel, now_ms=now_ms)

        def op(txn: Any) -> t.Command:
            command = self._load(txn, command_id)
            if command is None:
                raise NotFound(f"no command {command_id!r}")
            self._apply(txn, command, cancel)
            return command

        return self._writer.submit(op)

    def fire_timers(
        self, *, now_ms: int, limit: int = 1000
    ) -> asyncio.Future[tuple[list[t.Command], int]]:
        """Expire, time out and purge what is due: `(changed commands, timers due)`;
        fewer than `limit` due means nothing due is left.

        A due key that no longer matches its command's record (an orphan, or one an older
        version computed differently) is dropped, and the record's own timer kept. While
        the store is short of room, terminal commands are also purged ahead of their
        retention (`_reclaim`).
        """

        def settle(command: t.Command) -> bool:
            return lifecycle.timer_due(command, now_ms=now_ms) is lifecycle.Due.SETTLED

        def op(txn: Any) -> tuple[list[t.Command], int]:
            changed = []
            due: list[tuple[bytes, int, str]] = []
            unreadable: list[bytes] = []
            with txn.cursor(db=self._timers) as cursor:
                for key in cursor.iternext(keys=True, values=False):
                    try:
                        at_ms, command_id = codec.split_timer_key(key)
                    except (ValueError, UnicodeDecodeError):  # not ours: dropped below
                        unreadable.append(bytes(key))
                        continue
                    if at_ms > now_ms or len(due) >= limit:
                        break
                    due.append((bytes(key), at_ms, command_id))
            for key in unreadable:
                logger.warning("dropping an unreadable timer key %r", key)
                txn.delete(key, db=self._timers)
            for key, at_ms, command_id in due:
                command = self._load(txn, command_id)
                if command is None or self._timer_at(command) != at_ms:
                    txn.delete(key, db=self._timers)
                    if command is not None:
                        txn.put(self._timer_key(command), b"", db=self._timers)
                elif self._apply(txn, command, settle):  # EXPIRED or UNKNOWN
                    changed.append(command)
                else:  # terminal, and its retention is over
                    self._purge(txn, command)
            if self._room_bytes < self._reserve_bytes:
                self._reclaim(txn, now_ms)
            return changed, len(due)

        return self._writer.submit(op)

    def _reclaim(self, txn: Any, now_ms: int) -> int:
        """Short of room: purge terminal commands ahead of their retention.

        Looks at `RECLAIM_BATCH` timers a call, going on from where the last call
        stopped (wrapping around), so over successive sweeps it reaches every terminal
        command however many are pending. A command whose idempotency key is still in
        its window is kept: a retry with that key must find it, not create a second one.
        """
        keys: list[bytes] = []
        with txn.cursor(db=self._timers) as cursor:
            positioned = cursor.set_range(self._reclaim_from) or cursor.first()
            while positioned and len(keys) < RECLAIM_BATCH:
                keys.append(bytes(cursor.key()))
                positioned = cursor.next()
            self._reclaim_from = bytes(cursor.key()) if positioned else b""
        purged = 0
        for key in keys:
            at_ms, command_id = codec.split_timer_key(key)
            command = self._load(txn, command_id, with_payload=False)
            if command is None or command.status not in TERMINAL:
                continue
            if self._timer_at(command) != at_ms:
                continue
            if command.updated_at_ms + RECLAIM_MIN_AGE_MS > now_ms:
                continue  # its caller may still be reading the outcome
            if command.idempotency_key and lifecycle.in_idempotency_window(
                command, now_ms=now_ms, window_ms=self._idempotency_window_ms
            ):
                continue
            self._purge(txn, command)
            purged += 1
        return purged

    def recover(self, *, now_ms: int, senders: dict[str, int] | None = None) -> asyncio.Future[int]:
        """After a start: anything that was on the wire is QUEUED again (sessions did not
        survive the restart). Returns how many commands are pending, and adds each
        sender's count of them to `senders`; nothing is loaded into memory (cars get
        theirs from `load_pending` when they connect)."""
        recover = partial(lifecycle.recover, now_ms=now_ms)
        counts: dict[str, int] = {}

        def op(txn: Any) -> int:
            counts.clear()  # a failed group's operations run again, one by one
            with txn.cursor(db=self._pending) as cursor:
                ids = [value.decode() for value in cursor.iternext(keys=False, values=True)]
            for command_id in ids:
                command = self._load(txn, command_id)
                if command is not None:
                    counts[command.sender] = counts.get(command.sender, 0) + 1
                    self._apply(txn, command, recover)
            return len(ids)

        def counted(future: asyncio.Future[int]) -> None:
            if senders is not None and not future.cancelled() and future.exception() is None:
                for sender, count in counts.items():
                    senders[sender] = senders.get(sender, 0) + count

        future = self._writer.submit(op)
        future.add_done_callback(counted)
        return future

    def load_pending(
        self, vehicle_ids: Sequence[str], *, limit: int | None = None
    ) -> asyncio.Future[dict[str, list[t.Command]]]:
        """Each vehicle's non-terminal commands, in dispatch order (lane, then FIFO): the
        first `limit` of them (per vehicle), or all."""
        most = limit if limit is not None else -1

        def op(txn: Any) -> dict[str, list[t.Command]]:
            out: dict[str, list[t.Command]] = {}
            with txn.cursor(db=self._pending) as cursor:
                for vehicle_id in vehicle_ids:
                    prefix = codec.vehicle_prefix(vehicle_id)
                    commands: list[t.Command] = []
                    positioned = cursor.set_range(prefix)
                    while positioned and len(commands) != most:
                        key, value = cursor.item()
                        if not key.startswith(prefix):
                            break
                        command = self._load(txn, value.decode())
                        if command is not None:
                            commands.append(command)
                        positioned = cursor.next()
                    out[vehicle_id] = commands
            return out

        return self._writer.submit(op)

    def get(self, command_id: str) -> asyncio.Future[t.Command]:
        def op(txn: Any) -> t.Command:
            command = self._load(txn, command_id)
            if command is None:
                raise NotFound(f"no command {command_id!r}")
            return command

        return self._writer.submit(op)

    def list_vehicle(
        self, vehicle_id: str, *, limit: int, sender: str | None = None
    ) -> asyncio.Future[list[t.Command]]:
        """A vehicle's commands (only `sender`'s, if given), newest first."""
        prefix = codec.vehicle_prefix(vehicle_id)
        after = prefix[:-1] + b"\x01"

        def op(txn: Any) -> list[t.Command]:
            out: list[t.Command] = []
            with txn.cursor(db=self._by_vehicle) as cursor:
                positioned = cursor.prev() if cursor.set_range(after) else cursor.last()
                while positioned and len(out) < limit:
                    key, value = cursor.item()
                    if not key.startswith(prefix):
                        break
                    command = self._load(txn, value.decode())
                    if command is not None and sender in (None, command.sender):
                        out.append(command)
                    positioned = cursor.prev()
            return out

        return self._writer.submit(op)

    # -- vehicle state -------------------------------------------------------------------

    def put_states(self, states: Sequence[svc.VehicleState]) -> asyncio.Future[None]:
        blobs = [(s.vehicle_id.encode(), s.SerializeToString()) for s in states]

        def op(txn: Any) -> None:
            for key, blob in blobs:
                txn.put(key, blob, db=self._states)

        return self._writer.submit(op)

    def get_state(self, vehicle_id: str) -> asyncio.Future[svc.VehicleState | None]:
        def op(txn: Any) -> svc.VehicleState | None:
            blob = txn.get(vehicle_id.encode(), db=self._states)
            return None if blob is None else svc.VehicleState.FromString(blob)

        return self._writer.submit(op)

    # -- record helpers (writer thread only) ------------------------------------------------

    def _load(self, txn: Any, command_id: str, *, with_payload: bool = True) -> t.Command | None:
        key = command_id.encode()
        blob = txn.get(key, db=self._commands)
        if blob is None:
            return None
        command = t.Command.FromString(blob)
        if with_payload and not command.payload:  # empty, or kept apart
            payload = txn.get(key, db=self._payloads)
            if payload is not None:
                command.payload = payload
        return command

    def _save(self, txn: Any, command: t.Command) -> None:
        """Write the record; a large payload goes to `payloads` once (on the first save,
        or the first of a record written inline by an older version) and is left out."""
        key = command.command_id.encode()
        payload = command.payload
        if len(payload) > INLINE_PAYLOAD_MAX:
            if txn.get(key, db=self._payloads) is None:
                txn.put(key, payload, db=self._payloads)
            command.payload = b""
            blob = command.SerializeToString()
            command.payload = payload
        else:
            blob = command.SerializeToString()
        txn.put(key, blob, db=self._commands)

    def _timer_at(self, command: t.Command) -> int:
        return lifecycle.timer_at(command, self._retention_ms)

    def _timer_key(self, command: t.Command) -> bytes:
        return codec.timer_key(self._timer_at(command), command.command_id)

    def _change(
        self, txn: Any, command_id: str, rule: Callable[[t.Command], bool]
    ) -> t.Command | None:
        """Load a command and `_apply` a rule to it: the changed record, or None (there is
        no such command, or the rule refused the change)."""
        command = self._load(txn, command_id)
        return command if command is not None and self._apply(txn, command, rule) else None

    def _apply(self, txn: Any, command: t.Command, rule: Callable[[t.Command], bool]) -> bool:
        """Apply a lifecycle rule to `command` (in place) and write the change, keeping its
        timer and pending entries in step. False, and nothing written, if it refused."""
        old_timer = self._timer_key(command)
        was_pending = command.status not in TERMINAL
        if not rule(command):
            return False
        self._stamp(command.updated_at_ms)
        if was_pending and command.status in TERMINAL:
            txn.delete(_pending_key(command), db=self._pending)
        new_timer = self._timer_key(command)
        if new_timer != old_timer:
            txn.delete(old_timer, db=self._timers)
            txn.put(new_timer, b"", db=self._timers)
        self._save(txn, command)
        return True

    def _stamp(self, now_ms: int) -> None:
        self._stamp_due = True
        if now_ms > self._stamp_ms:
            self._stamp_ms = now_ms

    def _release_idempotency_key(self, txn: Any, command: t.Command) -> None:
        if command.idempotency_key:
            key = _idem_key(command.sender, command.idempotency_key)
            if txn.get(key, db=self._idem) == command.command_id.encode():
                txn.delete(key, db=self._idem)

    def _purge(self, txn: Any, command: t.Command) -> None:
        """Retention: drop a terminal command and every index entry that names it."""
        command_id = command.command_id.encode()
        txn.delete(self._timer_key(command), db=self._timers)
        txn.delete(codec.vehicle_key(command.vehicle_id, command.seq), db=self._by_vehicle)
        self._release_idempotency_key(txn, command)
        if command.coalesce_key:
            key = _coalesce_key(command)
            if txn.get(key, db=self._coalesce) == command_id:
                txn.delete(key, db=self._coalesce)
        txn.delete(command_id, db=self._commands)
        txn.delete(command_id, db=self._payloads)
