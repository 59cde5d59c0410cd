"""The annotated hex examples in docs/ABI.md are what tmem_wire.abi produces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tmem_wire import abi
from tmem_wire.abi import Feature, Frame, Hello, Op, Status

ABI_DOC = Path(__file__).parents[2] / "docs" / "ABI.md"
# "0018  00 .. 00 (24 bytes)" and "0040  ab ab ab ... (4096 bytes)" mean N bytes of
# the first value; "0050  ...4096 bytes..." (no hex) says nothing checkable.
DUMP_LINE = re.compile(
    r"^(?P<offset>[0-9a-f]{4})  (?P<hex>[0-9a-f]{2}(?: [0-9a-f]{2})*)"
    r"(?: \.\.\.? (?:[0-9a-f]{2} )?\((?P<run>\d+) bytes\))?(?:  |$)"
)


def example_dumps() -> list[dict[int, int]]:
    """Each code block of the examples section as {offset: byte value}."""
    section = ABI_DOC.read_text().split("## 9. Annotated examples", 1)[1].split("\n## ", 1)[0]
    dumps = []
    for block in section.split("```")[1::2]:
        known: dict[int, int] = {}
        for line in block.splitlines():
            match = DUMP_LINE.match(line)
            if match is None:
                continue
            values = bytes.fromhex(match["hex"])
            if match["run"] is not None:
                values = values[:1] * int(match["run"])
            start = int(match["offset"], 16)
            known.update((start + i, value) for i, value in enumerate(values))
        dumps.append(known)
    return dumps


CLIENT_HELLO = Hello(1, 2, Feature.BATCH | Feature.ASYNC | Feature.STATS, 1024,
                     abi.page_size_mask(12, 21), 256, 0x100040)
HELLO_REQUEST = Frame(Op.HELLO, 1, payload=CLIENT_HELLO.encode())
HELLO_REPLY = abi.reply_to(
    HELLO_REQUEST, Status.OK, abi.negotiate(CLIENT_HELLO, Hello(max_in_flight=128)).encode())
PUT_REQUEST = Frame(Op.PUT, 2, pool_id=1, oid=(0x1234, 0, 0), index=0x56, payload=b"\xab" * 4096)
GET_BATCH_REPLY = abi.reply_to(
    Frame(Op.GET_BATCH, 3, pool_id=1), Status.OK,
    abi.encode_batch_reply([Status.OK, Status.MISS, Status.OK], [bytes(4096)] * 2, page_shift=12))
EXAMPLES = [HELLO_REQUEST, HELLO_REPLY, PUT_REQUEST, GET_BATCH_REPLY]


def test_the_doc_has_the_examples() -> None:
    dumps = example_dumps()
    assert len(dumps) == len(EXAMPLES)
    assert [len(dump) for dump in dumps[:3]] == [96, 96, 4160]


@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=["hello", "hello-reply", "put",
                                                            "get-batch-reply"])
def test_example_bytes_match_the_codec(index: int) -> None:
    encoded = abi.encode_frame(EXAMPLES[index])
    dump = example_dumps()[index]
    assert dump, "no bytes parsed"
    assert {offset: encoded[offset] for offset in dump} == dump
