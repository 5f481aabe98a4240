"""The service SDK's parts that need no broker: requests, keys, records and errors."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import grpc
import pytest

from broker.core import lanes
from broker.sdk.client import (
    WAIT_MODES,
    BrokerClient,
    BrokerRpcError,
    _rpc_error,
    build_request,
    command_to_dict,
    new_idempotency_key,
)
from broker.v1 import command_service_pb2 as svc
from broker.v1 import types_pb2 as t
from broker.wire import PUSHBACK_KEY

# -- build_request ------------------------------------------------------------------------


def test_build_request_fills_every_field_from_friendly_arguments() -> None:
    request = build_request(
        "car-1",
        "climate",
        {"temperature_c": 21, "fan": "auto"},
        lane="bulk",
        ttl_s=90,
        idempotency_key="order-7",
        coalesce_key="cabin",
        wait="result",
        timeout_s=2.5,
    )
    assert isinstance(request, svc.SendCommandRequest)
    assert (request.vehicle_id, request.name) == ("car-1", "climate")
    assert request.payload == b'{"temperature_c":21,"fan":"auto"}'  # compact JSON
    assert request.lane == t.BULK
    assert (request.ttl_ms, request.wait_timeout_ms) == (90_000, 2500)
    assert (request.idempotency_key, request.coalesce_key) == ("order-7", "cabin")
    assert request.wait == svc.WAIT_RESULT


def test_build_request_defaults_leave_the_choices_to_the_broker() -> None:
    request = build_request("car-1", "unlock")
    assert request.payload == b""
    assert request.lane == t.LANE_UNSPECIFIED  # the command's policy decides
    assert (request.ttl_ms, request.wait_timeout_ms) == (0, 0)  # 0: the broker's default
    assert (request.idempotency_key, request.coalesce_key) == ("", "")
    assert request.wait == svc.WAIT_NONE


def test_build_request_passes_bytes_payloads_through() -> None:
    assert build_request("car-1", "config", b"\x00\xff").payload == b"\x00\xff"


@pytest.mark.parametrize(("name", "value"), sorted(lanes.VALUES.items()))
def test_build_request_knows_every_lane_by_its_name(name: str, value: int) -> None:
    assert build_request("car-1", "unlock", lane=name).lane == value


@pytest.mark.parametrize(("name", "value"), sorted(WAIT_MODES.items()))
def test_build_request_knows_every_wait_mode(name: str, value: int) -> None:
    assert build_request("car-1", "unlock", wait=name).wait == value


def test_build_request_refuses_an_unknown_lane_or_wait_mode_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="lane must be one of") as lane:
        build_request("car-1", "unlock", lane="urgent")
    assert all(name in str(lane.value) for name in lanes.VALUES)
    with pytest.raises(ValueError, match="wait must be one of") as wait:
        build_request("car-1", "unlock", wait="forever")
    assert all(name in str(wait.value) for name in WAIT_MODES)


@pytest.mark.parametrize(
    ("seconds", "ms"),
    [(None, 0), (0, 0), (1, 1000), (1.5, 1500), (0.0001, 1), (0.0015, 2), (3600, 3_600_000)],
)
def test_durations_become_whole_ms_never_rounded_down_to_the_default(
    seconds: float | None, ms: int
) -> None:
    request = build_request("car-1", "unlock", ttl_s=seconds, timeout_s=seconds)
    assert (request.ttl_ms, request.wait_timeout_ms) == (ms, ms)


@pytest.mark.parametrize("field", ["ttl_s", "timeout_s"])
def test_negative_durations_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match="durations must be positive"):
        build_request("car-1", "unlock", **{field: -1.0})


# -- new_idempotency_key ------------------------------------------------------------------


def test_idempotency_keys_are_time_first_hex_of_fixed_width() -> None:
    before_ms = time.time_ns() // 1_000_000
    key = new_idempotency_key()
    after_ms = time.time_ns() // 1_000_000
    assert len(key) == 32 and int(key, 16) >= 0 and key == key.lower()
    assert before_ms <= int(key[:12], 16) <= after_ms  # 12 hex digits of milliseconds


def test_idempotency_keys_are_unique_and_sort_in_the_order_they_were_made() -> None:
    keys = [new_idempotency_key() for _ in range(20_000)]
    assert len(set(keys)) == len(keys)
    stamps = [key[:12] for key in keys]
    assert stamps == sorted(stamps)  # a batch's keys land side by side in the key index
    assert len({key[12:] for key in keys}) == len(keys)  # 80 random bits each


# -- command_to_dict ----------------------------------------------------------------------


def test_command_to_dict_names_enums_and_leaves_unset_optionals_out() -> None:
    command = t.Command(
        command_id="c-1",
        vehicle_id="car-1",
        name="unlock",
        status=t.QUEUED,
        lane=t.CRITICAL,
        created_at_ms=1000,
        expires_at_ms=61_000,
        updated_at_ms=1000,
    )
    assert command_to_dict(command) == {
        "command_id": "c-1",
        "vehicle_id": "car-1",
        "name": "unlock",
        "status": "QUEUED",
        "lane": "CRITICAL",
        "attempt": 0,
        "created_at_ms": 1000,
        "expires_at_ms": 61_000,
        "updated_at_ms": 1000,
    }


def test_command_to_dict_includes_what_is_set_and_decodes_a_json_payload() -> None:
    command = t.Command(
        command_id="c-2",
        status=t.SUCCEEDED,
        lane=t.INTERACTIVE,
        attempt=2,
        delivered_at_ms=5,
        result_deadline_ms=9,
        idempotency_key="k",
        coalesce_key="cabin",
        status_reason="done",
        result_message="climate_c=21.0",
        payload=b'{"temperature_c": 21}',
    )
    out = command_to_dict(command)
    assert json.loads(json.dumps(out)) == out  # JSON-ready as it is
    assert out["payload"] == {"temperature_c": 21}
    assert "payload_hex" not in out
    assert {k: out[k] for k in ("attempt", "delivered_at_ms", "result_deadline_ms")} == {
        "attempt": 2,
        "delivered_at_ms": 5,
        "result_deadline_ms": 9,
    }
    assert (out["idempotency_key"], out["coalesce_key"]) == ("k", "cabin")
    assert (out["status_reason"], out["result_message"]) == ("done", "climate_c=21.0")


def test_command_to_dict_shows_a_payload_that_is_not_json_as_hex() -> None:
    out = command_to_dict(t.Command(command_id="c-3", payload=b"\x00\xffnot json"))
    assert out["payload_hex"] == "00ff6e6f74206a736f6e"
    assert "payload" not in out


# -- errors -------------------------------------------------------------------------------


def _aio_error(code: grpc.StatusCode, details: str | None, trailers: tuple[Any, ...] = ()) -> Any:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details=details
    )


def test_a_refusal_keeps_its_status_name_message_and_retry_hint() -> None:
    error = _rpc_error(
        _aio_error(grpc.StatusCode.UNAVAILABLE, "the store is full", ((PUSHBACK_KEY, "1500"),))
    )
    assert isinstance(error, BrokerRpcError)
    assert (error.code, error.message, error.retry_after_ms) == (
        "UNAVAILABLE",
        "the store is full",
        1500,
    )
    assert str(error) == "UNAVAILABLE: the store is full"


@pytest.mark.parametrize(
    "trailers",
    [(), (("other-key", "10"),), ((PUSHBACK_KEY, "soon"),), ((PUSHBACK_KEY, "-5"),)],
)
def test_a_refusal_without_a_usable_hint_has_none(trailers: tuple[Any, ...]) -> None:
    error = _rpc_error(_aio_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", trailers))
    assert (error.code, error.retry_after_ms) == ("RESOURCE_EXHAUSTED", None)


def test_a_refusal_without_details_has_an_empty_message() -> None:
    error = _rpc_error(_aio_error(grpc.StatusCode.INTERNAL, None))
    assert (error.code, error.message, str(error)) == ("INTERNAL", "", "INTERNAL: ")


# -- a client with nothing to talk to -------------------------------------------------------


def _closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once it closes


async def test_without_retries_an_unreachable_broker_fails_at_once_unavailable() -> None:
    async with BrokerClient(_closed_port(), token="t", max_retries=0, timeout_s=5) as client:
        started = time.monotonic()
        with pytest.raises(BrokerRpcError) as failed:
            await client.get_command("c-1")
        assert failed.value.code == "UNAVAILABLE"
        assert time.monotonic() - started < 4  # refused, not timed out
        assert (client.retries, client.pushbacks) == (0, 0)


async def test_a_retry_waits_for_the_broker_only_as_long_as_reconnect_wait_s() -> None:
    async with BrokerClient(
        _closed_port(), token="t", max_retries=3, reconnect_wait_s=0.2, timeout_s=10
    ) as client:
        started = time.monotonic()
        with pytest.raises(BrokerRpcError) as failed:
            await client.get_command("c-1")
        assert failed.value.code == "UNAVAILABLE"
        assert "the broker is unreachable" in failed.value.message
        assert time.monotonic() - started < 5  # not the call's 10 s
        assert client.retries == 0  # it never got as far as trying again


async def test_send_commands_keys_its_own_copies_and_leaves_the_callers_untouched() -> None:
    mine = [build_request("car-1", "unlock"), build_request("car-2", "lock", idempotency_key="k")]
    async with BrokerClient(_closed_port(), max_retries=0) as client:
        with pytest.raises(BrokerRpcError):
            await client.send_commands(mine)
    assert [r.idempotency_key for r in mine] == ["", "k"]
