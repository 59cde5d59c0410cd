"""One configured guest while tmemd serves it: its store client, its listeners,
its live ABI sessions and NBD export, and the state the control commands set.

The sessions attach and detach themselves here; the drain state changes only
through begin_drain() and thaw(). Socket and state file names live here too,
so that every part of tmemd (and its tests) names a guest's files one way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from tmem_host.daemon.config import GuestConfig
from tmem_host.replies import GuestRecord, PoolRecord
from tmem_host.nbd.export import NbdExport
from tmem_host.nbd.readcache import CachedDiskExport
from tmem_host.store import Client, Store
from tmem_wire.abi import PoolFlag, PoolStats

if TYPE_CHECKING:
    from tmem_host.daemon.session import AbiSession

log = logging.getLogger("tmemd")


def abi_socket_path(run_dir: Path, guest: str) -> Path:
    return run_dir / f"{guest}.tmem.sock"


def nbd_socket_path(run_dir: Path, guest: str) -> Path:
    return run_dir / f"{guest}.nbd.sock"


def disk_socket_path(run_dir: Path, guest: str) -> Path:
    """The guest's cached disk (GuestConfig.cached_disk)."""
    return run_dir / f"{guest}.disk.nbd.sock"


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
    # Its cached disk (GuestConfig.cached_disk) and that export's listener.
    disk_export: CachedDiskExport | None = None
    disk_server: asyncio.Server | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def connected(self) -> int:
        """Live connections to the guest's ABI and NBD sockets."""
        disk = self.disk_export.connected if self.disk_export is not None else 0
        return len(self.sessions) + self.nbd_export.connected + disk

    def attach(self, session: AbiSession) -> None:
        self.sessions.add(session)
        self.connections_total += 1

    def detach(self, session: AbiSession) -> None:
        self.sessions.discard(session)

    def begin_drain(self, store: Store) -> None:
        """Freeze the guest (new pages go to its fallback disk), flag every reply
        to its agent, and move the NBD export's pages to its fallback file (it has
        no agent to ask: tmemd moves them itself, between requests)."""
        store.freeze(self.client)
        self.draining = True
        if self.export_drain is None or self.export_drain.done():
            self.export_drain = asyncio.get_running_loop().create_task(self._drain_export())

    def thaw(self, store: Store) -> None:
        """Accept the guest's puts again; ends a drain."""
        store.thaw(self.client)
        self.draining = False

    async def _drain_export(self) -> int:
        started = time.monotonic()
        moved = await self.nbd_export.drain()
        log.info("NBD export drained", extra={"guest": self.name, "pages": moved,
                                              "seconds": round(time.monotonic() - started, 3)})
        return moved

    def stop_serving(self, *, discard: bool) -> None:
        """Close the listeners, the sessions, a running drain and the export (which
        keeps its pool and fallback file unless ``discard``)."""
        self.abi_server.close()
        self.nbd_server.close()
        if self.disk_server is not None:
            self.disk_server.close()
        for session in list(self.sessions):
            session.close("guest removed")
        if self.export_drain is not None:
            self.export_drain.cancel()
        self.nbd_export.close(discard=discard)
        if self.disk_export is not None:
            self.disk_export.close()

    async def wait_closed(self) -> None:
        await self.abi_server.wait_closed()
        await self.nbd_server.wait_closed()
        if self.disk_server is not None:
            await self.disk_server.wait_closed()

    def summary(self, store: Store) -> GuestRecord:
        """The control `guests` record."""
        return {
            **self.config.to_json(),
            "connections": len(self.sessions),
            "connections_total": self.connections_total,
            "draining": self.draining,
            "pools": [pool_stats_json(pool) for pool in store.pool_stats(self.client)],
        }


def persistent_pages(pools: list[PoolStats]) -> int:
    """Pages held in persistent pools: what a drain must bring to 0."""
    return sum(pool.pages for pool in pools if PoolFlag.PERSISTENT in pool.flags)


def pool_stats_json(pool: PoolStats) -> PoolRecord:
    """A PoolStats record as JSON, its flags spelled out."""
    record = dataclasses.asdict(pool)
    record["flags"] = [flag.name for flag in PoolFlag if flag in pool.flags]
    return cast(PoolRecord, record)
