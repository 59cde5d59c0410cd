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
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from tmem_host.daemon.config import (
    ConfigError, GuestConfig, check_weight, guest_from_mapping, parse_cap, parse_size,
    validate_guest_name,
)
from tmem_host.daemon.control import ControlError
from tmem_host.replies import (
    BudgetReply, CapReply, DrainReply, FlushReply, ForgetReply, FreezeReply, GuestRecord,
    RemoteClaimReply, RemoteDrainReply, RemoteForgetReply, RemoteGuestReply, RemoveGuestReply, RestoreReply, SaveReply,
    ShutdownReply,
    StatsReply, ThawReply, WeightReply,
)
from tmem_host.daemon.runtime import GuestRuntime, fallback_path, persistent_pages
from tmem_host.daemon.saverestore import restore_guest, save_guest
from tmem_host.journal.journaled import journal_path
from tmem_host.nbd.export import lost_map_path
from tmem_host.remote.tier import NotOwnerError, RemoteError, RemoteTier
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
            "remote": self.remote,
            "remote-drain": self.remote_drain,
            "remote-forget": self.remote_forget,
            "save": self.save,
            "handoff": self.handoff,
            "restore": self.restore,
            "remote-claim": self.remote_claim,
            "shutdown": self.shutdown,
        }

    async def handle(self, request: dict[str, Any]) -> Any:
        command = request.get("cmd")
        handler = self.handlers.get(command) if isinstance(command, str) else None
        if handler is None:
            raise ControlError(f"unknown command {command!r}; known: {', '.join(self.handlers)}")
        try:
            return await handler(request)
        except (ConfigError, OSError, RemoteError) as exc:  # e.g. a socket path too long for AF_UNIX
            raise ControlError(str(exc)) from None

    def _guest(self, name: object) -> GuestRuntime:
        runtime = self.daemon.guests.get(_guest_name(name))
        if runtime is None:
            known = ", ".join(sorted(self.daemon.guests))
            raise ControlError(f"no guest {name!r} (known: {known})")
        return runtime

    def _tier(self) -> RemoteTier:
        if self.daemon.tier is None:
            raise ControlError("tmemd has no remote tier (start it with --remote)")
        return self.daemon.tier

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
            "cached_disks": {name: runtime.disk_export.stats() for name, runtime in guests.items()
                             if runtime.disk_export is not None},
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
        if self.daemon.tier is not None and (remote := self.daemon.tier.guest(runtime.name)):
            remote.weight = updated.weight  # its share of the remote budget follows
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
        """Discard a guest's pages for good: its pools, journal, fallback file and
        (with a remote tier) its namespace in the cluster. Refused while anything
        is connected to the guest's sockets (a guest that swaps on that disk would
        read zeros). A configured guest starts afresh."""
        name = _guest_name(request.get("guest"))
        runtime = self.daemon.guests.get(name)
        if runtime is not None:
            if runtime.connected:
                raise ControlError(f"guest {name!r} has {runtime.connected} live connection(s):"
                                   " stop its QEMU (or its agent) first")
            await self.daemon.remove_guest(name, discard=True)
            try:
                # Removing its client released its remote pages; this catches orphans.
                deleted = await self._delete_namespace(runtime.config.identity_uuid)
            except NotOwnerError:  # handed off or taken over: the keys are another tmemd's
                deleted = 0
            except RemoteError as error:
                raise ControlError(f"guest {name!r} forgotten in tmemd, but its keys in the cluster "
                                   f"remain ({error}): delete them with 'tmemctl remote-forget "
                                   f"{name}'") from None
            finally:
                await self.daemon.add_guest(runtime.config)
            log.info("guest forgotten", extra={"guest": name, "remote_keys_deleted": deleted})
            return _forgotten(name, configured=True, remote_keys_deleted=deleted)
        state_dir = self.daemon.state_dir
        fallback = fallback_path(state_dir, validate_guest_name(name))
        files = [path for path in (journal_path(state_dir, name), fallback,
                                   lost_map_path(fallback))
                 if path.exists() or path.is_symlink()]
        # The cluster first: if it fails, nothing is forgotten (the files name its pages).
        try:
            deleted = await self._delete_namespace(self._namespace(name, request.get("uuid")))
        except RemoteError as error:
            raise ControlError(f"guest {name!r} not forgotten: its keys in the cluster cannot be "
                               f"deleted ({error})") from None
        if not files and not deleted:
            raise ControlError(f"nothing to forget: no guest {name!r} and no state of it in "
                               f"{state_dir}" + (" or in the cluster" if deleted == 0 else ""))
        for path in files:
            path.unlink()
        log.info("guest forgotten", extra={"guest": name, "files": [str(p) for p in files],
                                           "remote_keys_deleted": deleted})
        return _forgotten(name, configured=False, remote_keys_deleted=deleted)

    # -- save and restore (daemon/saverestore.py) ------------------------------------

    async def save(self, request: dict[str, Any]) -> SaveReply:
        runtime = self._guest(request.get("guest"))
        return await save_guest(self.daemon, runtime, _absolute_path(request.get("path")))

    async def handoff(self, request: dict[str, Any]) -> SaveReply:
        runtime = self._guest(request.get("guest"))
        return await save_guest(self.daemon, runtime, _absolute_path(request.get("path")), handoff=True)

    async def restore(self, request: dict[str, Any]) -> RestoreReply:
        guest = request.get("guest")
        name = None if guest is None else validate_guest_name(_guest_name(guest))
        return await restore_guest(self.daemon, _absolute_path(request.get("path")), name,
                                   replace=request.get("replace") is True)

    # -- the remote tier -------------------------------------------------------------

    async def remote(self, request: dict[str, Any]) -> RemoteGuestReply:
        """The guest's figures in the tier, and the keys its namespace really
        holds in the cluster (more than its remote pages: orphans)."""
        tier = self._tier()
        runtime = self._guest(request.get("guest"))
        figures = tier.guest_stats(runtime.name)
        if figures is None:  # every served guest is registered: a bug, said plainly
            raise ControlError(f"guest {runtime.name!r} is not registered in the remote tier")
        keys: int | None = None
        error: str | None = "the cluster is unreachable"
        if tier.reachable:  # else SCAN would wait out its timeouts for nothing
            try:
                keys, error = len(await tier.namespace_keys(runtime.config.identity_uuid)), None
            except RemoteError as exc:
                error = str(exc)
        return {**figures, "guest": runtime.name, "reachable": tier.reachable,
                "cluster_keys": keys, "cluster_error": error}

    async def remote_drain(self, request: dict[str, Any]) -> RemoteDrainReply:
        """Move the guest's remote pages home (into memory, while they fit) or to
        its fallback disk (the `drain` command: the NBD export reads its remote
        pages back as it goes; tmemctl then waits for 0 persistent pages)."""
        tier = self._tier()
        runtime = self._guest(request.get("guest"))
        client = runtime.client
        to = request.get("to")
        if to not in ("home", "disk"):
            raise ControlError("'to' must be \"home\" or \"disk\"")
        # Ephemeral pages in the cluster are a cache: a drain drops them.
        self.store.shed_remote_ephemeral(client)
        if to == "disk":
            left = client.remote_pages
            started = await self.drain(request)
            return {"guest": runtime.name, "to": to, "moved": 0, "left": left,
                    "draining": True, "persistent_pages": started["persistent_pages"]}
        if not tier.reachable:
            raise ControlError("the cluster is unreachable: no remote page can be read back now")
        moved, left = await tier.drain_home(client)
        log.info("remote pages drained home", extra={"guest": runtime.name, "moved": moved,
                                                     "left": left})
        return {"guest": runtime.name, "to": to, "moved": moved, "left": left,
                "draining": runtime.draining,
                "persistent_pages": persistent_pages(self.store.pool_stats(client))}

    async def remote_claim(self, request: dict[str, Any]) -> RemoteClaimReply:
        """Own the guest's namespace again after a handoff that no destination took
        up (or after the cluster was unreachable at the guest's start)."""
        tier = self._tier()
        runtime = self._guest(request.get("guest"))
        guest = tier.guest(runtime.name)
        assert guest is not None  # every served guest is registered
        if not await tier.claim(guest, reclaim=True):
            record = await tier.owner_record(guest) if tier.reachable else {}
            raise ControlError(f"guest {runtime.name!r} not claimed: "
                               + (f"the cluster says its owner is {record.get('host')!r}"
                                  if record else "the cluster is unreachable"))
        return {"guest": runtime.name, "epoch": guest.epoch or 0}

    async def remote_forget(self, request: dict[str, Any]) -> RemoteForgetReply:
        """Delete every key of a guest's namespace in the cluster. Refused while a
        served guest still has remote pages (its reads of them would fail): for a
        served guest it deletes orphans only."""
        tier = self._tier()
        name = validate_guest_name(_guest_name(request.get("guest")))
        uuid = self._namespace(name, request.get("uuid"))
        runtime = self.daemon.guests.get(name)
        if runtime is not None:
            deleted = await self._forget_orphans(tier, runtime, uuid)
        elif journal_path(self.daemon.state_dir, name).exists() and uuid == self._own_uuid(name):
            raise ControlError(f"guest {name!r} has a journal in {self.daemon.state_dir} that may "
                               "name pages in the cluster (its next start resumes them): "
                               f"'tmemctl forget {name}' discards both")
        else:
            deleted = await self._delete_namespace(uuid) or 0
        return {"guest": name, "uuid": str(uuid), "deleted": deleted}

    async def _forget_orphans(self, tier: RemoteTier, runtime: GuestRuntime, uuid: UUID) -> int:
        """Delete a served guest's namespace, which it must not reference."""
        name = runtime.name
        if uuid != runtime.config.identity_uuid:
            raise ControlError(f"guest {name!r} is served with uuid {runtime.config.identity_uuid}, "
                               f"not {uuid}")
        guest = tier.guest(name)
        if guest is None:
            raise ControlError(f"guest {name!r} is not registered in the remote tier")
        _refuse_if_remote_pages(runtime)
        # A limit of 0 stops its puts and demotions to the cluster while its keys
        # go (its pages stay in memory or go to the fallback disk); the barrier
        # waits out writes already in flight, which may yet make remote pages.
        saved_cap, guest.cap_bytes = guest.cap_bytes, 0
        try:
            if (in_flight := tier.barrier()) is not None:
                await in_flight
            _refuse_if_remote_pages(runtime)
            return await self._delete_namespace(uuid) or 0
        finally:
            guest.cap_bytes = saved_cap

    async def _delete_namespace(self, uuid: UUID) -> int | None:
        """Delete every key of the namespace in the cluster: the count (None
        without a tier). RemoteError if the cluster cannot be listed or written."""
        tier = self.daemon.tier
        if tier is None:
            return None
        if not tier.reachable:  # else SCAN would wait out its timeouts for nothing
            raise RemoteError("the cluster is unreachable")
        deleted = await tier.forget_namespace(uuid)
        log.info("remote namespace forgotten", extra={"uuid": str(uuid), "deleted": deleted})
        return deleted

    def _own_uuid(self, name: str) -> UUID:
        """A guest's namespace: the one tmemd last served it under, else the default."""
        guest = self.daemon.tier.guest(name) if self.daemon.tier is not None else None
        return guest.uuid if guest is not None else GuestConfig(name).identity_uuid

    def _namespace(self, name: str, given: object) -> UUID:
        """The request's `uuid` if given, else the guest's own."""
        if given is None:
            return self._own_uuid(name)
        if not isinstance(given, str):
            raise ControlError("'uuid' must be a UUID string")
        try:
            return UUID(given)
        except ValueError:
            raise ControlError(f"bad uuid {given!r}") from None

    async def shutdown(self, request: dict[str, Any]) -> ShutdownReply:
        log.info("shutting down", extra={"reason": "control request"})
        self.daemon.request_stop()  # after this reply: the stop waits for the handler
        return {"stopping": True}


def _absolute_path(path: object) -> Path:
    if not isinstance(path, str) or not os.path.isabs(path):
        raise ControlError("'path' must be an absolute path (tmemd's working directory is not yours)")
    return Path(path)


def _guest_name(name: object) -> str:
    if not isinstance(name, str):
        raise ControlError("missing 'guest' (a guest name)")
    return name


def _forgotten(name: str, *, configured: bool, remote_keys_deleted: int | None) -> ForgetReply:
    reply: ForgetReply = {"guest": name, "forgotten": True, "configured": configured}
    if remote_keys_deleted is not None:  # a tier: the count (the reply without one as before)
        reply["remote_keys_deleted"] = remote_keys_deleted
    return reply


def _refuse_if_remote_pages(runtime: GuestRuntime) -> None:
    pages = runtime.client.remote_pages
    if pages:
        raise ControlError(
            f"guest {runtime.name!r} is served and has {pages} page(s) in the cluster: deleting "
            f"them would fail its reads. Move them first ('tmemctl remote-drain {runtime.name} "
            f"--to home|disk') or forget the guest ('tmemctl forget {runtime.name}')")
