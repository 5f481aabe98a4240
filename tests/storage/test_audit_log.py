"""The audit trail's files, for real in tmp_path: the chain, rotation by UTC day,
retention, a restart that goes on with the chain, lines cut short, a full disk, the
reader's filters and `verify_audit`."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.core.audit import DENY, PRUNE, RECOVER, SEND, START, STOP, AuditEvent, DenialLimiter
from broker.core.errors import StoreUnavailable
from broker.storage import audit_log
from broker.storage.audit_log import (
    DAY_MS,
    GENESIS,
    AuditLog,
    audit_files,
    line_hash,
    parse_time,
    read_audit,
    verify_audit,
)
from tests.conftest import tmpfs

#: 2026-12-02T00:00:00Z
DAY0_MS = 1_796_169_600_000


class FakeClock:
    def __init__(self, now_ms: int = DAY0_MS + 3_600_000) -> None:
        self.now = now_ms

    def __call__(self) -> int:
        return self.now


def open_log(folder: Path, clock: FakeClock, **kwargs: Any) -> AuditLog:
    log = AuditLog(folder, now_ms=clock, fsync=kwargs.pop("fsync", False), **kwargs)
    log.start()
    return log


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def raw_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_lines_are_chained_json_in_a_private_file(tmp_path: Path) -> None:
    clock = FakeClock()
    log = open_log(tmp_path / "audit", clock)
    log.record(SEND, "service:app", vehicle_id="car-1", command_id="c1", name="unlock")
    log.deny("peer:10.0.0.7", "UNAUTHENTICATED", "SendCommand", peer="ipv4:10.0.0.7:5123")
    assert log.flush() == 2
    (path,) = audit_files(tmp_path / "audit")
    assert path.name == "audit-2026-12-02.jsonl"
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    start, send, deny = lines(path)
    assert (start["action"], start["actor"], start["prev"]) == (START, "broker", GENESIS)
    raw = raw_lines(path)
    assert send["prev"] == line_hash(raw[0]) and deny["prev"] == line_hash(raw[1])
    assert send == {
        "at_ms": clock.now, "actor": "service:app", "action": "send", "outcome": "ok",
        "vehicle_id": "car-1", "command_id": "c1", "name": "unlock", "prev": send["prev"],
    }  # fmt: skip
    assert (deny["method"], deny["peer"], deny["outcome"]) == (
        "SendCommand", "ipv4:10.0.0.7:5123", "UNAUTHENTICATED"
    )  # fmt: skip
    report = verify_audit(tmp_path / "audit")
    assert (report.ok, report.lines, report.continues_earlier) == (True, 3, False)


def test_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    os.chown(folder, 4242, 4242)
    with pytest.raises(StoreUnavailable, match="another user"):
        AuditLog(folder)


def test_days_rotate_at_utc_midnight_and_the_chain_runs_across_files(tmp_path: Path) -> None:
    clock = FakeClock(DAY0_MS + DAY_MS - 5)
    log = open_log(tmp_path, clock)
    log.record(SEND, "service:app", command_id="late")
    clock.now = DAY0_MS + DAY_MS + 5
    log.record(SEND, "service:app", command_id="early")
    log.flush()  # both days in one flush
    clock.now += DAY_MS
    log.record(SEND, "service:app", command_id="day3")
    log.flush()
    first, second, third = audit_files(tmp_path)
    assert [p.name for p in (first, second, third)] == [
        "audit-2026-12-02.jsonl", "audit-2026-12-03.jsonl", "audit-2026-12-04.jsonl"
    ]  # fmt: skip
    assert [r.get("command_id") for r in lines(first)] == [None, "late"]
    assert lines(second)[0]["prev"] == line_hash(raw_lines(first)[-1])
    assert lines(third)[0]["prev"] == line_hash(raw_lines(second)[-1])
    assert verify_audit(tmp_path).ok


async def test_a_restart_goes_on_with_the_chain_and_close_writes_the_stop_line(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    log = open_log(tmp_path, clock)
    log.record(SEND, "service:app")
    await log.close()
    clock.now += DAY_MS  # the next start is a day later: a new file
    again = open_log(tmp_path, clock)
    await again.close()
    first, second = audit_files(tmp_path)
    assert [r["action"] for r in lines(first)] == [START, SEND, STOP]
    assert [r["action"] for r in lines(second)] == [START, STOP]
    assert lines(second)[0]["prev"] == line_hash(raw_lines(first)[-1])
    assert verify_audit(tmp_path).ok


async def test_the_run_loop_writes_within_its_interval(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, fsync=True, flush_interval_s=0.05)
    log.start()
    task = asyncio.create_task(log.run())
    log.record(SEND, "service:app", command_id="c1")
    for _ in range(100):
        await asyncio.sleep(0.02)
        if log.written == 2:
            break
    assert log.written == 2
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await log.close()
    assert [r["action"] for r in read_audit(tmp_path)] == [START, SEND, STOP]


def test_retention_removes_old_days_and_says_so(tmp_path: Path) -> None:
    clock = FakeClock()
    log = open_log(tmp_path, clock, retention_days=3)
    for day in range(6):
        log.record(SEND, "service:app", command_id=f"day{day}")
        log.flush()
        clock.now += DAY_MS
    log.flush()
    names = [p.name for p in audit_files(tmp_path)]
    assert names == [f"audit-2026-12-0{d}.jsonl" for d in (5, 6, 7, 8)]
    prunes = [r for r in read_audit(tmp_path, action=PRUNE)]
    assert [r["count"] for r in prunes] == [1, 1, 1]
    assert "audit-2026-12-02.jsonl" in prunes[0]["reason"]
    report = verify_audit(tmp_path)
    assert report.ok and report.continues_earlier


def test_retention_zero_keeps_everything(tmp_path: Path) -> None:
    clock = FakeClock()
    log = open_log(tmp_path, clock, retention_days=0)
    for _ in range(5):
        clock.now += 400 * DAY_MS
        log.record(SEND, "service:app")
        log.flush()
    assert len(audit_files(tmp_path)) == 6


def _write_three(tmp_path: Path) -> Path:
    log = open_log(tmp_path, FakeClock())
    for i in range(3):
        log.record(SEND, "service:app", command_id=f"c{i}")
    log.flush()
    (path,) = audit_files(tmp_path)
    return path


def test_verify_finds_an_edited_line(tmp_path: Path) -> None:
    path = _write_three(tmp_path)
    path.write_bytes(path.read_bytes().replace(b'"c1"', b'"cX"'))
    report = verify_audit(tmp_path)
    assert not report.ok
    assert report.problems == [
        f"{path.name}:4: does not follow {path.name}:3 (a line was edited, removed or "
        "inserted there)"
    ]


def test_verify_finds_a_removed_line(tmp_path: Path) -> None:
    path = _write_three(tmp_path)
    kept = raw_lines(path)
    path.write_bytes(b"\n".join(kept[:2] + kept[3:]) + b"\n")
    report = verify_audit(tmp_path)
    assert not report.ok and report.problems[0].startswith(f"{path.name}:3: does not follow")


def test_verify_finds_an_inserted_line_and_garbage(tmp_path: Path) -> None:
    path = _write_three(tmp_path)
    kept = raw_lines(path)
    forged = json.dumps({"at_ms": 1, "actor": "service:x", "action": "send", "prev": "0" * 64})
    path.write_bytes(b"\n".join([*kept[:2], forged.encode(), b"not json", *kept[2:]]) + b"\n")
    report = verify_audit(tmp_path)
    assert not report.ok and report.problem_count == 3


def test_verify_finds_a_removed_file(tmp_path: Path) -> None:
    clock = FakeClock()
    log = open_log(tmp_path, clock)
    for _ in range(3):
        log.record(SEND, "service:app")
        log.flush()
        clock.now += DAY_MS
    audit_files(tmp_path)[1].unlink()
    assert not verify_audit(tmp_path).ok


def test_a_line_cut_short_by_kill_9_is_recovered_at_the_next_start(tmp_path: Path) -> None:
    path = _write_three(tmp_path)
    with open(path, "ab") as file:  # the last write was cut off
        file.write(b'{"at_ms":1796173200000,"actor":"serv')
    # while the broker is down, the newest line is open; the reader skips it
    assert verify_audit(tmp_path).open_end and verify_audit(tmp_path).ok
    assert len(read_audit(tmp_path)) == 4
    again = open_log(tmp_path, FakeClock())
    again.record(SEND, "service:app", command_id="after")
    again.flush()
    actions = [r["action"] for r in read_audit(tmp_path)]
    assert actions[4:] == [RECOVER, START, SEND]
    report = verify_audit(tmp_path)
    assert (report.ok, report.recovered, report.open_end) == (True, 1, False)


def test_a_cut_line_in_an_older_day_is_recovered_in_the_new_file(tmp_path: Path) -> None:
    path = _write_three(tmp_path)
    with open(path, "ab") as file:
        file.write(b"\x00" * 100)  # a power loss's unsynced tail
    clock = FakeClock(DAY0_MS + DAY_MS + 10)
    open_log(tmp_path, clock)
    assert [r["action"] for r in lines(audit_files(tmp_path)[1])] == [RECOVER, START]
    report = verify_audit(tmp_path)
    assert (report.ok, report.recovered) == (True, 1)


def test_a_failed_write_drops_its_lines_counts_them_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = open_log(tmp_path, FakeClock())
    real_write = os.write
    calls = {"n": 0}

    def half_then_full(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:  # half of the batch reaches the disk, then it is full
            return real_write(fd, bytes(data)[: len(data) // 2 + 7])  # mid-line
        raise OSError(errno.ENOSPC, "No space left on device")

    for i in range(10):
        log.record(SEND, "service:app", command_id=f"c{i}")
    monkeypatch.setattr(audit_log.os, "write", half_then_full)
    with caplog.at_level(logging.ERROR, "broker.storage.audit_log"):
        written = log.flush()
        log.record(SEND, "service:app", command_id="while-full")
        assert log.flush() == 0  # reopened; the disk is still full
    monkeypatch.undo()
    assert 0 < written < 10
    assert log.dropped == 11 - written and log.written == 1 + written
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1  # once
    log.record(SEND, "service:app", command_id="after")
    assert log.flush() == 1
    records = read_audit(tmp_path)
    assert records[-2]["action"] == RECOVER and records[-1]["command_id"] == "after"
    assert verify_audit(tmp_path).ok


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only), unmounted after the test."""
    with tmpfs(tmp_path, "256k") as mount:
        yield mount


def test_a_full_disk_costs_audit_lines_never_a_call_and_writing_resumes(tiny_disk: Path) -> None:
    log = open_log(tiny_disk / "audit", FakeClock(), fsync=True)
    ballast = tiny_disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            while True:  # fill the disk
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    for i in range(2000):
        log.record(SEND, "service:app", command_id=f"c{i}")
    log.flush()
    assert log.dropped > 0
    ballast.unlink()
    log.record(SEND, "service:app", command_id="after")
    log.flush()
    assert read_audit(tiny_disk / "audit")[-1]["command_id"] == "after"
    assert verify_audit(tiny_disk / "audit").ok


def test_a_full_buffer_drops_new_events_and_counts_them(tmp_path: Path) -> None:
    log = open_log(tmp_path, FakeClock(), max_buffer=10)
    for _ in range(15):
        log.record(SEND, "service:app")
    assert (log.buffered, log.dropped) == (10, 5)
    assert log.flush() == 10


async def test_close_writes_the_pending_denial_summaries(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, now_ms=FakeClock(), limiter=DenialLimiter(per_actor=2, total=10))
    log.start()
    for _ in range(7):
        log.deny("peer:10.0.0.7", "UNAUTHENTICATED", "SendCommand")
    await log.close()
    denials = read_audit(tmp_path, action=DENY)
    assert [d["outcome"] for d in denials] == ["UNAUTHENTICATED"] * 2 + ["suppressed"]
    assert denials[-1]["count"] == 5 and log.suppressed == 5


def test_the_reader_filters(tmp_path: Path) -> None:
    clock = FakeClock()
    log = open_log(tmp_path, clock)
    for i in range(6):
        clock.now += 60_000
        log.record(SEND, f"service:app{i % 2}", vehicle_id=f"car-{i % 3}", command_id=f"c{i}")
    log.deny("peer:10.0.0.7", "UNAUTHENTICATED", "Connect")
    clock.now += DAY_MS
    log.record("get", "service:app0", command_id="c0")
    log.flush()

    def ids(**filters: Any) -> list[str]:
        return [r.get("command_id", r["action"]) for r in read_audit(tmp_path, **filters)]

    assert ids(actor="service:app1") == ["c1", "c3", "c5"]
    assert ids(actor="service:*", action=SEND) == [f"c{i}" for i in range(6)]
    assert ids(vehicle_id="car-2") == ["c2", "c5"]
    assert ids(command_id="c0") == ["c0", "c0"]
    assert ids(action="deny") == ["deny"]
    assert ids(since_ms=DAY0_MS + 3_600_000 + 3 * 60_000, action=SEND) == ["c2", "c3", "c4", "c5"]
    assert ids(until_ms=DAY0_MS + 3_600_000 + 3 * 60_000, action=SEND) == ["c0", "c1"]
    assert ids(since_ms=DAY0_MS + DAY_MS) == ["c0"]  # the first day's file is not read
    assert ids(action=SEND, limit=2) == ["c4", "c5"]  # the newest, oldest first


def test_times_given_as_ago_or_iso() -> None:
    now = DAY0_MS
    assert parse_time("1h", now) == now - 3_600_000
    assert parse_time("30m", now) == now - 1_800_000
    assert parse_time("2d", now) == now - 2 * DAY_MS
    assert parse_time("2026-12-02T00:00:00Z", now) == DAY0_MS
    assert parse_time("2026-12-02", now) == DAY0_MS  # UTC unless it says
    assert parse_time("2026-12-02T01:00:00+01:00", now) == DAY0_MS
    with pytest.raises(ValueError, match="not a time"):
        parse_time("yesterday", now)


@pytest.mark.parametrize(
    "event",
    [
        AuditEvent(1, SEND, "service:app"),
        AuditEvent(DAY0_MS, DENY, "peer:[::1]", "UNAUTHENTICATED", "car-1", "c1", "unlock",
                   "Connect", "ipv6:[::1]:5", 'quote " backslash \\ newline \n é \u2028 \x00'),
        AuditEvent(DAY0_MS, DENY, "x" * 1000, "suppressed", reason="r" * 1000, tally=7),
    ],
)  # fmt: skip
def test_lines_are_the_json_of_the_event_s_fields(event: AuditEvent) -> None:
    line = audit_log.encode(event, "ab" * 32)
    assert line == json.dumps({**event.fields(), "prev": "ab" * 32}, separators=(",", ":")).encode()
    assert b"\n" not in line and line.isascii()


def test_the_trail_leaves_the_store_s_reserve_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Audit lines are dropped before they eat the room kept for accepted commands."""
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with caplog.at_level(logging.ERROR, "broker.storage.audit_log"):
        log = open_log(tmp_path, FakeClock(), reserve_bytes=free + (1 << 30))
        log.record(SEND, "service:app")
        log.flush()
    assert (log.written, log.dropped, audit_files(tmp_path)) == (0, 2, [])
    assert "the store keeps" in caplog.text
    log.reserve_bytes = 1 << 20
    log.record(SEND, "service:app")
    assert log.flush() == 1 and verify_audit(tmp_path).ok
