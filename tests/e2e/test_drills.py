"""The outage drills of loadtests/drills.py at CI scale: every check must pass.

Latency ratios are reported by the drills, not asserted here (benchmarks, not tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests import drills, netns

pytestmark = pytest.mark.slow


def _passed(verdict: drills.Verdict) -> None:
    print(verdict.table())
    failed = [(name, detail) for name, ok, detail in verdict.checks if not ok]
    assert not failed, verdict.table()


async def test_verbosity_storm(tmp_path: Path) -> None:
    _passed(await drills.verbosity_storm(tmp_path, cars=30, unlocks_per_phase=10, settle_s=2.5))


async def test_crash_and_replant(tmp_path: Path) -> None:
    _passed(
        await drills.crash_and_replant(
            tmp_path, cars=20, kills=2, load_s=2.0, down_s=1.0, backoff_cap_s=2.0
        )
    )


async def test_offline_hour(tmp_path: Path) -> None:
    _passed(await drills.offline_hour(tmp_path, ttl_s=1.0))


async def test_stale_position(tmp_path: Path) -> None:
    _passed(await drills.stale_position(tmp_path))


async def test_link_loss(tmp_path: Path) -> None:
    """A half-open link (no FIN, no RST) inside network namespaces the drill makes."""
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"link-loss drill: {reason}")
    verdict = await drills.link_loss(
        tmp_path, down_s=12, keepalive_s=5, heartbeat_interval_s=1, liveness_timeout_s=3, idle_s=2
    )
    _passed(verdict)
    # 3 s is shorter than anything the transport has (keepalive 30 s + 10 s): only the
    # heartbeat check can have found the dead link this soon.
    assert verdict.figures["stream ended by"] == "heartbeat check"
