"""Store key codecs, pure-Python reference twin of `_codec_c.pyx`.

Keys sort the way LMDB iterates them (bytewise), so:
- vehicle keys `vehicle_id 0x00 seq(8 bytes big-endian)` list one car's commands in
  enqueue order under a common prefix;
- timer keys `at_ms(8 bytes big-endian) command_id` list deadlines soonest first;
- pending keys `vehicle_id 0x00 (255 - lane) seq(8 bytes)` list one car's undelivered
  work in dispatch order: highest lane first, FIFO within a lane.
"""

from __future__ import annotations

from operator import index

_SEP = b"\x00"
_U64_MAX = (1 << 64) - 1


def vehicle_prefix(vehicle_id: str) -> bytes:
    """The key prefix under which all of one vehicle's commands sort."""
    return vehicle_id.encode() + _SEP


def vehicle_key(vehicle_id: str, seq: int) -> bytes:
    """Key of one command in its vehicle's index, ordered by `seq`."""
    seq = index(seq)  # integers only (TypeError otherwise), as in the compiled twin
    if not 0 <= seq <= _U64_MAX:
        raise ValueError(f"seq out of range: {seq}")
    return vehicle_id.encode() + _SEP + seq.to_bytes(8, "big")


def pending_key(vehicle_id: str, lane: int, seq: int) -> bytes:
    """Key of a non-terminal command in its vehicle's dispatch order."""
    lane, seq = index(lane), index(seq)
    if not 0 <= lane <= 255:
        raise ValueError(f"lane out of range: {lane}")
    if not 0 <= seq <= _U64_MAX:
        raise ValueError(f"seq out of range: {seq}")
    return vehicle_id.encode() + _SEP + bytes((255 - lane,)) + seq.to_bytes(8, "big")


def timer_key(at_ms: int, command_id: str) -> bytes:
    """Key of a command's next deadline (expiry or result timeout)."""
    at_ms = index(at_ms)
    if not 0 <= at_ms <= _U64_MAX:
        raise ValueError(f"timer out of range: {at_ms}")
    return at_ms.to_bytes(8, "big") + command_id.encode()


def split_timer_key(key: bytes) -> tuple[int, str]:
    """Inverse of `timer_key`: `(at_ms, command_id)`."""
    if len(key) < 9:
        raise ValueError(f"not a timer key: {key!r}")
    return int.from_bytes(key[:8], "big"), key[8:].decode()


def coalesce_key(vehicle_id: str, key: str) -> bytes:
    """Key of the newest command holding a coalesce key for one vehicle."""
    return vehicle_id.encode() + _SEP + key.encode()
