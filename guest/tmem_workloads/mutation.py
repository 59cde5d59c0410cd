"""Mutated tmem ABI frames: valid requests of every opcode, then bit flips,
truncation, length lies, header field swaps, garbage and splices.

Stdlib-only, so that both the host fuzzer (`make fuzz`, tmem_host.fuzz) and the
hostile-guest program (tmem_workloads.hostile, run inside a guest) use it.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from tmem_wire.abi import (
    ALL_POOLS,
    HEADER_SIZE,
    WHOLE_OBJECT,
    Frame,
    Hello,
    NewPool,
    Op,
    PoolFlag,
    encode_frame,
    encode_key_batch,
    encode_put_batch,
)
from tmem_workloads.usemem import expected_page

# Header byte offsets (docs/ABI.md): the fields mutations like to lie in.
OFFSET_OPCODE = 5
OFFSET_FLAGS = 6
OFFSET_STATUS = 16
OFFSET_POOL = 20
OFFSET_LENGTH = 56
OFFSET_RESERVED = 60
_U32 = struct.Struct("<I")
def seed_frames(rng: random.Random, templates: list[bytes]) -> list[bytes]:
    """One valid request per opcode (and a few variants), for pools 0 and 1."""
    pages = [expected_page(templates, 1, rng.randrange(1 << 20)) for _ in range(4)]
    keys = [((rng.randrange(4), 0, 0), index) for index in range(4)]

    def frame(opcode: Op, pool_id: int = 0, oid: tuple[int, int, int] = (0, 0, 0),
              index: int = 0, payload: bytes = b"") -> bytes:
        return encode_frame(Frame(opcode=opcode, request_id=rng.randrange(1 << 32),
                                  pool_id=pool_id, oid=oid, index=index, payload=payload))

    return [
        frame(Op.HELLO, payload=Hello().encode()),
        frame(Op.HELLO, payload=Hello(max_in_flight=2, max_batch_pages=2).encode()),
        frame(Op.NEW_POOL, payload=NewPool(PoolFlag.PERSISTENT).encode()),
        frame(Op.NEW_POOL, payload=NewPool(PoolFlag(0), page_shift=13).encode()),
        frame(Op.DESTROY_POOL, pool_id=rng.randrange(2, 16)),
        frame(Op.PUT, 0, (1, 0, 0), 3, pages[0]),
        frame(Op.PUT, 1, (2, 0, 0), 4, pages[1]),
        frame(Op.GET, 0, (1, 0, 0), 3),
        frame(Op.GET, 1, (2, 0, 0), 4),
        frame(Op.FLUSH_PAGE, 0, (1, 0, 0), 3),
        frame(Op.FLUSH_OBJECT, 1, (2, 0, 0)),
        frame(Op.PUT_BATCH, 0, payload=encode_put_batch(12, keys, pages)),
        frame(Op.GET_BATCH, 0, payload=encode_key_batch(keys)),
        frame(Op.FLUSH_BATCH, 1, payload=encode_key_batch(keys[:2] + [((3, 0, 0), WHOLE_OBJECT)])),
        frame(Op.STATS, ALL_POOLS),
        frame(Op.STATS, 1),
    ]


def _flip_bits(data: bytes, rng: random.Random) -> bytes:
    mutable = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(len(mutable))
        mutable[position] ^= 1 << rng.randrange(8)
    return bytes(mutable)


def _flip_header_bits(data: bytes, rng: random.Random) -> bytes:
    mutable = bytearray(data)
    position = rng.randrange(HEADER_SIZE)
    mutable[position] ^= 1 << rng.randrange(8)
    return bytes(mutable)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def _lie_about_length(data: bytes, rng: random.Random) -> bytes:
    mutable = bytearray(data)
    real = len(data) - HEADER_SIZE
    lie = rng.choice([0, 1, real - 1, real + 1, real * 2, 0xFFFFFFFF, rng.randrange(1 << 32),
                      rng.randrange(1 << 23)])
    _U32.pack_into(mutable, OFFSET_LENGTH, max(0, lie) & 0xFFFFFFFF)
    return bytes(mutable)


def _swap_field(data: bytes, rng: random.Random) -> bytes:
    mutable = bytearray(data)
    target = rng.choice([OFFSET_OPCODE, OFFSET_FLAGS, OFFSET_STATUS, OFFSET_POOL,
                         OFFSET_RESERVED])
    if target == OFFSET_OPCODE:
        mutable[target] = rng.randrange(256)
    else:
        _U32.pack_into(mutable, target, rng.choice([1, 2, 15, 16, 255, ALL_POOLS,
                                                    rng.randrange(1 << 32)]))
    return bytes(mutable)


def _garbage(data: bytes, rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(1, 300))


def _splice(data: bytes, rng: random.Random) -> bytes:
    cut = rng.randrange(len(data))
    return data[:cut] + rng.randbytes(rng.randrange(1, 64)) + data[cut:]


def _payload_bit_flip(data: bytes, rng: random.Random) -> bytes:
    if len(data) <= HEADER_SIZE:
        return _flip_header_bits(data, rng)
    mutable = bytearray(data)
    position = rng.randrange(HEADER_SIZE, min(len(data), HEADER_SIZE + 64))
    mutable[position] ^= 1 << rng.randrange(8)
    return bytes(mutable)


MUTATIONS: list[Callable[[bytes, random.Random], bytes]] = [
    _flip_bits, _flip_header_bits, _truncate, _lie_about_length, _swap_field, _garbage,
    _splice, _payload_bit_flip,
]


def mutate(frame: bytes, rng: random.Random) -> bytes:
    """A frame with one mutation, or (one time in four) unchanged: valid frames
    between mutated ones reach the request handlers in odd session states."""
    if rng.randrange(4) == 0:
        return frame
    return rng.choice(MUTATIONS)(frame, rng)
