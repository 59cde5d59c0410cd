"""The sans-IO NBD codec: handshake and transmission, whole, split and byte-at-a-time."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmem_wire import nbd

GREETING_BYTES = struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 3)


def client_option(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data


def info_data(name: str, requested: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requested))
            + struct.pack(f">{len(requested)}H", *requested))


def client_request(command: int, handle: int, offset: int, length: int,
                   data: bytes = b"", flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, command, handle, offset, length) + data


def parse_option_replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    """Split server option replies into (option, reply type, data)."""
    replies = []
    position = 0
    while position < len(raw):
        magic, option, reply_type, length = struct.unpack_from(">QIII", raw, position)
        assert magic == nbd.OPTION_REPLY_MAGIC
        position += 20
        replies.append((option, reply_type, raw[position : position + length]))
        position += length
    return replies


def drain(connection: nbd.NbdServerConnection | nbd.TransmissionDecoder) -> list[object]:
    events: list[object] = []
    while True:
        event = connection.next_event()
        if event is nbd.NEED_DATA or event is nbd.PAUSED:
            return events
        events.append(event)
        if isinstance(event, nbd.ConnectionClosed):
            return events


def chunks(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    position = 0
    for size in sizes:
        yield data[position : position + size]
        position += size
    if data[position:]:  # b"" would mean end of stream
        yield data[position:]


def started_connection() -> nbd.NbdServerConnection:
    connection = nbd.NbdServerConnection()
    assert connection.send(nbd.Greeting()) == GREETING_BYTES
    return connection


EXPORT = nbd.ExportInfo(
    name="g1", size=1 << 30,
    transmission_flags=nbd.TransmissionFlag.HAS_FLAGS | nbd.TransmissionFlag.SEND_FLUSH,
    minimum_block=4096, preferred_block=4096, maximum_payload=1 << 25, description="tmem swap",
)


def test_go_handshake_then_transmission() -> None:
    connection = started_connection()
    connection.receive_data(struct.pack(">I", 3))
    assert drain(connection) == [nbd.ClientFlags(nbd.ClientFlag(3))]

    connection.receive_data(client_option(nbd.Option.STRUCTURED_REPLY))
    [event] = drain(connection)
    assert event == nbd.OtherOption(nbd.Option.STRUCTURED_REPLY, b"")
    reply = connection.send(nbd.OptionError(nbd.ReplyType.ERR_UNSUP, "no"))
    assert parse_option_replies(reply) == [(8, nbd.ReplyType.ERR_UNSUP, b"no")]

    requested = (nbd.InfoType.BLOCK_SIZE, nbd.InfoType.NAME, nbd.InfoType.DESCRIPTION)
    # The client pipelines a request right behind GO: it must parse as transmission.
    write = client_request(nbd.Command.WRITE, 7, 4096, 4096, b"x" * 4096)
    connection.receive_data(client_option(nbd.Option.GO, info_data("g1", requested)) + write)
    [event] = drain(connection)
    assert event == nbd.InfoOption(nbd.Option.GO, "g1", requested)
    assert connection.next_event() is nbd.PAUSED
    replies = parse_option_replies(connection.send(EXPORT))
    assert replies == [
        (7, nbd.ReplyType.INFO, struct.pack(">HQH", 0, 1 << 30, 5)),
        (7, nbd.ReplyType.INFO, struct.pack(">HIII", 3, 4096, 4096, 1 << 25)),
        (7, nbd.ReplyType.INFO, b"\x00\x01g1"),
        (7, nbd.ReplyType.INFO, b"\x00\x02tmem swap"),
        (7, nbd.ReplyType.ACK, b""),
    ]
    assert connection.phase is nbd.Phase.TRANSMISSION
    assert drain(connection) == [nbd.Request(nbd.Command.WRITE, 0, 7, 4096, 4096, b"x" * 4096)]
    assert connection.send(nbd.SimpleReply(7)) == struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, 7)
    connection.receive_data(client_request(nbd.Command.DISC, 8, 0, 0))
    assert drain(connection) == [nbd.Request(nbd.Command.DISC, 0, 8, 0, 0), nbd.ConnectionClosed()]


def test_info_list_unknown_then_export_name_without_zeroes_flag() -> None:
    connection = started_connection()
    connection.receive_data(struct.pack(">I", 1))  # FIXED_NEWSTYLE only: zero padding expected
    connection.receive_data(client_option(nbd.Option.INFO, info_data("nope")))
    assert drain(connection) == [nbd.ClientFlags(nbd.ClientFlag.FIXED_NEWSTYLE),
                                 nbd.InfoOption(nbd.Option.INFO, "nope", ())]
    assert parse_option_replies(connection.send(nbd.OptionError(nbd.ReplyType.ERR_UNKNOWN))) == [
        (6, nbd.ReplyType.ERR_UNKNOWN, b"")]
    assert connection.phase is nbd.Phase.OPTIONS

    connection.receive_data(client_option(nbd.Option.LIST))
    assert drain(connection) == [nbd.ListOption()]
    assert parse_option_replies(connection.send(nbd.ExportList(("g1",)))) == [
        (3, nbd.ReplyType.SERVER, b"\x00\x00\x00\x02g1"), (3, nbd.ReplyType.ACK, b"")]

    connection.receive_data(client_option(nbd.Option.LIST, b"junk"))
    [malformed] = drain(connection)
    assert isinstance(malformed, nbd.MalformedOption) and malformed.option == nbd.Option.LIST
    connection.send(nbd.OptionError(nbd.ReplyType.ERR_INVALID, malformed.reason))

    connection.receive_data(client_option(nbd.Option.EXPORT_NAME, b"g1"))
    assert drain(connection) == [nbd.ExportNameOption("g1")]
    with pytest.raises(ValueError):
        connection.send(nbd.OptionError(nbd.ReplyType.ERR_UNSUP))
    reply = connection.send(nbd.ExportChosen(1 << 20, nbd.TransmissionFlag.HAS_FLAGS))
    assert reply == struct.pack(">QH", 1 << 20, 1) + bytes(124)
    connection.receive_data(b"")
    assert drain(connection) == [nbd.ConnectionClosed()]


def test_abort_ends_the_session() -> None:
    connection = started_connection()
    connection.receive_data(struct.pack(">I", 3) + client_option(nbd.Option.ABORT))
    assert drain(connection) == [nbd.ClientFlags(nbd.ClientFlag(3)), nbd.AbortOption()]
    assert parse_option_replies(connection.send(nbd.OptionReply(nbd.ReplyType.ACK))) == [
        (2, nbd.ReplyType.ACK, b"")]
    assert connection.next_event() == nbd.ConnectionClosed()


@pytest.mark.parametrize("raw, message", [
    (struct.pack(">I", 4), "client flags"),  # a flag the server never advertised
    (struct.pack(">I", 3) + struct.pack(">QII", 0x1234, 7, 0), "option magic"),
    (struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, 7, nbd.MAX_OPTION_DATA + 1), "exceeds"),
    (struct.pack(">I", 3) + client_option(nbd.Option.GO)[:10] + b"", None),
])
def test_malformed_handshake_raises_protocol_error(raw: bytes, message: str | None) -> None:
    connection = started_connection()
    connection.receive_data(raw)
    connection.receive_data(b"")  # EOF makes a truncated message an error too
    with pytest.raises(nbd.NbdProtocolError, match=message):
        drain(connection)


def test_transmission_decoder_alone() -> None:
    decoder = nbd.TransmissionDecoder(max_payload=8192)
    stream = (client_request(nbd.Command.READ, 1, 0, 65536)
              + client_request(nbd.Command.WRITE, 2, 8192, 8192, bytes(range(256)) * 32)
              + client_request(nbd.Command.TRIM, 3, 0, 1 << 20)
              + client_request(nbd.Command.WRITE_ZEROES, 4, 0, 4096,
                               flags=nbd.CommandFlag.NO_HOLE | nbd.CommandFlag.FAST_ZERO))
    for byte in stream:
        decoder.receive_data(bytes([byte]))
    events = drain(decoder)
    assert [(e.command, e.handle, e.length, len(e.data)) for e in events if isinstance(e, nbd.Request)] == [
        (0, 1, 65536, 0), (1, 2, 8192, 8192), (4, 3, 1 << 20, 0), (6, 4, 4096, 0)]
    assert isinstance(events[-1], nbd.Request) and events[-1].flags == 0b10010
    decoder.receive_data(client_request(nbd.Command.WRITE, 5, 0, 8193, bytes(8193)))
    with pytest.raises(nbd.NbdProtocolError, match="exceeds"):
        decoder.next_event()
    header = bytearray(20)
    nbd.pack_simple_reply_into(header, 4, 0xDEADBEEF, nbd.Error.EIO)
    assert bytes(header[4:]) == nbd.encode_simple_reply(0xDEADBEEF, nbd.Error.EIO)
    assert nbd.encode_simple_reply(9, data=b"abc")[16:] == b"abc"


def test_transmission_eof_mid_request_is_an_error_and_at_boundary_is_not() -> None:
    decoder = nbd.TransmissionDecoder()
    decoder.receive_data(client_request(nbd.Command.FLUSH, 1, 0, 0))
    decoder.receive_data(b"")
    assert drain(decoder) == [nbd.Request(nbd.Command.FLUSH, 0, 1, 0, 0), nbd.ConnectionClosed()]
    decoder = nbd.TransmissionDecoder()
    decoder.receive_data(client_request(nbd.Command.WRITE, 1, 0, 4096, bytes(100)))
    assert decoder.next_event() is nbd.NEED_DATA
    decoder.receive_data(b"")
    with pytest.raises(nbd.NbdProtocolError, match="middle"):
        decoder.next_event()
    with pytest.raises(nbd.NbdProtocolError):
        decoder.receive_data(b"more")


def full_session_stream() -> bytes:
    return (struct.pack(">I", 3)
            + client_option(nbd.Option.STRUCTURED_REPLY)
            + client_option(nbd.Option.GO, info_data("g1", (nbd.InfoType.BLOCK_SIZE,)))
            + client_request(nbd.Command.WRITE, 1, 0, 4096, b"\xab" * 4096)
            + client_request(nbd.Command.READ, 2, 0, 4096)
            + client_request(nbd.Command.DISC, 3, 0, 0))


def run_session(pieces: Iterator[bytes]) -> tuple[list[object], bytes]:
    """Serve a session the way a server would: answer options, collect events."""
    connection = started_connection()
    events: list[object] = []
    output = b""
    for piece in pieces:
        connection.receive_data(piece)
        while True:
            event = connection.next_event()
            if event is nbd.NEED_DATA or isinstance(event, nbd.ConnectionClosed):
                break
            assert event is not nbd.PAUSED
            events.append(event)
            if isinstance(event, nbd.OtherOption):
                output += connection.send(nbd.OptionError(nbd.ReplyType.ERR_UNSUP))
            elif isinstance(event, nbd.MalformedOption):
                output += connection.send(nbd.OptionError(nbd.ReplyType.ERR_INVALID))
            elif isinstance(event, nbd.InfoOption):
                output += connection.send(EXPORT)
            elif isinstance(event, nbd.ListOption):
                output += connection.send(nbd.ExportList(("g1",)))
            elif isinstance(event, nbd.AbortOption):
                output += connection.send(nbd.OptionReply(nbd.ReplyType.ACK))
            elif isinstance(event, nbd.ExportNameOption):
                output += connection.send(nbd.ExportChosen(1 << 20, nbd.TransmissionFlag.HAS_FLAGS))
            elif isinstance(event, nbd.Request) and event.command != nbd.Command.DISC:
                output += connection.send(nbd.SimpleReply(event.handle))
    return events, output


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=64), max_size=40))
def test_any_split_gives_the_same_events_and_bytes(sizes: list[int]) -> None:
    stream = full_session_stream()
    assert run_session(chunks(stream, sizes)) == run_session(iter([stream]))
    assert run_session(iter([bytes([b]) for b in stream]))[0] == run_session(iter([stream]))[0]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300), st.booleans())
def test_garbage_raises_only_protocol_errors(garbage: bytes, cut: int, transmission: bool) -> None:
    stream = full_session_stream()
    handshake_length = 4 + len(client_option(8)) + len(client_option(7, info_data("g1", (3,))))
    prefix = stream[:handshake_length] if transmission else stream[:cut]
    try:
        run_session(iter([prefix, garbage, b""]))
    except nbd.NbdProtocolError:
        pass
    decoder = nbd.TransmissionDecoder(max_payload=4096)
    try:
        decoder.receive_data(garbage)
        decoder.receive_data(b"")
        drain(decoder)
    except nbd.NbdProtocolError:
        pass


def test_iops_throttle_is_qemus_leaky_bucket() -> None:
    from tmem_host.nbd.export import IopsThrottle

    throttle = IopsThrottle(200)  # a burst of 20 operations, then 200 a second
    assert throttle.charge(1, now=10.0) == 0.0  # an idle disk: no wait
    assert throttle.charge(24, now=10.0) == 0.0  # the bucket held 1: room for the burst
    assert throttle.charge(1, now=10.0) == pytest.approx((25 - 20) / 200)  # past the burst
    assert throttle.charge(0, now=10.0) == 0.0
    # 10 ms later the bucket leaked 2: 24 in it, 4 past the burst.
    assert throttle.charge(1, now=10.01) == pytest.approx(4 / 200)
    assert throttle.charge(1, now=20.0) == 0.0  # idle meanwhile: no debt
    # A client slower than 200 a second (one every 6 ms) never waits.
    assert all(throttle.charge(1, now=30.0 + 0.006 * n) == 0.0 for n in range(1000))
    with pytest.raises(ValueError):
        IopsThrottle(0)
