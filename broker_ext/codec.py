"""Store key codecs: the compiled twin when loaded, else the pure-Python one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker_ext._compat import NO_EXTENSIONS, note_fallback

if TYPE_CHECKING or NO_EXTENSIONS:
    from broker_ext._codec_py import (
        coalesce_key,
        pending_key,
        split_timer_key,
        timer_key,
        vehicle_key,
        vehicle_prefix,
    )

    COMPILED = False
else:
    try:
        from broker_ext._codec_c import (
            coalesce_key,
            pending_key,
            split_timer_key,
            timer_key,
            vehicle_key,
            vehicle_prefix,
        )

        COMPILED = True
    except ImportError:
        from broker_ext._codec_py import (
            coalesce_key,
            pending_key,
            split_timer_key,
            timer_key,
            vehicle_key,
            vehicle_prefix,
        )

        COMPILED = False
        note_fallback("codec")

__all__ = [
    "COMPILED",
    "coalesce_key",
    "pending_key",
    "split_timer_key",
    "timer_key",
    "vehicle_key",
    "vehicle_prefix",
]
