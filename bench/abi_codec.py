"""Throughput of the wire ABI codec (tmem_wire.abi), host side, no I/O.

    .venv/bin/python bench/abi_codec.py [--seconds S]

Prints frames/s and pages/s for encoding and decoding single-page PUTs, GETs and
1000-page PUT_BATCHes fed in 64 KiB chunks (what a socket read hands over). The
daemon's target is 100k+ pages/s through the decoder; compare medians of runs,
the machine is shared.
"""

from __future__ import annotations

import argparse
import random

from tmem_host.bench import rate
from tmem_wire import abi
from tmem_wire.abi import NEED_DATA, Frame, FrameDecoder, Op
from tmem_wire.frontswap import PAGE_SHIFT, PAGE_SIZE

CHUNK = 64 * 1024


def decode_stream(stream: bytes) -> int:
    decoder = FrameDecoder()
    frames = 0
    for position in range(0, len(stream), CHUNK):
        decoder.feed(stream[position : position + CHUNK])
        while decoder.next_frame() is not NEED_DATA:
            frames += 1
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    seconds = parser.parse_args().seconds
    pages = [random.Random(seed).randbytes(PAGE_SIZE) for seed in range(1000)]
    puts = [Frame(Op.PUT, i, pool_id=1, oid=(7, 0, 0), index=i, payload=page)
            for i, page in enumerate(pages)]
    gets = [Frame(Op.GET, i, pool_id=1, oid=(7, 0, 0), index=i) for i in range(1000)]
    keys = [((7, 0, 0), i) for i in range(1000)]
    batch = Frame(Op.PUT_BATCH, 1, pool_id=1, payload=abi.encode_put_batch(PAGE_SHIFT, keys, pages))
    put_stream = b"".join(map(abi.encode_frame, puts))
    get_stream = b"".join(map(abi.encode_frame, gets))
    batch_stream = abi.encode_frame(batch) * 10

    def encode_puts() -> int:
        for frame in puts:
            abi.encode_frame(frame)
        return len(puts)

    def encode_batch() -> int:
        abi.encode_put_batch(PAGE_SHIFT, keys, pages)
        return len(keys)

    def decode_batches() -> int:
        decoder = FrameDecoder()
        decoded = 0
        for position in range(0, len(batch_stream), CHUNK):
            decoder.feed(batch_stream[position : position + CHUNK])
            while isinstance(frame := decoder.next_frame(), Frame):
                decoded += len(abi.decode_put_batch(frame.payload)[2])
        return decoded

    results = [
        ("encode PUT frames", "frames/s", rate(encode_puts, seconds)),
        ("decode PUT frames", "pages/s", rate(lambda: decode_stream(put_stream), seconds)),
        ("decode GET frames", "frames/s", rate(lambda: decode_stream(get_stream), seconds)),
        ("encode PUT_BATCH x1000", "pages/s", rate(encode_batch, seconds)),
        ("decode PUT_BATCH x1000 + payload", "pages/s", rate(decode_batches, seconds)),
    ]
    for name, unit, value in results:
        print(f"{name:34s} {value:12,.0f} {unit}")


if __name__ == "__main__":
    main()
