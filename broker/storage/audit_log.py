"""The audit trail on disk: append-only JSON lines, one file per UTC day, hash-chained.

`<data_dir>/audit/audit-YYYY-MM-DD.jsonl` (folder 0700, files 0600), one `AuditEvent`
per line (`broker/core/audit.py`), plus `prev`: the SHA-256 (hex) of the line before it,
across files ("" for the first line ever). So an edited, removed or inserted line breaks
the chain at the line after it (`verify_audit`, `broker audit verify`). The chain holds
no key: it shows what changed, not who; ship the lines elsewhere as they are written if
the host itself is not to be trusted.

Written by the broker only, and never rewritten. `record` appends to a bounded buffer
on the event loop; `run` hands the buffer to one writer thread every
`FLUSH_INTERVAL_S`, which writes the lines and fsyncs them. A disk that fails or is full
costs the lines of that flush (counted in `dropped`, logged once), never a call. kill -9
loses at most the lines of the last interval; a line cut short by it (or by a failed
write) is closed by a `recover` line when writing goes on. Files older than
`retention_days` are deleted once a day (a `prune` line says which).

`read_audit` and `verify_audit` read the files directly (the `broker audit` command), also
while the broker writes them.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _quoted
from pathlib import Path
from typing import Any

from broker.core import clock
from broker.core.audit import (
    BROKER,
    MAX_FIELD_CHARS,
    PRUNE,
    RECOVER,
    START,
    STOP,
    AuditEvent,
    AuditTrail,
    DenialLimiter,
)
from broker.core.errors import StoreUnavailable

logger = logging.getLogger(__name__)

#: how often the buffer is written out: what kill -9 may lose
FLUSH_INTERVAL_S = 0.2
#: events held before they are written; past it new ones are dropped (and counted)
MAX_BUFFER = 100_000
#: lines the writer thread encodes before it lets the event loop have the GIL (~0.5 ms):
#: without it a 4,000-line flush held it for 5 ms slices (grpc's loop waited that long)
YIELD_EVERY = 128
#: what a line is taken to need on the disk when room is checked (they average ~240 B)
ROOM_PER_LINE = 512
#: how long shutdown waits for the last lines to reach the disk
CLOSE_TIMEOUT_S = 5.0
#: the `prev` of the first line ever written
GENESIS = ""
DAY_MS = 86_400_000
FILE_PATTERN = re.compile(r"audit-(\d{4}-\d{2}-\d{2})\.jsonl")
#: what `verify_audit` lists at most
MAX_PROBLEMS = 100


def day_of(at_ms: int) -> str:
    """The UTC day of a time, as its file names it: 2026-12-02."""
    return time.strftime("%Y-%m-%d", time.gmtime(at_ms // 1000))


def file_name(day: str) -> str:
    return f"audit-{day}.jsonl"


def line_hash(line: bytes) -> str:
    """What the next line's `prev` holds: the SHA-256 of this one without its newline."""
    return hashlib.sha256(line).hexdigest()


#: `"key":` of the string fields written when given, and their place in an AuditEvent
_OPTIONAL = tuple(
    (f'"{name}":', AuditEvent._fields.index(name))
    for name in ("vehicle_id", "command_id", "name", "method", "peer", "reason")
)


def encode(event: AuditEvent, prev: str) -> bytes:
    """One line (without its newline): compact JSON, ASCII only; the same bytes as
    `json.dumps({**event.fields(), "prev": prev}, separators=(",", ":"))` at a quarter
    of its cost (grown by hand: this runs for every line)."""
    cut = MAX_FIELD_CHARS
    line = (
        f'{{"at_ms":{int(event.at_ms)},"actor":{_quoted(str(event.actor)[:cut])},'
        f'"action":{_quoted(str(event.action)[:cut])},'
        f'"outcome":{_quoted(str(event.outcome)[:cut])}'
    )
    for key, index in _OPTIONAL:
        value = event[index]
        if value:
            line += f",{key}{_quoted(str(value)[:cut])}"
    if event.tally:
        line += f',"count":{int(event.tally)}'
    return f'{line},"prev":{_quoted(prev)}}}'.encode()


def _record(line: bytes) -> dict[str, Any] | None:
    """The line as a record, or None if it is not one (cut short, or not ours)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("prev"), str):
        return None
    if not isinstance(record.get("at_ms"), int) or not isinstance(record.get("action"), str):
        return None
    return record


def audit_files(folder: Path) -> list[Path]:
    """The folder's audit files, oldest day first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [folder / name for name in sorted(names) if FILE_PATTERN.fullmatch(name)]


def _day_start_ms(path: Path) -> int:
    found = FILE_PATTERN.fullmatch(path.name)
    assert found is not None
    return calendar.timegm(time.strptime(found[1], "%Y-%m-%d")) * 1000


def _last_segment(path: Path) -> tuple[bytes, bool] | None:
    """The file's last line (without its newline) and whether it ended in one; None for
    an empty file. Read from the end, so a large file costs one small read."""
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return None
        chunk = 8192
        while True:
            start = max(0, size - chunk)
            file.seek(start)
            data = file.read(size - start)
            terminated = data.endswith(b"\n")
            body = data[:-1] if terminated else data
            cut = body.rfind(b"\n")
            if cut >= 0 or start == 0:
                return body[cut + 1 :], terminated
            chunk *= 4


def _private_folder(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_uid != os.geteuid():
            raise OSError(f"it belongs to another user (uid {path.stat().st_uid})")
        path.chmod(0o700)
    except OSError as exc:
        raise StoreUnavailable(f"cannot use {path} for the audit trail: {exc}") from None


class AuditLog(AuditTrail):
    """The trail as JSON-lines files in `folder` (see the module docstring).

    `start` (once, on the event loop: it writes the start line at once), then `run` as a
    task; `close` at shutdown writes everything still buffered. `flush` writes the
    buffer in the calling thread (the writer thread, or a test).
    """

    def __init__(
        self,
        folder: Path,
        *,
        retention_days: int = 90,
        fsync: bool = True,
        now_ms: Callable[[], int] = clock.now_ms,
        limiter: DenialLimiter | None = None,
        max_buffer: int = MAX_BUFFER,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        reserve_bytes: int = 0,
    ) -> None:
        super().__init__(now_ms=now_ms, limiter=limiter)
        _private_folder(folder)
        self.folder = folder
        #: files of days older than this are deleted (0: never)
        self.retention_days = retention_days
        #: room on the disk left to the store: below it audit lines are dropped, so the
        #: trail never takes the room kept for commands already accepted
        self.reserve_bytes = reserve_bytes
        self._fsync = fsync
        self._max_buffer = max_buffer
        self._interval_s = flush_interval_s
        self._buffer: deque[AuditEvent] = deque()
        self._full_logged = False
        # The writer's state, touched only under _lock (one flush at a time).
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._day = ""
        #: the hash of the last line on disk; None: unknown (read from the files first)
        self._prev: str | None = None
        self._pruned_day = ""
        self._failing = False
        self._written = 0
        #: lines the writer could not write (the disk failed or was full)
        self.dropped_io = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="audit")
        self._started = False
        self._closed = False

    # -- the event loop's side ---------------------------------------------------------------

    def _append(self, event: AuditEvent) -> None:
        buffer = self._buffer
        if len(buffer) < self._max_buffer:
            buffer.append(event)
            return
        self.dropped_full += 1
        if not self._full_logged:
            self._full_logged = True
            logger.error(
                "audit trail: %d lines wait for the disk; dropping new ones (counted in "
                "broker_audit_lines_dropped_total)",
                len(buffer),
            )

    def start(self) -> None:
        """Go on with the chain the folder holds and write the start line (here, at once)."""
        self._started = True
        self.record(START, BROKER, reason=f"pid {os.getpid()}")
        self.flush()

    async def run(self) -> None:
        """Write the buffer every `flush_interval_s` on the writer thread, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                self.tick()
                await loop.run_in_executor(self._executor, self.flush)
            except Exception:  # flush never raises; this loop must outlive anything
                logger.exception("audit flush failed")

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """The stop line and every pending summary, written; the file closed."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self.record(STOP, BROKER)
        self.tick(final=True)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(self._executor, self._last), timeout_s)
        except TimeoutError:
            logger.error(
                "audit trail: the disk did not take the last lines within %gs (%d left)",
                timeout_s,
                len(self._buffer),
            )
        self._executor.shutdown(wait=False)

    def _last(self) -> None:
        self.flush()
        with self._lock:
            self._close_file()

    # -- what the metrics read ---------------------------------------------------------------

    @property
    def written(self) -> int:
        return self._written

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_io

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # -- the writer's side -------------------------------------------------------------------

    def flush(self) -> int:
        """Write what is buffered, in this thread; returns the lines written. Never raises:
        what cannot be written is counted in `dropped`."""
        with self._lock:
            try:
                return self._flush_locked()
            except Exception:
                logger.exception("audit trail: unexpected error writing")
                self._close_file()
                return 0

    def _flush_locked(self) -> int:
        buffer = self._buffer
        events = [buffer.popleft() for _ in range(len(buffer))]
        events += self._prune_if_due(self.now_ms())
        if not events:
            return 0
        self._full_logged = False
        if self.reserve_bytes:
            try:
                disk = os.statvfs(self.folder)
                room = disk.f_bavail * disk.f_frsize
            except OSError:
                room = 1 << 62  # not measured: the write will say
            if room < self.reserve_bytes + len(events) * ROOM_PER_LINE:
                reserve_mb = self.reserve_bytes >> 20
                why = f"{room >> 20} MiB left, the store keeps {reserve_mb} MiB of its disk"
                self._lost(len(events), why)
                return 0
        written = 0
        start = 0
        while start < len(events):
            day_index = events[start].at_ms // DAY_MS
            end = start + 1
            while end < len(events) and events[end].at_ms // DAY_MS == day_index:
                end += 1
            written += self._write(day_of(events[start].at_ms), events[start:end])
            start = end
        return written

    def _write(self, day: str, events: list[AuditEvent]) -> int:
        try:
            fd = self._file_for(day)
        except OSError as exc:
            self._lost(len(events), exc.strerror or str(exc))
            return 0
        prev = self._prev
        assert prev is not None
        lines = []
        for index, event in enumerate(events, 1):
            line = encode(event, prev)
            lines.append(line)
            prev = line_hash(line)
            if not index % YIELD_EVERY:
                time.sleep(0)  # let the event loop have the GIL
        data = memoryview(b"\n".join(lines) + b"\n")
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as exc:
            complete = data[:done].tobytes().count(b"\n")
            self._written += complete
            self._lost(len(events) - complete, exc.strerror or str(exc))
            return complete
        self._prev = prev
        self._written += len(events)
        if self._fsync:
            try:
                os.fsync(fd)
            except OSError as exc:  # written, but perhaps not on the disk: start afresh
                logger.error("audit trail: fsync of %s failed: %s", self.folder, exc)
                self._close_file()
        if self._failing:
            self._failing = False
            logger.warning("audit trail: writing again (%d lines dropped in all)", self.dropped)
        return len(events)

    def _lost(self, count: int, why: str) -> None:
        self.dropped_io += count
        self._close_file()  # the chain's end is read back from the disk next time
        if not self._failing:
            self._failing = True
            logger.error(
                "audit trail: cannot write to %s (%s): %d lines dropped; counting further "
                "drops in broker_audit_lines_dropped_total and retrying every %gs",
                self.folder,
                why,
                count,
                self._interval_s,
            )

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        self._day = ""
        self._prev = None

    def _file_for(self, day: str) -> int:
        """The open file of `day` (rotating to it), with the chain's end known."""
        if self._fd is not None and self._day == day:
            return self._fd
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        path = self.folder / file_name(day)
        cut: tuple[int, bool] | None = None
        if self._prev is None:
            self._prev, cut = self._chain_end(path)
        created = not path.exists()
        fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.fchmod(fd, 0o600)
            if created and self._fsync:
                dir_fd = os.open(self.folder, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            if cut is not None:
                size, unterminated_here = cut
                line = encode(
                    AuditEvent(
                        self.now_ms(),
                        RECOVER,
                        BROKER,
                        reason=f"the line before ({size} bytes) was cut short: an unclean "
                        "stop or a failed write; the lines after it go on from it",
                    ),
                    self._prev,
                )
                os.write(fd, (b"\n" if unterminated_here else b"") + line + b"\n")
                self._prev = line_hash(line)
        except OSError:
            os.close(fd)
            self._prev = None
            raise
        self._fd, self._day = fd, day
        return fd

    def _chain_end(self, path: Path) -> tuple[str, tuple[int, bool] | None]:
        """The hash of the last line on disk (GENESIS if none), and, if that line is not
        a whole record, its size and whether it is the unterminated end of `path`."""
        for candidate in reversed(audit_files(self.folder)):
            last = _last_segment(candidate)
            if last is None:
                continue
            line, terminated = last
            if _record(line) is not None and terminated:
                return line_hash(line), None
            return line_hash(line), (len(line), candidate == path and not terminated)
        return GENESIS, None

    def _prune_if_due(self, now_ms: int) -> list[AuditEvent]:
        """Delete the files of days past retention (once a day); a `prune` line for them."""
        today = day_of(now_ms)
        if not self.retention_days or today == self._pruned_day:
            return []
        self._pruned_day = today
        oldest_kept = file_name(day_of(now_ms - self.retention_days * DAY_MS))
        removed = []
        for path in audit_files(self.folder):
            if path.name >= oldest_kept or path.name == file_name(self._day):
                continue
            try:
                path.unlink()
            except OSError as exc:
                logger.error("audit trail: cannot remove %s: %s", path, exc)
                continue
            removed.append(path.name)
        if not removed:
            return []
        logger.info("audit trail: removed %d files past retention", len(removed))
        span = removed[0] if len(removed) == 1 else f"{removed[0]} .. {removed[-1]}"
        return [
            AuditEvent(
                now_ms,
                PRUNE,
                BROKER,
                reason=f"removed {len(removed)} files older than {self.retention_days} "
                f"days: {span}",
                tally=len(removed),
            )
        ]


# -- reading -----------------------------------------------------------------------------------


def parse_time(text: str, now_ms: int) -> int:
    """`1h`, `30m`, `2d`, `90s`, `1w` ago, or an ISO 8601 time (UTC unless it says):
    Unix milliseconds. ValueError if it is neither."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if found:
        unit_s = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[found[2]]
        return now_ms - int(float(found[1]) * unit_s * 1000)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a time: {text!r} (give 1h, 30m, 2d or an ISO 8601 time)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _needle(value: str) -> bytes:
    """The bytes a line holding `value` as a JSON string contains."""
    return json.dumps(value).encode()


def read_audit(
    folder: Path,
    *,
    actor: str | None = None,
    vehicle_id: str | None = None,
    command_id: str | None = None,
    action: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The records `iter_audit` finds, oldest first; with `limit`, the newest `limit`."""
    found = iter_audit(
        folder, actor=actor, vehicle_id=vehicle_id, command_id=command_id, action=action,
        since_ms=since_ms, until_ms=until_ms,
    )  # fmt: skip
    return list(deque(found, maxlen=limit) if limit else found)


def iter_audit(
    folder: Path,
    *,
    actor: str | None = None,
    vehicle_id: str | None = None,
    command_id: str | None = None,
    action: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> Iterator[dict[str, Any]]:
    """The records with these fields (`actor` ending in `*` is a prefix), at or after
    `since_ms` and before `until_ms`, oldest first. A line still being written, or cut
    short, is skipped; files of days outside the times are not read."""
    wanted = {"vehicle_id": vehicle_id, "command_id": command_id, "action": action}
    exact = {k: v for k, v in wanted.items() if v is not None}
    needles = [_needle(v) for v in exact.values()]
    actor_prefix = actor[:-1] if actor is not None and actor.endswith("*") else None
    if actor is not None:
        needles.append(_needle(actor_prefix)[:-1] if actor_prefix is not None else _needle(actor))
    for path in audit_files(folder):
        day_start = _day_start_ms(path)
        if since_ms is not None and day_start + DAY_MS <= since_ms:
            continue
        if until_ms is not None and day_start >= until_ms:
            continue
        for raw in _lines(path):
            if any(n not in raw for n in needles):
                continue
            record = _record(raw)
            if record is None:
                continue
            at_ms = record["at_ms"]
            if (since_ms is not None and at_ms < since_ms) or (
                until_ms is not None and at_ms >= until_ms
            ):
                continue
            if any(record.get(k) != v for k, v in exact.items()):
                continue
            name = record.get("actor", "")
            if actor is not None and not (
                name.startswith(actor_prefix) if actor_prefix is not None else name == actor
            ):
                continue
            yield record


def _lines(path: Path) -> Iterator[bytes]:
    """The file's whole lines, without their newlines."""
    with open(path, "rb") as file:
        for raw in file:
            if raw.endswith(b"\n"):
                yield raw[:-1]


def format_record(record: dict[str, Any]) -> str:
    """One record for people: time (UTC), actor, action, outcome, then what it names."""
    parts = [
        clock.iso_time(int(record.get("at_ms", 0))),
        str(record.get("actor", "?")),
        str(record.get("action", "?")),
        str(record.get("outcome", "?")),
    ]
    for key, label in (
        ("vehicle_id", "vehicle"),
        ("command_id", "command"),
        ("name", "name"),
        ("method", "method"),
        ("peer", "peer"),
        ("count", "count"),
    ):
        if key in record:
            parts.append(f"{label}={record[key]}")
    if record.get("reason"):
        parts.append(f"-- {record['reason']}")
    return " ".join(parts)


@dataclass
class Verified:
    """What `verify_audit` found."""

    files: int = 0
    lines: int = 0
    #: lines cut short by an unclean stop, each closed by a `recover` line
    recovered: int = 0
    first_at_ms: int | None = None
    last_at_ms: int | None = None
    #: the oldest line follows one no longer there (removed by retention, or by hand)
    continues_earlier: bool = False
    #: the newest line is cut short (being written now, or an unclean stop not yet
    #: recovered: the broker closes it when it next writes)
    open_end: bool = False
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return not self.problem_count

    def describe(self) -> list[str]:
        """For people: each problem, then one line that starts with ok or FAILED."""
        out = [f"BROKEN: {problem}" for problem in self.problems]
        if self.problem_count > len(self.problems):
            out.append(f"... and {self.problem_count - len(self.problems)} more problems")
        span = "no lines"
        if self.first_at_ms is not None and self.last_at_ms is not None:
            span = f"{clock.iso_time(self.first_at_ms)} .. {clock.iso_time(self.last_at_ms)}"
        summary = f"{self.lines} lines in {self.files} files, {span}"
        if self.recovered:
            summary += f"; {self.recovered} lines cut short by an unclean stop, recovered"
        if self.continues_earlier:
            summary += "; begins after lines no longer there (removed by retention?)"
        if self.open_end:
            summary += "; the newest line is incomplete (being written, or an unclean stop)"
        out.append(f"{'ok' if self.ok else 'FAILED'}: {summary}")
        return out

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)


def verify_audit(folder: Path) -> Verified:
    """Check every file's lines and the chain through them, oldest first."""
    report = Verified()
    prev: str | None = None
    prev_where = ""
    cut: str | None = None  # where the latest line that is not a record is
    for path in audit_files(folder):
        report.files += 1
        with open(path, "rb") as file:
            for number, raw in enumerate(file, 1):
                line = raw[:-1] if raw.endswith(b"\n") else raw
                where = f"{path.name}:{number}"
                record = _record(line)
                if record is None:
                    if cut is not None:
                        report.problem(f"{cut}: not an audit record")
                    cut = where
                else:
                    report.lines += 1
                    if prev is None:
                        report.continues_earlier = record["prev"] != GENESIS
                    elif record["prev"] != prev:
                        report.problem(
                            f"{where}: does not follow {prev_where} (a line was edited, "
                            "removed or inserted there)"
                        )
                    if cut is not None:
                        if record["action"] == RECOVER:
                            report.recovered += 1
                        else:
                            report.problem(f"{cut}: not an audit record")
                        cut = None
                    if report.first_at_ms is None:
                        report.first_at_ms = record["at_ms"]
                    report.last_at_ms = record["at_ms"]
                prev, prev_where = line_hash(line), where
    report.open_end = cut is not None
    return report
