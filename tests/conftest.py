"""What every test may use: the session's signing keys, a valid Config, and `eventually`.

Fixtures that start a real server live in tests/e2e/ (conftest.py and harness.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import settings

from broker.config import Config
from broker.testing import AuthKeys

# A 2-core CI machine running e2e brokers next to property tests: time per example is
# not what these tests check, so no per-example deadline.
settings.register_profile("broker", deadline=None)
settings.load_profile("broker")

T = TypeVar("T")
_session_keys: list[AuthKeys] = []

#: how much of the last value an `eventually` failure shows
_SHOWN_CHARS = 2000


@pytest.fixture(scope="session", autouse=True)
def auth_keys(tmp_path_factory: pytest.TempPathFactory) -> AuthKeys:
    """The session's vehicle and service signing keys, made in a temp folder; brokers the
    tests start trust their public halves (`make_config`, `spawn`)."""
    if not _session_keys:
        _session_keys.append(AuthKeys.create(tmp_path_factory.mktemp("keys")))
    return _session_keys[0]


def session_keys() -> AuthKeys:
    """`auth_keys` for code that is not a fixture (helpers, `make_config`)."""
    assert _session_keys, "the session-scoped auth_keys fixture has not run"
    return _session_keys[0]


def make_config(data_dir: Path, **overrides: Any) -> Config:
    """A validated Config for a broker on a free loopback port, trusting `session_keys()`."""
    keys = session_keys()
    base = Config(
        listen="127.0.0.1:0",
        data_dir=data_dir,
        auth_vehicle_keys=str(keys.vehicle_public),
        auth_service_keys=str(keys.service_public),
        grace_s=0.5,
        drain_delay_s=0,
    )
    config = dataclasses.replace(base, **overrides)
    config.validate()
    return config


async def eventually(
    probe: Callable[[], T | Awaitable[T]],
    accept: Callable[[T], object] = bool,
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.05,
    what: str = "the condition",
) -> T:
    """Call `probe()` until `accept(value)` holds, and return that value.

    `probe` may be sync or async. A probe or `accept` that raises counts as "not yet" (so
    `accept` may assert). On timeout this raises AssertionError naming `what` and what the
    probe last returned, or what was last raised (chained as the cause).

    Sync code without a running loop (a sync test or a module-scoped fixture) calls it as
    `asyncio.run(eventually(...))`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    tries = 0
    while True:
        tries += 1
        error: Exception | None = None
        try:
            value: Any = probe()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            error, last = exc, f"the probe last raised {_shown(exc)}"
        else:
            try:
                if accept(value):
                    return value  # type: ignore[no-any-return]
                last = f"the probe last returned {_shown(value)}"
            except Exception as exc:
                error = exc
                last = f"the last value was refused with {_shown(exc)}: {_shown(value)}"
        if loop.time() >= deadline:
            raise AssertionError(
                f"{what} did not hold within {timeout_s:g}s ({tries} tries); {last}"
            ) from error
        await asyncio.sleep(interval_s)


def _shown(value: object) -> str:
    text = repr(value)
    if len(text) > _SHOWN_CHARS:
        return f"{text[:_SHOWN_CHARS]}... ({len(text)} characters)"
    return text


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "24m") mounted at `folder`/disk, unmounted afterwards; the
    test is skipped, saying why, where mounting is not allowed (not root, a container)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = folder / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
