"""`tmemd`: the transcendent-memory host daemon (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
import ctypes
import ctypes.util
import logging
import sys
from pathlib import Path

from tmem_host.daemon.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    OneLineArgumentParser,
    build_config,
    load_toml,
)
from tmem_host.daemon.logsetup import configure_logging
from tmem_host.daemon.server import Daemon
from tmem_host.journal.journaled import DURABILITY_LEVELS

log = logging.getLogger("tmemd")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="tmemd",
        description="Serve transcendent memory to QEMU guests over per-guest unix sockets.",
    )
    parser.add_argument("--run-dir", help="directory for sockets, pid file, fallbacks")
    parser.add_argument("--budget", help="memory budget for stored pages, e.g. 512M")
    parser.add_argument(
        "--guest", dest="guests", action="append", default=[], metavar="SPEC",
        help="NAME[:weight=W][:cap=SIZE][:shared=UUID,...][:dedup][:cid=N]; repeatable",
    )
    parser.add_argument("--config", type=Path, help="TOML file with the same settings")
    parser.add_argument("--no-compress", dest="compress", action="store_const", const=False,
                        default=None, help="store pages uncompressed")
    parser.add_argument("--nbd-size", help="size of each guest's NBD swap export (default 1G)")
    parser.add_argument("--state-dir",
                        help="directory for the journals and NBD fallback files (default: run dir)")
    parser.add_argument("--durability", choices=DURABILITY_LEVELS,
                        help="what survives a crash (default journal; docs/RELIABILITY.md)")
    parser.add_argument("--no-journal", dest="journal", action="store_const", const=False,
                        default=None, help="the same as --durability none")
    parser.add_argument("--no-preallocate", dest="preallocate", action="store_const",
                        const=False, default=None,
                        help="do not allocate fallback files and journal room up front")
    parser.add_argument("--journal-reserve", metavar="SIZE",
                        help="disk kept allocated past each journal's end (default 64M)")
    parser.add_argument("--socket-group", metavar="GROUP",
                        help="make the sockets group-accessible (0660) to this group or gid")
    parser.add_argument("--connections-per-guest", type=int, metavar="N",
                        help="connections each guest may hold open (default 8)")
    parser.add_argument("--handshake-timeout", type=float, metavar="SECONDS",
                        help="time a new connection has to say HELLO (default 10)")
    parser.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                        help="close a connection silent this long (default 300)")
    parser.add_argument("--vsock-port", type=int, help="also listen on AF_VSOCK at this port")
    parser.add_argument(
        "--guest-cid", dest="guest_cids", action="append", default=[], metavar="NAME=CID",
        help="vsock peer CID that identifies a configured guest; repeatable",
    )
    parser.add_argument("--remote", metavar="HOST:PORT[,...]",
                        help="Redis Cluster seed nodes: persistent pages that do not fit "
                        "go there (docs/REMOTE.md)")
    parser.add_argument("--remote-replicas", type=int, metavar="N",
                        help="acknowledge a remote write once N replicas have it (WAIT; default 0)")
    parser.add_argument("--remote-wait", type=float, metavar="SECONDS",
                        help="how long remote requests retry before the cluster counts as "
                        "unreachable (default 10)")
    parser.add_argument("--remote-budget", metavar="SIZE",
                        help="remote bytes all guests may use, shared by weight (default: no limit)")
    parser.add_argument("--remote-read-ahead", type=int, metavar="N",
                        help="64-page neighbourhoods read ahead of gets that walk a guest's pages "
                        "in order (default 2; 0: none)")
    parser.add_argument("--fallback-iops", type=int, metavar="N",
                        help="the NBD fallback files answer as a disk of N operations per second "
                             "(frontswap's real swap disk; default 0: page-cache speed)")
    parser.add_argument("--encoder-threads", type=int, metavar="N",
                        help="threads that compress PUT_BATCH pages while the event loop serves "
                             "(default 1; 0: the event loop compresses them)")
    parser.add_argument("--host-id", help="this tmemd's name among hosts sharing a cluster "
                        "(default: the hostname)")
    parser.add_argument("--log-level", choices=LOG_LEVELS)
    parser.add_argument("--log-format", choices=LOG_FORMATS)
    return parser


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_batch_buffers_on_the_heap() -> bool:
    """Serve batch-sized buffers (a 256 KiB frame, its payload, the reply) from the
    heap instead of a fresh mmap each time: glibc's default maps and unmaps them
    per frame, and the page faults cost a third of tmemd's CPU per batched page.
    Returns whether glibc took the settings (other libcs: nothing to tune)."""
    libc_path = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc_path), "mallopt", None) if libc_path else None
    if mallopt is None:
        return False
    # Above the largest frame (4 MiB + 64) and below glibc's 32 MiB limit.
    took_mmap = mallopt(M_MMAP_THRESHOLD, 16 << 20)
    took_trim = mallopt(M_TRIM_THRESHOLD, 128 << 20)
    return bool(took_mmap and took_trim)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = build_config(
            file_settings=load_toml(args.config) if args.config else {},
            run_dir=args.run_dir,
            budget=args.budget,
            guest_specs=args.guests,
            guest_cids=args.guest_cids,
            compress=args.compress,
            nbd_size=args.nbd_size,
            vsock_port=args.vsock_port,
            log_level=args.log_level,
            log_format=args.log_format,
            state_dir=args.state_dir,
            journal=args.journal,
            durability=args.durability,
            preallocate=args.preallocate,
            journal_reserve=args.journal_reserve,
            socket_group=args.socket_group,
            connections_per_guest=args.connections_per_guest,
            handshake_timeout=args.handshake_timeout,
            idle_timeout=args.idle_timeout,
            remote=args.remote,
            remote_replicas=args.remote_replicas,
            remote_wait=args.remote_wait,
            remote_budget=args.remote_budget,
            remote_read_ahead=args.remote_read_ahead,
            host_id=args.host_id,
            fallback_iops=args.fallback_iops,
            encoder_threads=args.encoder_threads,
        )
    except ConfigError as exc:
        print(f"tmemd: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    log.debug("malloc tuned for batch buffers", extra={"tuned": keep_batch_buffers_on_the_heap()})
    try:
        # Whatever umask tmemd was started under, what it creates is its own; the
        # sockets then get the configured mode (docs/RELIABILITY.md, "Threat model").
        os.umask(0o077)
        asyncio.run(Daemon(config).run())
    except (ConfigError, OSError) as exc:  # OSError: a socket that cannot be created
        log.error("cannot start", extra={"reason": str(exc)})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
