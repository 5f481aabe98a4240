"""The `broker` command's contract, run as real subprocesses against real brokers.

`--json` prints one JSON object per line with at least `command_id` and `status`; errors
go to stderr as `error: STATUS_NAME: message` with a non-zero exit code.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import broker
from broker.core.errors import Unauthenticated
from broker.security.auth import Authenticator
from broker.security.keys import load_trusted_keys
from broker.security.tokens import issue_token
from broker.testing import AuthKeys, BrokerProcess, clean_env
from tests.conftest import eventually, session_keys

CLI = [sys.executable, "-m", "broker.cli"]
TIMEOUT_S = 30


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One bounded `broker ...` invocation with a clean environment."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=clean_env(env or {}),
        stdin=subprocess.DEVNULL,
    )


def ok(*args: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run a `--json` command that must succeed; its output, one object per line."""
    result = run(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines, result
    return [json.loads(line) for line in lines]


def fails(*args: str, status: str, env: dict[str, str] | None = None) -> str:
    """Run a command that must fail with `status`; its stderr."""
    result = run(*args, env=env)
    assert result.returncode != 0, result
    assert result.stderr.startswith(f"error: {status}: ") or (
        f"\nerror: {status}: " in result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return result.stderr


class Background:
    """A long-running CLI subprocess whose stdout lines arrive on a queue."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        # A file, not a pipe, so a chatty child never blocks; closed by stop().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*CLI, *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=clean_env(env or {}),
            stdin=subprocess.DEVNULL,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def peek(self) -> bool:
        """Whether a line is waiting (without taking it)."""
        return not self.lines.empty()

    def line(self, timeout_s: float = 10) -> str:
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout_s}s from {self.proc.args}") from None

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then SIGKILL if it lingers; (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._stderr.seek(0)
        stderr = self._stderr.read().decode(errors="replace")
        self._stderr.close()
        return self.proc.returncode, stderr


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An --insecure-dev broker with two simulated cars, car-0 and car-1; its target."""
    root = tmp_path_factory.mktemp("cli-dev")
    process = BrokerProcess(root / "data", root / "broker.log")
    sim = None
    try:
        process.start()
        target = process.target
        sim = Background(
            "vehicle-sim", "--vehicles", "2", "--id-prefix", "car-", "--target", target
        )
        assert sim.line().startswith("vehicle-sim: 2 cars against")
        for car in ("car-0", "car-1"):
            asyncio.run(
                eventually(
                    lambda car=car: ok("state", car, "--target", target)[0]["connected"],
                    timeout_s=15,
                    what=f"{car} connected",
                )
            )
        yield target
    finally:
        if sim is not None:
            sim.stop()
        process.kill()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, auth_keys: AuthKeys) -> Iterator[str]:
    """A broker that requires tokens signed by the session's keys; its target."""
    root = tmp_path_factory.mktemp("cli-auth")
    process = BrokerProcess(root / "data", root / "broker.log", keys=auth_keys)
    try:
        yield process.start().target
    finally:
        process.kill()


# -- version and serve ----------------------------------------------------------------------------


def test_version_names_the_version_and_which_twins_are_loaded() -> None:
    expected = "compiled"
    if os.environ.get("BROKER_NO_EXTENSIONS"):
        expected = "pure-python (BROKER_NO_EXTENSIONS=1)"
    script = Path(sys.executable).with_name("broker")
    assert script.exists(), "the `broker` console script is not installed"
    for argv in ([str(script), "--version"], [*CLI, "--version"]):
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=clean_env({})
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"broker {broker.__version__}; extensions: {expected}\n"

    pure = run("--version", env={"BROKER_NO_EXTENSIONS": "1"})
    assert pure.stdout.endswith("extensions: pure-python (BROKER_NO_EXTENSIONS=1)\n")


def test_version_says_so_when_the_compiled_twin_failed_to_load() -> None:
    if os.environ.get("BROKER_NO_EXTENSIONS"):
        pytest.skip("the compiled twin is switched off in this run")
    code = (
        "import sys; sys.modules['broker_ext._codec_c'] = None; "  # its import now fails
        "from broker.cli import main; sys.exit(main(['--version']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=clean_env({}),
    )
    assert result.returncode == 0, result.stderr
    assert "extensions: pure-python fallback (compiled twins missing: codec)" in result.stdout


def test_serve_refuses_insecure_dev_on_a_non_loopback_address(tmp_path: Path) -> None:
    stderr = fails(
        "serve",
        "--insecure-dev",
        "--listen",
        "0.0.0.0:0",
        "--data",
        str(tmp_path / "data"),
        status="INVALID_ARGUMENT",
    )
    assert "refusing '0.0.0.0'" in stderr and "loopback" in stderr


def test_serve_refuses_to_start_without_keys_unless_insecure_dev(tmp_path: Path) -> None:
    stderr = fails(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data",
        str(tmp_path / "data"),
        status="INVALID_ARGUMENT",
    )
    assert "BROKER_AUTH_VEHICLE_KEYS" in stderr


def test_serve_shuts_down_cleanly_on_sigterm(tmp_path: Path) -> None:
    server = Background(
        "serve", "--insecure-dev", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data")
    )
    try:
        assert server.line().startswith("broker ready on 127.0.0.1:")
    finally:
        code, stderr = server.stop()
    assert code == 0, stderr
    assert "shutting down" in stderr


# -- send and its options -------------------------------------------------------------------------


def test_send_json_prints_one_object_with_id_and_status(dev: str) -> None:
    (sent,) = ok("send", "parked-1", "unlock", "--target", dev)
    assert sent["status"] == "QUEUED"  # the car is offline; the command waits, durable
    assert (sent["vehicle_id"], sent["name"], sent["lane"]) == ("parked-1", "unlock", "CRITICAL")
    assert len(sent["command_id"]) == 24 and sent["deduplicated"] is False

    text = run("send", "parked-1", "lock", "--target", dev)
    assert text.returncode == 0, text.stderr
    command_id, status, vehicle, name = text.stdout.split()
    assert (status, vehicle, name) == ("QUEUED", "parked-1", "lock") and len(command_id) == 24


def test_send_payload_must_be_json(dev: str) -> None:
    (sent,) = ok(
        "send", "parked-2", "climate", "--payload", '{"temperature_c": 22}', "--target", dev
    )
    assert sent["payload"] == {"temperature_c": 22}
    (stored,) = ok("status", sent["command_id"], "--target", dev)
    assert stored["payload"] == {"temperature_c": 22}

    stderr = fails(
        "send",
        "parked-2",
        "climate",
        "--payload",
        "{not json",
        "--target",
        dev,
        status="INVALID_ARGUMENT",
    )
    assert "--payload is not JSON" in stderr
    assert len(ok("list", "parked-2", "--target", dev)) == 1  # nothing was sent


def test_send_ttl_sets_the_expiry_and_bad_values_are_refused(dev: str) -> None:
    (sent,) = ok("send", "parked-3", "unlock", "--ttl", "5", "--target", dev)
    assert sent["expires_at_ms"] - sent["created_at_ms"] == 5000
    (default,) = ok("send", "parked-3", "unlock", "--target", dev)
    assert default["expires_at_ms"] - default["created_at_ms"] == 60_000  # unlock's policy
    for bad in ("-1", "0", "abc", "1e10"):
        fails(
            "send", "parked-3", "unlock", "--ttl", bad, "--target", dev, status="INVALID_ARGUMENT"
        )


def test_send_priority_bulk_lowers_the_lane(dev: str) -> None:
    (sent,) = ok("send", "parked-4", "climate", "--priority", "bulk", "--target", dev)
    assert sent["lane"] == "BULK"
    (default,) = ok("send", "parked-4", "climate", "--target", dev)
    assert default["lane"] == "INTERACTIVE"


def test_send_idempotency_key_returns_the_first_command(dev: str) -> None:
    args = ("send", "parked-5", "unlock", "--idempotency-key", "order-77", "--target", dev)
    (first,) = ok(*args)
    (again,) = ok(*args)
    assert again["command_id"] == first["command_id"]
    assert (first["deduplicated"], again["deduplicated"]) == (False, True)
    assert len(ok("list", "parked-5", "--target", dev)) == 1
    fails(
        "send",
        "parked-5",
        "lock",
        "--idempotency-key",
        "order-77",
        "--target",
        dev,
        status="ALREADY_EXISTS",
    )


def test_send_coalesce_key_supersedes_the_waiting_command(dev: str) -> None:
    args = ("send", "parked-6", "climate", "--coalesce-key", "cabin", "--target", dev)
    (older,) = ok(*args, "--payload", '{"temperature_c": 19}')
    (newer,) = ok(*args, "--payload", '{"temperature_c": 23}')
    (older_now,) = ok("status", older["command_id"], "--target", dev)
    assert older_now["status"] == "SUPERSEDED"
    assert newer["command_id"] in older_now["status_reason"]
    assert newer["status"] == "QUEUED"


def test_send_wait_result_round_trips_through_a_simulated_car(dev: str) -> None:
    (done,) = ok("send", "car-0", "unlock", "--wait", "result", "--timeout", "10", "--target", dev)
    assert (done["status"], done["wait_timed_out"], done["attempt"]) == ("SUCCEEDED", False, 1)
    assert done["result_message"] == "locked=False"

    text = run(
        "send",
        "car-1",
        "climate",
        "--payload",
        '{"temperature_c": 21}',
        "--wait",
        "result",
        "--timeout",
        "10",
        "--target",
        dev,
    )
    assert text.returncode == 0, text.stderr
    assert " SUCCEEDED car-1 climate (climate_c=21.0)" in text.stdout


def test_send_wait_for_an_offline_car_answers_with_the_status_reached(dev: str) -> None:
    (waited,) = ok(
        "send", "parked-7", "unlock", "--wait", "result", "--timeout", "0.5", "--target", dev
    )
    assert (waited["status"], waited["wait_timed_out"]) == ("QUEUED", True)


# -- status, cancel, list, watch, state -----------------------------------------------------------


def test_status_and_cancel(dev: str) -> None:
    (sent,) = ok("send", "parked-8", "horn", "--target", dev)
    (shown,) = ok("status", sent["command_id"], "--target", dev)
    assert {k: shown[k] for k in ("command_id", "status", "name")} == {
        "command_id": sent["command_id"],
        "status": "QUEUED",
        "name": "horn",
    }

    (canceled,) = ok("cancel", sent["command_id"], "--target", dev)
    assert canceled["status"] == "CANCELED"
    assert ok("status", sent["command_id"], "--target", dev)[0]["status"] == "CANCELED"
    fails("cancel", sent["command_id"], "--target", dev, status="FAILED_PRECONDITION")
    text = run("cancel", sent["command_id"], "--target", dev)
    assert "is CANCELED; only a command not yet delivered can be canceled" in text.stderr


def test_list_shows_a_vehicles_commands_newest_first(dev: str) -> None:
    ids = [
        ok("send", "parked-9", name, "--target", dev)[0]["command_id"]
        for name in ("lock", "unlock", "horn")
    ]
    listed = ok("list", "parked-9", "--target", dev)
    assert [c["command_id"] for c in listed] == ids[::-1]
    assert all(c["status"] == "QUEUED" for c in listed)


def test_watch_streams_status_changes(dev: str) -> None:
    watcher = Background(
        "watch", "--vehicle", "car-1", "--vehicle", "probe", "--json", "--target", dev
    )
    lines: list[str] = []

    def car_1_events() -> list[dict[str, Any]]:
        while watcher.peek():
            lines.append(watcher.line())
        return [e for e in map(json.loads, lines) if e["vehicle_id"] == "car-1"]

    try:
        asyncio.run(
            eventually(
                lambda: ok("send", "probe", "horn", "--target", dev) and watcher.peek(),
                timeout_s=15,
                what="the watch stream open",
            )
        )
        (done,) = ok(
            "send", "car-1", "lock", "--wait", "result", "--timeout", "10", "--target", dev
        )
        events = asyncio.run(
            eventually(
                car_1_events,
                lambda events: events[-1]["status"] == "SUCCEEDED",
                what="car-1's SUCCEEDED on the watch",
            )
        )
    finally:
        watcher.stop()
    assert {e["command_id"] for e in events} == {done["command_id"]}
    # A simulated car answers at once, so its result is its ack (no separate ACKED).
    assert [e["status"] for e in events][-2:] == ["DELIVERED", "SUCCEEDED"]


def test_state_tells_connected_from_last_seen(dev: str) -> None:
    ok("send", "car-0", "lock", "--wait", "result", "--timeout", "10", "--target", dev)
    (live,) = ok("state", "car-0", "--target", dev)
    assert live["connected"] is True and live["connected_since_ms"] > 0
    assert live["fields"]["locked"]["value"] is True
    assert live["fields"]["locked"]["reported_at_ms"] > 0
    assert live["firmware"] == "sim" and {"lock", "unlock"} <= set(live["capabilities"])
    assert "  firmware sim; can " in run("state", "car-0", "--target", dev).stdout

    sim = Background("vehicle-sim", "--vehicles", "1", "--id-prefix", "gone-", "--target", dev)
    try:
        assert sim.line().startswith("vehicle-sim: 1 cars")
        asyncio.run(
            eventually(
                lambda: ok("state", "gone-0", "--target", dev)[0]["connected"],
                timeout_s=15,
                what="gone-0 connected",
            )
        )
    finally:
        code, stderr = sim.stop()
    assert code == 0, stderr
    (gone,) = asyncio.run(
        eventually(
            lambda: ok("state", "gone-0", "--target", dev),
            lambda states: not states[0]["connected"],
            timeout_s=15,
            what="gone-0 disconnected",
        )
    )
    assert gone["last_seen_ms"] > 0 and gone["connected_since_ms"] == 0
    text = run("state", "gone-0", "--target", dev)
    assert re.search(
        r"gone-0: NOT connected; last seen 20\d\d-\d\d-\d\dT[\d:.]+Z \(\d+ s ago\)", text.stdout
    )

    (never,) = ok("state", "never-seen", "--target", dev)
    assert (never["connected"], never["last_seen_ms"], never["fields"]) == (False, 0, {})
    assert run("state", "never-seen", "--target", dev).stdout == "never-seen: never seen\n"


# -- errors ----------------------------------------------------------------------------------------


def test_errors_name_the_status_on_stderr(dev: str) -> None:
    fails("send", "", "unlock", "--target", dev, status="INVALID_ARGUMENT")
    fails("send", "car-0", "Not A Name", "--target", dev, status="INVALID_ARGUMENT")
    fails("status", "0123456789abcdef01234567", "--target", dev, status="NOT_FOUND")
    fails("list", "bad id", "--target", dev, status="INVALID_ARGUMENT")
    fails("send", "car-0", "unlock", "--target", "127.0.0.1:1", status="UNAVAILABLE")
    fails(
        "send", "car-0", "unlock", "--wait", "forever", "--target", dev, status="INVALID_ARGUMENT"
    )


# -- tokens and auth -------------------------------------------------------------------------------


def test_token_keygen_and_issue_mint_tokens_only_the_matching_public_key_accepts(
    tmp_path: Path,
) -> None:
    made = run("token", "keygen", "--out", str(tmp_path / "keys"), "--name", "cars-a")
    assert made.returncode == 0, made.stderr
    private, public = tmp_path / "keys/cars-a.private.pem", tmp_path / "keys/cars-a.public.pem"
    assert private.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    assert "PRIVATE KEY" not in public.read_text()
    fails("token", "keygen", "--out", str(tmp_path / "keys"), "--name", "cars-a",
          status="INVALID_ARGUMENT")  # fmt: skip  # never overwrites a key
    service_key = session_keys().service_key
    verifier = Authenticator(
        load_trusted_keys({"vehicle": [public], "service": [session_keys().service_public]})
    )
    vehicle = run("token", "issue", "--key-file", str(private), "--vehicle", "car-9")
    assert vehicle.returncode == 0, vehicle.stderr
    principal = verifier.verify(vehicle.stdout.strip())
    assert (principal.kind, principal.name) == ("vehicle", "car-9")
    assert f"token id {principal.token_id}" in vehicle.stderr
    assert 86400 - 5 <= principal.expires_at - time.time() <= 86400  # the vehicle default

    service = run(
        "token", "issue", "--key-file", str(service_key), "--service", "app",
        "--scopes", "send,read", "--ttl", "600",
    )  # fmt: skip
    assert service.returncode == 0, service.stderr
    principal = verifier.verify(service.stdout.strip())
    assert (principal.kind, principal.name) == ("service", "app")
    assert principal.scopes == {"send", "read"}
    assert principal.expires_at - time.time() <= 600
    # the car key cannot mint a service token the broker accepts
    wrong_role = run("token", "issue", "--key-file", str(private), "--service", "app")
    with pytest.raises(Unauthenticated, match="may sign vehicle tokens only"):
        verifier.verify(wrong_role.stdout.strip())

    fails("token", "issue", "--vehicle", "car-9", status="INVALID_ARGUMENT")  # no key file
    fails("token", "issue", "--key-file", str(public), "--vehicle", "car-9",
          status="INVALID_ARGUMENT")  # fmt: skip
    fails("token", "issue", "--key-file", str(service_key), "--service", "app",
          "--scopes", "send,root", status="INVALID_ARGUMENT")  # fmt: skip
    fails("token", "issue", "--key-file", str(private), "--vehicle", "car-9",
          "--service", "app", status="INVALID_ARGUMENT")  # fmt: skip
    private.chmod(0o644)
    stderr = fails("token", "issue", "--key-file", str(private), "--vehicle", "car-9",
                   status="INVALID_ARGUMENT")  # fmt: skip
    assert "readable by other users" in stderr


def test_serve_refuses_a_private_key_as_a_verification_key(tmp_path: Path) -> None:
    keys = session_keys()
    stderr = fails(
        "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data"),
        env={**keys.broker_env(), "BROKER_AUTH_VEHICLE_KEYS": str(keys.vehicle_key)},
        status="INVALID_ARGUMENT",
    )  # fmt: skip
    assert "public keys only" in stderr
    stderr = fails(
        "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data"),
        env={**keys.broker_env(), "BROKER_AUTH_VEHICLE_KEYS": str(keys.service_public)},
        status="INVALID_ARGUMENT",
    )  # fmt: skip
    assert "both vehicle and service" in stderr


def test_a_token_broker_refuses_calls_without_a_valid_token(secured: str, tmp_path: Path) -> None:
    fails("send", "car-0", "unlock", "--target", secured, status="UNAUTHENTICATED")
    forged = tmp_path / "forged.token"
    forged.write_text("v2.forged.token\n")
    fails("list", "car-0", "--target", secured, "--token-file", str(forged),
          status="UNAUTHENTICATED")  # fmt: skip
    wrong = issue_token(Ed25519PrivateKey.generate(), service="app", scopes=["read"])
    stderr = fails("list", "car-0", "--target", secured, env={"BROKER_TOKEN": wrong},
                   status="UNAUTHENTICATED")  # fmt: skip
    assert "unknown key" in stderr

    issued = run(
        "token", "issue", "--key-file", str(session_keys().service_key), "--service", "app",
        "--scopes", "send",
    )  # fmt: skip
    send_only = {"BROKER_TOKEN": issued.stdout.strip()}
    (sent,) = ok("send", "car-0", "unlock", "--target", secured, env=send_only)
    assert sent["status"] == "QUEUED"
    stderr = fails(
        "status", sent["command_id"], "--target", secured, env=send_only, status="PERMISSION_DENIED"
    )
    assert "lacks the 'read' scope" in stderr


def test_vehicle_sim_exits_when_the_broker_refuses_every_car(secured: str, tmp_path: Path) -> None:
    result = run("vehicle-sim", "--vehicles", "2", "--target", secured)
    assert result.returncode != 0
    assert "error: UNAUTHENTICATED: every simulated car was refused" in result.stderr

    # the signing key by file (--vehicle-key), or its path in $BROKER_VEHICLE_KEY: never
    # anything secret in argv
    key = str(session_keys().vehicle_key)
    by_flag = Background("vehicle-sim", "--vehicles", "1", "--id-prefix", "flag-",
                         "--target", secured, "--vehicle-key", key)  # fmt: skip
    by_env = Background("vehicle-sim", "--vehicles", "1", "--id-prefix", "env-",
                        "--target", secured, env={"BROKER_VEHICLE_KEY": key})  # fmt: skip
    token = tmp_path / "service.token"
    token.write_text(session_keys().service_token("send", "read", name="cli-test"))
    try:
        for sim, car in ((by_flag, "flag-0"), (by_env, "env-0")):
            assert sim.line().startswith("vehicle-sim: 1 cars")
            (done,) = ok(
                "send", car, "unlock", "--wait", "result", "--timeout", "10",
                "--target", secured, "--token-file", str(token),
            )  # fmt: skip
            assert done["status"] == "SUCCEEDED"
            argv = Path(f"/proc/{sim.proc.pid}/cmdline").read_bytes()
            assert b"PRIVATE" not in argv
    finally:
        results = [by_flag.stop(), by_env.stop()]
    for code, stderr in results:
        assert code == 0, stderr
