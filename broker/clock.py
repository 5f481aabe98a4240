"""Broker time: wall-clock milliseconds that never step while the broker runs.

Every timestamp the broker stores or sends (created, expires, result deadlines, purge
times) is broker time. It is anchored to the wall clock when the process starts — never
earlier than the highest time the store has recorded, so it never runs backwards across
a restart — and from then on advances with the boot-time clock only (monotonic, and
counting a suspended VM's sleep, so a TTL is real time). A wall-clock step while running
(NTP, an operator, a VM resume) moves no deadline: a 4 s TTL ends 4 s later whatever the
wall clock does. The step is visible as `wall_offset_ms()` (logged and exported).

Tests install a `Clock` whose wall clock they control (`install`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def _steady_ns() -> int:
    if _BOOTTIME is not None:
        return time.clock_gettime_ns(_BOOTTIME)
    return time.monotonic_ns()


class Clock:
    """Wall time at the anchor, then steady time since it."""

    __slots__ = ("_anchored", "_base_ms", "_base_steady_ns", "_steady_ns", "_wall_ns")

    def __init__(
        self,
        wall_ns: Callable[[], int] = time.time_ns,
        steady_ns: Callable[[], int] = _steady_ns,
    ) -> None:
        self._wall_ns = wall_ns
        self._steady_ns = steady_ns
        self._base_ms = 0
        self._base_steady_ns = 0
        self._anchored = False
        self.anchor()

    def anchor(self, not_before_ms: int = 0) -> None:
        """Take the wall clock's reading now, or `not_before_ms` if that is later; never
        earlier than this clock's own time (it never runs backwards)."""
        floor = self.now_ms() if self._anchored else 0
        self._base_ms = max(self._wall_ns() // 1_000_000, not_before_ms, floor)
        self._base_steady_ns = self._steady_ns()
        self._anchored = True

    def now_ms(self) -> int:
        return self._base_ms + (self._steady_ns() - self._base_steady_ns) // 1_000_000

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
