"""The audit trail's domain: events, `record` that never raises, and the denial limiter
that keeps a flood of refusals from growing memory or the files."""

from __future__ import annotations

import pytest

from broker.core.audit import (
    DENY,
    OTHER_ACTORS,
    SEND,
    SUPPRESSED,
    AuditEvent,
    DenialLimiter,
    MemoryAuditTrail,
    NullAuditTrail,
)


class FakeClock:
    def __init__(self, now_ms: int = 1_796_000_000_000) -> None:
        self.now = now_ms

    def __call__(self) -> int:
        return self.now


def trail(clock: FakeClock | None = None, **limits: int) -> MemoryAuditTrail:
    return MemoryAuditTrail(now_ms=clock or FakeClock(), limiter=DenialLimiter(**limits))


def test_an_event_has_the_time_the_actor_and_only_the_fields_given() -> None:
    clock = FakeClock(1_796_000_000_123)
    audit = trail(clock)
    audit.record(SEND, "service:app", vehicle_id="car-1", command_id="c1", name="unlock")
    (event,) = audit.events
    assert event.fields() == {
        "at_ms": 1_796_000_000_123,
        "actor": "service:app",
        "action": "send",
        "outcome": "ok",
        "vehicle_id": "car-1",
        "command_id": "c1",
        "name": "unlock",
    }
    assert list(event.fields()) == [
        "at_ms", "actor", "action", "outcome", "vehicle_id", "command_id", "name"
    ]  # fmt: skip


def test_long_text_is_cut_and_nothing_but_strings_and_counts_is_kept() -> None:
    audit = trail()
    audit.record(DENY, "peer:10.0.0.7", outcome="UNAUTHENTICATED", reason="x" * 10_000)
    fields = audit.events[0].fields()
    assert len(str(fields["reason"])) == 256
    assert all(isinstance(v, str | int) for v in fields.values())


def test_record_never_raises_and_counts_what_it_lost() -> None:
    def broken_clock() -> int:
        raise RuntimeError("clock gone")

    audit = MemoryAuditTrail(now_ms=broken_clock)
    audit.record(SEND, "service:app")
    audit.record(SEND, "service:app")
    assert (len(audit.events), audit.dropped) == (0, 2)


def test_a_null_trail_forgets_everything() -> None:
    audit = NullAuditTrail()
    audit.record(SEND, "service:app")
    audit.deny("peer:1.2.3.4", "UNAUTHENTICATED", "SendCommand")
    assert (audit.written, audit.dropped, audit.suppressed) == (0, 0, 0)


def test_actions_are_never_rate_limited() -> None:
    audit = trail(per_actor=2, total=2)
    for _ in range(50):
        audit.record(SEND, "service:app")
    assert len(audit.select(SEND)) == 50 and audit.suppressed == 0


def test_denials_past_the_per_actor_limit_are_counted_and_summed_up_once() -> None:
    clock = FakeClock()
    audit = trail(clock, per_actor=3, total=100, window_ms=1000, summary_every_ms=10_000)
    for _ in range(10):
        audit.deny("peer:10.0.0.7", "UNAUTHENTICATED", "SendCommand", peer="ipv4:10.0.0.7:1")
    audit.deny("service:other", "PERMISSION_DENIED", "GetCommand")
    assert len(audit.select(DENY, actor="peer:10.0.0.7")) == 3
    assert len(audit.select(DENY, actor="service:other")) == 1
    assert audit.suppressed == 7
    audit.tick()
    (summary,) = audit.select(DENY, outcome=SUPPRESSED)
    assert (summary.actor, summary.tally, summary.method) == ("peer:10.0.0.7", 7, "SendCommand")
    assert "UNAUTHENTICATED" in summary.reason
    audit.tick()  # nothing new: no second summary
    assert len(audit.select(DENY, outcome=SUPPRESSED)) == 1
    clock.now += 1000  # a new window: recorded one by one again
    audit.deny("peer:10.0.0.7", "UNAUTHENTICATED", "SendCommand")
    assert len(audit.select(DENY, actor="peer:10.0.0.7", outcome="UNAUTHENTICATED")) == 4


def test_summaries_come_at_most_once_per_interval_and_all_at_the_end() -> None:
    clock = FakeClock()
    audit = trail(clock, per_actor=1, total=100, summary_every_ms=10_000)
    audit.deny("peer:a", "UNAUTHENTICATED", "SendCommand")
    audit.deny("peer:a", "UNAUTHENTICATED", "SendCommand")
    audit.tick()
    clock.now += 2000
    audit.deny("peer:a", "UNAUTHENTICATED", "SendCommand")
    audit.deny("peer:a", "UNAUTHENTICATED", "SendCommand")
    audit.tick()  # 2 s after the last summary: not yet
    assert [e.tally for e in audit.select(outcome=SUPPRESSED)] == [1]
    audit.tick(final=True)  # shutdown: whatever is pending
    assert [e.tally for e in audit.select(outcome=SUPPRESSED)] == [1, 1]


def test_a_flood_from_many_addresses_stays_bounded_in_memory_and_in_lines() -> None:
    clock = FakeClock()
    audit = trail(clock, per_actor=10, total=200, max_actors=100, summary_every_ms=10_000)
    for second in range(3):
        for i in range(20_000):
            audit.deny(f"peer:10.{i >> 8}.{i & 255}.{second}", "UNAUTHENTICATED", "Connect")
        clock.now += 1000
        limiter = audit.limiter
        assert len(limiter._counts) <= 200 and len(limiter._pending) <= 101
        audit.tick()
    recorded = audit.select(DENY, outcome="UNAUTHENTICATED")
    summaries = audit.select(DENY, outcome=SUPPRESSED)
    assert len(recorded) == 3 * 200
    assert len(summaries) == 101  # one interval: 100 actors and everyone else
    assert summaries[-1].actor == OTHER_ACTORS
    assert audit.suppressed == 3 * 20_000 - len(recorded)
    audit.tick(final=True)  # every suppressed denial is in some summary's count
    assert sum(e.tally for e in audit.select(outcome=SUPPRESSED)) == audit.suppressed


def test_the_memory_trail_keeps_a_bounded_number_of_events() -> None:
    audit = MemoryAuditTrail(max_events=5)
    for i in range(8):
        audit.record(SEND, "service:app", command_id=f"c{i}")
    assert [e.command_id for e in audit.events] == ["c3", "c4", "c5", "c6", "c7"]
    assert audit.select(SEND, command_id="c5")[0].command_id == "c5"


@pytest.mark.parametrize("tally", [0, 3])
def test_count_is_only_written_when_there_is_one(tally: int) -> None:
    event = AuditEvent(1, DENY, "peer:x", SUPPRESSED, tally=tally)
    assert ("count" in event.fields()) == bool(tally)
