"""The `broker` command: serve, send and inspect commands, simulate cars, issue tokens."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import broker
from broker.core import clock, lanes
from broker.core.errors import BrokerError, InvalidArgument
from broker.sdk.client import (
    DEFAULT_TARGET,
    WAIT_MODES,
    BrokerClient,
    BrokerRpcError,
    command_to_dict,
)
from broker.security.keys import KEY_ID_BYTES, generate_key_pair, key_id, load_private_key
from broker.security.tokens import b64decode_canonical, issue_token
from broker_ext._compat import extensions_summary

if TYPE_CHECKING:
    import grpc

    from broker.sdk.simulator import SimulatedFleet

logger = logging.getLogger("broker")


#: The wire carries TTLs and wait timeouts as uint32 milliseconds.
_WIRE_MAX_S = (2**32 - 1) / 1000


def _seconds(max_s: float) -> Callable[[str], float]:
    """An argparse type: a duration from 1 ms up to `max_s` seconds."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not 0.001 <= value <= max_s:
            raise argparse.ArgumentTypeError(f"{text} is not within 0.001..{max_s:.0f} seconds")
        return value

    return parse


def _count(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """Usage errors in the CLI's one error format, with argparse's exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"error: INVALID_ARGUMENT: {self.prog}: {message}\n")


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help="broker HOST:PORT")
    parser.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token (default: $BROKER_TOKEN; never the token itself "
        "on the command line, where other users see it)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    _tls_client_args(parser)


def _tls_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("BROKER_TLS_CA"),
        help="trust this CA and connect over TLS (default: $BROKER_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get("BROKER_TLS_CERT"),
        help="client certificate for mTLS (default: $BROKER_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        default=os.environ.get("BROKER_TLS_KEY"),
        help="its private key (default: $BROKER_TLS_KEY)",
    )


def _credentials(args: argparse.Namespace) -> Any:
    """Channel credentials from --tls-ca/--tls-cert/--tls-key, or None (plaintext)."""
    if not args.tls_ca:
        if args.tls_cert or args.tls_key:
            raise InvalidArgument("--tls-cert/--tls-key need --tls-ca")
        return None
    from broker.security.tls import channel_credentials

    try:
        return channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"TLS files: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="broker", description=__doc__)
    parser.add_argument("--version", action="store_true", help="version and loaded extensions")
    sub = parser.add_subparsers(dest="cmd")

    serve = sub.add_parser("serve", help="run the broker")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:50051)")
    serve.add_argument("--data", help="LMDB folder (default ./broker-data)")
    serve.add_argument("--config", type=Path, help="TOML config file")
    serve.add_argument("--insecure-dev", action="store_true", default=None,
                       help="no auth; refuses to bind anything but loopback")  # fmt: skip
    serve.add_argument("--durability", choices=["fsync", "relaxed"])
    serve.add_argument("--metrics", help="HOST:PORT for Prometheus /metrics (default: off)")
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.add_argument("--tls-cert", help="server certificate chain (PEM); with --tls-key: TLS")
    serve.add_argument("--tls-key", help="server private key (PEM)")
    serve.add_argument("--tls-client-ca", help="CA of client certificates: mTLS, cars by cert")
    serve.add_argument(
        "--plaintext-on-private-network",
        action="store_true",
        default=None,
        help="serve plaintext on a non-loopback address (a TLS proxy in front)",
    )
    serve.add_argument(
        "--metrics-on-network-in-dev",
        action="store_true",
        default=None,
        help="with --insecure-dev, allow --metrics on a non-loopback address",
    )
    serve.add_argument(
        "--reflection",
        choices=["auto", "on", "off"],
        help="gRPC server reflection (auto: on in insecure-dev mode only)",
    )

    certs = sub.add_parser("certs", help="a development CA and certificates for TLS and mTLS")
    certs_sub = certs.add_subparsers(dest="certs_cmd", required=True)
    init = certs_sub.add_parser("init", help="a CA (ca.pem, ca.key) and a server certificate")
    init.add_argument("--out", type=Path, required=True, help="folder to write them to")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        help="server DNS name or IP (repeatable; default localhost, 127.0.0.1)",
    )
    for kind in ("car", "service"):
        one = certs_sub.add_parser(kind, help=f"a client certificate naming a {kind}")
        one.add_argument("name", nargs="+", help="vehicle id(s)" if kind == "car" else "name(s)")
        one.add_argument("--ca", type=Path, required=True, help="the folder `certs init` wrote")
        one.add_argument("--out", type=Path, help="where to write NAME.pem/.key (default --ca)")

    send = sub.add_parser("send", help="send a command to a vehicle")
    send.add_argument("vehicle")
    send.add_argument("command")
    send.add_argument("--payload", help="JSON payload")
    send.add_argument("--ttl", type=_seconds(_WIRE_MAX_S), help="seconds until the command expires")
    send.add_argument("--priority", choices=sorted(lanes.VALUES), help="lane (may only lower it)")
    send.add_argument("--idempotency-key", default="")
    send.add_argument("--coalesce-key", default="")
    send.add_argument("--wait", choices=sorted(WAIT_MODES), default="none")
    send.add_argument("--timeout", type=_seconds(_WIRE_MAX_S), help="seconds to wait (with --wait)")
    send.add_argument("--sign-key", type=Path, help="sign the command end to end with this "
                      "private key file (`broker keys command-keygen`); its expiry is --ttl "
                      "(default 60 s) and cars that trust the key check it")  # fmt: skip
    _client_args(send)

    for name, helptext in (("status", "show one command"), ("cancel", "cancel a command")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("command_id")
        _client_args(p)
    for name, helptext in (("list", "a vehicle's commands"), ("state", "a vehicle's state")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("vehicle")
        _client_args(p)
    watch = sub.add_parser("watch", help="stream status changes")
    watch.add_argument("--vehicle", action="append", default=[])
    watch.add_argument("--command-id", action="append", default=[])
    _client_args(watch)

    sim = sub.add_parser("vehicle-sim", help="simulated cars that execute commands")
    sim.add_argument("--target", default=DEFAULT_TARGET)
    sim.add_argument("--vehicles", type=_count, default=1)
    sim.add_argument("--id-prefix", default="car-")
    sim.add_argument("--telemetry-hz", type=float, default=0.0)
    sim.add_argument(
        "--ignore-policy",
        action="store_true",
        help="misbehave: ignore the broker's telemetry policy (outage drills)",
    )
    sim.add_argument("--storm-factor", type=float, default=1.0,
                     help="multiply telemetry rate and verbosity; SIGUSR1 multiplies it by "
                     "10 while running, SIGUSR2 ends the storm")  # fmt: skip
    sim.add_argument("--tls-ca", type=Path, help="trust this CA: connect over TLS")
    sim.add_argument("--cert-dir", type=Path,
                     help="mTLS: each car presents CERT_DIR/<vehicle id>.pem and .key")  # fmt: skip
    sim.add_argument("--vehicle-key", type=Path, help="mint each car's tokens with this "
                     "vehicle signing key file (default: $BROKER_VEHICLE_KEY; none against "
                     "--insecure-dev)")  # fmt: skip
    sim.add_argument("--trust-key", action="append", default=[], metavar="FILE[:NAME,...]",
                     help="cars accept commands signed by this public key file, for these "
                     "command names only if given (repeatable)")  # fmt: skip
    sim.add_argument("--require-signatures", nargs="?", const="*", metavar="NAME,...",
                     help="cars refuse unsigned commands: all of them, or these names")  # fmt: skip

    audit = sub.add_parser(
        "audit",
        help="read the audit trail (who did what, every refusal) from the data folder",
        description="Reads <data>/audit/ directly (also while the broker runs; as the "
        "broker's user): the matching lines, oldest first; `broker audit verify` checks "
        "the files' hash chain.",
    )
    audit.add_argument("check", nargs="?", choices=["verify"], help="check the hash chain")
    audit.add_argument("--data", type=Path, default=Path(os.environ.get("BROKER_DATA_DIR",
                       "broker-data")), help="the data folder (default $BROKER_DATA_DIR, "
                       "else ./broker-data)")  # fmt: skip
    audit.add_argument("--actor", help="e.g. service:fleet-app, vehicle:car-1, peer:10.0.0.7; "
                       "a trailing * matches a prefix")  # fmt: skip
    audit.add_argument("--vehicle", help="vehicle id")
    audit.add_argument("--command", help="command id")
    audit.add_argument("--action", help="send, cancel, supersede, get, list, watch, state, deny")
    audit.add_argument("--since", help="1h, 30m, 2d ago, or an ISO 8601 time (UTC unless it says)")
    audit.add_argument("--until", help="as --since: lines before it")
    audit.add_argument("--limit", type=_count, help="only the newest N matching lines")
    audit.add_argument("--json", action="store_true", help="the stored JSON lines")

    keys = sub.add_parser("keys", help="keys that sign commands end to end (not tokens)")
    keys_sub = keys.add_subparsers(dest="keys_cmd", required=True)
    command_keygen = keys_sub.add_parser(
        "command-keygen",
        help="a sender's Ed25519 key pair: NAME.private.pem (0600, for the sender only) and "
        "NAME.public.pem (for the cars: vehicle-sim --trust-key)",
    )
    command_keygen.add_argument("--out", type=Path, required=True, help="folder (0700 if new)")
    command_keygen.add_argument("--name", default="command", help="file name (default command)")

    token = sub.add_parser("token", help="signing keys and tokens")
    token_sub = token.add_subparsers(dest="token_cmd", required=True)
    keygen = token_sub.add_parser(
        "keygen", help="an Ed25519 key pair: NAME.private.pem (0600) and NAME.public.pem"
    )
    keygen.add_argument("--out", type=Path, required=True, help="folder (made 0700 if missing)")
    keygen.add_argument("--name", required=True, help="e.g. vehicle-2025a, service-2025a")
    issue = token_sub.add_parser("issue", help="mint a token with a private key file")
    issue.add_argument("--key-file", type=Path, required=True, help="NAME.private.pem")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--vehicle")
    who.add_argument("--service")
    issue.add_argument("--scopes", default="", help="comma-separated: send,read,read:fleet,admin")
    issue.add_argument(
        "--vehicles",
        default=None,
        help="comma-separated vehicle ids or 'prefix*' patterns the service is limited to",
    )
    issue.add_argument(
        "--ttl", type=_seconds(30 * 86400),
        help="seconds (default: 86400 for a vehicle, 3600 for a service; the broker refuses "
        "more than its auth_*_max_ttl_s)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        import broker_ext.codec  # noqa: F401  (importing a twin records a compiled fallback)

        print(f"broker {broker.__version__}; extensions: {extensions_summary()}")
        return 0
    if args.cmd is None:
        build_parser().print_help()
        return 2
    try:
        if args.cmd == "serve":
            return _serve(args)
        if args.cmd == "token":
            return _token(args)
        if args.cmd == "keys":
            return _keys(args)
        if args.cmd == "certs":
            return _certs(args)
        if args.cmd == "audit":
            return _audit(args)
        if args.cmd == "vehicle-sim":
            return _run(lambda: _vehicle_sim(args))
        return _run(lambda: _client_command(args))
    except BrokerError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except BrokerRpcError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    from broker.server.broker import install_event_loop_policy

    install_event_loop_policy()
    return asyncio.run(factory())


# -- serve ------------------------------------------------------------------------------------


def _configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=os.environ.get("BROKER_LOG_LEVEL", "INFO"), handlers=[handler])


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {"ts": record.created, "level": record.levelname, "logger": record.name,
             "msg": record.getMessage()}
        )  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    from broker.config import load_config
    from broker.server.broker import Broker, install_event_loop_policy

    config = load_config(
        {
            "listen": args.listen,
            "data_dir": args.data,
            "insecure_dev": args.insecure_dev,
            "durability": args.durability,
            "metrics_listen": args.metrics,
            "log_format": args.log_format,
            "tls_cert_file": args.tls_cert,
            "tls_key_file": args.tls_key,
            "tls_client_ca_file": args.tls_client_ca,
            "plaintext_on_private_network": args.plaintext_on_private_network,
            "metrics_on_network_in_dev": args.metrics_on_network_in_dev,
            "reflection": args.reflection,
        },
        config_file=args.config,
    )
    _configure_logging(config.log_format)
    loop_kind = install_event_loop_policy()
    if "fallback" in extensions_summary():
        logger.warning("extensions: %s", extensions_summary())

    async def serve() -> int:
        # Handlers first: whoever waits for the ready line may signal right after it.
        stop = asyncio.Event()
        received: list[int] = []

        def on_signal(signum: int) -> None:
            received.append(signum)
            stop.set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        instance = Broker(config)
        port = await instance.start()
        host = config.listen.rpartition(":")[0]
        auth = "insecure-dev" if config.insecure_dev else "tokens"
        if config.tls_cert_file:
            auth += "+mtls" if config.tls_client_ca_file else "+tls"
        print(
            f"broker ready on {host}:{port} data={config.data_dir} loop={loop_kind} "
            f"extensions={extensions_summary()} auth={auth}"
            + (
                f" metrics={config.metrics_listen.rpartition(':')[0]}:{instance.metrics_port}"
                if instance.metrics_port
                else ""
            ),
            flush=True,
        )
        await stop.wait()
        logger.info("shutting down")
        # SIGTERM (an orchestrator) gets the drain delay; Ctrl-C (a person) does not.
        await instance.stop(drain_delay_s=0 if received[0] == signal.SIGINT else None)
        return 0

    return asyncio.run(serve())


# -- certs ------------------------------------------------------------------------------------


def _certs(args: argparse.Namespace) -> int:
    """A development CA: for production, issue certificates from your own PKI with the
    same URI SANs (`urn:vehicle:<id>`, `urn:service:<name>`)."""
    from broker.security import tls

    try:
        if args.certs_cmd == "init":
            tls.create_ca(args.out)
            hosts = args.host or ["localhost", "127.0.0.1"]
            cert, key = tls.issue_certificate(args.out, "server", server_hosts=hosts)
            print(f"wrote {args.out / 'ca.pem'}, {args.out / 'ca.key'} (keep it off the broker), "
                  f"{cert}, {key} for {', '.join(hosts)}")  # fmt: skip
            return 0
        for name in args.name:
            options = {"vehicle_id": name} if args.certs_cmd == "car" else {"service": name}
            cert, key = tls.issue_certificate(args.ca, name, out=args.out, **options)
            print(f"wrote {cert}, {key}")
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"certs: {exc}") from None
    return 0


# -- audit ------------------------------------------------------------------------------------


def _audit(args: argparse.Namespace) -> int:
    """Print the audit lines that match (exit 0), or verify the chain (exit 1 if broken)."""

    from broker.storage import audit_log

    folder = args.data / "audit"
    if not folder.is_dir():
        raise InvalidArgument(f"no audit trail in {args.data} (no folder {folder})")
    try:
        if args.check == "verify":
            report = audit_log.verify_audit(folder)
            print("\n".join(report.describe()))
            return 0 if report.ok else 1
        now_ms = int(time.time() * 1000)
        try:
            since_ms = audit_log.parse_time(args.since, now_ms) if args.since else None
            until_ms = audit_log.parse_time(args.until, now_ms) if args.until else None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        filters = {
            "actor": args.actor, "vehicle_id": args.vehicle, "command_id": args.command,
            "action": args.action, "since_ms": since_ms, "until_ms": until_ms,
        }  # fmt: skip
        records = (
            audit_log.read_audit(folder, limit=args.limit, **filters)
            if args.limit
            else audit_log.iter_audit(folder, **filters)
        )
        for record in records:
            print(
                json.dumps(record, separators=(",", ":"))  # the stored bytes
                if args.json
                else audit_log.format_record(record)
            )
    except BrokenPipeError:  # `broker audit | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as exc:
        raise InvalidArgument(f"cannot read {folder}: {exc.strerror or exc}") from None
    return 0


# -- token ------------------------------------------------------------------------------------


def _token(args: argparse.Namespace) -> int:
    """`keygen` writes a key pair; `issue` prints a token on stdout (its id, key and
    expiry on stderr, for the revocation list and the record)."""
    if args.token_cmd == "keygen":
        private_path, public_path = generate_key_pair(args.out, args.name)
        kid = key_id(load_private_key(private_path).public_key()).hex()
        print(f"key id {kid}: wrote {private_path} (keep it off the broker) and {public_path}")
        return 0
    key = load_private_key(args.key_file)
    scopes = [s for s in args.scopes.split(",") if s]
    vehicles = None if args.vehicles is None else [v for v in args.vehicles.split(",") if v]
    try:
        token = issue_token(
            key,
            vehicle=args.vehicle,
            service=args.service,
            scopes=scopes,
            ttl_s=args.ttl,
            vehicles=vehicles,
        )
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    claims = json.loads(b64decode_canonical(token.split(".")[1], "body")[KEY_ID_BYTES:])
    print(token)
    print(
        f"token id {claims['jti']}, key id {key_id(key.public_key()).hex()}, "
        f"expires at {claims['exp']}",
        file=sys.stderr,
    )
    return 0


def _keys(args: argparse.Namespace) -> int:
    """`command-keygen`: a key pair that signs commands (never given to the broker)."""
    private_path, public_path = generate_key_pair(args.out, args.name)
    kid = key_id(load_private_key(private_path).public_key()).hex()
    print(
        f"command key id {kid}: wrote {private_path} (the sender's: `broker send --sign-key`) "
        f"and {public_path} (the cars': `vehicle-sim --trust-key`; not the broker's)"
    )
    return 0


def _bearer_token(args: argparse.Namespace) -> str | None:
    """The client commands' token: --token-file, else $BROKER_TOKEN."""
    if args.token_file is None:
        return os.environ.get("BROKER_TOKEN") or None
    try:
        return args.token_file.read_text().strip() or None
    except OSError as exc:
        raise InvalidArgument(f"--token-file {args.token_file}: {exc.strerror or exc}") from None


# -- client commands --------------------------------------------------------------------------


def _emit(args: argparse.Namespace, command: Any, **extra: Any) -> None:
    data = command_to_dict(command)
    data.update(extra)
    if args.json:
        print(json.dumps(data), flush=True)
    else:
        line = f"{data['command_id']} {data['status']} {data['vehicle_id']} {data['name']}"
        if data.get("status_reason") or data.get("result_message"):
            line += f" ({data.get('result_message') or data.get('status_reason')})"
        print(line, flush=True)


async def _client_command(args: argparse.Namespace) -> int:
    token = _bearer_token(args)
    # A person at a prompt wants to hear at once that the broker is not there.
    credentials = _credentials(args)
    sign_key = getattr(args, "sign_key", None)
    signer = None
    if sign_key is not None:
        from broker.security.signing import CommandSigner

        signer = CommandSigner.from_file(sign_key)
    async with BrokerClient(
        args.target, token=token, credentials=credentials, reconnect_wait_s=0, signer=signer
    ) as client:
        if args.cmd == "send":
            payload = None
            if args.payload is not None:
                try:
                    json.loads(args.payload)
                except ValueError as exc:
                    print(f"error: INVALID_ARGUMENT: --payload is not JSON: {exc}", file=sys.stderr)
                    return 2
                payload = args.payload.encode()
            reply = await client.send_command(
                args.vehicle, args.command, payload, lane=args.priority, ttl_s=args.ttl,
                idempotency_key=args.idempotency_key, coalesce_key=args.coalesce_key,
                wait=args.wait, timeout_s=args.timeout,
            )  # fmt: skip
            _emit(args, reply.command, deduplicated=reply.deduplicated,
                  wait_timed_out=reply.wait_timed_out)  # fmt: skip
        elif args.cmd == "status":
            _emit(args, await client.get_command(args.command_id))
        elif args.cmd == "cancel":
            _emit(args, await client.cancel_command(args.command_id))
        elif args.cmd == "list":
            for command in await client.list_commands(args.vehicle):
                _emit(args, command)
        elif args.cmd == "watch":
            async for command in client.watch_commands(args.vehicle, args.command_id):
                _emit(args, command)
        elif args.cmd == "state":
            _print_state(args, await client.get_vehicle_state(args.vehicle))
    return 0


def _print_state(args: argparse.Namespace, state: Any) -> None:
    fields = {}
    for name, entry in sorted(state.fields.items()):
        kind = entry.value.WhichOneof("kind")
        fields[name] = {
            "value": getattr(entry.value, kind) if kind else None,
            "reported_at_ms": entry.reported_at_ms,
            "received_at_ms": entry.received_at_ms,
        }
    data = {
        "vehicle_id": state.vehicle_id,
        "connected": state.connected,
        "connected_since_ms": state.connected_since_ms,
        "last_seen_ms": state.last_seen_ms,
        "firmware": state.firmware,
        "capabilities": list(state.capabilities),
        "fields": fields,
    }
    if args.json:
        print(json.dumps(data))
        return
    now = int(time.time() * 1000)
    if state.connected:
        seen = f"connected since {clock.when(state.connected_since_ms, now)}"
    elif state.last_seen_ms:
        seen = (
            f"NOT connected; last seen {clock.when(state.last_seen_ms, now)}; "
            "values are not current"
        )
    else:
        seen = "never seen"
    print(f"{state.vehicle_id}: {seen}")
    if state.firmware or state.capabilities:
        print(f"  firmware {state.firmware or '-'}; can {', '.join(state.capabilities) or '-'}")
    for name, field in fields.items():
        print(f"  {name} = {field['value']} (reported {clock.when(field['reported_at_ms'], now)})")


# -- vehicle-sim ------------------------------------------------------------------------------


async def _vehicle_sim(args: argparse.Namespace) -> int:
    from broker.sdk.simulator import SimulatedFleet

    key_env = os.environ.get("BROKER_VEHICLE_KEY")
    vehicle_key = args.vehicle_key or (Path(key_env) if key_env else None)
    fleet = SimulatedFleet(
        args.target, [f"{args.id_prefix}{i}" for i in range(args.vehicles)],
        vehicle_key=vehicle_key, tls_ca=args.tls_ca, cert_dir=args.cert_dir,
        telemetry_hz=args.telemetry_hz, rng=random.Random(),
        obey_policy=not args.ignore_policy, verifier=_command_verifier(args),
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    storm = [args.storm_factor]

    def set_storm(factor: float) -> None:
        storm[0] = factor
        fleet.storm(factor)
        print(f"vehicle-sim: storm factor {factor:g}", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, lambda: set_storm(storm[0] * 10))
    loop.add_signal_handler(signal.SIGUSR2, lambda: set_storm(1.0))
    await fleet.start()
    fleet.storm(args.storm_factor)
    print(f"vehicle-sim: {args.vehicles} cars against {args.target}", flush=True)

    async def announce_connected() -> None:
        with contextlib.suppress(TimeoutError):
            await fleet.wait_connected(timeout_s=300)
            print(f"vehicle-sim: {args.vehicles} cars connected", flush=True)

    announce = asyncio.create_task(announce_connected())
    refusal = await _until_stopped_or_refused(fleet, stop)
    announce.cancel()
    await fleet.stop()
    if refusal is not None:
        print(
            f"error: {refusal.code().name}: every simulated car was refused: {refusal.details()}",
            file=sys.stderr,
        )
        return 1
    return 0


def _command_verifier(args: argparse.Namespace) -> Callable[[], Any] | None:
    """Each simulated car's CommandVerifier, from --trust-key and --require-signatures
    (None without either: cars run unsigned commands and do not check signed ones)."""
    from broker.security.signing import CommandVerifier, trusted_key

    if not args.trust_key and args.require_signatures is None:
        return None
    if not args.trust_key:
        raise InvalidArgument("--require-signatures needs --trust-key (whose commands to run)")
    trusted = {}
    for spec in args.trust_key:
        path, _, names = spec.partition(":")
        kid, key = trusted_key(Path(path), [n for n in names.split(",") if n] if names else None)
        trusted[kid] = key
    required: bool | frozenset[str] = False
    if args.require_signatures is not None:
        listed = frozenset(n for n in args.require_signatures.split(",") if n)
        required = True if args.require_signatures == "*" else listed

    def make() -> CommandVerifier:
        return CommandVerifier(trusted, require_signatures=required)

    return make


async def _until_stopped_or_refused(
    fleet: SimulatedFleet, stop: asyncio.Event
) -> grpc.aio.AioRpcError | None:
    """Wait for SIGINT/SIGTERM; or, when the broker refused every car (a refused car does
    not retry), return one of the refusals so the simulator does not idle with no cars."""
    refused = ("UNAUTHENTICATED", "PERMISSION_DENIED")
    while True:
        errors = [car.agent.last_error for car in fleet.cars]
        if all(e is not None and e.code().name in refused for e in errors):
            return errors[0]
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            continue
        return None


if __name__ == "__main__":
    sys.exit(main())
