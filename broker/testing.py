"""`python -m broker.cli serve` as a child process: the one helper of the load tools and
the end-to-end tests (and `stop_process`, how both end the children they start).

Synchronous at its core (`start`, `stop` and `kill` return once done), so pytest fixtures
use it as is; asyncio callers use `astart`, `astop`, `akill` or `async with`, which run
the same waits on a worker thread while the event loop goes on.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.security.keys import generate_key_pair, load_private_key
from broker.security.tokens import issue_token

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
#: Only a whole line (with its newline) counts, so `metrics=` is never missed.
READY_LINE = re.compile(
    r"broker ready on (?P<host>[^\s:]+):(?P<port>\d+) .*loop=(?P<loop>\S+) "
    r"extensions=(?P<extensions>.*) auth=\S+(?: metrics=(?P<metrics>\S+))?\n"
)


class AuthKeys:
    """A vehicle and a service signing key pair in `folder` (made by `create`), for
    brokers that e2e tests and load tools start: the broker gets the public halves
    (`broker_env`), the test or tool mints tokens with the private ones."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.vehicle_key = folder / "vehicle.private.pem"
        self.service_key = folder / "service.private.pem"
        self.vehicle_public = folder / "vehicle.public.pem"
        self.service_public = folder / "service.public.pem"
        self._loaded: dict[Path, Ed25519PrivateKey] = {}

    @classmethod
    def create(cls, folder: Path) -> AuthKeys:
        for name in ("vehicle", "service"):
            generate_key_pair(folder, name)
        return cls(folder)

    def broker_env(self) -> dict[str, str]:
        """The settings that make a broker trust these keys."""
        return {
            "BROKER_AUTH_VEHICLE_KEYS": str(self.vehicle_public),
            "BROKER_AUTH_SERVICE_KEYS": str(self.service_public),
        }

    def _key(self, path: Path) -> Ed25519PrivateKey:
        if path not in self._loaded:
            self._loaded[path] = load_private_key(path)
        return self._loaded[path]

    def vehicle_token(self, vehicle_id: str, **kwargs: Any) -> str:
        return issue_token(self._key(self.vehicle_key), vehicle=vehicle_id, **kwargs)

    def service_token(self, *scopes: str, name: str = "tests", **kwargs: Any) -> str:
        """A service token with `scopes` (default: send, read)."""
        return issue_token(
            self._key(self.service_key), service=name, scopes=scopes or ("send", "read"), **kwargs
        )


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without BROKER_* settings (but the choice of compiled or
    pure-Python twins, so both builds can be run end to end), plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BROKER_") or k == "BROKER_NO_EXTENSIONS"
    }
    env.update(extra)
    return env


def status_kb(pid: int | str = "self") -> dict[str, int]:
    """A process's memory from /proc/PID/status in KiB: VmRSS (resident now), RssAnon (heap),
    RssFile (file-backed; for the broker mostly LMDB's map), VmHWM (peak resident); empty
    without /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for field in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
        found = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
        if found:
            out[field] = int(found[1])
    return out


def memory_mb(pid: int) -> dict[str, float]:
    """A process's memory in MiB: peak resident, and resident now, split in anonymous
    (heap) and file-backed (for the broker, mostly LMDB's map); empty without /proc."""
    kb = status_kb(pid)
    names = (("VmHWM", "peak_rss_mb"), ("RssAnon", "anon_mb"), ("RssFile", "file_mb"))
    return {name: round(kb[field] / 1024, 1) for field, name in names if field in kb}


def stop_process(proc: subprocess.Popen[Any], grace_s: float) -> float:
    """End a child process this process started: SIGTERM, up to `grace_s` for it to exit,
    then SIGKILL; reaped either way. Returns the seconds it took; a no-op once it has ended.

    Only through its `Popen`, which signals a PID only while it has not reaped that child,
    so a PID the system has since given to another process is never signalled.
    """
    if proc.poll() is not None:
        return 0.0
    started = time.perf_counter()
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.perf_counter() - started


class BrokerProcess:
    """A broker on 127.0.0.1 over `data_dir`, its stdout and stderr appended to `log_path`.

    `host` and `prefix` run it elsewhere on this machine: e.g. `prefix=("ip", "netns",
    "exec", NS)` with `host` an address of a network namespace the caller made.

    With `keys` (an `AuthKeys`) it requires tokens signed by them, without it runs
    `--insecure-dev`. Its environment is `clean_env(env)`; `args` go after the others.
    `port=0` takes a free port (read from the "broker ready on HOST:PORT ..." line); a
    second `start()`, a restart over the same data folder, binds the same port again.
    """

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        *,
        keys: AuthKeys | None = None,
        port: int = 0,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        host: str = LOOPBACK,
        prefix: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.prefix = list(prefix)
        self.log_path = log_path
        self.port = port
        self.keys = keys
        self.args = list(args)
        # No drain delay unless asked for: nothing polls these brokers' health.
        self.env = clean_env(
            {
                "BROKER_DRAIN_DELAY_S": "0",
                **(keys.broker_env() if keys else {}),
                **(env or {}),
            }
        )
        self.loop = ""
        self.extensions = ""
        self.metrics_target = ""  # HOST:PORT when started with `--metrics`
        self.shutdown_s: float | None = None
        self.memory_mb: dict[str, float] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """None until it has been started and has ended."""
        return None if self._proc is None else self._proc.poll()

    def start(self, timeout_s: float = 30.0) -> BrokerProcess:
        """Start (or restart) and wait, bounded, for the ready line; SIGKILL on failure."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            offset = log.tell()  # where this run's output starts
            self._proc = subprocess.Popen(
                [
                    *self.prefix,
                    *(sys.executable, "-m", "broker.cli", "serve"),
                    *("--listen", self.target, "--data", str(self.data_dir)),
                    *([] if self.keys else ["--insecure-dev"]),
                    *self.args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=PROJECT_ROOT,
                env=self.env,
            )
        deadline = time.monotonic() + timeout_s
        while not (ready := READY_LINE.search(self._output(offset))):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"broker did not become ready; its log:\n{self.logs()}")
            time.sleep(0.02)
        self.port = int(ready["port"])
        self.loop = ready["loop"]
        self.extensions = ready["extensions"]
        self.metrics_target = ready["metrics"] or ""
        return self

    def kill(self) -> None:
        """SIGKILL (no drain, no flush: what was committed must survive) and reap; a no-op
        once it has ended."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (the broker drains and closes LMDB), SIGKILL after `timeout_s`; records
        the memory it ended with and how long it took. A no-op once it has ended."""
        if not self.running:
            return
        assert self._proc is not None
        self.memory_mb = memory_mb(self._proc.pid)
        self.shutdown_s = round(stop_process(self._proc, timeout_s), 3)

    # -- for asyncio callers: the same, waited for on a worker thread --

    async def astart(self) -> BrokerProcess:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def __aenter__(self) -> BrokerProcess:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    # -- what it measures (started with `--metrics HOST:PORT`) --

    def metrics(self, timeout_s: float = 10.0) -> dict[str, float]:
        """`name{label=value,...}` (labels sorted) -> value, from its Prometheus /metrics;
        {} when it does not answer (down, or started without `--metrics`)."""
        from prometheus_client.parser import text_string_to_metric_families

        if not self.metrics_target:
            return {}
        url = f"http://{self.metrics_target}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as reply:
                text = reply.read().decode()
        except OSError:
            return {}
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    async def ametrics(self) -> dict[str, float]:
        return await asyncio.to_thread(self.metrics)

    # -- what it printed and logged --

    def _output(self, offset: int) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def logs(self, max_chars: int = 8000) -> str:
        """The end of the log, over every start."""
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return "(no log)"

    def log_problems(self) -> list[str]:
        """WARNING/ERROR/CRITICAL lines and tracebacks the broker logged."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        keep = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
        return [line for line in text.splitlines() if any(k in line for k in keep)]

    def describe(self) -> dict[str, Any]:
        """How the process went: memory at the end, shutdown time, exit code, log file."""
        return {
            "memory_mb": self.memory_mb,
            "shutdown_s": self.shutdown_s,
            "exit_code": self.exit_code,
            "log": str(self.log_path),
        }
