"""The store key codecs: both twins agree, keys sort as the store relies on."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_ext import _codec_py, codec
from broker_ext._compat import extensions_summary

NO_EXTENSIONS = bool(os.environ.get("BROKER_NO_EXTENSIONS"))
U64_MAX = (1 << 64) - 1
FUNCTIONS = (
    "coalesce_key",
    "pending_key",
    "split_timer_key",
    "timer_key",
    "vehicle_key",
    "vehicle_prefix",
)


def _load_c() -> ModuleType:
    return importlib.import_module("broker_ext._codec_c")


@pytest.fixture(
    params=[
        pytest.param("py"),
        pytest.param(
            "c",
            marks=pytest.mark.skipif(NO_EXTENSIONS, reason="BROKER_NO_EXTENSIONS=1"),
        ),
    ]
)
def twin(request: pytest.FixtureRequest) -> ModuleType:
    """Each twin in turn: the pure-Python reference, then the compiled one."""
    return _codec_py if request.param == "py" else _load_c()


@pytest.fixture(scope="module")
def c_twin() -> ModuleType:
    """The compiled twin, for comparisons against the pure one."""
    if NO_EXTENSIONS:
        pytest.skip("BROKER_NO_EXTENSIONS=1")
    return _load_c()


# -- which twin is loaded -------------------------------------------------------------------


@pytest.mark.skipif(NO_EXTENSIONS, reason="BROKER_NO_EXTENSIONS=1 forces the pure twin")
def test_codec_c_loaded() -> None:
    assert codec.COMPILED, f"codec twin loaded: {extensions_summary()}"
    c = _load_c()
    for name in FUNCTIONS:
        assert getattr(codec, name) is getattr(c, name), name


@pytest.mark.skipif(not NO_EXTENSIONS, reason="only under BROKER_NO_EXTENSIONS=1")
def test_codec_py_forced() -> None:
    assert not codec.COMPILED
    for name in FUNCTIONS:
        assert getattr(codec, name) is getattr(_codec_py, name), name


def test_twins_export_the_same_names(twin: ModuleType) -> None:
    for name in FUNCTIONS:
        assert callable(getattr(twin, name)), name


# -- behaviour of each twin -------------------------------------------------------------------


def test_vehicle_key_layout(twin: ModuleType) -> None:
    assert twin.vehicle_prefix("car-1") == b"car-1\x00"
    assert twin.vehicle_key("car-1", 1) == b"car-1\x00" + b"\x00" * 7 + b"\x01"
    assert twin.vehicle_key("car-1", 0x0102).endswith(b"\x00" * 6 + b"\x01\x02")
    assert twin.vehicle_key("car-1", U64_MAX) == b"car-1\x00" + b"\xff" * 8


def test_timer_key_round_trip(twin: ModuleType) -> None:
    for at_ms in (0, 1, 1_700_000_000_000, U64_MAX):
        key = twin.timer_key(at_ms, "0190abcdef01a1b2c3d4e5f6")
        assert len(key) == 8 + 24
        assert twin.split_timer_key(key) == (at_ms, "0190abcdef01a1b2c3d4e5f6")


def test_coalesce_key_layout(twin: ModuleType) -> None:
    assert twin.coalesce_key("car-1", "climate") == b"car-1\x00climate"
    assert twin.coalesce_key("car-1", "x") != twin.coalesce_key("car-10", "x")


def test_timer_keys_sort_by_time_then_id(twin: ModuleType) -> None:
    entries = [(2, "a"), (1, "b"), (256, "a"), (1, "a"), (255, "z"), (1 << 40, "a")]
    keys = sorted(twin.timer_key(at, cid) for at, cid in entries)
    assert [twin.split_timer_key(k) for k in keys] == sorted(entries)


def test_vehicle_keys_sort_by_seq_under_their_prefix(twin: ModuleType) -> None:
    seqs = [3, 1, 256, 255, 1 << 33, 0, U64_MAX]
    keys = sorted(twin.vehicle_key("car-1", s) for s in seqs)
    prefix = twin.vehicle_prefix("car-1")
    assert all(k.startswith(prefix) for k in keys)
    assert [int.from_bytes(k[len(prefix) :], "big") for k in keys] == sorted(seqs)
    # A vehicle whose id extends another's never falls under the shorter one's prefix.
    assert not twin.vehicle_key("car-10", 0).startswith(prefix)
    assert not twin.vehicle_prefix("car-10").startswith(prefix)


def test_pending_keys_sort_by_lane_down_then_seq_under_their_prefix(twin: ModuleType) -> None:
    assert twin.pending_key("car-1", 3, 1) == b"car-1\x00\xfc" + b"\x00" * 7 + b"\x01"
    entries = [(1, 5), (3, 9), (2, 1), (3, 2), (1, 1), (2, U64_MAX), (0, 0)]
    keys = sorted(twin.pending_key("car-1", lane, seq) for lane, seq in entries)
    prefix = twin.vehicle_prefix("car-1")
    assert all(k.startswith(prefix) for k in keys)
    decoded = [(255 - k[len(prefix)], int.from_bytes(k[len(prefix) + 1 :], "big")) for k in keys]
    assert decoded == sorted(entries, key=lambda e: (-e[0], e[1]))
    with pytest.raises(ValueError, match="lane out of range"):
        twin.pending_key("car-1", 256, 1)
    with pytest.raises(ValueError, match="out of range"):
        twin.pending_key("car-1", 1, -1)
    with pytest.raises(TypeError):
        twin.pending_key("car-1", 1.0, 1)


@pytest.mark.parametrize("bad", [-1, -(1 << 70), 1 << 64, (1 << 64) + 1, 1 << 100])
def test_out_of_range_integers_raise_value_error(twin: ModuleType, bad: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        twin.timer_key(bad, "c")
    with pytest.raises(ValueError, match="out of range"):
        twin.vehicle_key("car-1", bad)


@pytest.mark.parametrize("bad", [1.5, 2.0, "1", None])
def test_non_integers_raise_type_error(twin: ModuleType, bad: object) -> None:
    # A float must never be truncated into a key (the compiled twin once did that).
    with pytest.raises(TypeError):
        twin.timer_key(bad, "c")
    with pytest.raises(TypeError):
        twin.vehicle_key("car-1", bad)


@pytest.mark.parametrize("short", [b"", b"\x00" * 8])
def test_split_timer_key_rejects_short_keys(twin: ModuleType, short: bytes) -> None:
    with pytest.raises(ValueError, match="not a timer key"):
        twin.split_timer_key(short)


def test_split_timer_key_rejects_invalid_utf8(twin: ModuleType) -> None:
    with pytest.raises(UnicodeDecodeError):
        twin.split_timer_key(b"\x00" * 8 + b"\xff")


def test_unencodable_ids_raise_value_error(twin: ModuleType) -> None:
    for call in (
        lambda: twin.vehicle_prefix("car-\ud800"),
        lambda: twin.vehicle_key("car-\ud800", 1),
        lambda: twin.timer_key(1, "c-\ud800"),
        lambda: twin.coalesce_key("car-1", "k-\ud800"),
    ):
        with pytest.raises(UnicodeEncodeError):
            call()


# -- the twins agree byte for byte ----------------------------------------------------------------

u64 = st.integers(min_value=0, max_value=U64_MAX)
ids = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=300)
@given(vehicle_id=ids, seq=u64, at_ms=u64, command_id=ids, coalesce=ids)
def test_twins_agree_on_random_inputs(
    c_twin: ModuleType, vehicle_id: str, seq: int, at_ms: int, command_id: str, coalesce: str
) -> None:
    py = _codec_py
    assert c_twin.vehicle_prefix(vehicle_id) == py.vehicle_prefix(vehicle_id)
    assert c_twin.vehicle_key(vehicle_id, seq) == py.vehicle_key(vehicle_id, seq)
    assert c_twin.coalesce_key(vehicle_id, coalesce) == py.coalesce_key(vehicle_id, coalesce)
    lane = seq % 256
    assert c_twin.pending_key(vehicle_id, lane, seq) == py.pending_key(vehicle_id, lane, seq)
    key = py.timer_key(at_ms, command_id)
    assert c_twin.timer_key(at_ms, command_id) == key
    if command_id:
        assert c_twin.split_timer_key(key) == py.split_timer_key(key) == (at_ms, command_id)


@settings(max_examples=300)
@given(key=st.binary(max_size=40))
def test_twins_agree_on_random_timer_keys(c_twin: ModuleType, key: bytes) -> None:
    outcomes = []
    for twin in (_codec_py, c_twin):
        try:
            outcomes.append(twin.split_timer_key(key))
        except ValueError as exc:
            outcomes.append(type(exc))
    assert outcomes[0] == outcomes[1]


@settings(max_examples=300)
@given(value=st.integers(min_value=-(1 << 80), max_value=1 << 80))
def test_twins_agree_on_the_integer_range(c_twin: ModuleType, value: int) -> None:
    outcomes = []
    for twin in (_codec_py, c_twin):
        try:
            outcomes.append((twin.timer_key(value, "c"), twin.vehicle_key("v", value)))
        except ValueError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    assert isinstance(outcomes[0], tuple) == (0 <= value <= U64_MAX)


@given(entries=st.lists(st.tuples(u64, st.text(min_size=1, max_size=10)), max_size=20))
def test_timer_key_order_is_time_then_id(entries: list[tuple[int, str]]) -> None:
    # Bytewise order of whole keys equals (at_ms, command_id bytes) order: the store's
    # timer sweep depends on it. Checked on the loaded twin.
    keys = sorted(codec.timer_key(at, cid) for at, cid in entries)
    decoded = [codec.split_timer_key(k) for k in keys]
    assert decoded == sorted(entries, key=lambda e: (e[0], e[1].encode()))


@given(
    vehicle_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,10}", fullmatch=True),
    seqs=st.lists(u64, max_size=20),
)
def test_vehicle_key_order_is_seq(vehicle_id: str, seqs: list[int]) -> None:
    prefix = codec.vehicle_prefix(vehicle_id)
    keys = sorted(codec.vehicle_key(vehicle_id, s) for s in seqs)
    assert all(k.startswith(prefix) for k in keys)
    assert [int.from_bytes(k[len(prefix) :], "big") for k in keys] == sorted(seqs)
