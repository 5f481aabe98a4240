"""Ed25519 key files: the private keys that mint tokens and the public keys that check them.

`broker token keygen --out DIR --name NAME` writes `DIR/NAME.private.pem` (PKCS#8, mode
0600, never overwritten) and `DIR/NAME.public.pem` (SubjectPublicKeyInfo). The broker is
given public keys only, by role: `auth_vehicle_keys` may sign vehicle tokens,
`auth_service_keys` service tokens (files, or folders whose `*.public.pem` files are
read). A key's id is its fingerprint, the first 8 bytes of SHA-256 over its raw 32-byte
public key (16 hex digits): a token names it, so the broker finds the one key to check
without trying each, and renaming a file changes nothing. Loading refuses a private key
where a public one is expected, a folder holding a private key, and one key in both roles.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.core.errors import InvalidArgument

PRIVATE_SUFFIX = ".private.pem"
PUBLIC_SUFFIX = ".public.pem"
#: bytes of the SHA-256 fingerprint that make a key id (a token carries them raw)
KEY_ID_BYTES = 8
KINDS = ("vehicle", "service")


def key_id(public_key: Ed25519PublicKey) -> bytes:
    """The key's fingerprint: what a token signed by it names."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:KEY_ID_BYTES]


@dataclass(frozen=True)
class TrustedKey:
    """A public key the broker accepts, and the one kind of token it may sign."""

    key_id: bytes
    kind: str
    public_key: Ed25519PublicKey
    source: Path


def generate_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.private.pem (0600) and NAME.public.pem in `folder` (made 0700 if
    missing); returns (private, public). Refuses to overwrite either."""
    if not name or "/" in name or name.startswith("."):
        raise InvalidArgument(f"key name must be a plain file name, got {name!r}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path, public_path = (
        folder / f"{name}{PRIVATE_SUFFIX}",
        folder / f"{name}{PUBLIC_SUFFIX}",
    )
    for path in (private_path, public_path):
        if path.exists():
            raise InvalidArgument(f"{path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL and the mode at creation: the private key is never readable by others, not
    # even for a moment, whatever the umask.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """A signing key from its file; refused if other users may read it (as ssh does)."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"signing key {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidArgument(
            f"signing key {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
            f"chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidArgument(f"signing key {path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"signing key {path}: not an Ed25519 key")
    return key


def load_public_key(
    path: Path,
    *,
    holder: str = "the broker must be given public keys only (it must not be able to mint tokens)",
) -> Ed25519PublicKey:
    """A public key file (SubjectPublicKeyInfo PEM, `*.public.pem`); a private key is
    refused with `holder` saying why the one given this file must not have it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"public key {path}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY" in data:
        raise InvalidArgument(f"{path} holds a private key: {holder}")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidArgument(f"public key {path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidArgument(f"public key {path}: not an Ed25519 key")
    return key


def _key_files(location: Path) -> list[Path]:
    """A file as given, or a folder's `*.public.pem` files (a folder with a private key in
    it is refused: whoever can read the folder could mint)."""
    if not location.is_dir():
        return [location]
    private = sorted(location.glob(f"*{PRIVATE_SUFFIX}"))
    if private:
        raise InvalidArgument(
            f"key folder {location} holds private key {private[0].name}: give the broker "
            "a folder of public keys only"
        )
    found = sorted(location.glob(f"*{PUBLIC_SUFFIX}"))
    if not found:
        raise InvalidArgument(f"key folder {location} has no *{PUBLIC_SUFFIX} files")
    return found


def split_locations(setting: str) -> list[Path]:
    """A setting's comma-separated paths."""
    return [Path(part.strip()) for part in setting.split(",") if part.strip()]


def load_trusted_keys(locations: Mapping[str, Iterable[Path]]) -> dict[bytes, TrustedKey]:
    """kind ("vehicle" | "service") -> key files or folders, as key id -> TrustedKey."""
    keys: dict[bytes, TrustedKey] = {}
    for kind, paths in locations.items():
        if kind not in KINDS:
            raise InvalidArgument(f"unknown key role {kind!r}")
        for location in paths:
            for path in _key_files(location):
                public_key = load_public_key(path)
                kid = key_id(public_key)
                known = keys.get(kid)
                if known is not None and known.kind != kind:
                    raise InvalidArgument(
                        f"key {kid.hex()} ({path}) is listed for both {known.kind} and {kind} "
                        "tokens: car and service tokens must come from different keys"
                    )
                keys[kid] = TrustedKey(kid, kind, public_key, path)
    return keys
