"""Fixtures for end-to-end tests that run the broker as a real subprocess."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.testing import BrokerProcess
from tests.conftest import SECRET


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """`spawn(**BrokerProcess kwargs)`: a started broker subprocess, SIGKILLed at teardown.

    It requires tokens signed with SECRET unless told otherwise (`secret=None`: insecure).
    """
    started: list[BrokerProcess] = []
    counter = itertools.count(1)

    def start(data_dir: Path | None = None, **kwargs: Any) -> BrokerProcess:
        kwargs.setdefault("secret", SECRET)
        log_path = tmp_path / f"broker-{next(counter)}.log"
        process = BrokerProcess(data_dir or tmp_path / "data", log_path, **kwargs)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.kill()
        print(f"--- {process.target} logs ---\n{process.logs()}")  # shown when a test fails
