"""The remote tier's keys and values (tier.page_key, encode_value / decode_value,
_values.c): the TMR2 bytes against an independent XXH3-128 (the `xxhash`
package); a value of another key or version, damaged, cut or grown anywhere is
None, never data; the keys and the TMR1 values an older tmemd wrote (BLAKE2b-128)
still find and read their pages."""

from __future__ import annotations

import hashlib
import struct
from uuid import UUID

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from tmem_host.remote.tier import VALUE_HEADER, GuestRemote, decode_value, encode_value, page_key

KEY = b"tmem:{00112233445566778899aabbccddeeff:2a}:1:0.0.0:3:5:1c"
# Written by tmemd at commit 517a2ba (the last to write TMR1) for KEY, version 28:
# a data page and a fill word.
OLD_DATA = b"the old format, written by tmemd before TMR2"
OLD_DATA_VALUE = bytes.fromhex(
    "544d5231010000001c0000000000000034bc9a4afa658b50f50320d7362ee4d1"
    + OLD_DATA.hex())
OLD_FILL = 0x0123456789ABCDEF
OLD_FILL_VALUE = bytes.fromhex(
    "544d5231000000001c000000000000006337a98a3beabbe3721d3b5eefa3029befcdab8967452301")

keys = st.binary(min_size=1, max_size=80)
versions = st.integers(min_value=0, max_value=2**64 - 1)
stored_pages = st.one_of(st.binary(max_size=4200), st.integers(min_value=0, max_value=2**64 - 1))


def reference_tmr2(key: bytes, version: int, stored: bytes | int) -> bytes:
    """docs/REMOTE.md's TMR2, written out with the xxhash package."""
    tag, data = (0, struct.pack("<Q", stored)) if isinstance(stored, int) else (1, stored)
    digest = xxhash.xxh3_128(struct.pack("<I", len(key)) + key + struct.pack("<QB", version, tag)
                             + data).digest()
    return VALUE_HEADER.pack(b"TMR2", tag, version, digest) + data


def reference_tmr1(key: bytes, version: int, stored: bytes | int) -> bytes:
    tag, data = (0, struct.pack("<Q", stored)) if isinstance(stored, int) else (1, stored)
    hasher = hashlib.blake2b(key, digest_size=16)
    hasher.update(struct.pack("<QB", version, tag) + data)
    return VALUE_HEADER.pack(b"TMR1", tag, version, hasher.digest()) + data


@given(keys, versions, stored_pages)
def test_values_are_the_documented_bytes_and_read_back(key: bytes, version: int,
                                                      stored: bytes | int) -> None:
    value = encode_value(key, version, stored)
    assert value == reference_tmr2(key, version, stored)
    assert decode_value(key, version, value) == stored
    assert type(decode_value(key, version, value)) is type(stored)


@given(keys, versions, stored_pages, st.data())
def test_another_key_or_version_is_not_this_pages_copy(key: bytes, version: int,
                                                       stored: bytes | int, data: st.DataObject) -> None:
    value = encode_value(key, version, stored)
    other_key = data.draw(keys.filter(lambda other: other != key))
    other_version = data.draw(versions.filter(lambda other: other != version))
    assert decode_value(other_key, version, value) is None
    assert decode_value(key, other_version, value) is None


@given(keys, versions, stored_pages, st.data())
def test_a_flipped_bit_anywhere_is_a_miss(key: bytes, version: int, stored: bytes | int,
                                          data: st.DataObject) -> None:
    for make in (encode_value, reference_tmr1):
        value = bytearray(make(key, version, stored))
        bit = data.draw(st.integers(min_value=0, max_value=len(value) * 8 - 1))
        value[bit // 8] ^= 1 << (bit % 8)
        assert decode_value(key, version, bytes(value)) is None


@given(keys, versions, stored_pages, st.data())
def test_a_cut_or_grown_value_is_a_miss(key: bytes, version: int, stored: bytes | int,
                                        data: st.DataObject) -> None:
    for make in (encode_value, reference_tmr1):
        value = make(key, version, stored)
        cut = data.draw(st.integers(min_value=0, max_value=len(value) - 1))
        assert decode_value(key, version, value[:cut]) is None
        assert decode_value(key, version, value + data.draw(st.binary(min_size=1, max_size=8))) is None


def test_no_value_and_unknown_formats_are_misses() -> None:
    value = encode_value(KEY, 28, b"page")
    assert decode_value(KEY, 28, None) is None
    assert decode_value(KEY, 28, b"TMR3" + value[4:]) is None
    assert decode_value(KEY, 28, b"") is None
    # A tag beyond fill and data, with a digest that matches it.
    digest = xxhash.xxh3_128(struct.pack("<I", len(KEY)) + KEY + struct.pack("<QB", 28, 2)
                             + b"page").digest()
    assert decode_value(KEY, 28, VALUE_HEADER.pack(b"TMR2", 2, 28, digest) + b"page") is None


def test_values_an_older_tmemd_wrote_still_read_back() -> None:
    assert decode_value(KEY, 28, OLD_DATA_VALUE) == OLD_DATA
    assert decode_value(KEY, 28, OLD_FILL_VALUE) == OLD_FILL
    assert OLD_DATA_VALUE == reference_tmr1(KEY, 28, OLD_DATA)
    assert decode_value(KEY, 29, OLD_DATA_VALUE) is None
    assert decode_value(KEY + b"0", 28, OLD_FILL_VALUE) is None


@given(keys, versions, stored_pages)
def test_tmr1_values_read_back(key: bytes, version: int, stored: bytes | int) -> None:
    assert decode_value(key, version, reference_tmr1(key, version, stored)) == stored


@pytest.mark.parametrize("bad", [("key", 1, b""), (b"k", -1, b""), (b"k", 2**64, b""), (b"k", 1, 2**64),
                                 (b"k", 1, -1), (b"k", 1, "page")])
def test_encode_refuses_what_is_not_a_value(bad: tuple[object, object, object]) -> None:
    with pytest.raises((TypeError, OverflowError)):
        encode_value(*bad)  # type: ignore[arg-type]


def test_page_keys_are_the_ones_an_older_tmemd_wrote() -> None:
    """Keys name pages across upgrades (the journal and the cluster keep them):
    this one was made at commit 517a2ba."""
    guest = GuestRemote("g", UUID(int=0x00112233445566778899AABBCCDDEEFF), None, 1)
    assert page_key(guest, 3, (0x123457, 0, 0), 0x2A5, 0x1C) == (
        b"tmem:{00112233445566778899aabbccddeeff:2b}:3:12345.0.0:a9:1d:1c")
