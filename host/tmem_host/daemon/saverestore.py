"""`tmemctl save` and `restore`: a guest's persistent tmem state to one file and
back, on this tmemd or any other (docs/RELIABILITY.md, "Save and restore").

Saving takes the guest's persistent pools as they are at one moment (the store is
single-threaded: one snapshot of every page's stored form), reads its remote
pages back from the tier, and writes them, its NBD export's fallback file and
lost-slot map into a save file (tmem_host.journal.savefile) from a worker thread.
The guest must not be connected (stop its QEMU first, e.g. after QEMU's
migrate-to-file): nothing may change the disk being saved.

Restoring installs the file as the guest's state files, exactly what a graceful
stop leaves: its journal (a compacted journal of every page, data inline), its
fallback file and lost map; then the guest is added back and the ordinary
restart path replays the journal and resumes the export. So a restored guest
is served by the code every restart uses, and the file is checked whole (every
crc, the digest, every journal record) before anything is touched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tmem_host.daemon.control import ControlError
from tmem_host.daemon.runtime import GuestRuntime, fallback_path, persistent_pages
from tmem_host.failpoints import failpoint
from tmem_host.journal import codec
from tmem_host.journal.journaled import JournaledStore, journal_path
from tmem_host.journal.savefile import (
    FORMAT_VERSION, SavedGuest, SaveFileError, fallback_runs, read_save_file, write_save_file,
)
from tmem_host.nbd.export import EXPORT_POOL_LABEL, lost_map_path
from tmem_host.replies import RestoreReply, SaveReply
from tmem_host.statefiles import fsync_dir, open_state_file
from tmem_host.store import Store
from tmem_host.store.pagecodec import StoredPage, stored_data_bytes
from tmem_host.store.store import Client, Pool
from tmem_host.store.tier import RemotePage
from tmem_wire.abi import Buffer, Oid
from tmem_wire.frontswap import PAGE_SIZE, frontswap_offset

if TYPE_CHECKING:
    from tmem_host.daemon.server import Daemon

log = logging.getLogger("tmemd")

# Remote pages read back per fetch (one round trip per master, as a GET_BATCH).
FETCH_PAGES = 64

# A page's stored form; a handoff keeps a remote page as its RemotePage (its key).
SavedPage = tuple[Oid, int, StoredPage | RemotePage]


async def save_guest(daemon: Daemon, runtime: GuestRuntime, path: Path, *,
                     handoff: bool = False) -> SaveReply:
    """Save the guest's state to ``path``. ``handoff``: hand its namespace in the
    cluster off first (RemoteTier.relinquish) and write its remote pages as their
    keys (REMOTE records), not their data: the destination's restore takes the
    namespace over and reads them where they are."""
    _refuse_if_connected(runtime, "saved")
    if path.exists() or path.is_symlink():  # before a handoff fences anything
        raise ControlError(f"{path} exists: tmemd does not overwrite a save file")
    # What the guest's connections have done: unchanged at the end, or nothing is saved.
    activity = (runtime.connections_total, runtime.nbd_export.counters["requests"])
    if handoff:
        tier = daemon.tier
        guest = tier.guest(runtime.name) if tier is not None else None
        if tier is None or guest is None:
            raise ControlError("a handoff needs a remote tier (--remote): use save")
        handoff_epoch: int | None = await tier.relinquish(guest)
        failpoint("handoff-relinquished")
        try:
            return await _save_state(daemon, runtime, path, activity, handoff_epoch)
        except BaseException:
            log.error("handoff failed after the guest's namespace was fenced: 'tmemctl remote-claim "
                      f"{runtime.name}' takes it back", extra={"guest": runtime.name})
            raise
    return await _save_state(daemon, runtime, path, activity, None)


async def _save_state(daemon: Daemon, runtime: GuestRuntime, path: Path, activity: tuple[int, int],
                      handoff_epoch: int | None) -> SaveReply:
    store = daemon.store
    client = runtime.client
    export = runtime.nbd_export
    handoff = handoff_epoch is not None
    pools: list[tuple[int, Pool, list[SavedPage]]] = []
    remote_pages = 0
    for pool_id, pool in enumerate(client.pools):
        if pool is None or not pool.persistent or pool.shared:
            continue
        snapshot = list(Store.stored_pages(pool))
        remote_pages += pool.remote_pages
        pools.append((pool_id, pool, snapshot if handoff
                      else await _read_back(store, client, pool_id, pool, snapshot)))
    lost_map = export.lost_map()
    metadata: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "guest": runtime.name,
        "uuid": str(runtime.config.identity_uuid),
        "host_id": daemon.config.host_id,
        "saved_at": time.time(),
        "page_size": PAGE_SIZE,
        "nbd_size_bytes": export.size_bytes,
        "handoff_epoch": handoff_epoch,
        "remote_pages": remote_pages if handoff else 0,  # pages named by their keys
        "pools": [{"id": pool_id, "page_shift": pool.page_shift, "label": pool.label, "pages": len(pages)}
                  for pool_id, pool, pages in pools],
        "pages": sum(len(pages) for _, _, pages in pools),
        "stored_bytes": sum(pool.remote_page_cost if isinstance(stored, RemotePage)
                            else pool.page_overhead + stored_data_bytes(stored)
                            for _, pool, pages in pools for _, _, stored in pages),
    }
    pieces = _journal_pieces(store, client, pools)
    fallback = list(await asyncio.to_thread(lambda: list(fallback_runs(export.fallback_path,
                                                                       export.size_bytes))))
    size, digest = await asyncio.to_thread(write_save_file, path, metadata, pieces, fallback, lost_map)
    failpoint("handoff-written" if handoff else "save-written")
    if runtime.connected or activity != (runtime.connections_total, export.counters["requests"]):
        path.unlink(missing_ok=True)
        raise ControlError(f"guest {runtime.name!r} connected during the save: nothing saved "
                           "(stop its QEMU or agent first)")
    reply: SaveReply = {
        "guest": runtime.name, "path": str(path), "bytes": size, "sha256": digest,
        "pools": len(pools), "pages": metadata["pages"], "remote_pages": remote_pages,
        "fallback_pages": sum(len(data) for _, data in fallback) // PAGE_SIZE,
        "lost_pages": _lost_pages(store, runtime),
    }
    log.info("guest saved", extra=dict(reply))
    return reply


async def _read_back(store: Store, client: Client, pool_id: int, pool: Pool,
                     snapshot: list[SavedPage]) -> list[SavedPage]:
    """The snapshot with every remote page's stored form read back from the tier;
    ControlError if any cannot be (missing, damaged, the cluster unreachable)."""
    remote = [position for position, (_, _, value) in enumerate(snapshot) if type(value) is RemotePage]
    unreadable = 0
    for start in range(0, len(remote), FETCH_PAGES):
        batch = remote[start:start + FETCH_PAGES]
        await store.read_back(client, pool_id, [snapshot[position][:2] for position in batch])
        for position in batch:
            oid, index, page = snapshot[position]
            assert type(page) is RemotePage
            copy = page.pending if page.pending is not None else page.fetched
            if copy is None:
                # Moved home meanwhile (remote-drain): the same contents, in memory now.
                current = pool.objects.get(oid, {}).get(index)
                if current is None or isinstance(current, RemotePage):
                    unreadable += 1
                    continue
                copy = current if isinstance(current, (int, bytes)) else current.stored
            snapshot[position] = (oid, index, copy)
    if unreadable:
        raise ControlError(f"{unreadable} of {len(remote)} remote pages of pool {pool_id} could not "
                           "be read back from the cluster (missing, damaged or unreachable): nothing saved")
    return snapshot


def _journal_pieces(store: Store, client: Client,
                    pools: Sequence[tuple[int, Pool, list[SavedPage]]]) -> list[Buffer]:
    """The pools as a compacted journal: NEW_POOL, its PUTs, its LOST keys."""
    pieces: list[Buffer] = []
    for pool_id, pool, pages in pools:
        pieces.append(codec.encode(codec.NewPoolRecord(pool_id, pool.page_shift, pool.label)))
        for oid, index, stored in pages:
            pieces += codec.put_record(pool_id, oid, index, stored)
        pieces += [codec.encode(codec.LostRecord(pool_id, oid, index))
                   for oid, index in sorted(store.lost_keys(client, pool_id))]
    return pieces


async def restore_guest(daemon: Daemon, path: Path, name: str | None, *,
                        replace: bool = False) -> RestoreReply:
    """Restore the save at ``path`` into guest ``name`` (default: the one saved).
    ``replace``: even if the guest holds pages (they are discarded here; its keys
    in the cluster are left alone): to finish a restore a crash interrupted."""
    try:
        saved = await asyncio.to_thread(read_save_file, path)
    except SaveFileError as error:
        raise ControlError(f"not restored: {error}") from None
    metadata = saved.metadata
    target = name if name is not None else str(metadata.get("guest"))
    runtime = daemon.guests.get(target)
    if runtime is None:
        raise ControlError(f"no guest {target!r} here: add it first (tmemctl add-guest {target}), "
                           "then restore into it")
    store = daemon.store
    if not isinstance(store, JournaledStore):
        raise ControlError("this tmemd keeps no journal to restore into")
    if runtime.connected and not _pristine(runtime, store):
        _refuse_if_connected(runtime, "restored")
    held = persistent_pages(store.pool_stats(runtime.client))
    if held and not replace:
        raise ControlError(f"guest {target!r} holds {held} persistent pages: 'tmemctl forget {target}' "
                           "first, restore --as another guest, or --replace them")
    uses_export = (saved.fallback or saved.lost_map is not None
                   or any(pool.get("label") == EXPORT_POOL_LABEL for pool in metadata.get("pools", ())))
    if uses_export and metadata.get("nbd_size_bytes") != daemon.config.nbd_size_bytes:
        raise ControlError(f"the save holds a {metadata.get('nbd_size_bytes')}-byte NBD disk; this "
                           f"tmemd exports {daemon.config.nbd_size_bytes} bytes (--nbd-size)")
    needed = int(metadata.get("stored_bytes", 0))
    room = store.budget_bytes - store.used_bytes
    if store.tier is None and needed > room:
        raise ControlError(f"the save's pages take {needed} bytes and the budget has {room} free: "
                           "raise it (tmemctl set-budget) or give tmemd a remote tier")
    config = runtime.config
    if metadata.get("remote_pages"):
        # A handoff: its remote pages are keys in the guest's namespace. Take the
        # namespace over before anything else, so that the source can neither write
        # nor delete there from now on (docs/REMOTE.md, "Handing a guest off").
        tier = daemon.tier
        guest = tier.guest(target) if tier is not None else None
        if tier is None or guest is None:
            raise ControlError("the save names pages in a remote tier: this tmemd has none (--remote)")
        if str(config.identity_uuid) != metadata.get("uuid"):
            raise ControlError(f"the save's pages are in namespace {metadata.get('uuid')}; guest "
                               f"{target!r} has uuid {config.identity_uuid} (give it uuid=...)")
        if not await tier.claim(guest, take_over=True):
            raise ControlError(f"guest {target!r} could not be taken over in the cluster: see tmemd's log")
        failpoint("restore-claimed")
    await daemon.remove_guest(target)
    try:
        await asyncio.to_thread(_install_state, daemon.state_dir, target, saved,
                                daemon.config.nbd_size_bytes)
    finally:
        # The guest lives here now: its namespace in the cluster too, whoever had it.
        runtime = await daemon.add_guest(config, take_over=True)
    stats = store.journal_stats(runtime.client)
    pages = persistent_pages(store.pool_stats(runtime.client))
    if pages != metadata.get("pages") or stats["replayed_pages"] != pages:
        raise ControlError(f"guest {target!r} came back with {pages} pages, the save has "
                           f"{metadata.get('pages')}: see tmemd's log")
    reply: RestoreReply = {
        "guest": target, "path": str(path), "saved_guest": str(metadata.get("guest")),
        "pools": len(metadata.get("pools", ())), "pages": pages,
        "fallback_pages": saved.fallback_pages, "lost_pages": _lost_pages(store, runtime),
    }
    log.info("guest restored", extra=dict(reply))
    return reply


def _install_state(state_dir: Path, guest: str, saved: SavedGuest, nbd_size_bytes: int) -> None:
    """Write the guest's state files from the save, each durable before the next:
    first a lost map with every slot lost, then the fallback file, then the journal
    (a rename), then the saved lost map. A crash before the journal is in place
    leaves the old (empty) journal and every slot failing to read (restore again);
    one after it leaves the pages in the pool readable and the rest failing. Never
    a slot that reads another state's data, or zeros where a page was."""
    fallback = fallback_path(state_dir, guest)
    lost = lost_map_path(fallback)
    _replace_file(lost, [b"\xff" * ((nbd_size_bytes // PAGE_SIZE + 7) // 8)])
    fsync_dir(state_dir)
    fd = open_state_file(fallback)
    try:
        os.ftruncate(fd, 0)  # whatever was there is not the restored disk's
        os.ftruncate(fd, nbd_size_bytes)
        for offset, data in saved.fallback:
            if offset + len(data) > nbd_size_bytes:
                raise ControlError(f"the save's fallback data at {offset} is past the disk's end")
            view = memoryview(data)
            while view:
                view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]
        os.fdatasync(fd)
    finally:
        os.close(fd)
    failpoint("restore-fallback-written")
    _replace_file(journal_path(state_dir, guest), saved.journal)
    fsync_dir(state_dir)
    failpoint("restore-journal-written")
    if saved.lost_map is None:
        lost.unlink(missing_ok=True)
    else:
        _replace_file(lost, [saved.lost_map])
    fsync_dir(state_dir)


def _replace_file(path: Path, pieces: Sequence[bytes]) -> None:
    tmp_path = path.with_name(path.name + ".restore.tmp")
    fd = open_state_file(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for piece in pieces:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        tmp_path.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp_path, path)


def _pristine(runtime: GuestRuntime, store: Store) -> bool:
    """Whether nothing connected to the guest has put or changed anything since it
    was added: a destination QEMU started with -incoming is connected, paused and
    idle. Its connections are closed by the restore and reconnect to the result."""
    return (runtime.client.puts == 0 and runtime.nbd_export.counters["changes"] == 0
            and persistent_pages(store.pool_stats(runtime.client)) == 0)


def _refuse_if_connected(runtime: GuestRuntime, what: str) -> None:
    if runtime.connected:
        raise ControlError(f"guest {runtime.name!r} has {runtime.connected} live connection(s): it "
                           f"cannot be {what} while it runs (stop its QEMU or agent first)")


def _lost_pages(store: Store, runtime: GuestRuntime) -> int:
    """The guest's pages that read as errors: the NBD export's lost slots (its map
    and the keys an admin flush took from its pool) and its agent pools' lost keys."""
    client = runtime.client
    export_pool = store.find_pool(client, EXPORT_POOL_LABEL)
    lost_map = runtime.nbd_export.lost_map() or b""
    slots = {at * 8 + bit for at, byte in enumerate(lost_map) if byte for bit in range(8) if byte >> bit & 1}
    others = 0
    for pool_id, pool in enumerate(client.pools):
        if pool is None or not pool.persistent:
            continue
        if pool_id == export_pool:
            slots.update(frontswap_offset(oid, index) for oid, index in store.lost_keys(client, pool_id))
        else:
            others += len(store.lost_keys(client, pool_id))
    return len(slots) + others

