"""What the store knows of a tier below it (the remote tier, tmem_host.remote).

The store stays pure: it keeps a page that lives elsewhere as a ``RemotePage``
(its version and size, no data) and asks a ``PageTier`` to take, read and
release such pages. The tier does the I/O in the background; the frontends
wait for it through ``Store.fetch`` (before a get) and ``Store.make_durable``
(before replies), docs/REMOTE.md.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final, Protocol

from tmem_wire.abi import Oid

from .pagecodec import StoredPage

if TYPE_CHECKING:
    from .store import Pool

#: A remote page's local metadata beyond a persistent page's: the RemotePage
#: object (5 slots, 72 bytes) and its version int (36), sys.getsizeof on 3.11.
REMOTE_PAGE_EXTRA_BYTES: Final = 112


class RemotePage:
    """A persistent page whose data lives in the tier, not in memory.

    ``version`` names this copy (it is part of the remote key and of the value's
    checksum, so an older copy can never be taken for it). ``nbytes`` is what it
    costs the tier. ``pending`` holds the stored form while the tier's write is
    in flight (gets are served from it); ``fetched`` holds a copy the tier read
    back for a get in progress. ``read_failed``: the tier's last read of it for a
    get found no valid copy (missing, damaged, unreachable): the gets that read
    waited for miss rather than read again (``Store.fetch(again=True)``)."""

    __slots__ = ("version", "nbytes", "pending", "fetched", "read_failed")

    def __init__(self, version: int, nbytes: int, pending: StoredPage | None = None) -> None:
        self.version = version
        self.nbytes = nbytes
        self.pending = pending
        self.fetched: StoredPage | None = None
        self.read_failed = False

    def __repr__(self) -> str:
        return f"RemotePage(version={self.version}, nbytes={self.nbytes})"


class PageTier(Protocol):
    """The store's view of a tier that holds persistent pages it has no room for."""

    def take(self, pool: Pool, oid: Oid, index: int, stored: StoredPage) -> RemotePage | None:
        """A page that does not fit locally: start writing it to the tier and
        return its RemotePage (the store enters it), or None to refuse it
        (quota, tier unreachable, too much in flight)."""

    def release(self, pool: Pool, oid: Oid, index: int, page: RemotePage, *, keep: bool) -> None:
        """The store dropped the page (flushed, replaced, pool destroyed): delete
        its copy in the tier (in the background). ``keep``: the guest left memory
        at a graceful stop and its journal still points at the copy: keep it."""

    def fetch(self, pool: Pool, pages: list[tuple[Oid, int, RemotePage]],
              held: list[RemotePage]) -> asyncio.Future[None]:
        """Read these pages back (into ``page.fetched``); the future completes when
        every read has ended, whether it found the page or not (then it sets
        ``page.read_failed``; a read that finds it clears it). ``held``: pages of
        the same gets whose copy is here already (written or read before): they
        must still have it when the future's waiters run."""

    def barrier(self) -> asyncio.Future[None] | None:
        """A future that completes when every write taken so far has ended (the
        tier acknowledged it, or the page went back to memory); None if none is
        in flight."""

    def pressure(self) -> None:
        """A persistent put found no room even for a remote page's metadata: make
        room (demote) before the next ones."""

    def consumed(self, pool: Pool, oid: Oid, index: int, page: RemotePage) -> None:
        """A get took this page's copy (``page.fetched`` or ``pending``): a copy a
        get waited for is kept until then, however long the event loop took to run
        it; and the tier sees which pages the guest reads (read-ahead)."""

    def restored(self, page: RemotePage) -> None:
        """The journal's replay entered this page: versions must stay above it."""
