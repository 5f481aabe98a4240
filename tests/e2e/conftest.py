"""Fixtures for end-to-end tests that run the broker as a real subprocess."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SECRET

REPO_ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"broker ready on (\S+):(\d+) ")


class BrokerProcess:
    """`python -m broker.cli serve` as a child process, stdout and stderr in files.

    `start()` waits (bounded) for the one "broker ready on HOST:PORT ..." line and reads
    the port from it, so `--listen 127.0.0.1:0` works.
    """

    def __init__(
        self,
        data_dir: Path,
        log_dir: Path,
        *,
        insecure_dev: bool = False,
        listen: str = "127.0.0.1:0",
        env: Mapping[str, str] | None = None,
        args: Iterable[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = 0
        self._log_dir = log_dir
        self._argv = [
            sys.executable,
            "-m",
            "broker.cli",
            "serve",
            "--listen",
            listen,
            "--data",
            str(data_dir),
            *(["--insecure-dev"] if insecure_dev else []),
            *args,
        ]
        self._env = clean_env(env or ({} if insecure_dev else {"BROKER_AUTH_SECRET": SECRET}))
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout = log_dir / "stdout.log"
        self._stderr = log_dir / "stderr.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self, timeout_s: float = 20.0) -> BrokerProcess:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        with self._stdout.open("wb") as out, self._stderr.open("ab") as err:
            self._proc = subprocess.Popen(
                self._argv,
                stdout=out,
                stderr=err,
                env=self._env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = READY.search(self._stdout.read_text())
            if match:
                self.port = int(match.group(2))
                return self
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"broker did not become ready:\n{self.logs()}")

    def kill(self) -> None:
        """SIGKILL (no shutdown path runs) and reap; a no-op once it is gone."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-4000:]
            for p in (self._stdout, self._stderr)
            if p.exists()
        )


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without BROKER_* settings (but the choice of compiled or
    pure-Python twins, so both builds are tested end to end), plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BROKER_") or k == "BROKER_NO_EXTENSIONS"
    }
    env.update(extra)
    return env


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """`spawn(**BrokerProcess kwargs)`: a started broker subprocess, SIGKILLed at teardown."""
    started: list[BrokerProcess] = []
    counter = itertools.count(1)

    def start(data_dir: Path | None = None, **kwargs: Any) -> BrokerProcess:
        log_dir = tmp_path / f"broker-{next(counter)}"
        process = BrokerProcess(data_dir or tmp_path / "data", log_dir, **kwargs)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.kill()
        print(f"--- {process.target} logs ---\n{process.logs()}")  # shown when a test fails
