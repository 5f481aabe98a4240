"""The shard map: vehicle id -> slot -> shard, the one source the brokers and the proxy share.

A fixed number of slots (`DEFAULT_SLOTS`); a vehicle's slot is `crc32(id) mod slots`, the
same hash HAProxy computes with `req.hdr(x-vehicle-id),crc32(0),mod(SLOTS)` (its
`crc32(0)` equals zlib's). Each slot belongs to exactly one shard; a shard owns its
slots and its own data folder, and refuses a vehicle whose slot it does not own.

The file (TOML):

    slots = 1024

    [[shard]]
    name = "shard-0"
    address = "unix:/var/lib/broker/shard-0.sock"   # how the proxy reaches it
    slots = "0-511"

    [[shard]]
    name = "shard-1"
    address = "10.0.0.12:50051"
    slots = "512-1023"

`slots` of a shard is a comma-separated list of slots and inclusive ranges.
"""

from __future__ import annotations

import re
import tomllib
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.core.errors import InvalidArgument

DEFAULT_SLOTS = 1024
MAX_SLOTS = 65536
SHARD_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def slot_of(vehicle_id: str, slots: int = DEFAULT_SLOTS) -> int:
    """The vehicle's slot: zlib's CRC-32 of its UTF-8 id, modulo the slot count."""
    return zlib.crc32(vehicle_id.encode()) % slots


@dataclass(frozen=True)
class Shard:
    name: str
    address: str
    slots: frozenset[int]


def parse_slots(text: str, slots: int) -> frozenset[int]:
    """ "0-3,7,9-10" -> {0, 1, 2, 3, 7, 9, 10}, each below `slots`."""
    owned: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise InvalidArgument(f"slot list {text!r}: {part!r} is not N or N-M")
        first, last = int(low), int(high) if dash else int(low)
        if first > last or last >= slots:
            raise InvalidArgument(f"slot list {text!r}: {part!r} is outside 0-{slots - 1}")
        owned.update(range(first, last + 1))
    return frozenset(owned)


def format_slots(owned: Iterable[int]) -> str:
    """The inverse of `parse_slots`, with runs as ranges."""
    ranges: list[str] = []
    run: list[int] = []
    for slot in sorted(owned):
        if run and slot == run[-1] + 1:
            run.append(slot)
            continue
        if run:
            ranges.append(_run(run))
        run = [slot]
    if run:
        ranges.append(_run(run))
    return ",".join(ranges)


def _run(run: Sequence[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


class ShardMap:
    """Which shard owns each slot; every slot exactly once."""

    def __init__(self, shards: Sequence[Shard], slots: int = DEFAULT_SLOTS) -> None:
        if not 1 <= slots <= MAX_SLOTS:
            raise InvalidArgument(f"slots must be 1-{MAX_SLOTS} (got {slots})")
        if not shards:
            raise InvalidArgument("a shard map needs at least one shard")
        owner: list[Shard | None] = [None] * slots
        names: set[str] = set()
        for shard in shards:
            if not SHARD_NAME.fullmatch(shard.name):
                raise InvalidArgument(f"shard name {shard.name!r} must match {SHARD_NAME.pattern}")
            if shard.name in names:
                raise InvalidArgument(f"shard {shard.name!r} is listed twice")
            names.add(shard.name)
            for slot in shard.slots:
                if not 0 <= slot < slots:
                    raise InvalidArgument(f"shard {shard.name!r}: slot {slot} is outside the map")
                other = owner[slot]
                if other is not None:
                    raise InvalidArgument(
                        f"slot {slot} is owned by both {other.name!r} and {shard.name!r}"
                    )
                owner[slot] = shard
        missing = [slot for slot, who in enumerate(owner) if who is None]
        if missing:
            raise InvalidArgument(f"slots {format_slots(missing)} have no shard")
        self.slots = slots
        self.shards = tuple(shards)
        self._owner: tuple[Shard, ...] = tuple(o for o in owner if o is not None)

    @classmethod
    def even(cls, addresses: Sequence[str], slots: int = DEFAULT_SLOTS) -> ShardMap:
        """`len(addresses)` shards named shard-0.. with contiguous, near-equal slot ranges."""
        count = len(addresses)
        shards = [
            Shard(
                f"shard-{i}",
                address,
                frozenset(range(i * slots // count, (i + 1) * slots // count)),
            )
            for i, address in enumerate(addresses)
        ]
        return cls(shards, slots)

    def slot(self, vehicle_id: str) -> int:
        return slot_of(vehicle_id, self.slots)

    def owner(self, vehicle_id: str) -> Shard:
        """The shard that owns this vehicle."""
        return self._owner[self.slot(vehicle_id)]

    def shard(self, name: str) -> Shard:
        for shard in self.shards:
            if shard.name == name:
                return shard
        raise InvalidArgument(f"no shard named {name!r} in the shard map")

    def to_toml(self) -> str:
        lines = [f"slots = {self.slots}", ""]
        for shard in self.shards:
            lines += [
                "[[shard]]",
                f"name = {_quote(shard.name)}",
                f"address = {_quote(shard.address)}",
                f'slots = "{format_slots(shard.slots)}"',
                "",
            ]
        return "\n".join(lines)

    @classmethod
    def from_toml(cls, text: str) -> ShardMap:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"shard map: {exc}") from None
        slots = data.get("slots", DEFAULT_SLOTS)
        if not isinstance(slots, int) or isinstance(slots, bool):
            raise InvalidArgument("shard map: slots must be an integer")
        entries = data.get("shard", [])
        if not isinstance(entries, list):
            raise InvalidArgument("shard map: [[shard]] must be a list of tables")
        shards = []
        for entry in entries:
            name, address, owned = (entry.get(k) for k in ("name", "address", "slots"))
            if not all(isinstance(v, str) for v in (name, address, owned)):
                raise InvalidArgument("shard map: every [[shard]] needs name, address and slots")
            shards.append(Shard(name, address, parse_slots(owned, slots)))
        return cls(shards, slots)

    @classmethod
    def load(cls, path: Path) -> ShardMap:
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidArgument(f"cannot read the shard map {path}: {exc}") from None
        return cls.from_toml(text)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
