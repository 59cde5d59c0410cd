"""tmemd's core: the store, per-guest listeners, the control socket, lifecycle.

Everything runs on one asyncio loop in one thread, so the store (which is
not thread-safe) is only ever touched from here. A guest while served is a
GuestRuntime (daemon/runtime.py); the control commands are in daemon/commands.py.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import signal
import stat
from pathlib import Path
from typing import Any

from tmem_host.daemon.commands import ControlCommands
from tmem_host.daemon.config import ConfigError, DaemonConfig, GuestConfig
from tmem_host.daemon.control import (
    CONTROL_SOCKET_NAME,
    ControlError,
    ControlServerProtocol,
)
from tmem_host.limits import ConnectionLimiter, check_socket_buffers, raise_descriptor_limit
from tmem_host.daemon.runtime import (
    disk_socket_path,
    GuestRuntime, abi_socket_path, fallback_path, nbd_socket_path,
)
from tmem_host.daemon.session import AbiSession
from tmem_host.daemon.vsock import guest_for_peer, open_vsock_listener
from tmem_host.journal.journaled import JournaledStore
from tmem_host.nbd.export import ExportStart, NbdConnection, NbdExport
from tmem_host.nbd.readcache import CachedDiskExport, CachedImages
from tmem_host.statefiles import open_state_file, prepare_private_dir
from tmem_host.remote.tier import RemoteError, RemoteSettings, RemoteTier
from tmem_host.store import Client, PageEncoder, Store

log = logging.getLogger("tmemd")

PID_FILE_NAME = "tmemd.pid"
READY_LINE = "tmemd ready"


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
        # Compresses PUT_BATCH pages on its own threads ahead of the sessions
        # (docs/PERFORMANCE.md); they start with the first batch.
        self.encoder = PageEncoder(config.encoder_threads) if config.encoder_threads else None
        if config.socket_group is None:
            self._socket_mode, self._socket_gid = 0o600, -1
        else:
            self._socket_mode, self._socket_gid = 0o660, group_id(config.socket_group)
        self.guests: dict[str, GuestRuntime] = {}
        # The cached disks open per image: a write through one flushes them all.
        self.cached_images = CachedImages()
        # The remote tier (--remote), connected when run() starts.
        self.tier: RemoteTier | None = None
        self.limiter = self._connection_limits()
        self.commands = ControlCommands(self)
        self._control_server: asyncio.Server | None = None
        self._vsock_server: asyncio.Server | None = None
        self._stopping = asyncio.Event()
        # Set once every socket listens (an in-process tmemd's tests wait for it).
        self.ready = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> None:
        """Listen on every socket, announce readiness, serve until shutdown.
        ``handle_signals``: SIGTERM and SIGINT stop it (the tmemd process; a test
        that runs a Daemon on its own event loop stops it with stop())."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self._on_signal, signum)
        self._prepare_run_dir()
        # Claimed before any socket is touched, so a second tmemd on this run dir
        # stops at the pid check instead of unlinking our sockets.
        pid_fd = open_state_file(self.run_dir / PID_FILE_NAME,
                                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(pid_fd, "w") as pid_file:
            pid_file.write(f"{os.getpid()}\n")
        try:
            if self.config.remote_seeds is not None:
                await self._start_tier(self.config.remote_seeds)
            for guest in self.config.guests:
                await self.add_guest(guest)
            control_path = self.run_dir / CONTROL_SOCKET_NAME
            control_path.unlink(missing_ok=True)
            self._control_server = await loop.create_unix_server(
                lambda: ControlServerProtocol(self.handle_control, self.limiter), str(control_path)
            )
            self._secure_socket(control_path)
            if self.config.vsock_port is not None:
                await self._start_vsock(self.config.vsock_port)
            log.info(READY_LINE, extra={"run_dir": str(self.run_dir), "pid": os.getpid(),
                                        "guests": len(self.guests)})
            print(f"{READY_LINE} pid={os.getpid()} run_dir={self.run_dir}", flush=True)
            self.ready.set()
            await self._stopping.wait()
        finally:
            await self._close_everything()
        log.info("tmemd stopped")

    async def _start_tier(self, seeds: tuple[tuple[str, int], ...]) -> None:
        """Connect the remote tier and put it below the store (before any guest,
        whose journal replay may name remote pages)."""
        config = self.config
        tier = RemoteTier(RemoteSettings(
            seeds=seeds, replicas=config.remote_replicas, wait_s=config.remote_wait_s,
            budget_bytes=config.remote_budget_bytes, read_ahead_groups=config.remote_read_ahead,
            host_id=config.host_id), self.store)
        try:
            await tier.start()
        except RemoteError as error:
            raise ConfigError(str(error)) from None
        self.store.attach_tier(tier, tier.settings.local_fraction)
        self.tier = tier

    async def settle(self) -> None:
        """Wait until every write the store started has ended (the remote tier's):
        before a guest leaves memory, its journal must point only at pages that are
        where it says."""
        while (waiter := self.store.make_durable()) is not None:
            await waiter

    def _connection_limits(self) -> ConnectionLimiter:
        """Take every descriptor the hard limit allows, and bound what connections
        may hold of them, of memory and of time (docs/CONTROL.md, "Connection limits")."""
        config = self.config
        check_socket_buffers()
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
        if self.tier is not None:
            await self.tier.aclose()
        if self.encoder is not None:
            self.encoder.close()  # after the sessions that submit to it
        for path in (self.run_dir / CONTROL_SOCKET_NAME, self.run_dir / PID_FILE_NAME):
            path.unlink(missing_ok=True)

    # -- guests ------------------------------------------------------------

    async def add_guest(self, guest: GuestConfig, *, take_over: bool = False) -> GuestRuntime:
        """Serve the guest; with a remote tier, claim its namespace (``take_over``:
        even from another host, as a restore does; docs/REMOTE.md)."""
        if guest.name in self.guests:
            raise ControlError(f"guest {guest.name!r} exists")
        if guest.cid is not None and self._guest_by_cid(guest.cid) is not None:
            raise ControlError(f"vsock CID {guest.cid} belongs to another guest")
        if guest.remote_ephemeral and self.tier is None:
            raise ControlError(f"guest {guest.name!r}: remote-ephemeral needs a remote tier (--remote)")
        loop = asyncio.get_running_loop()
        if guest.cached_disk_pool is not None:
            self._check_cached_disk_pool(guest)
        # A cached disk's shared pool is the host's say-so: its UUID is authorised
        # (in the store's namespace of cached disks only, Store.new_pool).
        shared_uuids = guest.shared_uuids | ({guest.cached_disk_pool} if guest.cached_disk_pool else set())
        client = self.store.add_client(
            guest.name, weight=guest.weight, cap_bytes=guest.cap_bytes, dedup=guest.dedup,
            shared_uuids=frozenset(shared_uuids),
        )
        if self.tier is not None:
            await self.tier.register(client, guest.identity_uuid, guest.remote_cap_bytes,
                                     take_over=take_over)
            self.store.set_demote_evicted(client, guest.remote_ephemeral)
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
        disk_path = disk_socket_path(self.run_dir, guest.name)
        sockets = (abi_path, nbd_path, disk_path)
        export: NbdExport | None = None
        disk_export: CachedDiskExport | None = None
        servers: list[asyncio.Server] = []
        try:
            for stale in sockets:  # a dead tmemd's sockets
                stale.unlink(missing_ok=True)
            export = NbdExport(self.store, client, name=guest.name,
                               size_bytes=self.config.nbd_size_bytes,
                               fallback_path=guest_fallback, start=start,
                               preallocate=self.config.preallocate,
                               sync_fallback=self.config.durability == "fsync",
                               fallback_iops=self.config.fallback_iops)
            if guest.cached_disk is not None:
                disk_export = self._open_cached_disk(guest, client)
            # The guest is fixed by the socket: nothing the peer sends can change it.
            servers.append(await loop.create_unix_server(
                lambda: AbiSession(self.store, lambda _transport: runtime, "unix", self.limiter,
                                   self.encoder),
                str(abi_path), start_serving=False,
            ))
            servers.append(await loop.create_unix_server(
                lambda: NbdConnection(export, self.limiter), str(nbd_path), start_serving=False
            ))
            if disk_export is not None:
                cached = disk_export
                servers.append(await loop.create_unix_server(
                    lambda: NbdConnection(cached, self.limiter), str(disk_path), start_serving=False
                ))
        except BaseException:
            for server in servers:
                server.close()
            if disk_export is not None:
                disk_export.close()
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
            for path in sockets:
                path.unlink(missing_ok=True)
            raise
        runtime = GuestRuntime(guest, client, servers[0], export, servers[1],
                               disk_export=disk_export, disk_server=servers[2] if disk_export else None)
        self.guests[guest.name] = runtime
        for path in sockets[: len(servers)]:
            self._secure_socket(path)
        for server in servers:
            await server.start_serving()
        log.info("guest added", extra={"guest": guest.name, "abi": str(abi_path),
                                       "nbd": str(nbd_path),
                                       "cached_disk": str(disk_path) if disk_export else None})
        return runtime

    def _check_cached_disk_pool(self, guest: GuestConfig) -> None:
        """A shared pool of cached disks serves one image: a guest naming the pool
        of another image would read that image's pages (ConfigError)."""
        assert guest.cached_disk is not None
        try:
            image = os.stat(guest.cached_disk)
        except OSError as error:
            raise _cannot_serve(guest, error) from None
        for other in self.guests.values():
            export = other.disk_export
            if export is None or other.config.cached_disk_pool != guest.cached_disk_pool:
                continue
            if export.image_inode != (image.st_dev, image.st_ino):
                raise ConfigError(f"guest {guest.name!r}: cached-disk-pool {guest.cached_disk_pool} reads "
                                  f"{export.backing_path} (guest {other.name!r}), not {guest.cached_disk}")

    def _open_cached_disk(self, guest: GuestConfig, client: Client) -> CachedDiskExport:
        """The guest's cached disk; a ConfigError says why it cannot be served."""
        assert guest.cached_disk is not None
        try:
            return CachedDiskExport(self.store, client, name=guest.name, backing_path=guest.cached_disk,
                                    backing_iops=self.config.fallback_iops,
                                    shared_pool=guest.cached_disk_pool, images=self.cached_images,
                                    write_allocate=guest.cached_disk_write_allocate)
        except (OSError, ValueError) as error:
            raise _cannot_serve(guest, error) from None

    async def remove_guest(self, name: str, *, discard: bool = False) -> None:
        """Stop serving the guest. Its pages stay on disk (journal, fallback file)
        for the next start, unless ``discard``: then they are gone for good."""
        runtime = self.guests.pop(name)
        runtime.stop_serving(discard=discard)
        await runtime.wait_closed()
        await self.settle()
        for path in (abi_socket_path(self.run_dir, name), nbd_socket_path(self.run_dir, name),
                     disk_socket_path(self.run_dir, name)):
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

    def _guest_by_cid(self, cid: int) -> GuestRuntime | None:
        return next((g for g in self.guests.values() if g.config.cid == cid), None)

    # -- vsock -------------------------------------------------------------

    async def _start_vsock(self, port: int) -> None:
        listener = open_vsock_listener(port)
        if listener is None:
            return
        self._vsock_server = await asyncio.get_running_loop().create_server(
            lambda: AbiSession(self.store, self._resolve_vsock_peer, "vsock", self.limiter,
                               self.encoder),
            sock=listener,
        )
        log.info("vsock listening", extra={"port": port})

    def _resolve_vsock_peer(self, transport: asyncio.BaseTransport) -> GuestRuntime | None:
        by_cid = {g.config.cid: g for g in self.guests.values() if g.config.cid is not None}
        return guest_for_peer(transport.get_extra_info("peername"), by_cid)

    # -- control -----------------------------------------------------------

    async def handle_control(self, request: dict[str, Any]) -> Any:
        return await self.commands.handle(request)

    def request_stop(self) -> None:
        """Stop once the current control reply has gone out."""
        asyncio.get_running_loop().call_soon(self._stopping.set)

    def stop(self) -> None:
        """Stop now: what SIGTERM does (every guest's state is kept)."""
        self._stopping.set()


def _cannot_serve(guest: GuestConfig, error: Exception) -> ConfigError:
    return ConfigError(f"guest {guest.name!r}: cannot serve cached disk {guest.cached_disk}: {error}")


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

