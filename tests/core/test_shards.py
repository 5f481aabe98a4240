"""The shard map: slots, ownership, the file format, and its refusals."""

from __future__ import annotations

import zlib

import pytest

from broker.core.errors import InvalidArgument
from broker.core.shards import (
    DEFAULT_SLOTS,
    Shard,
    ShardMap,
    format_slots,
    parse_slots,
    slot_of,
)


def test_a_slot_is_zlib_crc32_modulo_the_slot_count() -> None:
    # HAProxy's `crc32(0)` converter is zlib's CRC-32 (checked against HAProxy 2.6).
    for vehicle_id in ("car-1", "VIN5YJ3E1EA7KF000000", "ü-car"):
        assert slot_of(vehicle_id) == zlib.crc32(vehicle_id.encode()) % DEFAULT_SLOTS
    assert slot_of("car-1", 7) == zlib.crc32(b"car-1") % 7


def test_an_even_map_covers_every_slot_once_and_keeps_a_vehicle_in_place() -> None:
    shard_map = ShardMap.even(["unix:/a.sock", "unix:/b.sock", "unix:/c.sock"])
    sizes = [len(shard.slots) for shard in shard_map.shards]
    assert sum(sizes) == DEFAULT_SLOTS and max(sizes) - min(sizes) <= 1
    owners = {shard_map.owner(f"car-{i}").name for i in range(3000)}
    assert owners == {"shard-0", "shard-1", "shard-2"}
    assert shard_map.owner("car-42") == shard_map.owner("car-42")
    assert shard_map.slot("car-42") in shard_map.owner("car-42").slots


def test_the_file_round_trips() -> None:
    shard_map = ShardMap(
        [
            Shard("east", 'host "1":50051', frozenset({0, 1, 2, 5})),
            Shard("west", "unix:/w.sock", frozenset({3, 4, 6, 7})),
        ],
        slots=8,
    )
    again = ShardMap.from_toml(shard_map.to_toml())
    assert again.slots == 8
    assert [(s.name, s.address, s.slots) for s in again.shards] == [
        (s.name, s.address, s.slots) for s in shard_map.shards
    ]
    assert again.shard("west").address == "unix:/w.sock"


def test_slot_lists_parse_and_format_as_ranges() -> None:
    assert parse_slots("0-3, 7,9-10", 16) == frozenset({0, 1, 2, 3, 7, 9, 10})
    assert format_slots({10, 9, 7, 3, 2, 1, 0}) == "0-3,7,9-10"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("slots = 4\n", "at least one shard"),
        ('slots = 4\n[[shard]]\nname = "a"\naddress = "x"\nslots = "0-2"\n', "slots 3 have no"),
        (
            'slots = 4\n[[shard]]\nname = "a"\naddress = "x"\nslots = "0-2"\n'
            '[[shard]]\nname = "b"\naddress = "y"\nslots = "2-3"\n',
            "slot 2 is owned by both",
        ),
        ('slots = 4\n[[shard]]\nname = "a"\naddress = "x"\nslots = "0-9"\n', "outside 0-3"),
        ('slots = 4\n[[shard]]\nname = "A b"\naddress = "x"\nslots = "0-3"\n', "must match"),
        ('slots = 4\n[[shard]]\nname = "a"\nslots = "0-3"\n', "needs name, address"),
        ("slots = [", "shard map:"),
        ("slots = 0\n", "slots must be 1-"),
    ],
)
def test_a_bad_map_is_refused_with_a_reason(text: str, complaint: str) -> None:
    with pytest.raises(InvalidArgument, match=complaint):
        ShardMap.from_toml(text)
