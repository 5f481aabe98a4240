"""TLS and mTLS: server credentials that reload, channel credentials for the SDKs, the
car's identity from its verified certificate, and a development CA.

A car's identity is the URI subject-alternative name `urn:vehicle:<id>` of the client
certificate the TLS handshake verified against `tls_client_ca_file` (never a field the
car types). A service's client certificate carries `urn:service:<name>`; it
authenticates the connection only, the service still presents its token for scopes.

Certificates reload without a restart: the server's credentials ask, at each new TLS
handshake, whether the files changed (by modification time, at most once a second) and
take the new ones for new connections; open connections keep theirs.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

VEHICLE_URI_PREFIX = "urn:vehicle:"
SERVICE_URI_PREFIX = "urn:service:"
#: how often (at most) the certificate files are checked for a change
RELOAD_CHECK_S = 1.0


@dataclass(frozen=True)
class ServerTls:
    """The server side: its certificate chain and key, and the CA that signs client
    certificates (None: no client certificates, TLS only)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class _Reloader:
    """The fetcher of `grpc.dynamic_ssl_server_credentials`: a new configuration when
    the files changed, else None (grpc keeps the current one)."""

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls
        self._lock = threading.Lock()  # grpc calls it from its own threads
        self._checked_at = 0.0
        self._stamp = self._files_stamp()

    def _files(self) -> list[Path]:
        tls = self._tls
        return [tls.cert_file, tls.key_file, *([tls.client_ca_file] if tls.client_ca_file else [])]

    def _files_stamp(self) -> tuple[int, ...]:
        return tuple(path.stat().st_mtime_ns for path in self._files())

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        tls = self._tls
        pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
        roots = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at < RELOAD_CHECK_S:
                return None
            self._checked_at = now
            try:
                stamp = self._files_stamp()
                if stamp == self._stamp:
                    return None
                configuration = self.configuration()
            except (OSError, ValueError) as exc:  # half-written files: keep the current ones
                logger.warning("TLS certificate reload failed (keeping the current ones): %s", exc)
                return None
            self._stamp = stamp
            logger.info("TLS certificates reloaded from %s", tls_files_text(self._tls))
            return configuration


def tls_files_text(tls: ServerTls) -> str:
    return ", ".join(str(p) for p in (tls.cert_file, tls.key_file, tls.client_ca_file) if p)


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """TLS server credentials; client certificates required (and verified) when
    `client_ca_file` is set. Reloads the files for new connections when they change."""
    reloader = _Reloader(tls)
    return grpc.dynamic_ssl_server_credentials(
        reloader.configuration(),
        reloader,  # type: ignore[arg-type]  # may return None: "no change" (grpc's docs)
        require_client_authentication=tls.client_ca_file is not None,
    )


def channel_credentials(
    ca_file: Path | str, cert_file: Path | str | None = None, key_file: Path | str | None = None
) -> grpc.ChannelCredentials:
    """Credentials for a client: trust `ca_file`; present `cert_file`/`key_file` (mTLS)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )


# -- identity from a verified peer certificate ----------------------------------------------

_IDENTITIES: OrderedDict[bytes, tuple[str, str] | None] = OrderedDict()
_IDENTITIES_MAX = 4096


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> tuple[str, str] | None:
    """`("vehicle", id)` or `("service", name)` from the peer's verified certificate, or
    None (no certificate, or one naming neither). Only a certificate the TLS handshake
    verified appears in `auth_context`. Parsed once per certificate (a small cache)."""
    pem = next(iter(auth_context.get("x509_pem_cert", ())), None)
    if pem is None:
        return None
    if pem in _IDENTITIES:
        _IDENTITIES.move_to_end(pem)
        return _IDENTITIES[pem]
    identity = _identity(pem)
    _IDENTITIES[pem] = identity
    if len(_IDENTITIES) > _IDENTITIES_MAX:
        _IDENTITIES.popitem(last=False)
    return identity


def _identity(pem: bytes) -> tuple[str, str] | None:
    try:
        certificate = x509.load_pem_x509_certificate(pem)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return None
    found = []
    for uri in names.value.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(VEHICLE_URI_PREFIX):
            found.append(("vehicle", uri.removeprefix(VEHICLE_URI_PREFIX)))
        elif uri.startswith(SERVICE_URI_PREFIX):
            found.append(("service", uri.removeprefix(SERVICE_URI_PREFIX)))
    return found[0] if len(found) == 1 else None  # two identities in one certificate: none


# -- a development CA ------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def create_ca(folder: Path, *, days: int = 365) -> None:
    """`ca.pem` and `ca.key` (0600) in `folder`: the CA that signs server, car and service
    certificates. Whoever holds ca.key can make car identities: keep it off the broker."""
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vehicle broker dev CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(folder / "ca.key", _key_pem(key), private=True)
    _write(folder / "ca.pem", certificate.public_bytes(serialization.Encoding.PEM))


def issue_certificate(
    folder: Path,
    name: str,
    *,
    server_hosts: Sequence[str] = (),
    vehicle_id: str | None = None,
    service: str | None = None,
    days: int = 90,
    out: Path | None = None,
) -> tuple[Path, Path]:
    """Sign a certificate with the CA in `folder`; returns (cert, key) paths written to
    `out` (default `folder`) as NAME.pem and NAME.key (0600).

    `server_hosts`: a server certificate for these DNS names / IP addresses;
    `vehicle_id` / `service`: a client certificate naming the car or the service.
    """
    if sum(map(bool, (server_hosts, vehicle_id, service))) != 1:
        raise ValueError("give exactly one of server_hosts, vehicle_id, service")
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("ca.key is not the EC key this helper makes")
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    if server_hosts:
        for host in server_hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        uri = (
            f"{VEHICLE_URI_PREFIX}{vehicle_id}" if vehicle_id else f"{SERVICE_URI_PREFIX}{service}"
        )
        names.append(x509.UniformResourceIdentifier(uri))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    target = out or folder
    cert_path, key_path = target / f"{name}.pem", target / f"{name}.key"
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
