"""Signed commands through a real broker: an honest one runs; one the broker alters,
retargets, re-dates or replays (an injected mutation of the frames it writes) is refused
by the car SDK and ends FAILED with the reason, visible through GetCommand."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import broker.core.stream as stream_module
from broker.core.clock import now_ms
from broker.sdk.client import BrokerClient, BrokerRpcError, build_request, sign_request
from broker.sdk.vehicle import HandlerResult, VehicleAgent
from broker.security.keys import key_id
from broker.security.signing import CommandSigner, CommandVerifier
from broker.testing import clean_env
from broker.v1 import types_pb2 as t
from tests.conftest import eventually, session_keys
from tests.e2e.harness import Running, settled

SENDER = Ed25519PrivateKey.generate()
PAYLOAD = b'{"door":"all"}'
#: command id -> what the "compromised broker" does to that command's frames
Mutation = Callable[[Any], None]


@pytest.fixture
def tamper(monkeypatch: pytest.MonkeyPatch) -> dict[str, Mutation]:
    """A broker that tampers: every frame it writes for a command id in the returned dict
    goes through that mutation first (it holds no signing key, as a real broker)."""
    mutations: dict[str, Mutation] = {}
    original = stream_module.command_frame

    def command_frame(out: Any, attempt: int) -> Any:
        frame = original(out, attempt)
        mutate = mutations.get(frame.command.command_id)
        if mutate is not None:
            mutate(frame.command)
        return frame

    monkeypatch.setattr(stream_module, "command_frame", command_frame)
    return mutations


def verifier(**kwargs: Any) -> CommandVerifier:
    return CommandVerifier({key_id(SENDER.public_key()): (SENDER.public_key(), None)}, **kwargs)


class Recorder:
    """Handlers that record what they were asked to do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def handlers(self) -> dict[str, Any]:
        def handler(name: str) -> Any:
            async def handle(payload: bytes) -> HandlerResult:
                self.calls.append((name, payload))
                return True, f"{name} done", b""

            return handle

        return {name: handler(name) for name in ("unlock", "lock", "climate")}


async def signed_car(
    running: Running, cars: Callable[..., Any], vehicle_id: str = "car-1", **kwargs: Any
) -> tuple[VehicleAgent, Recorder]:
    recorder = Recorder()
    kwargs.setdefault("verifier", verifier())
    agent = await cars(running, vehicle_id, handlers=recorder.handlers(), **kwargs)
    return agent, recorder


def signed_request(vehicle_id: str = "car-1", name: str = "unlock", **kwargs: Any) -> Any:
    request = build_request(vehicle_id, name, kwargs.pop("payload", PAYLOAD), **kwargs)
    return sign_request(request, CommandSigner(SENDER))


def command_id_of(request: Any) -> str:
    return t.CommandBody.FromString(request.signed.body).command_id


async def send(client: BrokerClient, request: Any) -> Any:
    """One SendCommandRequest as it is (send_commands leaves a signed item alone)."""
    (item,) = (await client.send_commands([request])).items
    if item.WhichOneof("outcome") == "error":
        raise BrokerRpcError(item.error.code, item.error.message)
    return item.accepted


def body_with(envelope: Any, **changes: Any) -> bytes:
    body = t.CommandBody.FromString(envelope.body)
    for name, value in changes.items():
        setattr(body, name, value)
    return body.SerializeToString()


# -- the honest path -----------------------------------------------------------------------


async def test_an_honest_signed_command_succeeds(
    running: Running, cars: Callable[..., Any]
) -> None:
    agent, recorder = await signed_car(running, cars)
    client = BrokerClient(
        running.target, token=running.service_token(), signer=CommandSigner(SENDER)
    )
    try:
        reply = await client.send_command("car-1", "unlock", PAYLOAD, wait="result", timeout_s=5)
    finally:
        await client.close()
    command = reply.command
    assert t.CommandStatus.Name(command.status) == "SUCCEEDED", command
    assert command.result_message == "unlock done"
    assert recorder.calls == [("unlock", PAYLOAD)]
    body = t.CommandBody.FromString(command.signed.body)  # stored and shown verbatim
    assert (body.command_id, body.vehicle_id, body.payload) == (
        command.command_id,
        "car-1",
        PAYLOAD,
    )
    assert command.expires_at_ms == body.expires_at_ms  # the signed expiry (default 60 s)
    assert 55_000 <= body.expires_at_ms - body.issued_at_ms <= 60_000
    assert list(agent.refused) == []


async def test_an_unsigned_command_to_a_car_that_requires_signatures_fails(
    running: Running, cars: Callable[..., Any]
) -> None:
    _, recorder = await signed_car(running, cars)
    client = running.client()
    reply = await client.send_command("car-1", "unlock", wait="result", timeout_s=5)
    assert t.CommandStatus.Name(reply.command.status) == "FAILED"
    assert reply.command.result_message.startswith("refused: unsigned"), reply.command
    stored = await client.get_command(reply.command.command_id)
    assert stored.result_message == reply.command.result_message
    assert recorder.calls == []


async def test_a_resent_envelope_is_deduplicated_and_its_id_cannot_be_reused(
    running: Running, cars: Callable[..., Any]
) -> None:
    _, recorder = await signed_car(running, cars)
    client = running.client()
    request = signed_request()
    first = await send(client, request)
    again = await send(client, request)  # a retry: the same envelope
    assert (again.deduplicated, again.command.command_id) == (True, first.command.command_id)
    await settled(client, first.command.command_id)
    other = signed_request(payload=b'{"door":"driver"}')
    other.signed.CopyFrom(
        CommandSigner(SENDER).sign(
            "car-1", "unlock", b"{}", ttl_s=30, command_id=first.command.command_id
        )
    )
    with pytest.raises(BrokerRpcError) as info:
        await send(client, other)
    assert info.value.code == "ALREADY_EXISTS"
    assert recorder.calls == [("unlock", PAYLOAD)]


# -- a broker that tampers ----------------------------------------------------------------


async def _tampered_outcome(
    running: Running, tamper: dict[str, Mutation], request: Any, mutate: Mutation
) -> Any:
    tamper[command_id_of(request)] = mutate
    client = running.client()
    await send(client, request)
    return await settled(client, command_id_of(request))


def _set_body(**changes: Any) -> Mutation:
    def mutate(frame: Any) -> None:
        frame.signed.body = body_with(frame.signed, **changes)

    return mutate


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_set_body(payload=b'{"door":"trunk"}'), "bad signature"),  # altered
        (_set_body(name="lock"), "bad signature"),
        (_set_body(vehicle_id="car-1", command_id="x-1"), "bad signature"),
        (_set_body(expires_at_ms=now_ms() + 86_400_000), "bad signature"),  # re-dated
        (_set_body(issued_at_ms=1), "bad signature"),
        (lambda frame: frame.ClearField("signed"), "unsigned"),  # stripped
        (
            lambda frame: setattr(frame.signed, "signature", b"\x00" * 64),
            "bad signature",
        ),
    ],
)
async def test_a_tampered_command_is_refused_and_fails_with_the_reason(
    running: Running,
    cars: Callable[..., Any],
    tamper: dict[str, Mutation],
    mutate: Mutation,
    reason: str,
) -> None:
    _, recorder = await signed_car(running, cars)
    command = await _tampered_outcome(running, tamper, signed_request(), mutate)
    assert t.CommandStatus.Name(command.status) == "FAILED", command
    assert command.result_message.startswith(f"refused: {reason}"), command.result_message
    assert recorder.calls == []


async def test_changing_the_frames_unsigned_copies_changes_nothing(
    running: Running, cars: Callable[..., Any], tamper: dict[str, Mutation]
) -> None:
    _, recorder = await signed_car(running, cars)

    def mutate(frame: Any) -> None:
        frame.name, frame.payload = "lock", b"evil"
        frame.expires_at_ms += 86_400_000

    command = await _tampered_outcome(running, tamper, signed_request(), mutate)
    assert t.CommandStatus.Name(command.status) == "SUCCEEDED", command
    assert recorder.calls == [("unlock", PAYLOAD)]  # the body's, not the frame's


async def test_a_command_retargeted_to_another_car_is_refused(
    running: Running, cars: Callable[..., Any], tamper: dict[str, Mutation]
) -> None:
    agent, recorder = await signed_car(running, cars)
    client = running.client()
    # A real command for car-2 (offline), whose stored envelope and id the broker then
    # hands to car-1 in place of car-1's own command.
    for_car_2 = await send(client, signed_request("car-2"))
    stolen = (await client.get_command(for_car_2.command.command_id)).signed

    def retarget(frame: Any) -> None:
        frame.signed.CopyFrom(stolen)
        frame.command_id = for_car_2.command.command_id

    request = signed_request()
    tamper[command_id_of(request)] = retarget
    await send(client, request)
    await eventually(lambda: agent.refused, what="car-1 to refuse the retargeted command")
    assert list(agent.refused) == [
        (for_car_2.command.command_id, "signed for vehicle 'car-2', not this one ('car-1')")
    ]
    assert recorder.calls == []
    # car-1's answer names car-2's command, which the broker does not take from car-1.
    theirs = await client.get_command(for_car_2.command.command_id)
    assert t.CommandStatus.Name(theirs.status) == "QUEUED"


async def test_a_command_retargeted_under_its_own_id_fails_with_the_reason(
    running: Running, cars: Callable[..., Any], tamper: dict[str, Mutation]
) -> None:
    _, recorder = await signed_car(running, cars)
    client = running.client()
    for_car_2 = await send(client, signed_request("car-2"))
    stolen = (await client.get_command(for_car_2.command.command_id)).signed
    command = await _tampered_outcome(
        running, tamper, signed_request(), lambda frame: frame.signed.CopyFrom(stolen)
    )
    assert t.CommandStatus.Name(command.status) == "FAILED"
    # The vehicle check comes first: it was signed for car-2.
    assert command.result_message == "refused: signed for vehicle 'car-2', not this one ('car-1')"
    assert recorder.calls == []


async def test_an_old_envelope_replayed_under_a_new_id_is_refused(
    running: Running, cars: Callable[..., Any], tamper: dict[str, Mutation]
) -> None:
    _, recorder = await signed_car(running, cars)
    client = running.client()
    first = signed_request()
    await send(client, first)
    done = await settled(client, command_id_of(first))
    assert t.CommandStatus.Name(done.status) == "SUCCEEDED"
    old_envelope = done.signed
    command = await _tampered_outcome(
        running, tamper, signed_request("car-1", "lock"), lambda f: f.signed.CopyFrom(old_envelope)
    )
    assert t.CommandStatus.Name(command.status) == "FAILED"
    assert command.result_message.startswith("refused: command id mismatch: signed as "), command
    assert recorder.calls == [("unlock", PAYLOAD)]  # once


async def test_a_command_held_back_past_its_signed_expiry_is_refused(
    running: Running, cars: Callable[..., Any]
) -> None:
    # The broker delays it until the car's clock is past the signed expiry (simulated by
    # a car clock 31 s ahead of a 30 s command; the broker's own clock is honest).
    _, recorder = await signed_car(
        running, cars, verifier=verifier(clock=lambda: now_ms() + 31_000, clock_skew_ms=60_000)
    )
    client = running.client()
    request = signed_request(ttl_s=30)
    await send(client, request)
    command = await settled(client, command_id_of(request))
    assert t.CommandStatus.Name(command.status) == "FAILED"
    assert command.result_message.startswith("refused: expired"), command
    assert recorder.calls == []


async def test_keys_are_trusted_per_command_name(
    running: Running, cars: Callable[..., Any]
) -> None:
    stranger = CommandSigner(Ed25519PrivateKey.generate())
    only_climate = CommandVerifier(
        {key_id(SENDER.public_key()): (SENDER.public_key(), ["climate"])}
    )
    _, recorder = await signed_car(running, cars, verifier=only_climate)
    client = running.client()
    unlock = signed_request()
    climate = signed_request(name="climate", payload=b'{"temperature_c":21}')
    strangers = sign_request(build_request("car-1", "climate"), stranger)
    for request in (unlock, climate, strangers):
        await send(client, request)
    outcomes = {
        command_id_of(r): await settled(client, command_id_of(r))
        for r in (unlock, climate, strangers)
    }
    assert outcomes[command_id_of(unlock)].result_message.startswith(
        f"refused: key {SENDER_KEY_ID} may not sign 'unlock'"
    )
    assert t.CommandStatus.Name(outcomes[command_id_of(climate)].status) == "SUCCEEDED"
    assert outcomes[command_id_of(strangers)].result_message == (
        f"refused: unknown signing key {stranger.key_id.hex()}"
    )
    assert recorder.calls == [("climate", b'{"temperature_c":21}')]


SENDER_KEY_ID = key_id(SENDER.public_key()).hex()


# -- the CLI -------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(env or {}),
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def vehicle_sim(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        log = (tmp_path / f"sim-{len(started)}.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "vehicle-sim", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env({}),
            stdin=subprocess.DEVNULL,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_the_cli_makes_keys_signs_and_simulated_cars_check(
    running: Running, tmp_path: Path, vehicle_sim: Callable[..., Any]
) -> None:
    keys = tmp_path / "command-keys"
    made = await asyncio.to_thread(
        _cli, "keys", "command-keygen", "--out", str(keys), "--name", "app"
    )
    assert made.returncode == 0, made.stderr
    private, public = keys / "app.private.pem", keys / "app.public.pem"
    assert private.stat().st_mode & 0o777 == 0o600
    kid = CommandSigner.from_file(private).key_id.hex()
    assert f"command key id {kid}" in made.stdout
    vehicle_sim(
        "--target", running.target, "--vehicles", "1", "--id-prefix", "sim-",
        "--vehicle-key", str(session_keys().vehicle_key),
        "--trust-key", f"{public}:unlock,lock", "--require-signatures",
    )  # fmt: skip
    client = running.client()

    async def connected() -> bool:
        return bool((await client.get_vehicle_state("sim-0")).connected)

    await eventually(connected, timeout_s=20, what="the simulated car to connect")
    token_file = tmp_path / "token"
    token_file.write_text(running.service_token())
    common = ("--target", running.target, "--token-file", str(token_file), "--json")
    signed = await asyncio.to_thread(
        _cli, "send", "sim-0", "unlock", "--sign-key", str(private), "--ttl", "30",
        "--wait", "result", "--timeout", "10", *common,
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    out = json.loads(signed.stdout)
    assert (out["status"], out["signed"]) == ("SUCCEEDED", True), out
    unsigned = await asyncio.to_thread(
        _cli, "send", "sim-0", "lock", "--wait", "result", "--timeout", "10", *common
    )
    assert unsigned.returncode == 0, unsigned.stderr
    out = json.loads(unsigned.stdout)
    assert out["status"] == "FAILED" and out["result_message"].startswith("refused: unsigned")
    not_trusted = await asyncio.to_thread(
        _cli, "send", "sim-0", "climate", "--payload", '{"temperature_c":21}',
        "--sign-key", str(private), "--wait", "result", "--timeout", "10", *common,
    )  # fmt: skip
    out = json.loads(not_trusted.stdout)
    assert out["result_message"] == f"refused: key {kid} may not sign 'climate'", out
