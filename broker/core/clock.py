"""Broker time: wall-clock milliseconds that never step while the broker runs.

Every timestamp the broker stores or sends (created, expires, result deadlines, purge
times) is broker time. It is the wall clock read when the process starts, advanced from
then on by the boot-time clock only (monotonic, and counting a suspended VM's sleep, so a
TTL is real time). A wall-clock step while running (NTP, an operator, a VM resume) moves
no deadline: a 4 s TTL ends 4 s later whatever the wall clock does. The step is visible
as `wall_offset_ms()` (logged).

Across restarts the store keeps a reference: the highest broker time it wrote, the
boot-time clock then, and the boot's id. A broker starting on the same boot goes on from
that reference by the boot-time clock (downtime counted exactly, the wall clock not
consulted); after a reboot it is never behind the stored time. Broker time only moves
forward: where the wall clock is ahead, it is taken (a command then expires early, never
late).

Tests install a `Clock` whose wall clock they control (`install`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return boot.read().strip()
    except OSError:
        return ""


#: this boot's id ("" where the OS does not say): the boot-time clock is comparable
#: between processes of one boot only
BOOT_ID = _boot_id() if _BOOTTIME is not None else ""


def steady_ns() -> int:
    """The boot-time clock (monotonic, counting suspend) where the OS has one."""
    if _BOOTTIME is not None:
        return time.clock_gettime_ns(_BOOTTIME)
    return time.monotonic_ns()


class Clock:
    """Wall time at the anchor, then steady time since it."""

    __slots__ = ("_base_ms", "_base_steady_ns", "_steady_ns", "_wall_ns")

    def __init__(
        self,
        wall_ns: Callable[[], int] = time.time_ns,
        steady_ns: Callable[[], int] = steady_ns,
    ) -> None:
        self._wall_ns = wall_ns
        self._steady_ns = steady_ns
        self._base_ms = self._wall_ns() // 1_000_000
        self._base_steady_ns = self._steady_ns()

    def now_ms(self) -> int:
        return self._base_ms + (self._steady_ns() - self._base_steady_ns) // 1_000_000

    def reference(self) -> tuple[int, int]:
        """`(broker time, boot-time clock in ns)` at one instant, for a store to keep."""
        steady_ns = self._steady_ns()
        return self._base_ms + (steady_ns - self._base_steady_ns) // 1_000_000, steady_ns

    def resume(self, stored_ms: int, stored_steady_ns: int, stored_boot_id: str) -> None:
        """Go on from a reference a store kept (see the module docstring)."""
        target_ms = stored_ms
        elapsed_ns = self._steady_ns() - stored_steady_ns
        if stored_boot_id and stored_boot_id == BOOT_ID and elapsed_ns >= 0:
            target_ms += elapsed_ns // 1_000_000
        self.advance_to(target_ms)

    def advance_to(self, target_ms: int) -> None:
        """Move broker time forward to `target_ms` if it is behind (never backward)."""
        behind_ms = target_ms - self.now_ms()
        if behind_ms > 0:
            self._base_ms += behind_ms

    def wall_offset_ms(self) -> int:
        """How far the wall clock is from broker time (positive: the wall is ahead)."""
        return self._wall_ns() // 1_000_000 - self.now_ms()


_clock = Clock()


def now_ms() -> int:
    """Broker time in milliseconds (see the module docstring)."""
    return _clock.now_ms()


def current() -> Clock:
    return _clock


def install(clock: Clock) -> Clock:
    """Make `clock` the process's broker clock; returns the one it replaces."""
    global _clock
    previous, _clock = _clock, clock
    return previous


# -- times for people ---------------------------------------------------------------------


def iso_time(at_ms: int) -> str:
    """2026-12-02T10:00:00.123Z"""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at_ms // 1000)) + (
        f".{at_ms % 1000:03d}Z"
    )


def ago(at_ms: int, now: int) -> str:
    """How long before `now` (ms) `at_ms` was, rounded for a person: "45 s ago",
    "12 min ago", "3 h ago", "2 d ago" ("in 5 s" for a time ahead)."""
    delta_s = (now - at_ms) / 1000
    ahead, delta_s = delta_s < 0, abs(delta_s)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta_s >= size:
            amount = f"{int(delta_s // size)} {unit}"
            break
    else:
        amount = f"{int(delta_s)} s"
    return f"in {amount}" if ahead else f"{amount} ago"


def when(at_ms: int, now: int) -> str:
    """`iso_time` and `ago`: "2026-12-02T10:00:00.123Z (12 min ago)"."""
    return f"{iso_time(at_ms)} ({ago(at_ms, now)})"
