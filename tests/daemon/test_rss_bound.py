"""tmemd's resident memory under a put flood stays within its budget plus a
stated overhead (issue #7, point 6; docs/RELIABILITY.md, "Isolation and fault
containment").

Two guests flood a real tmemd with PUT_BATCH frames worth several budgets;
tmemd's VmRSS is sampled throughout and after. The bound:

    RSS <= budget + BASE_OVERHEAD + pages * uncharged bytes per page

BASE_OVERHEAD is the interpreter and its modules (an idle tmemd: about 26 MiB)
plus buffers (256 KiB receive buffer and up to 4 MiB of pending replies per
connection, frames up to 4 MiB, allocator slack). The store charges every page
its data bytes plus PAGE_OVERHEAD_BYTES; what a page really costs beyond that
(dict slots, ints, and for ephemeral pages the LRU entry) is uncharged, and
`pages` is at most budget / PAGE_OVERHEAD_BYTES, so with pages that store
no data bytes (same-filled) the uncharged part is what grows.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest

from tmem_guest.usemem import expected_page, page_templates
from tmem_host.daemon.client import AbiClient
from tmem_host.daemon.process import StartTmemd, TmemdProcess
from tmem_host.store import PAGE_OVERHEAD_BYTES
from tmem_wire.abi import PoolFlag, Status

MIB = 1 << 20
PAGE = 4096
BATCH = 256
# Measured: idle tmemd 26 MiB; after a 4x flood of random pages 31-36 MiB
# above budget + uncharged metadata.
BASE_OVERHEAD = 48 * MIB
# Uncharged host bytes per stored page (measured with same-filled pages, where
# nothing else grows; 8-16 MiB floods): persistent 54-82, ephemeral 335-390.
UNCHARGED_PER_PAGE = {True: 112, False: 480}

PageMaker = Callable[[int, int], list[bytes]]


def random_pages(start: int, count: int) -> list[bytes]:
    data = os.urandom(PAGE * count)
    return [data[i * PAGE:(i + 1) * PAGE] for i in range(count)]


def same_filled_pages(start: int, count: int) -> list[bytes]:
    """Each page one distinct 8-byte word repeated: 0 data bytes in the store."""
    return [(start + i).to_bytes(8, "little") * (PAGE // 8) for i in range(count)]


TEMPLATES = page_templates(3)


def mixed_pages(start: int, count: int) -> list[bytes]:
    """usemem's mix: text, structured binary, zero, random; lz4 sizes vary."""
    return [expected_page(TEMPLATES, 3, start + i) for i in range(count)]


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def flood(daemon: TmemdProcess, guest: str, persistent: bool, make_pages: PageMaker,
          pages_to_send: int, statuses: list[Status]) -> None:
    with AbiClient.open(daemon.abi_socket(guest)) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT if persistent else PoolFlag(0))
        for start in range(0, pages_to_send, BATCH):
            keys = [((n // 4096, 0, 0), n % 4096) for n in range(start, start + BATCH)]
            statuses += client.put_batch(pool_id, keys, make_pages(start, BATCH))


# (pages, persistent, budget MiB, page cost the flood is sized by): each flood is
# 3-4 budgets' worth of pages at that cost (mixed pages: about 1 KiB after lz4).
@pytest.mark.parametrize(("make_pages", "persistent", "budget_mib", "page_cost"), [
    (random_pages, True, 64, PAGE + PAGE_OVERHEAD_BYTES),
    (random_pages, False, 64, PAGE + PAGE_OVERHEAD_BYTES),
    (same_filled_pages, True, 8, PAGE_OVERHEAD_BYTES * 4 // 3),
    (same_filled_pages, False, 8, PAGE_OVERHEAD_BYTES * 4 // 3),
    (mixed_pages, False, 32, 1024),
], ids=["random-persistent", "random-ephemeral", "same-filled-persistent",
        "same-filled-ephemeral", "mixed-ephemeral"])
def test_put_flood_keeps_rss_within_budget_plus_overhead(
        start_tmemd: StartTmemd, make_pages: PageMaker, persistent: bool, budget_mib: int,
        page_cost: int) -> None:
    budget = budget_mib * MIB
    daemon = start_tmemd(guests=("g1", "g2"), budget=f"{budget_mib}M")
    idle_rss = vm_rss(daemon.pid)
    per_guest = (4 * budget // page_cost // 2) // BATCH * BATCH
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], vm_rss(daemon.pid))
            time.sleep(0.02)

    statuses: dict[str, list[Status]] = {"g1": [], "g2": []}
    sampler = threading.Thread(target=sample)
    guests = [threading.Thread(target=flood, args=(daemon, guest, persistent, make_pages,
                                                   per_guest, statuses[guest]))
              for guest in statuses]
    sampler.start()
    for thread in guests:
        thread.start()
    for thread in guests:
        thread.join(120)
    done.set()
    sampler.join()
    after = vm_rss(daemon.pid)
    with daemon.control() as control:
        store = control.request("stats")["store"]
    pages = sum(client["pages"] for client in store["clients"].values())
    sent = sum(map(len, statuses.values()))
    assert sent == 2 * per_guest
    assert store["used_bytes"] <= budget and pages <= budget // PAGE_OVERHEAD_BYTES
    if persistent:  # the flood overflowed the budget: puts refused, nothing evicted
        assert statuses["g1"].count(Status.REFUSED) + statuses["g2"].count(Status.REFUSED) \
            == sent - pages
    else:  # eviction made room for every put
        assert all(status == Status.OK for status in statuses["g1"] + statuses["g2"])
        assert store["evictions"] == sent - pages
    bound = budget + BASE_OVERHEAD + pages * UNCHARGED_PER_PAGE[persistent]
    report = (f"idle {idle_rss / MIB:.1f} MiB, peak {peak[0] / MIB:.1f} MiB, after "
              f"{after / MIB:.1f} MiB, bound {bound / MIB:.1f} MiB, {pages} pages, "
              f"used {store['used_bytes'] / MIB:.1f} MiB")
    assert max(peak[0], after) <= bound, report
    print(report)
    if make_pages is same_filled_pages:
        # Nothing but page metadata grew: count it per page.
        data_bytes = store["used_bytes"] - pages * PAGE_OVERHEAD_BYTES
        per_page = (after - idle_rss - data_bytes) / pages
        assert per_page <= PAGE_OVERHEAD_BYTES + UNCHARGED_PER_PAGE[persistent], report
        print(f"{per_page:.0f} host bytes per page")
