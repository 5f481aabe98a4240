"""The one switch between compiled and pure-Python twins, read once at import."""

from __future__ import annotations

import importlib
import os

NO_EXTENSIONS: bool = bool(os.environ.get("BROKER_NO_EXTENSIONS"))

#: Names of twins whose compiled module was expected but failed to import.
MISSING_COMPILED: list[str] = []


def note_fallback(name: str) -> None:
    """Record that a compiled twin is missing, so start-up and --version can say so."""
    MISSING_COMPILED.append(name)


#: Every module that picks a twin; each records a fallback when it is imported.
_TWIN_SELECTORS = ("broker_ext.codec",)


def extensions_summary() -> str:
    """One phrase saying which twins are loaded, for logs and `broker --version`."""
    # Resolve every twin first: a caller (the CLI) may not have imported them yet, and
    # a fallback that was never attempted would otherwise be reported as "compiled".
    for name in _TWIN_SELECTORS:
        importlib.import_module(name)
    if NO_EXTENSIONS:
        return "pure-python (BROKER_NO_EXTENSIONS=1)"
    if MISSING_COMPILED:
        return "pure-python fallback (compiled twins missing: " + ", ".join(MISSING_COMPILED) + ")"
    return "compiled"
