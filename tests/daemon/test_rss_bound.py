"""tmemd's resident memory under a put flood stays within its budget plus a
fixed overhead (issue #7, point 6; docs/RELIABILITY.md, "Isolation and fault
containment").

Two guests flood a real tmemd with PUT_BATCH frames worth several budgets;
tmemd's VmRSS is sampled throughout and after. The bound, with no per-page
term:

    RSS <= budget + FIXED_OVERHEAD

because the store charges every page what it really costs the host: its data
bytes, its metadata (per kind) and its object's (tmem_host.store's overhead
constants). FIXED_OVERHEAD is the interpreter and its modules (an idle tmemd:
about 26 MiB) plus buffers (256 KiB receive buffer and up to 4 MiB of pending
replies per connection, frames up to 4 MiB, allocator slack).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest

from tmem_host.daemon.client import AbiClient
from tmem_host.daemon.process import StartTmemd, TmemdProcess
from tmem_host.store import OBJECT_OVERHEAD_BYTES, page_overhead_bytes
from tmem_wire.abi import PoolFlag, Status
from tmem_workloads.usemem import expected_page, page_templates

MIB = 1 << 20
PAGE = 4096
BATCH = 256
# Measured (docs/RELIABILITY.md): idle tmemd 27 MiB; the floods below peak
# 20-31 MiB above their budget.
FIXED_OVERHEAD = 48 * MIB

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


def flood(daemon: TmemdProcess, guest: str, persistent: bool, make_pages: PageMaker,
          pages_per_object: int, pages_to_send: int, statuses: list[Status]) -> None:
    with AbiClient.open(daemon.abi_socket(guest)) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT if persistent else PoolFlag(0))
        # With one page per object, large oid words: the costliest keys.
        high = 1 << 63 if pages_per_object == 1 else 0
        for start in range(0, pages_to_send, BATCH):
            keys = [((high + n // pages_per_object, high, high), n % pages_per_object)
                    for n in range(start, start + BATCH)]
            statuses += client.put_batch(pool_id, keys, make_pages(start, BATCH))


# (pages, persistent, pages per object, budget MiB, data bytes a page stores):
# each flood is 3-4 budgets' worth at what a page is charged (mixed pages:
# about 1 KiB after lz4). Same-filled pages store no data: only the metadata
# charge bounds their number (at the old flat 64 bytes, 32 MiB admitted 500k
# of them, ~200 MiB of RSS).
@pytest.mark.parametrize(("make_pages", "persistent", "pages_per_object", "budget_mib",
                          "data_bytes"), [
    (random_pages, True, 4096, 64, PAGE),
    (random_pages, False, 4096, 64, PAGE),
    (same_filled_pages, True, 4096, 16, 0),
    (same_filled_pages, False, 4096, 32, 0),
    (same_filled_pages, False, 1, 32, 0),
    (mixed_pages, False, 4096, 32, 1024),
], ids=["random-persistent", "random-ephemeral", "same-filled-persistent",
        "same-filled-ephemeral", "same-filled-ephemeral-one-per-object", "mixed-ephemeral"])
def test_put_flood_keeps_rss_within_budget_plus_overhead(
        start_tmemd: StartTmemd, make_pages: PageMaker, persistent: bool,
        pages_per_object: int, budget_mib: int, data_bytes: int) -> None:
    budget = budget_mib * MIB
    daemon = start_tmemd(guests=("g1", "g2"), budget=f"{budget_mib}M")
    idle_rss = daemon.rss_bytes()
    page_cost = (data_bytes + page_overhead_bytes(persistent)
                 + OBJECT_OVERHEAD_BYTES // pages_per_object)
    per_guest = (4 * budget // page_cost // 2) // BATCH * BATCH
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], daemon.rss_bytes())
            time.sleep(0.02)

    statuses: dict[str, list[Status]] = {"g1": [], "g2": []}
    sampler = threading.Thread(target=sample)
    guests = [threading.Thread(target=flood, args=(daemon, guest, persistent, make_pages,
                                                   pages_per_object, per_guest, statuses[guest]))
              for guest in statuses]
    sampler.start()
    for thread in guests:
        thread.start()
    for thread in guests:
        thread.join(120)
    done.set()
    sampler.join()
    after = daemon.rss_bytes()
    with daemon.control() as control:
        store = control.request("stats")["store"]
    pages = sum(client["pages"] for client in store["clients"].values())
    sent = sum(map(len, statuses.values()))
    assert sent == 2 * per_guest
    assert store["used_bytes"] <= budget and pages <= budget // page_overhead_bytes(persistent)
    if persistent:  # the flood overflowed the budget: puts refused, nothing evicted
        assert statuses["g1"].count(Status.REFUSED) + statuses["g2"].count(Status.REFUSED) \
            == sent - pages
    else:  # eviction made room for every put
        assert all(status == Status.OK for status in statuses["g1"] + statuses["g2"])
        assert store["evictions"] == sent - pages
    bound = budget + FIXED_OVERHEAD
    report = (f"idle {idle_rss / MIB:.1f} MiB, peak {peak[0] / MIB:.1f} MiB, after "
              f"{after / MIB:.1f} MiB, bound {bound / MIB:.1f} MiB, {pages} pages, "
              f"used {store['used_bytes'] / MIB:.1f} MiB, "
              f"{(max(peak[0], after) - budget) / MIB:.1f} MiB above the budget")
    assert max(peak[0], after) <= bound, report
    print(report)
    if make_pages is same_filled_pages:
        # Nothing but metadata grew: what the host spent per page against what
        # the store charged per page.
        spent = (after - idle_rss) / pages
        charged = store["used_bytes"] / pages
        print(f"{spent:.0f} host bytes per page, {charged:.0f} charged")
