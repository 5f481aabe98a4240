"""Broker time: steady while running, resumed (never behind) across restarts."""

from __future__ import annotations

from broker.core import clock
from broker.core.clock import BOOT_ID, Clock


class Fake:
    """A wall clock and a boot-time clock the test moves by hand (ns)."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000_000 * 1_000_000
        self.steady = 50 * 10**9

    def clock(self) -> Clock:
        return Clock(wall_ns=lambda: self.wall, steady_ns=lambda: self.steady)


def test_a_wall_clock_step_moves_nothing_while_running() -> None:
    fake = Fake()
    broker_time = fake.clock()
    start = broker_time.now_ms()
    fake.wall -= 30 * 10**9  # stepped back 30 s
    fake.steady += 4 * 10**9  # 4 s pass
    assert broker_time.now_ms() == start + 4_000
    assert broker_time.wall_offset_ms() == -34_000
    fake.wall += 25 * 3600 * 10**9  # and forward a day
    assert broker_time.now_ms() == start + 4_000


def test_a_restart_on_the_same_boot_counts_the_downtime_whatever_the_wall_says() -> None:
    fake = Fake()
    before = fake.clock()
    stored_ms, stored_steady = before.reference()
    fake.steady += 600 * 10**9  # down for 10 minutes
    fake.wall -= 3600 * 10**9  # and the wall clock set back an hour meanwhile
    after = fake.clock()
    after.resume(stored_ms, stored_steady, BOOT_ID)
    assert after.now_ms() == stored_ms + 600_000


def test_after_a_reboot_time_is_never_behind_what_was_stored() -> None:
    fake = Fake()
    stored_ms = fake.wall // 1_000_000 + 3_600_000  # the store saw a later time
    restarted = fake.clock()
    restarted.resume(stored_ms, 999 * 10**9, "another-boot")
    assert restarted.now_ms() == stored_ms


def test_resuming_never_moves_time_backwards() -> None:
    fake = Fake()
    running = fake.clock()
    now = running.now_ms()
    running.resume(now - 60_000, fake.steady, "another-boot")
    assert running.now_ms() == now


def test_install_replaces_the_process_clock() -> None:
    fake = Fake()
    previous = clock.install(fake.clock())
    try:
        assert clock.now_ms() == fake.wall // 1_000_000
    finally:
        clock.install(previous)


def test_times_for_people() -> None:
    at = 1_796_161_477_187  # what the CLI used to print as it was
    assert clock.iso_time(at) == "2026-12-01T21:44:37.187Z"
    assert clock.ago(at, at + 45_900) == "45 s ago"
    assert clock.ago(at, at + 12 * 60_000 + 5) == "12 min ago"
    assert clock.ago(at, at + 3 * 3_600_000) == "3 h ago"
    assert clock.ago(at, at + 2 * 86_400_000) == "2 d ago"
    assert clock.ago(at, at - 5_000) == "in 5 s"
    assert clock.when(at, at) == "2026-12-01T21:44:37.187Z (0 s ago)"
