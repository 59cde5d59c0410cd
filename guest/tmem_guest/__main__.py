"""The guest agent's command line.

    python3 -m tmem_guest start --swap batched [--cache SOURCE MOUNTPOINT] [options]
    python3 -m tmem_guest stats            # every frontend's counters, one JSON object
    python3 -m tmem_guest find-disk SERIAL # the /dev path of the virtio disk with this serial

`start` runs in the foreground until SIGTERM/SIGINT, then swapoff, unmount and
exit. It writes /run/tmem-agent/ready once swap is on and the cache mounted.
One process serves both frontends because a virtio-serial port has one opener.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from tmem_guest import counters, system
from tmem_guest.channel import open_channel
from tmem_guest.session import DEFAULT_HEARTBEAT_S, DEFAULT_REQUEST_TIMEOUT_S, Session
from tmem_guest.swap import READ_RECONNECT_WAIT_S, READAHEAD_PAGES
from tmem_wire.agent import AGENT_LOG_FILE, AGENT_MODES, AGENT_READY_FILE, DISK_SERIALS

log = logging.getLogger("tmem_guest")

READY_FILE = Path(AGENT_READY_FILE)
# Every agent thread's stack is locked by mlockall(MCL_FUTURE): keep them small
# (Python's default 8 MiB each would pin tens of MiB in a 256 MiB guest).
THREAD_STACK_BYTES = 512 * 1024


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m tmem_guest", description="tmem guest agent")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run the agent (foreground)")
    start.add_argument("--channel", default="port", help="port, port:NAME, a /dev path, or unix:PATH")
    start.add_argument("--swap", choices=AGENT_MODES, help="serve frontswap in this mode")
    start.add_argument("--swap-disk-serial", default=DISK_SERIALS["swap"], help="virtio-blk serial of the fallback disk")
    start.add_argument("--nbd", default="/dev/nbd0", type=Path, help="the NBD device to serve")
    start.add_argument("--swap-mib", type=int, default=0, help="swap size (default: the fallback disk's size)")
    start.add_argument("--swap-priority", type=int, default=10)
    start.add_argument("--swap-type", type=int, default=0, help="swap area number in the frontswap keys")
    start.add_argument("--depth", type=int, default=4, help="pipelined mode: NBD requests served at once")
    start.add_argument("--cache", nargs=2, metavar=("SOURCE", "MOUNTPOINT"), help="cleancache FUSE mount")
    start.add_argument("--no-lock", action="store_true", help="skip mlockall/IO_FLUSHER (experiments only)")
    start.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, metavar="S",
                       help="a request unanswered this long takes the session down (a stopped tmemd); "
                       "new swap pages then go to the fallback disk")
    start.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S, metavar="S",
                       help="an idle session sends a STATS this often (notices a dead tmemd, sees drain requests)")
    start.add_argument("--read-wait", type=float, default=READ_RECONNECT_WAIT_S, metavar="S",
                       help="how long a swap read of a page in tmem waits for a lost session (then EIO)")
    start.add_argument("--readahead", type=int, default=READAHEAD_PAGES, metavar="PAGES",
                       help="batched/pipelined swap: tmem pages fetched ahead of small reads (0: off)")
    start.add_argument("--stats-interval", type=float, default=1.0)
    start.add_argument("--verbose", action="store_true")
    commands.add_parser("stats", help="print the agent's counters as JSON")
    find_disk = commands.add_parser("find-disk", help="print the /dev path of the virtio disk with this serial")
    find_disk.add_argument("serial")
    return parser.parse_args(argv)


def run_agent(arguments: argparse.Namespace) -> int:
    from tmem_guest.swap import FallbackDisk, NbdSwapServer, SwapStore
    from tmem_wire.frontswap import Where

    # The session's timeouts also bound a send to a host that stopped reading.
    channel = open_channel(arguments.channel, send_timeout=arguments.request_timeout)
    session = Session(channel, request_timeout=arguments.request_timeout, heartbeat_interval=arguments.heartbeat)

    threading.stack_size(THREAD_STACK_BYTES)
    if arguments.swap and not arguments.no_lock:
        system.lock_memory()
        system.become_io_flusher()
        system.write_sysctls(system.SWAP_AGENT_SYSCTLS)
    READY_FILE.unlink(missing_ok=True)
    swap_pool = session.register_pool(persistent=True) if arguments.swap else None
    cache_pool = session.register_pool(persistent=False) if arguments.cache else None
    session.start()
    if not session.wait_up(10):
        log.warning("tmemd not reachable yet: starting on the fallback paths")
    stopping = threading.Event()
    publishers: list[counters.StatsPublisher] = []
    server: NbdSwapServer | None = None
    if arguments.swap:
        assert swap_pool is not None
        disk = FallbackDisk(system.find_disk_by_serial(arguments.swap_disk_serial))
        swap_counters = counters.Counters("swap", arguments.swap)
        slot_count = (arguments.swap_mib << 20 >> 12) if arguments.swap_mib else None
        store = SwapStore(
            session, swap_pool, disk, swap_counters, batched=arguments.swap != "sync",
            swap_type=arguments.swap_type, slot_count=slot_count, read_wait=arguments.read_wait,
            readahead=arguments.readahead,
        )
        server = NbdSwapServer(arguments.nbd, store, mode=arguments.swap, depth=arguments.depth)
        server.start()
        threading.Thread(target=store.maintain, args=(stopping,), name="swap-maintenance", daemon=True).start()
        subprocess.run(["mkswap", str(arguments.nbd)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["swapon", "-p", str(arguments.swap_priority), "--discard", str(arguments.nbd)], check=True)
        publishers.append(
            counters.StatsPublisher(
                "swap",
                lambda: swap_counters.snapshot(
                    {
                        "session_up": session.is_up,
                        "connections": session.connections,
                        "pool_id": swap_pool.pool_id,
                        "slots_in_tmem": store.slots.count(Where.TMEM),
                        "slots_on_disk": store.slots.count(Where.DISK),
                        "slots_unsure": store.unsure.count(),
                        "session_timeouts": session.timeouts,
                        "late_replies": session.late_replies,
                        "pools_resumed": session.pools_resumed,
                        "draining": session.draining,
                    }
                ),
                interval=arguments.stats_interval,
            )
        )
    for publisher in publishers:
        publisher.start()

    def request_stop(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        if arguments.cache:
            from tmem_guest.cache import serve_cache

            assert cache_pool is not None
            source, mountpoint = (Path(path) for path in arguments.cache)
            cache_counters = counters.Counters("cache", "batched")
            cache_publisher = counters.StatsPublisher(
                "cache", lambda: cache_counters.snapshot({"pool_id": cache_pool.pool_id}), interval=arguments.stats_interval
            )
            cache_publisher.start()
            publishers.append(cache_publisher)
            serve_cache(session, cache_pool, cache_counters, source, mountpoint, ready=READY_FILE, stopping=stopping)
        else:
            counters.write_text_atomically(READY_FILE, f"{os.getpid()}\n")
            while not stopping.wait(1.0):
                if server is not None and server.finished.is_set():
                    log.error("the NBD device went away")
                    return 1
    finally:
        if server is not None:
            subprocess.run(["swapoff", str(arguments.nbd)], check=False)
            server.disconnect()
            server.close()
        session.stop()
        for publisher in publishers:
            publisher.stop()
        READY_FILE.unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.command == "stats":
        print(json.dumps(counters.read_all(), sort_keys=True))
        return 0
    if arguments.command == "find-disk":
        try:
            print(system.find_disk_by_serial(arguments.serial))
        except FileNotFoundError as error:
            print(f"tmem_guest: {error}", file=sys.stderr)
            return 1
        return 0
    if arguments.swap and (swap_backed := system.swap_backed_outputs()):
        print(f"tmem_guest: refusing to serve swap while writing to swap-backed files ({'; '.join(swap_backed)}): "
              f"their pages swap out through this agent, and a write would wait on the agent itself; "
              f"log to a disk file such as {AGENT_LOG_FILE}", file=sys.stderr)
        return 2
    if arguments.swap and not arguments.no_lock and not system.with_allocator_settings():
        # Swap agent: its memory must be reused, not returned and faulted in again (system.py).
        system.reexec_with_allocator_settings("tmem_guest", list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(asctime)s %(threadName)s %(name)s: %(message)s",
    )
    return run_agent(arguments)


if __name__ == "__main__":
    sys.exit(main())
