"""tmemd's core: the store, per-guest listeners, the control socket, lifecycle.

Everything runs on one asyncio loop in one thread, so the store (which is
not thread-safe) is only ever touched from here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import logging
import os
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tmem_host.daemon.config import (
    ConfigError,
    check_weight,
    DaemonConfig,
    GuestConfig,
    guest_from_mapping,
    parse_cap,
    parse_size,
    validate_guest_name,
)
from tmem_host.daemon.control import (
    CONTROL_SOCKET_NAME,
    ControlError,
    ControlServerProtocol,
)
from tmem_host.daemon.limits import ConnectionLimiter, raise_descriptor_limit
from tmem_host.daemon.session import AbiSession
from tmem_host.daemon.vsock import guest_for_peer, open_vsock_listener
from tmem_host.journal.journaled import JournaledStore, journal_path
from tmem_host.nbd.export import ExportStart, NbdConnection, NbdExport
from tmem_host.statefiles import open_state_file, prepare_private_dir
from tmem_host.store import Client, Store
from tmem_wire.abi import PoolFlag, PoolStats, Status

log = logging.getLogger("tmemd")

PID_FILE_NAME = "tmemd.pid"
READY_LINE = "tmemd ready"


def abi_socket_path(run_dir: Path, guest: str) -> Path:
    return run_dir / f"{guest}.tmem.sock"


def nbd_socket_path(run_dir: Path, guest: str) -> Path:
    return run_dir / f"{guest}.nbd.sock"


def fallback_path(state_dir: Path, guest: str) -> Path:
    return state_dir / f"{guest}.fallback"


@dataclass(eq=False)
class GuestRuntime:
    """A configured guest: its store client, listeners and live connections."""

    config: GuestConfig
    client: Client
    abi_server: asyncio.Server
    nbd_export: NbdExport
    nbd_server: asyncio.Server
    sessions: set[AbiSession] = field(default_factory=set)
    connections_total: int = 0
    # `tmemctl drain` until `thaw`: puts refused (frozen), replies carry Flag.DRAIN.
    draining: bool = False
    # The NBD export's drain (its pages to its fallback file), while it runs.
    export_drain: asyncio.Task[int] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def connected(self) -> int:
        """Live connections to the guest's ABI and NBD sockets."""
        return len(self.sessions) + self.nbd_export.connected


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir
        self.state_dir = config.state_path
        # Every durability level keeps the guests' pages across a graceful stop.
        self.store: Store = JournaledStore(
            config.budget_bytes, compress=config.compress, state_dir=self.state_dir,
            durability=config.durability,
            reserve_bytes=config.journal_reserve_bytes if config.preallocate else 0)
        if config.socket_group is None:
            self._socket_mode, self._socket_gid = 0o600, -1
        else:
            self._socket_mode, self._socket_gid = 0o660, group_id(config.socket_group)
        self.guests: dict[str, GuestRuntime] = {}
        self._control_server: asyncio.Server | None = None
        self._vsock_server: asyncio.Server | None = None
        self._stopping = asyncio.Event()
        self._started_at = time.time()
        self._commands: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "guests": self._cmd_guests,
            "stats": self._cmd_stats,
            "set-budget": self._cmd_set_budget,
            "set-weight": self._cmd_set_weight,
            "set-cap": self._cmd_set_cap,
            "freeze": self._cmd_freeze,
            "thaw": self._cmd_thaw,
            "drain": self._cmd_drain,
            "flush": self._cmd_flush,
            "add-guest": self._cmd_add_guest,
            "remove-guest": self._cmd_remove_guest,
            "shutdown": self._cmd_shutdown,
            "forget": self._cmd_forget,
        }

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        """Listen on every socket, announce readiness, serve until shutdown."""
        loop = asyncio.get_running_loop()
        self._limiter = self._start_connection_limits()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        # Whatever umask tmemd was started under, what it creates is its own; the
        # sockets then get the configured mode (docs/RELIABILITY.md, "Threat model").
        os.umask(0o077)
        self._prepare_run_dir()
        # Claimed before any socket is touched, so a second tmemd on this run dir
        # stops at the pid check instead of unlinking our sockets.
        pid_fd = open_state_file(self.run_dir / PID_FILE_NAME,
                                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(pid_fd, "w") as pid_file:
            pid_file.write(f"{os.getpid()}\n")
        try:
            for guest in self.config.guests:
                await self.add_guest(guest)
            control_path = self.run_dir / CONTROL_SOCKET_NAME
            control_path.unlink(missing_ok=True)
            self._control_server = await loop.create_unix_server(
                lambda: ControlServerProtocol(self.handle_control, self._limiter), str(control_path)
            )
            self._secure_socket(control_path)
            if self.config.vsock_port is not None:
                await self._start_vsock(self.config.vsock_port)
            log.info(READY_LINE, extra={"run_dir": str(self.run_dir), "pid": os.getpid(),
                                        "guests": len(self.guests)})
            print(f"{READY_LINE} pid={os.getpid()} run_dir={self.run_dir}", flush=True)
            await self._stopping.wait()
        finally:
            await self._close_everything()
        log.info("tmemd stopped")

    def _start_connection_limits(self) -> ConnectionLimiter:
        """Take every descriptor the hard limit allows, and bound what connections
        may hold of them, of memory and of time (docs/CONTROL.md, "Connection limits")."""
        config = self.config
        return ConnectionLimiter(
            connections_per_guest=config.connections_per_guest,
            handshake_timeout_s=config.handshake_timeout_s,
            idle_timeout_s=config.idle_timeout_s,
            descriptor_limit=raise_descriptor_limit())

    def _on_signal(self, signum: int) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        self._stopping.set()

    def _prepare_run_dir(self) -> None:
        group_access = self.config.socket_group is not None
        prepare_private_dir(self.run_dir, "run dir", group_access=group_access)
        if group_access:  # the group must reach its sockets: search, no more
            os.chown(self.run_dir, -1, self._socket_gid)
            os.chmod(self.run_dir, stat.S_IMODE(self.run_dir.stat().st_mode) | 0o050)
        if self.state_dir != self.run_dir:
            prepare_private_dir(self.state_dir, "state dir")
        pid_file = self.run_dir / PID_FILE_NAME
        try:
            other_pid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        if other_pid != os.getpid() and _process_exists(other_pid):
            raise ConfigError(f"another tmemd (pid {other_pid}) serves {self.run_dir}")
        pid_file.unlink()

    async def _close_everything(self) -> None:
        servers = [self._control_server, self._vsock_server]
        for server in servers:
            if server is not None:
                server.close()
        # Detached, not removed: journals and fallback files stay for the next start.
        for name in list(self.guests):
            await self.remove_guest(name)
        for server in servers:
            if server is not None:
                await server.wait_closed()
        for path in (self.run_dir / CONTROL_SOCKET_NAME, self.run_dir / PID_FILE_NAME):
            path.unlink(missing_ok=True)

    # -- guests ------------------------------------------------------------

    async def add_guest(self, guest: GuestConfig) -> GuestRuntime:
        if guest.name in self.guests:
            raise ControlError(f"guest {guest.name!r} exists")
        if guest.cid is not None and self._guest_by_cid(guest.cid) is not None:
            raise ControlError(f"vsock CID {guest.cid} belongs to another guest")
        loop = asyncio.get_running_loop()
        client = self.store.add_client(
            guest.name, weight=guest.weight, cap_bytes=guest.cap_bytes, dedup=guest.dedup,
            shared_uuids=guest.shared_uuids,
        )
        abi_path = abi_socket_path(self.run_dir, guest.name)
        nbd_path = nbd_socket_path(self.run_dir, guest.name)
        # After a restart the journal brought the export's pool back: resume it,
        # and keep the fallback file, whose slots the pool does not hold. A
        # fallback file nothing vouches for (a crash with durability none, a
        # journal that failed or is corrupt) cannot be undone: the disk's old
        # slots read as errors, never as zeros or old data.
        guest_fallback = fallback_path(self.state_dir, guest.name)
        start: ExportStart = "new"
        if self.store.resumed(client):
            start = "resume"
        elif guest_fallback.exists() or guest_fallback.is_symlink():
            start = "lost"
            log.error("this guest's swap disk was left without a journal that restores it: "
                      "its old slots fail to read", extra={"guest": guest.name})
        export: NbdExport | None = None
        abi_server: asyncio.Server | None = None
        try:
            for stale in (abi_path, nbd_path):  # a dead tmemd's sockets
                stale.unlink(missing_ok=True)
            export = NbdExport(self.store, client, name=guest.name,
                               size_bytes=self.config.nbd_size_bytes,
                               fallback_path=guest_fallback, start=start,
                               preallocate=self.config.preallocate,
                               sync_fallback=self.config.durability == "fsync")
            # The guest is fixed by the socket: nothing the peer sends can change it.
            abi_server = await loop.create_unix_server(
                lambda: AbiSession(self.store, lambda _transport: runtime, "unix", self._limiter),
                str(abi_path), start_serving=False,
            )
            nbd_server = await loop.create_unix_server(
                lambda: NbdConnection(export, self._limiter), str(nbd_path), start_serving=False
            )
        except BaseException:
            if abi_server is not None:
                abi_server.close()
            # Keep a journal and fallback file the guest came back with: a later
            # start may still resume them. A new guest leaves nothing behind.
            if export is not None:
                export.close()
            if start == "new":  # a file there now is one this attempt created
                self.store.remove_client(client)
                if not guest_fallback.is_symlink():
                    guest_fallback.unlink(missing_ok=True)
            else:
                self.store.detach_client(client)
            for path in (abi_path, nbd_path):
                path.unlink(missing_ok=True)
            raise
        runtime = GuestRuntime(guest, client, abi_server, export, nbd_server)
        self.guests[guest.name] = runtime
        for path in (abi_path, nbd_path):
            self._secure_socket(path)
        await abi_server.start_serving()
        await nbd_server.start_serving()
        log.info("guest added", extra={"guest": guest.name, "abi": str(abi_path),
                                       "nbd": str(nbd_path)})
        return runtime

    async def remove_guest(self, name: str, *, discard: bool = False) -> None:
        """Stop serving the guest. Its pages stay on disk (journal, fallback file)
        for the next start, unless ``discard``: then they are gone for good."""
        runtime = self._guest(name)
        del self.guests[name]
        runtime.abi_server.close()
        runtime.nbd_server.close()
        for session in list(runtime.sessions):
            session.close("guest removed")
        if runtime.export_drain is not None:
            runtime.export_drain.cancel()
        runtime.nbd_export.close(discard=discard)
        await runtime.abi_server.wait_closed()
        await runtime.nbd_server.wait_closed()
        for path in (abi_socket_path(self.run_dir, name), nbd_socket_path(self.run_dir, name)):
            path.unlink(missing_ok=True)
        if discard:
            self.store.remove_client(runtime.client)
        else:
            self.store.detach_client(runtime.client)
        log.info("guest removed", extra={"guest": name, "data": "discarded" if discard
                                         else "kept for the next start"})

    def _secure_socket(self, path: Path) -> None:
        """The configured mode (0600, or 0660 and the socket group): only tmemd's
        user (and that group) may connect, whatever the umask or the directory."""
        if self._socket_gid >= 0:
            os.chown(path, -1, self._socket_gid)
        os.chmod(path, self._socket_mode)

    def _guest(self, name: object) -> GuestRuntime:
        if not isinstance(name, str):
            raise ControlError("missing 'guest' (a guest name)")
        runtime = self.guests.get(name)
        if runtime is None:
            raise ControlError(f"no guest {name!r} (known: {', '.join(sorted(self.guests))})")
        return runtime

    def _guest_by_cid(self, cid: int) -> GuestRuntime | None:
        return next((g for g in self.guests.values() if g.config.cid == cid), None)

    # -- vsock -------------------------------------------------------------

    async def _start_vsock(self, port: int) -> None:
        listener = open_vsock_listener(port)
        if listener is None:
            return
        self._vsock_server = await asyncio.get_running_loop().create_server(
            lambda: AbiSession(self.store, self._resolve_vsock_peer, "vsock", self._limiter),
            sock=listener,
        )
        log.info("vsock listening", extra={"port": port})

    def _resolve_vsock_peer(self, transport: asyncio.BaseTransport) -> GuestRuntime | None:
        by_cid = {g.config.cid: g for g in self.guests.values() if g.config.cid is not None}
        return guest_for_peer(transport.get_extra_info("peername"), by_cid)

    # -- control -----------------------------------------------------------

    async def handle_control(self, request: dict[str, Any]) -> Any:
        command = request.get("cmd")
        handler = self._commands.get(command) if isinstance(command, str) else None
        if handler is None:
            raise ControlError(f"unknown command {command!r}; known: {', '.join(self._commands)}")
        try:
            return await handler(request)
        except (ConfigError, OSError) as exc:  # e.g. a socket path too long for AF_UNIX
            raise ControlError(str(exc)) from None

    async def _cmd_guests(self, request: dict[str, Any]) -> Any:
        return [self._guest_summary(runtime) for runtime in self.guests.values()]

    def _guest_summary(self, runtime: GuestRuntime) -> dict[str, Any]:
        return {
            **runtime.config.to_json(),
            "connections": len(runtime.sessions),
            "connections_total": runtime.connections_total,
            "draining": runtime.draining,
            "pools": [pool_stats_json(pool) for pool in self.store.pool_stats(runtime.client)],
        }

    async def _cmd_stats(self, request: dict[str, Any]) -> Any:
        return {
            "daemon": {"pid": os.getpid(), "uptime_s": round(time.time() - self._started_at, 3),
                       "run_dir": str(self.run_dir)},
            "store": self.store.stats(),
            "guests": {name: self._guest_summary(runtime) for name, runtime in self.guests.items()},
            "connections": [session.stats() for runtime in self.guests.values()
                            for session in runtime.sessions],
            "nbd": {name: runtime.nbd_export.stats() for name, runtime in self.guests.items()},
            "journal": {name: journal for name, runtime in self.guests.items()
                        if (journal := self.store.durability_stats(runtime.client)) is not None},
            "limits": self._limiter.stats(self.guests),
        }

    async def _cmd_set_budget(self, request: dict[str, Any]) -> Any:
        size = request.get("size")
        if not isinstance(size, (str, int)) or isinstance(size, bool):
            raise ControlError("missing 'size' (bytes or a size like 512M)")
        budget = parse_size(size)
        self.store.set_budget(budget)
        log.info("budget set", extra={"budget_bytes": budget})
        return {"budget_bytes": budget}

    async def _cmd_set_weight(self, request: dict[str, Any]) -> Any:
        runtime = self._guest(request.get("guest"))
        updated = replace(runtime.config, weight=check_weight(request.get("weight")))
        self.store.set_weight(runtime.client, updated.weight)
        runtime.config = updated
        log.info("weight set", extra={"guest": runtime.name, "weight": updated.weight})
        return {"guest": runtime.name, "weight": updated.weight}

    async def _cmd_set_cap(self, request: dict[str, Any]) -> Any:
        runtime = self._guest(request.get("guest"))
        cap = request.get("cap")
        if cap is not None and (not isinstance(cap, (str, int)) or isinstance(cap, bool)):
            raise ControlError("'cap' must be bytes, a size like 64M, or null for no cap")
        cap_bytes = parse_cap(cap)
        self.store.set_cap(runtime.client, cap_bytes)
        runtime.config = replace(runtime.config, cap_bytes=cap_bytes)
        log.info("cap set", extra={"guest": runtime.name, "cap_bytes": cap_bytes})
        return {"guest": runtime.name, "cap_bytes": cap_bytes}

    async def _cmd_freeze(self, request: dict[str, Any]) -> Any:
        runtime = self._guest(request.get("guest"))
        self.store.freeze(runtime.client)
        log.info("guest frozen", extra={"guest": runtime.name})
        return {"guest": runtime.name, "frozen": True}

    async def _cmd_thaw(self, request: dict[str, Any]) -> Any:
        runtime = self._guest(request.get("guest"))
        self.store.thaw(runtime.client)
        runtime.draining = False
        log.info("guest thawed", extra={"guest": runtime.name})
        return {"guest": runtime.name, "frozen": False, "draining": False}

    async def _cmd_drain(self, request: dict[str, Any]) -> Any:
        """Start draining: freeze the guest (new pages go to its fallback disk) and
        flag every reply to its agent; tmemctl then waits for 0 persistent pages."""
        runtime = self._guest(request.get("guest"))
        self.store.freeze(runtime.client)
        runtime.draining = True
        # The export has no agent to ask: tmemd moves its pages itself, between requests.
        if runtime.export_drain is None or runtime.export_drain.done():
            runtime.export_drain = asyncio.get_running_loop().create_task(self._drain_export(runtime))
        agents = sum(1 for session in runtime.sessions if session.drain_negotiated)
        pages = persistent_pages(self.store.pool_stats(runtime.client))
        log.info("guest draining", extra={"guest": runtime.name, "persistent_pages": pages,
                                          "agents": agents})
        return {"guest": runtime.name, "draining": True, "persistent_pages": pages,
                "agent_connections": agents}

    async def _drain_export(self, runtime: GuestRuntime) -> int:
        started = time.monotonic()
        moved = await runtime.nbd_export.drain()
        log.info("NBD export drained", extra={"guest": runtime.name, "pages": moved,
                                              "seconds": round(time.monotonic() - started, 3)})
        return moved

    async def _cmd_flush(self, request: dict[str, Any]) -> Any:
        runtime = self._guest(request.get("guest"))
        pool = request.get("pool")
        if pool is None:
            self.store.flush_client(runtime.client)
        elif isinstance(pool, int) and not isinstance(pool, bool):
            status = self.store.flush_pool(runtime.client, pool)
            if status != Status.OK:
                raise ControlError(f"flush of pool {pool} of {runtime.name!r}: {status.name}")
        else:
            raise ControlError("'pool' must be a pool id (integer)")
        log.info("flushed", extra={"guest": runtime.name, "pool": pool})
        return {"guest": runtime.name, "pool": pool}

    async def _cmd_add_guest(self, request: dict[str, Any]) -> Any:
        fields = {key: value for key, value in request.items() if key != "cmd"}
        runtime = await self.add_guest(guest_from_mapping(fields))
        return self._guest_summary(runtime)

    async def _cmd_remove_guest(self, request: dict[str, Any]) -> Any:
        runtime = self._guest(request.get("guest"))
        await self.remove_guest(runtime.name)
        return {"guest": runtime.name, "removed": True, "data_kept": True}

    async def _cmd_forget(self, request: dict[str, Any]) -> Any:
        """Discard a guest's pages for good: its pools, journal and fallback file.
        Refused while anything is connected to the guest's sockets (a guest that
        swaps on that disk would read zeros). A configured guest starts afresh."""
        name = request.get("guest")
        if not isinstance(name, str):
            raise ControlError("missing 'guest' (a guest name)")
        runtime = self.guests.get(name)
        if runtime is not None:
            if runtime.connected:
                raise ControlError(f"guest {name!r} has {runtime.connected} live connection(s):"
                                   " stop its QEMU (or its agent) first")
            config = runtime.config
            await self.remove_guest(name, discard=True)
            await self.add_guest(config)
            log.info("guest forgotten", extra={"guest": name})
            return {"guest": name, "forgotten": True, "configured": True}
        files = [path for path in (journal_path(self.state_dir, validate_guest_name(name)),
                                   fallback_path(self.state_dir, name))
                 if path.exists() or path.is_symlink()]
        if not files:
            raise ControlError(f"nothing to forget: no guest {name!r} and no state of it in "
                               f"{self.state_dir}")
        for path in files:
            path.unlink()
        log.info("guest forgotten", extra={"guest": name, "files": [str(p) for p in files]})
        return {"guest": name, "forgotten": True, "configured": False}

    async def _cmd_shutdown(self, request: dict[str, Any]) -> Any:
        log.info("shutting down", extra={"reason": "control request"})
        # Reply first: the stop happens once this handler has returned.
        asyncio.get_running_loop().call_soon(self._stopping.set)
        return {"stopping": True}


def persistent_pages(pools: list[PoolStats]) -> int:
    """Pages held in persistent pools: what a drain must bring to 0."""
    return sum(pool.pages for pool in pools if PoolFlag.PERSISTENT in pool.flags)


def pool_stats_json(pool: PoolStats) -> dict[str, Any]:
    """A PoolStats record as JSON, its flags spelled out."""
    record = dataclasses.asdict(pool)
    record["flags"] = [flag.name for flag in PoolFlag if flag in pool.flags]
    return record


def group_id(group: str) -> int:
    """A group name or numeric gid (the config checked that it exists)."""
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

