"""The revocation list: token ids (`jti`) the broker refuses, from a file it re-reads.

One token id per line; blank lines and lines starting with `#` are ignored. The broker
reads the file at start (a missing or unreadable file stops it from starting) and again
whenever its modification time, size or inode changes (`refresh`, called about once a
second). A file that cannot be read later keeps the last list in force (logged): losing
the file must not un-revoke anything. An id can be removed once the token it names has
expired (at most the longest accepted lifetime after it was issued).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from broker.core.errors import InvalidArgument

logger = logging.getLogger(__name__)


class RevocationList:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.revoked: frozenset[str] = frozenset()
        self._seen: tuple[int, int, int] | None = None
        self._failing = False
        if path is not None:
            try:
                self._load(path)
            except OSError as exc:
                raise InvalidArgument(
                    f"auth_revocation_file {path}: {exc.strerror or exc}"
                ) from None

    def __contains__(self, token_id: object) -> bool:
        return token_id in self.revoked

    def _load(self, path: Path) -> bool:
        info = os.stat(path)
        seen = (info.st_mtime_ns, info.st_size, info.st_ino)
        if seen == self._seen:
            return False
        text = path.read_text(encoding="utf-8", errors="replace")
        self.revoked = frozenset(
            line.strip() for line in text.splitlines() if line.strip() and line[:1] != "#"
        )
        self._seen = seen
        return True

    def refresh(self) -> bool:
        """Re-read the file if it changed; True if the list was reloaded."""
        if self.path is None:
            return False
        try:
            changed = self._load(self.path)
        except OSError as exc:
            if not self._failing:
                logger.warning(
                    "revocation list %s unreadable (%s); keeping the %d ids already revoked",
                    self.path,
                    exc.strerror or exc,
                    len(self.revoked),
                )
            self._failing = True
            return False
        if changed:
            logger.info("revocation list %s: %d token ids revoked", self.path, len(self.revoked))
        self._failing = False
        return changed
