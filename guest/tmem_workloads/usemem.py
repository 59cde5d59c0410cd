"""usemem: a checksummed page toucher, the swap-pressure workload (stdlib only).

Maps anonymous memory, writes every page with content derived from (seed, page
number), then reads every page back and compares. A page that comes back wrong
from swap (stale, zeroed, another page's) is caught, named, and makes the exit
status 1. Content is a realistic mix for a compressing backend: text-like pages,
binary pages, zero pages and random pages, each stamped with its page number so
that no two pages are equal.

    python3 -m tmem_workloads.usemem --mib 384 [--order random] [--passes 2] [--json]

Prints one JSON line with the timings and the verdict.
"""

from __future__ import annotations

import argparse
import json
import mmap
import random
import struct
import sys
import time
from collections.abc import Sequence

PAGE_SIZE = 4096
STAMP = struct.Struct("<QQ")  # seed, page number: first 16 bytes of every page
TEMPLATE_COUNT = 64


def page_templates(seed: int) -> list[bytes]:
    """Build the page templates: a fixed mix of compressibility classes."""
    rng = random.Random(seed)
    words = [b"swap", b"page", b"tmem", b"frontswap", b"cleancache", b"guest", b"host", b"pool"]
    templates: list[bytes] = []
    for number in range(TEMPLATE_COUNT):
        kind = number % 4
        if kind == 0:  # text-like, compresses well
            text = b" ".join(rng.choice(words) for _ in range(900))
            templates.append(text[:PAGE_SIZE].ljust(PAGE_SIZE, b"."))
        elif kind == 1:  # binary with structure (small integers), compresses somewhat
            templates.append(b"".join(struct.pack("<I", rng.randrange(1 << 12)) for _ in range(PAGE_SIZE // 4)))
        elif kind == 2:  # zero page (only the stamp differs)
            templates.append(bytes(PAGE_SIZE))
        else:  # random, incompressible
            templates.append(rng.randbytes(PAGE_SIZE))
    return templates


def expected_page(templates: Sequence[bytes], seed: int, page: int) -> bytes:
    return STAMP.pack(seed, page) + templates[page % TEMPLATE_COUNT][STAMP.size :]


def page_order(pages: int, order: str, seed: int) -> list[int]:
    sequence = list(range(pages))
    if order == "random":
        random.Random(seed ^ 0x5EED).shuffle(sequence)
    return sequence


def fill(region: mmap.mmap, templates: Sequence[bytes], *, seed: int, order: str) -> None:
    for page in page_order(len(region) // PAGE_SIZE, order, seed):
        offset = page * PAGE_SIZE
        region[offset : offset + PAGE_SIZE] = expected_page(templates, seed, page)


def verify(
    region: mmap.mmap, templates: Sequence[bytes], *, seed: int, order: str, order_seed: int
) -> list[int]:
    """Return the wrong pages, in the order they were checked."""
    bad_pages: list[int] = []
    for page in page_order(len(region) // PAGE_SIZE, order, order_seed):
        offset = page * PAGE_SIZE
        if region[offset : offset + PAGE_SIZE] != expected_page(templates, seed, page):
            bad_pages.append(page)
    return bad_pages


def run(mib: int, *, seed: int, order: str, passes: int) -> dict[str, object]:
    pages = mib * 1024 * 1024 // PAGE_SIZE
    templates = page_templates(seed)
    region = mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    started = time.monotonic()
    fill(region, templates, seed=seed, order=order)
    written = time.monotonic()
    bad_pages: list[int] = []
    for verify_pass in range(passes):
        # Later passes check in another random order, so swap-in readahead differs.
        order_this_pass = order if verify_pass == 0 else "random"
        bad_pages += verify(region, templates, seed=seed, order=order_this_pass, order_seed=seed + verify_pass)
    verified = time.monotonic()
    region.close()
    return {
        "workload": "usemem",
        "mib": mib,
        "pages": pages,
        "order": order,
        "passes": passes,
        "seed": seed,
        "write_s": round(written - started, 3),
        "verify_s": round(verified - written, 3),
        "total_s": round(verified - started, 3),
        "bad_pages": len(bad_pages),
        "first_bad_pages": bad_pages[:16],
        "verified": not bad_pages,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tmem_workloads.usemem", description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, required=True, help="working set in MiB")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--order", choices=("sequential", "random"), default="sequential")
    parser.add_argument("--passes", type=int, default=1, help="verification passes")
    args = parser.parse_args(argv)
    result = run(args.mib, seed=args.seed, order=args.order, passes=args.passes)
    print(json.dumps(result), flush=True)
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
