"""The one switch between compiled and pure-Python twins, read once at import."""

from __future__ import annotations

import os

NO_EXTENSIONS: bool = bool(os.environ.get("BROKER_NO_EXTENSIONS"))

#: Names of twins whose compiled module was expected but failed to import.
MISSING_COMPILED: list[str] = []


def note_fallback(name: str) -> None:
    """Record that a compiled twin is missing, so start-up and --version can say so."""
    MISSING_COMPILED.append(name)


def extensions_summary() -> str:
    """One phrase saying which twins are loaded, for logs and `broker --version`."""
    if NO_EXTENSIONS:
        return "pure-python (BROKER_NO_EXTENSIONS=1)"
    if MISSING_COMPILED:
        return "pure-python fallback (compiled twins missing: " + ", ".join(MISSING_COMPILED) + ")"
    return "compiled"
