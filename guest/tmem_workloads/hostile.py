"""A hostile guest: attacks tmemd through this guest's own tmem channel (stdlib only).

Run instead of the agent (a port has one opener). Three phases, each reported:

1. malformed: for `--seconds`, bursts of mutated frames (tmem_workloads.mutation:
   bad magic, oversize and lying lengths, random opcodes, garbage pool ids,
   truncations, garbage bytes), each burst on a fresh session; tmemd may close
   the channel (QEMU's chardev then reconnects). Every byte tmemd sends back
   must decode as reply frames.
2. forged: a clean session asks for other guests' pages: GET, GET_BATCH,
   FLUSH_PAGE, FLUSH_OBJECT, FLUSH_BATCH, DESTROY_POOL on every pool id a
   guest can have and the keys the frontswap mapping uses (swap slots 0..),
   then STATS of all pools. Before this guest made a pool, nothing may answer
   anything but INVALID, and STATS must list nothing.
3. flood: a persistent pool (then an ephemeral one) filled with random pages
   in PUT_BATCH frames until `--flood-mib` were sent: tmemd refuses (cap,
   budget) or evicts this guest's own ephemeral pages.

    python3 -m tmem_workloads.hostile [--channel port|unix:PATH] [--seconds 20]
                                      [--flood-mib 256] [--seed 1]

Prints one JSON object; exits 1 if tmemd answered something it must not have.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from tmem_guest.channel import Channel, ChannelDown, open_channel
from tmem_wire.abi import (
    ALL_POOLS,
    NEED_DATA,
    WHOLE_OBJECT,
    Frame,
    FrameDecoder,
    Hello,
    NewPool,
    Op,
    PoolFlag,
    ProtocolError,
    Status,
    decode_batch_reply,
    decode_pool_stats,
    encode_frame,
    encode_key_batch,
    encode_put_batch,
    max_batch_pages,
)
from tmem_wire.frontswap import PAGE_SIZE, frontswap_key
from tmem_workloads.mutation import mutate, seed_frames
from tmem_workloads.usemem import page_templates

# How long to wait for the channel to come (back) up, and for a reply.
CONNECT_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 30.0
# After a burst, how long to wait for replies that may never come (a mutated
# length can make tmemd wait for bytes that are not sent).
SETTLE_S = 0.5
PROBE_REQUEST_ID = (1 << 64) - 1
FORGED_SLOTS = 256  # swap slots whose keys are guessed
# Pool ids are small per-guest integers from 0; tmemd allows 16 per guest (Xen's
# MAX_POOLS_PER_DOMAIN), so these are every id another guest's pool can have.
GUESSED_POOL_IDS = [*range(16), 0xFFFFFFF0]
FLOOD_BATCH_PAGES = 256


@dataclass
class HostileReport:
    malformed_frames: int = 0
    malformed_rounds: int = 0
    closed_by_tmemd: int = 0
    replies: int = 0
    bad_replies: list[str] = field(default_factory=list)
    forged_requests: int = 0
    forged_statuses: dict[str, int] = field(default_factory=dict)
    forged_pages_seen: int = 0
    stats_pools_seen: int = 0
    flood_pages_sent: int = 0
    flood_pages_stored: int = 0
    flood_pages_refused: int = 0
    flood_statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def breached(self) -> bool:
        """tmemd answered something it must not have."""
        return bool(self.bad_replies or self.forged_pages_seen or self.stats_pools_seen
                    or set(self.forged_statuses) - {Status.INVALID.name})


class Connection:
    """One session on the channel: raw bytes out, decoded reply frames in."""

    def __init__(self, channel: Channel, report: HostileReport) -> None:
        self.channel = channel
        self.report = report
        self.decoder = FrameDecoder()
        self.buffer = memoryview(bytearray(1 << 16))
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.channel.send(memoryview(data))
        except ChannelDown:
            self.closed = True

    def frames(self, timeout: float) -> Iterator[Frame]:
        """Reply frames until `timeout` passes with nothing to read, or tmemd hangs up."""
        while not self.closed and self.channel.wait_readable(timeout):
            count = self.channel.recv_into(self.buffer)
            if count == 0:
                self.closed = True
                return
            try:
                self.decoder.feed(self.buffer[:count])
                while (frame := self.decoder.next_frame()) is not NEED_DATA:
                    assert isinstance(frame, Frame)
                    if not frame.is_reply:
                        raise ProtocolError(Status.PROTOCOL_ERROR, "a non-reply frame")
                    self.report.replies += 1
                    yield frame
            except ProtocolError as error:
                self.report.bad_replies.append(str(error))
                self.closed = True
                return

    def call(self, opcode: Op, *, request_id: int, pool_id: int = 0,
             oid: tuple[int, int, int] = (0, 0, 0), index: int = 0,
             payload: bytes = b"") -> Frame:
        self.send(encode_frame(Frame(opcode=opcode, request_id=request_id, pool_id=pool_id,
                                     oid=oid, index=index, payload=payload)))
        for frame in self.frames(REPLY_TIMEOUT_S):
            if frame.request_id == request_id:
                return frame
        raise ChannelDown(f"no reply to {opcode.name} (request {request_id})")


def open_session(channel: Channel, report: HostileReport) -> Connection:
    """Wait for the channel, then a fresh connection (tmemd resyncs on our HELLO)."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    channel.disconnect()
    while not channel.connect():
        if time.monotonic() > deadline:
            raise ChannelDown(f"channel not up within {CONNECT_TIMEOUT_S} s")
        time.sleep(0.05)
    return Connection(channel, report)


def hello(connection: Connection) -> Hello:
    reply = connection.call(Op.HELLO, request_id=1, payload=Hello().encode())
    if reply.status != Status.OK:
        raise ChannelDown(f"HELLO refused: {reply.status}")
    return Hello.decode(reply.payload)


def malformed(channel: Channel, report: HostileReport, rng: random.Random, seconds: float,
              burst: int) -> None:
    templates = page_templates(rng.randrange(1 << 30))
    hello_frame = encode_frame(Frame(opcode=Op.HELLO, request_id=0, payload=Hello().encode()))
    probe = encode_frame(Frame(opcode=Op.STATS, request_id=PROBE_REQUEST_ID, pool_id=ALL_POOLS))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        connection = open_session(channel, report)
        frames = [mutate(rng.choice(seed_frames(rng, templates)), rng) for _ in range(burst)]
        connection.send(b"".join([hello_frame, *frames, probe]))
        for frame in connection.frames(SETTLE_S):
            if frame.request_id == PROBE_REQUEST_ID:
                break
        report.malformed_frames += burst
        report.malformed_rounds += 1
        report.closed_by_tmemd += connection.closed


def forged(channel: Channel, report: HostileReport) -> None:
    """Other guests' keys, on every pool id, before this guest has a pool."""
    connection = open_session(channel, report)
    hello(connection)
    for record in decode_pool_stats(connection.call(
            Op.STATS, request_id=2, pool_id=ALL_POOLS).payload):
        # Pools an earlier run of this guest left behind: ours, so not a breach.
        connection.call(Op.DESTROY_POOL, request_id=3, pool_id=record.pool_id)
    keys = [frontswap_key(0, slot) for slot in range(FORGED_SLOTS)]
    request_id = 10

    def count(frame: Frame) -> None:
        name = Status(frame.status).name
        report.forged_statuses[name] = report.forged_statuses.get(name, 0) + 1
        report.forged_requests += 1
        if frame.opcode == Op.GET and frame.status == Status.OK:
            report.forged_pages_seen += 1
        if frame.opcode == Op.GET_BATCH and frame.status == Status.OK:
            statuses, _ = decode_batch_reply(frame.payload)
            report.forged_pages_seen += sum(status == Status.OK for status in statuses)

    for pool_id in GUESSED_POOL_IDS:
        for start in range(0, len(keys), 64):
            request_id += 1
            count(connection.call(Op.GET_BATCH, request_id=request_id, pool_id=pool_id,
                                  payload=encode_key_batch(keys[start:start + 64])))
            request_id += 1
            count(connection.call(Op.FLUSH_BATCH, request_id=request_id, pool_id=pool_id,
                                  payload=encode_key_batch(keys[start:start + 64])))
        for oid, index in keys[:16]:
            for opcode in (Op.GET, Op.FLUSH_PAGE):
                request_id += 1
                count(connection.call(opcode, request_id=request_id, pool_id=pool_id,
                                      oid=oid, index=index))
            request_id += 1
            count(connection.call(Op.FLUSH_OBJECT, request_id=request_id, pool_id=pool_id,
                                  oid=oid))
        request_id += 1
        count(connection.call(Op.FLUSH_BATCH, request_id=request_id, pool_id=pool_id,
                              payload=encode_key_batch([((0, 0, 0), WHOLE_OBJECT)])))
        request_id += 1
        count(connection.call(Op.STATS, request_id=request_id, pool_id=pool_id))
        request_id += 1
        count(connection.call(Op.DESTROY_POOL, request_id=request_id, pool_id=pool_id))
    request_id += 1
    stats = connection.call(Op.STATS, request_id=request_id, pool_id=ALL_POOLS)
    report.stats_pools_seen = len(decode_pool_stats(stats.payload))


def flood(channel: Channel, report: HostileReport, flood_mib: int) -> None:
    """Random pages until flood_mib were sent, half persistent, half ephemeral."""
    connection = open_session(channel, report)
    agreed = hello(connection)
    count = min(FLOOD_BATCH_PAGES, max_batch_pages(12, agreed.max_frame),
                agreed.max_batch_pages)
    per_pool = (flood_mib << 20) // PAGE_SIZE // 2
    request_id = 100
    for flags in (PoolFlag.PERSISTENT, PoolFlag(0)):
        request_id += 1
        created = connection.call(Op.NEW_POOL, request_id=request_id,
                                  payload=NewPool(flags).encode())
        if created.status != Status.OK:
            raise ChannelDown(f"NEW_POOL refused: {created.status}")
        for start in range(0, per_pool, count):
            keys = [frontswap_key(0, slot) for slot in range(start, start + count)]
            data = os.urandom(count * PAGE_SIZE)
            pages = [data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(count)]
            request_id += 1
            reply = connection.call(Op.PUT_BATCH, request_id=request_id,
                                    pool_id=created.pool_id,
                                    payload=encode_put_batch(12, keys, pages))
            statuses = decode_batch_reply(reply.payload)[0] if reply.status == Status.OK \
                else [Status(reply.status)] * count
            report.flood_pages_sent += count
            for status in statuses:
                name = Status(status).name
                report.flood_statuses[name] = report.flood_statuses.get(name, 0) + 1
            report.flood_pages_stored += sum(status == Status.OK for status in statuses)
            report.flood_pages_refused += sum(status == Status.REFUSED for status in statuses)


def run(channel: Channel, *, seconds: float, flood_mib: int, seed: int,
        burst: int = 16) -> HostileReport:
    report = HostileReport()
    started = time.monotonic()
    rng = random.Random(seed)
    malformed(channel, report, rng, seconds, burst)
    forged(channel, report)
    flood(channel, report, flood_mib)
    channel.disconnect()
    report.seconds = round(time.monotonic() - started, 3)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tmem_workloads.hostile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--channel", default="port", help="port, port:NAME, a /dev path or unix:PATH")
    parser.add_argument("--seconds", type=float, default=20.0, help="of malformed frames")
    parser.add_argument("--flood-mib", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    report = run(open_channel(args.channel), seconds=args.seconds, flood_mib=args.flood_mib,
                 seed=args.seed)
    print(json.dumps({**asdict(report), "breached": report.breached}), flush=True)
    return 1 if report.breached else 0


if __name__ == "__main__":
    sys.exit(main())
