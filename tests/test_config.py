"""Config: precedence (flags > env > TOML > defaults) and validation at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import FALLBACK_POLICY, load_config
from broker.core.errors import InvalidArgument
from broker.v1 import types_pb2 as t

#: the auth settings a broker needs unless insecure-dev (the files are read at start only)
SECRET_ENV = {
    "BROKER_AUTH_VEHICLE_KEYS": "keys/vehicle.public.pem",
    "BROKER_AUTH_SERVICE_KEYS": "keys/service.public.pem",
}


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text('window = 2\nretention_s = 60\nlisten = "127.0.0.1:7000"\n')
    env = {**SECRET_ENV, "BROKER_WINDOW": "3", "BROKER_DURABILITY": "relaxed"}
    config = load_config({"window": 5}, config_file=toml, environ=env)
    assert config.window == 5  # flag beats env and file
    assert config.durability == "relaxed"  # env beats default
    assert config.retention_s == 60  # file beats default
    assert config.listen == "127.0.0.1:7000"
    assert load_config({}, config_file=toml, environ={**env}).window == 3


def test_command_table_from_toml(tmp_path: Path) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text('[commands.unlock]\nttl_s = 30\n[commands.wipers]\nlane = "bulk"\n')
    config = load_config({}, config_file=toml, environ=SECRET_ENV)
    assert config.policy("unlock").ttl_s == 30
    assert config.policy("unlock").lane == t.CRITICAL
    assert config.policy("wipers").lane == t.BULK
    assert config.policy("lock").ttl_s == 60
    assert config.policy("no-such-command") == FALLBACK_POLICY


@pytest.mark.parametrize(
    ("overrides", "env", "needle"),
    [
        ({}, {}, "auth_vehicle_keys"),
        ({}, {"BROKER_AUTH_VEHICLE_KEYS": "v.public.pem"}, "auth_service_keys"),
        ({"auth_clock_skew_s": -1}, SECRET_ENV, "auth_clock_skew_s"),
        ({"auth_service_max_ttl_s": 0}, SECRET_ENV, "auth_service_max_ttl_s"),
        ({"insecure_dev": True, "listen": "0.0.0.0:50051"}, {}, "loopback"),
        ({"listen": "nonsense"}, SECRET_ENV, "HOST:PORT"),
        ({"durability": "maybe"}, SECRET_ENV, "durability"),
        ({"window": 0}, SECRET_ENV, "window"),
        ({"window": "many"}, SECRET_ENV, "window"),
        ({"map_size_mb": 64, "map_size_max_mb": 32}, SECRET_ENV, "map_size_max_mb"),
        ({"nope": 1}, SECRET_ENV, "unknown setting"),
        ({"listen": "0.0.0.0:50051"}, SECRET_ENV, "refusing to serve plaintext on '0.0.0.0'"),
        ({"tls_cert_file": "server.pem"}, SECRET_ENV, "give both or neither"),
        ({"tls_client_ca_file": "ca.pem"}, SECRET_ENV, "mTLS.*needs tls_cert_file"),
        ({"tls_cert_file": "/no/c.pem", "tls_key_file": "/no/k.pem"}, SECRET_ENV, "no such file"),
        ({"insecure_dev": True, "metrics_listen": "0.0.0.0:9464"}, {}, "metrics on loopback"),
        ({"reflection": "maybe"}, SECRET_ENV, "reflection"),
    ],
)
def test_bad_values_are_refused_clearly(
    overrides: dict[str, object], env: dict[str, str], needle: str
) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        load_config(overrides, environ=env)


def test_plaintext_off_loopback_only_when_said_loudly() -> None:
    config = load_config(
        {"listen": "0.0.0.0:0", "plaintext_on_private_network": True}, environ=SECRET_ENV
    )
    assert config.listen == "0.0.0.0:0"
    assert not config.reflection_on  # production: reflection off unless asked
    assert load_config({"insecure_dev": True}, environ={}).reflection_on


def test_insecure_dev_allows_loopback_only() -> None:
    for host in ("127.0.0.1", "localhost", "[::1]"):
        assert load_config({"insecure_dev": True, "listen": f"{host}:0"}, environ={}).insecure_dev


def test_bad_toml_file(tmp_path: Path) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text("window = \n")
    with pytest.raises(InvalidArgument, match="config file"):
        load_config({}, config_file=toml, environ=SECRET_ENV)
    toml.write_text("colour = 'blue'\n")
    with pytest.raises(InvalidArgument, match="unknown setting"):
        load_config({}, config_file=toml, environ=SECRET_ENV)
    toml.write_text('[commands.unlock]\nlane = "urgent"\n')
    with pytest.raises(InvalidArgument, match="lane"):
        load_config({}, config_file=toml, environ=SECRET_ENV)
    with pytest.raises(InvalidArgument, match="config file"):
        load_config({}, config_file=tmp_path / "missing.toml", environ=SECRET_ENV)


def test_a_reserve_that_leaves_no_room_for_commands_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="store_reserve_mb"):
        load_config(
            {"map_size_mb": 16, "map_size_max_mb": 100, "store_reserve_mb": 64},
            environ=SECRET_ENV,
        )


def test_liveness_must_outlast_the_heartbeat_interval() -> None:
    with pytest.raises(InvalidArgument, match="liveness_timeout_s"):
        load_config(
            {"heartbeat_interval_s": 30, "liveness_timeout_s": 20},
            environ=SECRET_ENV,
        )
