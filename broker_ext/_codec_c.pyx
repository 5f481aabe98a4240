# cython: language_level=3
"""Store key codecs, compiled twin of `_codec_py.py` (same names, same errors)."""

from libc.stdint cimport uint64_t
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.number cimport PyNumber_Index

cdef bytes _SEP = b"\x00"


cdef inline bytes _u64(object value, str what):
    cdef uint64_t v
    # Integers only, as in the pure twin: a float must not be truncated into a key.
    value = PyNumber_Index(value)
    if value < 0 or value > 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"{what} out of range: {value}")
    v = value
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 8)
    cdef unsigned char *p = <unsigned char *> PyBytes_AS_STRING(out)
    cdef int i
    for i in range(7, -1, -1):
        p[i] = v & 0xFF
        v >>= 8
    return out


def vehicle_prefix(str vehicle_id):
    """The key prefix under which all of one vehicle's commands sort."""
    return vehicle_id.encode() + _SEP


def vehicle_key(str vehicle_id, seq):
    """Key of one command in its vehicle's index, ordered by `seq`."""
    return vehicle_id.encode() + _SEP + _u64(seq, "seq")


def pending_key(str vehicle_id, lane, seq):
    """Key of a non-terminal command in its vehicle's dispatch order."""
    lane = PyNumber_Index(lane)
    if lane < 0 or lane > 255:
        raise ValueError(f"lane out of range: {lane}")
    cdef bytes tail = _u64(seq, "seq")
    return vehicle_id.encode() + _SEP + bytes((255 - lane,)) + tail


def timer_key(at_ms, str command_id):
    """Key of a command's next deadline (expiry or result timeout)."""
    return _u64(at_ms, "timer") + command_id.encode()


def split_timer_key(bytes key):
    """Inverse of `timer_key`: `(at_ms, command_id)`."""
    cdef Py_ssize_t n = len(key)
    if n < 9:
        raise ValueError(f"not a timer key: {key!r}")
    cdef const unsigned char *p = <const unsigned char *> PyBytes_AS_STRING(key)
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v, key[8:].decode()


def coalesce_key(str vehicle_id, str key):
    """Key of the newest command holding a coalesce key for one vehicle."""
    return vehicle_id.encode() + _SEP + key.encode()
