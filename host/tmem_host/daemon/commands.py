"""tmemd's control commands (docs/CONTROL.md): one method per command, each
taking the request's JSON object and returning the reply's result.

The commands act through the daemon's lifecycle methods (add_guest,
remove_guest, request_stop) and the guests' runtimes; they never touch a
listener or a connection themselves.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tmem_host.daemon.config import (
    ConfigError, check_weight, guest_from_mapping, parse_cap, parse_size, validate_guest_name,
)
from tmem_host.daemon.control import ControlError
from tmem_host.replies import (
    BudgetReply, CapReply, DrainReply, FlushReply, ForgetReply, FreezeReply, GuestRecord,
    RemoveGuestReply, ShutdownReply, StatsReply, ThawReply, WeightReply,
)
from tmem_host.daemon.runtime import GuestRuntime, fallback_path, persistent_pages
from tmem_host.journal.journaled import journal_path
from tmem_host.nbd.export import lost_map_path
from tmem_wire.abi import Status

if TYPE_CHECKING:
    from tmem_host.daemon.server import Daemon

log = logging.getLogger("tmemd")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlCommands:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.store = daemon.store
        self._started_at = time.time()
        self.handlers: dict[str, Handler] = {
            "guests": self.guests,
            "stats": self.stats,
            "set-budget": self.set_budget,
            "set-weight": self.set_weight,
            "set-cap": self.set_cap,
            "freeze": self.freeze,
            "thaw": self.thaw,
            "drain": self.drain,
            "flush": self.flush,
            "add-guest": self.add_guest,
            "remove-guest": self.remove_guest,
            "forget": self.forget,
            "shutdown": self.shutdown,
        }

    async def handle(self, request: dict[str, Any]) -> Any:
        command = request.get("cmd")
        handler = self.handlers.get(command) if isinstance(command, str) else None
        if handler is None:
            raise ControlError(f"unknown command {command!r}; known: {', '.join(self.handlers)}")
        try:
            return await handler(request)
        except (ConfigError, OSError) as exc:  # e.g. a socket path too long for AF_UNIX
            raise ControlError(str(exc)) from None

    def _guest(self, name: object) -> GuestRuntime:
        if not isinstance(name, str):
            raise ControlError("missing 'guest' (a guest name)")
        runtime = self.daemon.guests.get(name)
        if runtime is None:
            known = ", ".join(sorted(self.daemon.guests))
            raise ControlError(f"no guest {name!r} (known: {known})")
        return runtime

    async def guests(self, request: dict[str, Any]) -> list[GuestRecord]:
        return [runtime.summary(self.store) for runtime in self.daemon.guests.values()]

    async def stats(self, request: dict[str, Any]) -> StatsReply:
        guests = self.daemon.guests
        return {
            "daemon": {"pid": os.getpid(), "uptime_s": round(time.time() - self._started_at, 3),
                       "run_dir": str(self.daemon.run_dir)},
            "store": self.store.stats(),
            "guests": {name: runtime.summary(self.store) for name, runtime in guests.items()},
            "connections": [session.stats() for runtime in guests.values()
                            for session in runtime.sessions],
            "nbd": {name: runtime.nbd_export.stats() for name, runtime in guests.items()},
            "journal": {name: journal for name, runtime in guests.items()
                        if (journal := self.store.durability_stats(runtime.client)) is not None},
            "limits": self.daemon.limiter.stats(guests),
            "remote": (None if self.daemon.tier is None else
                       self.daemon.tier.stats(self.daemon.config.host_id)),
        }

    async def set_budget(self, request: dict[str, Any]) -> BudgetReply:
        size = request.get("size")
        if not isinstance(size, (str, int)) or isinstance(size, bool):
            raise ControlError("missing 'size' (bytes or a size like 512M)")
        budget = parse_size(size)
        self.store.set_budget(budget)
        log.info("budget set", extra={"budget_bytes": budget})
        return {"budget_bytes": budget}

    async def set_weight(self, request: dict[str, Any]) -> WeightReply:
        runtime = self._guest(request.get("guest"))
        updated = replace(runtime.config, weight=check_weight(request.get("weight")))
        self.store.set_weight(runtime.client, updated.weight)
        runtime.config = updated
        log.info("weight set", extra={"guest": runtime.name, "weight": updated.weight})
        return {"guest": runtime.name, "weight": updated.weight}

    async def set_cap(self, request: dict[str, Any]) -> CapReply:
        runtime = self._guest(request.get("guest"))
        cap = request.get("cap")
        if cap is not None and (not isinstance(cap, (str, int)) or isinstance(cap, bool)):
            raise ControlError("'cap' must be bytes, a size like 64M, or null for no cap")
        cap_bytes = parse_cap(cap)
        self.store.set_cap(runtime.client, cap_bytes)
        runtime.config = replace(runtime.config, cap_bytes=cap_bytes)
        log.info("cap set", extra={"guest": runtime.name, "cap_bytes": cap_bytes})
        return {"guest": runtime.name, "cap_bytes": cap_bytes}

    async def freeze(self, request: dict[str, Any]) -> FreezeReply:
        runtime = self._guest(request.get("guest"))
        self.store.freeze(runtime.client)
        log.info("guest frozen", extra={"guest": runtime.name})
        return {"guest": runtime.name, "frozen": True}

    async def thaw(self, request: dict[str, Any]) -> ThawReply:
        runtime = self._guest(request.get("guest"))
        runtime.thaw(self.store)
        log.info("guest thawed", extra={"guest": runtime.name})
        return {"guest": runtime.name, "frozen": False, "draining": False}

    async def drain(self, request: dict[str, Any]) -> DrainReply:
        """Start draining; tmemctl then waits for 0 persistent pages."""
        runtime = self._guest(request.get("guest"))
        runtime.begin_drain(self.store)
        agents = sum(1 for session in runtime.sessions if session.drain_negotiated)
        pages = persistent_pages(self.store.pool_stats(runtime.client))
        log.info("guest draining", extra={"guest": runtime.name, "persistent_pages": pages,
                                          "agents": agents})
        return {"guest": runtime.name, "draining": True, "persistent_pages": pages,
                "agent_connections": agents}

    async def flush(self, request: dict[str, Any]) -> FlushReply:
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

    async def add_guest(self, request: dict[str, Any]) -> GuestRecord:
        fields = {key: value for key, value in request.items() if key != "cmd"}
        runtime = await self.daemon.add_guest(guest_from_mapping(fields))
        return runtime.summary(self.store)

    async def remove_guest(self, request: dict[str, Any]) -> RemoveGuestReply:
        runtime = self._guest(request.get("guest"))
        await self.daemon.remove_guest(runtime.name)
        return {"guest": runtime.name, "removed": True, "data_kept": True}

    async def forget(self, request: dict[str, Any]) -> ForgetReply:
        """Discard a guest's pages for good: its pools, journal and fallback file.
        Refused while anything is connected to the guest's sockets (a guest that
        swaps on that disk would read zeros). A configured guest starts afresh."""
        name = request.get("guest")
        if not isinstance(name, str):
            raise ControlError("missing 'guest' (a guest name)")
        runtime = self.daemon.guests.get(name)
        if runtime is not None:
            if runtime.connected:
                raise ControlError(f"guest {name!r} has {runtime.connected} live connection(s):"
                                   " stop its QEMU (or its agent) first")
            await self.daemon.remove_guest(name, discard=True)
            await self.daemon.add_guest(runtime.config)
            log.info("guest forgotten", extra={"guest": name})
            return {"guest": name, "forgotten": True, "configured": True}
        state_dir = self.daemon.state_dir
        fallback = fallback_path(state_dir, validate_guest_name(name))
        files = [path for path in (journal_path(state_dir, name), fallback,
                                   lost_map_path(fallback))
                 if path.exists() or path.is_symlink()]
        if not files:
            raise ControlError(f"nothing to forget: no guest {name!r} and no state of it in "
                               f"{state_dir}")
        for path in files:
            path.unlink()
        log.info("guest forgotten", extra={"guest": name, "files": [str(p) for p in files]})
        return {"guest": name, "forgotten": True, "configured": False}

    async def shutdown(self, request: dict[str, Any]) -> ShutdownReply:
        log.info("shutting down", extra={"reason": "control request"})
        self.daemon.request_stop()  # after this reply: the stop waits for the handler
        return {"stopping": True}
