"""What one connection may take from tmemd: memory, descriptors, time.

tmemd serves every guest from one thread, so a client that can make it buffer
without bound, hold descriptors or wait forever harms every other guest and the
control socket. The pieces (docs/CONTROL.md, "Connection limits"):

- ``ReplyFlow``: a connection's replies in flight. A protocol takes requests from
  its codec only while the transport's write buffer plus the replies it is
  building stay under REPLY_BYTES_IN_FLIGHT; the rest wait in the codec with
  reading paused and are served, in order, once the transport drains.
- ``DurableReplies``: replies that wait for the store (what they acknowledge
  made durable) while the connection is served on; at most MAX_WAITING_PASSES
  passes' worth and REPLY_BYTES_IN_FLIGHT.
- ``ConnectionLimiter``: live connections per guest socket (ABI and NBD
  separately) and on the control socket, a reserve of descriptors that guests'
  extra connections cannot take, and handshake and idle timeouts, checked by one
  periodic sweep (no timer per connection, nothing on the per-request path).
- ``raise_descriptor_limit``: RLIMIT_NOFILE's soft limit up to the hard limit.
- ``widen_socket_buffers``: kernel socket buffers that hold a whole batch.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import resource
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

from tmem_host.replies import ConnectionGroupStats, GuestLimitStats, LimitCounters, LimitsStats

log = logging.getLogger("tmemd.limits")

#: Reply bytes one connection may have in flight: its transport's unsent bytes
#: plus the replies being built. A serving pass stops taking requests once it
#: reaches this (the reply that crosses it is finished, so one reply may exceed
#: it: at most 4 MiB, an NBD READ or an ABI GET_BATCH). With the codec's own
#: bound (one read of 256 KiB plus one request payload of at most 4 MiB), a
#: connection holds at most about 2 x 4 MiB of replies + 4.25 MiB of requests.
REPLY_BYTES_IN_FLIGHT: Final = 4 << 20
#: Kernel buffer asked for on each stream socket of tmemd and its host clients,
#: each way (the kernel doubles it for its bookkeeping, and caps the request at
#: net.core.wmem_max / rmem_max). A unix socket's default, 208 KiB, is less than
#: one 64-page batch (256 KiB and its header): each batch then leaves in pieces,
#: the sender waiting for the receiver to drain the first, one event-loop turn
#: each. docs/PERFORMANCE.md, "Socket buffers", has what it bought.
SOCKET_BUFFER_BYTES: Final = 1 << 20
#: Concurrent control connections (tmemctl, monitoring).
CONTROL_CONNECTIONS: Final = 16
#: Descriptors kept for the control socket (CONTROL_CONNECTIONS of them), each
#: guest's reconnect and what tmemd opens itself (journals, a guest added at run
#: time): a guest's extra connections are refused before they could take these.
DESCRIPTOR_RESERVE: Final = 32
# The sweep runs this often relative to the shortest timeout, within these bounds.
_SWEEPS_PER_TIMEOUT: Final = 4
_SWEEP_INTERVAL_S: Final = (0.1, 1.0)


class ConnectionKind(enum.Enum):
    ABI = "abi"
    NBD = "nbd"
    CONTROL = "control"


COUNTER_NAMES: Final = (
    # The connection was closed at once: its group (or tmemd's descriptors) was
    # full and no connection of the group was still in its handshake.
    "refused_full", "refused_descriptors",
    # A connection still in its handshake, closed to make room for a new one.
    "evicted",
    "handshake_timeouts", "idle_timeouts",
)


class LimitedConnection(Protocol):
    """What the limiter needs from a protocol."""

    @property
    def handshake_done(self) -> bool:
        """NBD: transmission reached; ABI: HELLO negotiated; control: a request received."""

    @property
    def activity(self) -> int:
        """A number that changes whenever the peer makes progress (bytes received)."""

    def close_by_limit(self, reason: str) -> None:
        """Drop the connection now (the limiter has logged why)."""


class Admission:
    """A connection's place in its group; the protocol releases it in connection_lost."""

    __slots__ = ("_limiter", "connection", "group", "accepted_at", "activity_seen", "active_at",
                 "released")

    def __init__(self, limiter: ConnectionLimiter, connection: LimitedConnection,
                 group: ConnectionGroup, now: float) -> None:
        self._limiter = limiter
        self.connection = connection
        self.group = group
        self.accepted_at = now
        self.activity_seen = connection.activity
        self.active_at = now
        self.released = False

    def release(self) -> None:
        self._limiter._release(self)


@dataclass(eq=False)
class ConnectionGroup:
    """One guest's ABI or NBD socket, or the control socket."""

    kind: ConnectionKind
    guest: str
    max_connections: int
    idle_timeout_s: float | None
    # Oldest first (dicts keep insertion order): eviction takes the oldest.
    live: dict[LimitedConnection, Admission] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)

    def oldest_in_handshake(self) -> Admission | None:
        return next((entry for connection, entry in self.live.items()
                     if not connection.handshake_done), None)

    def stats(self) -> ConnectionGroupStats:
        return cast(ConnectionGroupStats, {"connections": len(self.live),
                                           **{name: self.counters[name] for name in COUNTER_NAMES}})


class ConnectionLimiter:
    """Admits, evicts, refuses and times out connections (one per tmemd).

    Admission, per group (one guest's ABI socket, its NBD socket, the control
    socket): at ``max_connections`` live, the new connection takes the place of
    the group's oldest connection still in its handshake (a real client's
    reconnect always gets past half-open junk), or is refused without one. A
    guest connection is refused the same way when fewer than
    ``descriptor_reserve`` descriptors would remain, unless it is the only one of
    its group (a reconnect draws on the reserve). Control connections only count
    against their own limit: the reserve is theirs.
    """

    def __init__(self, *, connections_per_guest: int, handshake_timeout_s: float,
                 idle_timeout_s: float, descriptor_limit: int,
                 control_connections: int = CONTROL_CONNECTIONS,
                 descriptor_reserve: int = DESCRIPTOR_RESERVE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.connections_per_guest = connections_per_guest
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.descriptor_limit = descriptor_limit
        self.descriptor_reserve = descriptor_reserve
        self._clock = clock
        self._groups: dict[tuple[ConnectionKind, str], ConnectionGroup] = {}
        self.control = self._group(ConnectionKind.CONTROL, "", control_connections)
        # Admitted guest connections whose descriptor is not closed yet (evicted
        # ones included, until their connection_lost).
        self.guest_connections = 0
        # Descriptors that are not guest connections, counted the first time it matters.
        self._other_descriptors: int | None = None
        self.totals: Counter[str] = Counter()
        low, high = _SWEEP_INTERVAL_S
        shortest = min(handshake_timeout_s, idle_timeout_s)
        self.sweep_interval_s = min(high, max(low, shortest / _SWEEPS_PER_TIMEOUT))
        self._sweep_timer: asyncio.TimerHandle | None = None

    def _group(self, kind: ConnectionKind, guest: str, limit: int) -> ConnectionGroup:
        group = self._groups.get((kind, guest))
        if group is None:
            # Established NBD connections never time out: QEMU sends no keepalive
            # and an idle swap disk is a healthy one. The agent heartbeats every
            # second, and tmemctl asks and leaves.
            idle = None if kind is ConnectionKind.NBD else self.idle_timeout_s
            group = self._groups[(kind, guest)] = ConnectionGroup(kind, guest, limit, idle)
        return group

    # -- admission -------------------------------------------------------------

    def admit(self, connection: LimitedConnection, transport: asyncio.BaseTransport,
              kind: ConnectionKind, guest: str = "") -> Admission | None:
        """Called from connection_made. None: refused, and already closed."""
        if kind is ConnectionKind.CONTROL:
            group = self.control
        else:
            group = self._group(kind, guest, self.connections_per_guest)
        full = len(group.live) >= group.max_connections
        short = (not full and kind is not ConnectionKind.CONTROL and bool(group.live)
                 and self._descriptors_low(transport))
        if full or short:
            oldest = group.oldest_in_handshake()
            if oldest is None:
                self._count(group, "refused_full" if full else "refused_descriptors")
                log.warning("connection refused", extra={
                    "guest": group.guest or None, "socket": kind.value,
                    "reason": "connection limit" if full else "descriptor reserve",
                    "connections": len(group.live)})
                connection.close_by_limit("refused")
                return None
            self._close(oldest, "evicted", "a new connection took the place of one "
                        "still in its handshake")
        entry = Admission(self, connection, group, self._clock())
        group.live[connection] = entry
        if kind is not ConnectionKind.CONTROL:
            self.guest_connections += 1
        self._start_sweeping()
        return entry

    def _descriptors_low(self, transport: asyncio.BaseTransport) -> bool:
        """Whether fewer than the reserve would remain with this connection. Two
        lower bounds of the descriptors in use: the kernel hands out the lowest
        free number, so all below the new one are open; and the other descriptors
        (counted once) plus the live guest connections."""
        if self._other_descriptors is None:
            self._other_descriptors = max(0, open_descriptors() - self.guest_connections - 1)
        sock = transport.get_extra_info("socket")
        number = sock.fileno() if sock is not None else -1
        in_use = max(number + 1, self._other_descriptors + self.guest_connections + 1)
        return in_use > self.descriptor_limit - self.descriptor_reserve

    def _release(self, entry: Admission) -> None:
        if entry.released:
            return
        entry.released = True
        entry.group.live.pop(entry.connection, None)
        if entry.group.kind is not ConnectionKind.CONTROL:
            self.guest_connections -= 1

    def _close(self, entry: Admission, counter: str, reason: str) -> None:
        """Close an admitted connection: it leaves its group now, its descriptor
        counts until connection_lost."""
        group = entry.group
        group.live.pop(entry.connection, None)
        self._count(group, counter)
        log.info("closing connection", extra={"guest": group.guest or None,
                                              "socket": group.kind.value, "reason": reason})
        entry.connection.close_by_limit(reason)

    def _count(self, group: ConnectionGroup, counter: str) -> None:
        group.counters[counter] += 1
        self.totals[counter] += 1

    # -- timeouts ----------------------------------------------------------------

    def _start_sweeping(self) -> None:
        if self._sweep_timer is None:
            self._sweep_timer = asyncio.get_running_loop().call_later(
                self.sweep_interval_s, self._sweep_tick)

    def _sweep_tick(self) -> None:
        self._sweep_timer = None
        self.sweep()
        if any(group.live for group in self._groups.values()):
            self._start_sweeping()

    def sweep(self) -> None:
        """Close the connections past their handshake or idle timeout."""
        now = self._clock()
        handshake_timeout = self.handshake_timeout_s
        for group in self._groups.values():
            idle_timeout = group.idle_timeout_s
            waiting = [connection for connection in group.live if not connection.handshake_done]
            # QEMU's virtio-serial chardev connects when QEMU starts and stays silent
            # until the guest's agent says HELLO, minutes later or never: the newest
            # silent ABI connection waits (one 4 KiB buffer); older ones are junk.
            patient = waiting[-1] if group.kind is ConnectionKind.ABI and waiting else None
            for connection, entry in list(group.live.items()):
                if not connection.handshake_done:
                    if connection is not patient and now - entry.accepted_at >= handshake_timeout:
                        self._close(entry, "handshake_timeouts",
                                    f"no handshake within {handshake_timeout:g} s")
                    continue
                if idle_timeout is None:
                    continue
                activity = connection.activity
                if activity != entry.activity_seen:
                    entry.activity_seen = activity
                    entry.active_at = now
                elif now - entry.active_at >= idle_timeout:
                    self._close(entry, "idle_timeouts", f"idle for {idle_timeout:g} s")

    # -- stats ---------------------------------------------------------------------

    def stats(self, guests: Iterable[str]) -> LimitsStats:
        """The control ``stats`` reply's ``limits``."""
        # The counters go by name (COUNTER_NAMES), which mypy cannot follow: the
        # control tests check the reply against LimitsStats.
        empty = cast(ConnectionGroupStats, {"connections": 0, **{name: 0 for name in COUNTER_NAMES}})
        return {
            "connections_per_guest": self.connections_per_guest,
            "control_connections_max": self.control.max_connections,
            "handshake_timeout_s": self.handshake_timeout_s,
            "idle_timeout_s": self.idle_timeout_s,
            "reply_bytes_in_flight_max": REPLY_BYTES_IN_FLIGHT,
            "descriptor_limit": self.descriptor_limit,
            "descriptor_reserve": self.descriptor_reserve,
            "guest_connections": self.guest_connections,
            "totals": cast(LimitCounters, {name: self.totals[name] for name in COUNTER_NAMES}),
            "control": self.control.stats(),
            "guests": {
                guest: cast(GuestLimitStats, {
                    kind.value: (group.stats() if (group := self._groups.get((kind, guest)))
                                 else empty.copy())
                    for kind in (ConnectionKind.ABI, ConnectionKind.NBD)})
                for guest in guests
            },
        }


#: Passes whose replies may wait for the store at once (DurableReplies).
MAX_WAITING_PASSES: Final = 32


class DurableReplies:
    """A connection's replies that wait, each for the store's future that says
    what it acknowledges is durable (the remote tier's writes acknowledged by the
    cluster), sent strictly in order: a reply leaves once its own future and
    every reply before it have. Meanwhile the protocol serves on, so the next
    requests' work overlaps the store's.

    ``add`` says when the protocol must stop serving until the first waiting
    reply can leave (``first_waiting``): MAX_WAITING_PASSES passes or
    REPLY_BYTES_IN_FLIGHT wait. ``bytes`` count against the pass's room. An EOF
    while replies wait is held (``hold_eof``): the transport closes once they
    are sent.
    """

    __slots__ = ("_make_outcome_durable", "_transport", "_waiting", "bytes", "_eof")

    def __init__(self, make_outcome_durable: Callable[[], object]) -> None:
        # Called before replies leave whose futures completed: durability fsync
        # syncs the records of those writes' outcomes (a page the cluster refused
        # is back in memory, its journal record written).
        self._make_outcome_durable = make_outcome_durable
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[tuple[bytes, asyncio.Future[None] | None]] = deque()
        self.bytes = 0
        self._eof = False

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def detach(self) -> None:
        self._transport = None
        self._waiting.clear()
        self.bytes = 0

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def add(self, reply: bytes, waiter: asyncio.Future[None] | None) -> bool:
        """Send ``reply`` once ``waiter`` (None: nothing) and the replies before it
        have completed; True if the protocol must stop serving (see the class)."""
        transport = self._transport
        if transport is None:
            return False
        if waiter is None and not self._waiting:
            transport.write(reply)
            return False
        self._waiting.append((reply, waiter))
        self.bytes += len(reply)
        if waiter is not None:
            waiter.add_done_callback(self._send_ready)
        return len(self._waiting) >= MAX_WAITING_PASSES or self.bytes >= REPLY_BYTES_IN_FLIGHT

    def first_waiting(self) -> asyncio.Future[None]:
        """The future the first reply that cannot leave waits for (its callback,
        which sends, runs before any added later)."""
        return next(waiter for _, waiter in self._waiting if waiter is not None)

    def send_all(self, reply: bytes) -> None:
        """The connection is closing: every reply now, then ``reply``, whatever the
        store does (a page the tier fails to take stays in memory, Store.strand)."""
        pieces = [waiting for waiting, _ in self._waiting]
        self._waiting.clear()
        self.bytes = 0
        if self._transport is not None:
            self._transport.write(b"".join([*pieces, reply]))

    def hold_eof(self) -> bool:
        """At EOF: True (keep the transport open) if replies wait."""
        self._eof = bool(self._waiting)
        return self._eof

    def _send_ready(self, _: asyncio.Future[None] | None = None) -> None:
        transport = self._transport
        ready: list[bytes] = []
        while self._waiting:
            reply, waiter = self._waiting[0]
            if waiter is not None and not waiter.done():
                break
            self._waiting.popleft()
            self.bytes -= len(reply)
            ready.append(reply)
        if not ready or transport is None:
            return
        self._make_outcome_durable()
        transport.write(b"".join(ready))
        if self._eof and not self._waiting:
            transport.close()


class ReplyFlow:
    """Bounds one connection's replies in flight to REPLY_BYTES_IN_FLIGHT.

    The protocol serves requests in passes: a pass builds replies until ``room()``
    bytes are used up or the codec needs data, writes them in one write, and
    reports with ``pass_done(backlog)``. With a backlog (requests left in the
    codec) reading stays paused, and ``serve_backlog`` (the protocol's pass) runs
    again once the transport has room: at once (from the event loop, not nested)
    if it already has, else when asyncio calls resume_writing. Requests are
    served in the order they arrived; EOF cannot overtake them, as nothing is
    read while a backlog waits.

    A pass may also stop on the store (``suspend``: the remote tier is reading
    pages back, or its writes must land before the replies go): reading stays
    paused and nothing is served until the store's future completes; then the
    protocol's ``resume`` finishes the pass.
    """

    __slots__ = ("_serve_backlog", "_transport", "_backlogged", "_writing_paused", "_scheduled",
                 "suspended")

    def __init__(self, serve_backlog: Callable[[], None]) -> None:
        self._serve_backlog = serve_backlog
        self._transport: asyncio.Transport | None = None
        self._backlogged = False
        self._writing_paused = False
        self._scheduled = False
        #: A pass waits for the store: serve nothing until it resumes.
        self.suspended = False

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        # asyncio pauses writing above this; resume_writing comes at a quarter of it.
        transport.set_write_buffer_limits(high=REPLY_BYTES_IN_FLIGHT)

    def detach(self) -> None:
        self._transport = None

    @property
    def backlogged(self) -> bool:
        return self._backlogged

    def room(self) -> int:
        """Reply bytes the next pass may build."""
        transport = self._transport
        return REPLY_BYTES_IN_FLIGHT - (transport.get_write_buffer_size() if transport else 0)

    def pass_done(self, backlog: bool) -> None:
        """After a pass's write: ``backlog`` if it stopped with requests left."""
        transport = self._transport
        if transport is None:
            return
        if backlog:
            if not self._backlogged:
                self._backlogged = True
                transport.pause_reading()
            if not self._writing_paused:
                self._schedule()
        elif self._backlogged:
            self._backlogged = False
            if not self._writing_paused:
                transport.resume_reading()

    def suspend(self, waiter: asyncio.Future[None], resume: Callable[[], None]) -> None:
        """Stop serving until ``waiter`` completes, then call ``resume`` (which
        serves again, and so calls pass_done)."""
        self.suspended = True
        # Requests may be left in the codec: a backlog, so pass_done resumes reading.
        self._backlogged = True
        if self._transport is not None:
            self._transport.pause_reading()

        def wake(_: asyncio.Future[None]) -> None:
            self.suspended = False
            transport = self._transport
            if transport is not None and not transport.is_closing():
                resume()

        waiter.add_done_callback(wake)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.suspended:
            return  # the store's future resumes the pass
        if self._backlogged:
            self._schedule()
        elif self._transport is not None:
            self._transport.resume_reading()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        transport = self._transport
        if (self._backlogged and not self._writing_paused and not self.suspended and transport is not None
                and not transport.is_closing()):
            self._serve_backlog()


def raise_descriptor_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:  # an infinite hard limit above fs.nr_open
            log.warning("cannot raise the descriptor limit",
                        extra={"soft": soft, "hard": hard, "error": str(error)})
    return soft if soft != resource.RLIM_INFINITY else _nr_open()


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as nr_open:
            return int(nr_open.read())
    except (OSError, ValueError):
        return 1 << 20


def open_descriptors() -> int:
    """The descriptors this process has open (0 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except OSError:
        return 0


class SocketOptions(Protocol):
    """What widen_socket_buffers needs: a socket, or asyncio's view of one."""

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...

    def getsockopt(self, level: int, option: int, /) -> int: ...


def widen_socket_buffers(sock: SocketOptions | None) -> int:
    """Ask for SOCKET_BUFFER_BYTES of send and receive buffer on ``sock``; returns
    the send buffer the kernel granted (0 if the socket takes no such option)."""
    if sock is None:
        return 0
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:  # not a socket that takes them
        return 0


def check_socket_buffers() -> int:
    """The send buffer each connection will get; a warning if the host caps it
    below SOCKET_BUFFER_BYTES (net.core.wmem_max: batches then leave in pieces)."""
    ours, peer = socket.socketpair()
    with ours, peer:
        granted = widen_socket_buffers(ours)
    if granted < SOCKET_BUFFER_BYTES:
        log.warning("socket buffers are capped below what batches need",
                    extra={"granted": granted, "asked": SOCKET_BUFFER_BYTES,
                           "fix": f"sysctl net.core.wmem_max={SOCKET_BUFFER_BYTES} "
                                  f"net.core.rmem_max={SOCKET_BUFFER_BYTES}"})
    return granted
