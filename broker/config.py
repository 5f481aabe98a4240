"""Broker configuration: one frozen dataclass from CLI flags > BROKER_* env > TOML > defaults."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from broker.core import lanes
from broker.core.errors import InvalidArgument
from broker.core.quotas import CallerPolicy


@dataclass(frozen=True)
class CommandPolicy:
    """How one command name is treated: its lane, default TTL and result timeout."""

    lane: int
    ttl_s: float
    result_timeout_s: float


def _policies(
    lane: str, ttl_s: float, result_timeout_s: float, *names: str
) -> dict[str, CommandPolicy]:
    return {n: CommandPolicy(lanes.VALUES[lane], ttl_s, result_timeout_s) for n in names}


DEFAULT_COMMANDS: Mapping[str, CommandPolicy] = MappingProxyType(
    {
        # An unlock an hour late is a safety bug: short TTLs on the critical lane.
        **_policies("critical", 60, 30, "lock", "unlock", "start", "stop", "immobilise"),
        **_policies("interactive", 300, 60, "climate", "charge", "charge_limit", "trunk", "horn"),
        **_policies("bulk", 86400, 300, "config", "update_schedule", "data_request"),
    }
)
#: The policy of a command name that is not in the table.
FALLBACK_POLICY = CommandPolicy(lanes.INTERACTIVE, 300, 60)


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:50051"
    #: HOST:PORT for Prometheus /metrics; empty disables it
    metrics_listen: str = ""
    data_dir: Path = Path("broker-data")
    insecure_dev: bool = False
    #: TLS: the server's certificate chain and key (PEM); both or neither. With
    #: tls_client_ca_file every client must present a certificate that CA signed (mTLS):
    #: a car's identity is then its certificate's URI SAN `urn:vehicle:<id>`
    #: (broker/security/tls.py). The files are reloaded for new connections when they change.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    #: serve plaintext on a non-loopback address (only behind a proxy that terminates TLS
    #: on a private link): without it, a non-loopback listen needs TLS
    plaintext_on_private_network: bool = False
    #: serve /metrics on a non-loopback address in insecure-dev mode (it needs no token)
    metrics_on_network_in_dev: bool = False
    #: gRPC server reflection (lists every method to anyone who can connect): on in
    #: insecure-dev mode, off otherwise unless set; health checks are always served
    reflection: str = "auto"
    #: public keys (PEM files, or folders of *.public.pem; comma-separated) whose Ed25519
    #: signatures make vehicle tokens, and those that make service tokens: one key never
    #: in both, and every key listed is accepted (rotate by adding the new key first).
    #: Both are required unless insecure_dev; the broker holds no key that can mint.
    auth_vehicle_keys: str = ""
    auth_service_keys: str = ""
    #: token ids (one per line) refused from now on; re-read when the file changes
    auth_revocation_file: str = ""
    #: the longest token lifetime (exp - iat) accepted, per kind
    auth_vehicle_max_ttl_s: float = 7 * 86400
    auth_service_max_ttl_s: float = 86400
    #: how far in the future a token's iat/nbf may be (the issuer's clock ahead of ours)
    auth_clock_skew_s: float = 60
    #: "fsync": every group commit is on disk before any command in it is acknowledged.
    #: "relaxed": commits are not fsynced; a power loss (not a process crash) may lose
    #: the last ~second of accepted commands. The store syncs once a second.
    durability: str = "fsync"
    group_commit_max: int = 1024
    map_size_mb: int = 256
    map_size_max_mb: int = 65536
    #: room (in the map and on the disk) kept for commands already accepted: below it new
    #: commands are refused (critical ones below half of it), so their deliveries,
    #: results and expiries always fit
    store_reserve_mb: int = 64
    retention_s: float = 7 * 86400
    idempotency_window_s: float = 86400
    window: int = 4
    max_payload_bytes: int = 16384
    max_batch: int = 1000
    max_message_bytes: int = 1 << 20
    default_wait_timeout_s: float = 30
    max_wait_timeout_s: float = 300
    hello_timeout_s: float = 10
    #: HTTP/2 streams one connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS). A car
    #: needs one; a service's channel or a proxy multiplexing cars needs as many as it
    #: keeps in flight on one connection (past it, grpc clients queue and proxies open
    #: another connection: docs/operations.md)
    max_concurrent_streams: int = 1000
    #: a unary or server-streaming call whose request message has not arrived this long
    #: after its HEADERS is ended (INVALID_ARGUMENT); car streams have hello_timeout_s
    first_message_timeout_s: float = 10
    #: calls open at once from one peer address, car streams included (0: no limit);
    #: behind a proxy every call has the proxy's address: 0 there, and limit in the proxy
    max_streams_per_peer: int = 10_000
    #: a car sends a frame at least this often (Welcome tells it); a stream silent for
    #: liveness_timeout_s is closed as a dead link (checked every liveness_timeout_s / 8).
    #: A direct link that dies is found sooner by the server's HTTP/2 keepalive (20 s +
    #: 10 s); this check is for what keepalive cannot see (a proxy answers its pings).
    #: Each heartbeat costs ~60 us of broker CPU (docs/operations.md)
    heartbeat_interval_s: float = 30
    liveness_timeout_s: float = 75
    #: new vehicle streams admitted per second (reconnect-storm control), and the burst
    new_streams_per_s: float = 2000
    new_streams_burst: float = 2000
    #: new streams one car credential may open, per second and at once: a car that
    #: reconnects in a loop is deferred on its own bucket (UNAVAILABLE with the wait for
    #: its next token) before it can spend the fleet's. A car on a flapping link opens a
    #: few streams a minute; 10 at once and one every 2 s never defer it
    new_streams_per_vehicle_per_s: float = 0.5
    new_streams_per_vehicle_burst: float = 10
    #: commands of one connected car held in memory (queued, not yet on the wire); the rest
    #: stay on disk and are loaded, in order, as these drain. A car that does not read
    #: costs at most this many records (64 x 16 KiB payloads: 1 MiB), not its queue: 5,040
    #: x 16 KiB to such a car grew the heap by 11.5 MB at 64 (a parked car's: 11.9 MB),
    #: by 190 MB without a cap; a reading car drained them as fast. A higher lane still
    #: goes first: a new critical command pushes the last queued bulk one back to disk
    max_outbox_per_car: int = 64
    sweep_interval_s: float = 0.25
    #: coalesced telemetry is applied to live state this often (memory only)
    state_flush_interval_s: float = 1.0
    #: a connected car's changed state reaches LMDB at most this late (spread over the
    #: interval, oldest change first); a car's state is persisted at once when it goes
    state_persist_interval_s: float = 10.0
    max_state_fields: int = 256
    #: telemetry verbosity guard budgets (see broker/core/telemetry.py); per broker process
    telemetry_car_msgs_per_s: float = 2
    telemetry_car_bytes_per_s: float = 4096
    telemetry_fleet_msgs_per_s: float = 5000
    telemetry_fleet_bytes_per_s: float = 4_000_000
    telemetry_hold_s: float = 30
    #: adaptive admission of command work (see broker/core/admission.py)
    admission_initial_limit: int = 64
    admission_min_limit: int = 8
    admission_max_limit: int = 512
    codel_target_ms: float = 5
    codel_interval_ms: float = 100
    #: critical commands per car per minute (the one quota critical work is subject to)
    critical_per_minute: float = 10
    critical_burst: int = 10
    #: a critical command not durable within this long is refused (UNAVAILABLE, nothing
    #: written): an unlock that waited longer for a stalled disk would arrive stale
    critical_commit_wait_s: float = 5
    #: the longest TTL a caller may ask for: critical commands (an unlock must not wait
    #: for days) and everything else
    critical_max_ttl_s: float = 3600
    max_ttl_s: float = 7 * 86400
    #: non-terminal commands held; each lane is refused past its fraction of it
    #: (broker/core/lanes.py: bulk at 80%, interactive at 100%, critical never)
    durable_queue_budget: int = 2_000_000
    #: per-caller limits (broker/core/quotas.py), refused RESOURCE_EXHAUSTED for that caller
    #: alone; each can be changed for one caller in a `[callers."service:NAME"]` TOML table
    #: (keys rate_per_s, burst, critical_rate_per_s, critical_burst, queue_share,
    #: max_watches). Commands a second on the interactive and bulk lanes, and the burst
    #: (one broker takes ~18,000 a second: one caller gets at most about a ninth of that)
    caller_rate_per_s: float = 2000
    caller_burst: float = 5000
    #: commands a second on the critical lane, and the burst: a bucket of its own, so an
    #: unlock never waits behind any flood of the other lanes, the caller's own included
    caller_critical_rate_per_s: float = 100
    caller_critical_burst: float = 500
    #: the fraction of durable_queue_budget one caller may hold (non-terminal commands),
    #: degraded by lane as the budget is (bulk from 80% of the share); critical is never
    #: refused for depth (its rate, the per-car quota and its TTL cap bound it)
    caller_queue_share: float = 0.5
    #: WatchCommands streams one caller may have open at once (each costs ~20 KB; one
    #: stream watches up to 10,000 vehicles and commands)
    max_watches_per_caller: int = 1000
    #: on SIGTERM: health says NOT_SERVING this long while everything is still served
    #: (load balancers and kubelets polling Check see it), then the drain starts
    drain_delay_s: float = 5
    #: how long the drain may take: calls still running then are cut
    grace_s: float = 5
    #: move long-lived objects out of the cyclic GC's sight this often (0: never); see
    #: StateFlush.run (broker/server/loops.py) for the measured reason
    gc_freeze_interval_s: float = 10
    #: the audit trail (<data_dir>/audit/, one JSON-lines file per UTC day): files of days
    #: older than this are deleted, once a day (0: never; docs/operations.md)
    audit_retention_days: int = 90
    log_format: str = "text"
    commands: Mapping[str, CommandPolicy] = field(default_factory=lambda: DEFAULT_COMMANDS)
    #: per-caller overrides of the caller_* limits, by caller name (`service:NAME`):
    #: `[callers."service:NAME"]` in the TOML file; only the keys given change
    callers: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: MappingProxyType({}))

    def policy(self, name: str) -> CommandPolicy:
        return self.commands.get(name, FALLBACK_POLICY)

    def caller_policy(self, caller: str) -> CallerPolicy:
        """`caller`'s limits: the caller_* defaults, with its `[callers.NAME]` keys."""
        default = CallerPolicy(
            rate_per_s=self.caller_rate_per_s,
            burst=self.caller_burst,
            critical_rate_per_s=self.caller_critical_rate_per_s,
            critical_burst=self.caller_critical_burst,
            queue_share=self.caller_queue_share,
            max_watches=self.max_watches_per_caller,
        )
        override = self.callers.get(caller)
        return dataclasses.replace(default, **override) if override else default  # type: ignore[arg-type]

    def ttl_limit_s(self, lane: int) -> float:
        """The longest TTL a caller may ask for on `lane` (the lane table names the setting)."""
        return float(getattr(self, lanes.BY_VALUE[lane].max_ttl_setting))

    @property
    def reflection_on(self) -> bool:
        """Whether server reflection is served ('auto': in insecure-dev mode only)."""
        return self.reflection == "on" or (self.reflection == "auto" and self.insecure_dev)

    def validate(self) -> None:
        for name in ("listen", "metrics_listen"):
            value = getattr(self, name)
            host, _, port = value.rpartition(":")
            if (value or name == "listen") and (
                not host or not port.isdigit() or int(port) > 65535
            ):
                raise InvalidArgument(f"{name}: expected HOST:PORT, got {value!r}")
        host = self.listen.rpartition(":")[0]
        tls_files = (self.tls_cert_file, self.tls_key_file)
        if any(tls_files) and not all(tls_files):
            raise InvalidArgument("tls_cert_file and tls_key_file: give both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise InvalidArgument("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise InvalidArgument(f"{name}: no such file {path!r}")
        if (
            not self.tls_cert_file
            and not _is_loopback(host)
            and not self.insecure_dev
            and not self.plaintext_on_private_network
        ):
            raise InvalidArgument(
                f"refusing to serve plaintext on {host!r}: tokens and commands would cross "
                "the network in the clear. Give tls_cert_file and tls_key_file (TLS), or "
                "plaintext_on_private_network (--plaintext-on-private-network) if a proxy "
                "on a private link terminates TLS in front of this broker"
            )
        metrics_host = self.metrics_listen.rpartition(":")[0]
        if (
            self.metrics_listen
            and self.insecure_dev
            and not _is_loopback(metrics_host)
            and not self.metrics_on_network_in_dev
        ):
            raise InvalidArgument(
                f"insecure-dev mode serves /metrics on loopback only; refusing {metrics_host!r} "
                "(metrics_on_network_in_dev / --metrics-on-network-in-dev if intended)"
            )
        if self.reflection not in ("auto", "on", "off"):
            raise InvalidArgument(f"reflection: 'auto', 'on' or 'off', got {self.reflection!r}")
        if self.insecure_dev and not _is_loopback(host):
            raise InvalidArgument(
                f"--insecure-dev disables auth and binds loopback only; refusing {host!r}"
            )
        if not self.insecure_dev:
            for name in ("auth_vehicle_keys", "auth_service_keys"):
                if not getattr(self, name).strip():
                    raise InvalidArgument(
                        f"{name} (BROKER_{name.upper()}): the public keys that sign tokens are "
                        "required unless --insecure-dev is given (make a pair with "
                        "`broker token keygen`)"
                    )
        if self.durability not in ("fsync", "relaxed"):
            raise InvalidArgument(f"durability: 'fsync' or 'relaxed', got {self.durability!r}")
        if self.log_format not in ("text", "json"):
            raise InvalidArgument(f"log_format: 'text' or 'json', got {self.log_format!r}")
        positive = [
            "group_commit_max", "map_size_mb", "window", "max_payload_bytes", "max_batch",
            "max_message_bytes", "default_wait_timeout_s", "max_wait_timeout_s",
            "hello_timeout_s", "new_streams_per_s", "new_streams_burst", "sweep_interval_s",
            "state_flush_interval_s", "state_persist_interval_s", "max_state_fields",
            "telemetry_car_msgs_per_s",
            "telemetry_car_bytes_per_s", "telemetry_fleet_msgs_per_s",
            "telemetry_fleet_bytes_per_s", "telemetry_hold_s", "admission_initial_limit",
            "admission_min_limit", "admission_max_limit", "codel_target_ms", "codel_interval_ms",
            "critical_per_minute", "critical_burst", "durable_queue_budget",
            "critical_max_ttl_s", "max_ttl_s", "heartbeat_interval_s", "liveness_timeout_s",
            "critical_commit_wait_s", "auth_vehicle_max_ttl_s", "auth_service_max_ttl_s",
            "max_concurrent_streams", "first_message_timeout_s",
            "new_streams_per_vehicle_per_s", "new_streams_per_vehicle_burst",
            "max_outbox_per_car",
        ]  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name}: must be positive, got {getattr(self, name)!r}")
        if self.map_size_max_mb < self.map_size_mb:
            raise InvalidArgument("map_size_max_mb must be >= map_size_mb")
        if self.store_reserve_mb * 2 > self.map_size_max_mb:
            raise InvalidArgument(
                f"store_reserve_mb ({self.store_reserve_mb}) must be at most half of "
                f"map_size_max_mb ({self.map_size_max_mb}), or no command is ever accepted"
            )
        for name in (
            "store_reserve_mb", "drain_delay_s", "grace_s", "auth_clock_skew_s",
            "max_streams_per_peer", "audit_retention_days",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name}: must not be negative, got {getattr(self, name)!r}")
        for caller in ("", *self.callers):
            try:
                self.caller_policy(caller).check(f"callers.{caller}." if caller else "caller_")
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
        if self.liveness_timeout_s <= self.heartbeat_interval_s:
            raise InvalidArgument(
                "liveness_timeout_s must be longer than heartbeat_interval_s "
                f"(got {self.liveness_timeout_s} <= {self.heartbeat_interval_s})"
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    try:
        if kind in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (Path, "Path"):
            return Path(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name}: cannot read {raw!r} as {kind}") from None


def _commands_from_toml(table: Mapping[str, Any]) -> Mapping[str, CommandPolicy]:
    merged = dict(DEFAULT_COMMANDS)
    for name, spec in table.items():
        base = merged.get(name, FALLBACK_POLICY)
        lane_name = spec.get("lane")
        if lane_name is not None and lane_name not in lanes.VALUES:
            raise InvalidArgument(
                f"commands.{name}.lane: one of {sorted(lanes.VALUES)}, got {lane_name!r}"
            )
        merged[name] = CommandPolicy(
            lanes.VALUES[lane_name] if lane_name else base.lane,
            float(spec.get("ttl_s", base.ttl_s)),
            float(spec.get("result_timeout_s", base.result_timeout_s)),
        )
    return MappingProxyType(merged)


#: the keys of a `[callers.NAME]` table, and the type of each
_CALLER_KEYS = {field.name: field.type for field in dataclasses.fields(CallerPolicy)}


def _callers_from_toml(table: Any) -> Mapping[str, Mapping[str, float]]:
    if not isinstance(table, Mapping):
        raise InvalidArgument('callers: expected tables, as [callers."service:NAME"]')
    callers = {}
    for name, spec in table.items():
        if not isinstance(spec, Mapping):
            raise InvalidArgument(f"callers.{name}: expected a table of limits")
        values = {}
        for key, raw in spec.items():
            if key not in _CALLER_KEYS:
                raise InvalidArgument(
                    f"callers.{name}.{key}: unknown; one of {', '.join(sorted(_CALLER_KEYS))}"
                )
            values[key] = _coerce(f"callers.{name}.{key}", _CALLER_KEYS[key], raw)
        callers[name] = MappingProxyType(values)
    return MappingProxyType(callers)


def load_config(
    overrides: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the config: `overrides` (CLI flags) > BROKER_* env > TOML file > defaults."""
    environ = os.environ if environ is None else environ
    tables = ("commands", "callers")  # TOML tables only
    fields = {f.name: f for f in dataclasses.fields(Config) if f.name not in tables}
    values: dict[str, Any] = {}
    if config_file is None and environ.get("BROKER_CONFIG"):
        config_file = Path(environ["BROKER_CONFIG"])
    if config_file is not None:
        try:
            document = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"config file {config_file}: {exc}") from None
        commands = document.pop("commands", None)
        if commands is not None:
            values["commands"] = _commands_from_toml(commands)
        callers = document.pop("callers", None)
        if callers is not None:
            values["callers"] = _callers_from_toml(callers)
        for key, raw in document.items():
            if key not in fields:
                raise InvalidArgument(f"config file {config_file}: unknown setting {key!r}")
            values[key] = _coerce(key, fields[key].type, raw)
    for name, spec in fields.items():
        env_value = environ.get(f"BROKER_{name.upper()}")
        if env_value is not None:
            values[name] = _coerce(f"BROKER_{name.upper()}", spec.type, env_value)
    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        if name not in fields:
            raise InvalidArgument(f"unknown setting {name!r}")
        values[name] = _coerce(name, fields[name].type, raw)
    config = Config(**values)
    config.validate()
    return config
