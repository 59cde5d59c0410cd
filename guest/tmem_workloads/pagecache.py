"""pagecache: a checksummed file-set reader, the page-cache (cleancache) workload.

`prepare` writes a file set of --mib MiB in files of --file-mib MiB under a
directory, every page from usemem's templates stamped with (seed, file, page):
deterministic, mixed compressibility, no two pages equal. It then syncs and drops
the page cache, so the first read comes from the disk. `read` reads every file
through a directory (the agent's FUSE mount, or the plain file system) `--passes`
times and checks every page; a page that comes back stale, zeroed or from another
file is counted and named, and makes the exit status 1. `--order random` reads
`--reads` single pages per pass instead, chosen at random over the whole set
(the same sequence every pass, readahead off: POSIX_FADV_RANDOM), the way a
database or a key-value store looks records up: the disk's operations per second,
not its bandwidth, bound it.

    python3 -m tmem_workloads.pagecache prepare --dir /data/set --mib 96 [--seed 1]
    python3 -m tmem_workloads.pagecache read --dir /mnt/cache --mib 96 [--passes 2]
    python3 -m tmem_workloads.pagecache read --dir /data/set --mib 96 --order random --reads 8192

Both print one JSON line. Stdlib only.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tmem_workloads.usemem import PAGE_SIZE, expected_page, page_templates

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
CHUNK_PAGES = 64  # 256 KiB per read()/write(): a few FUSE requests each


def file_name(number: int) -> str:
    return f"f{number:04d}"


def page_stamp(file: int, page: int) -> int:
    """usemem stamps (seed, page number); the file number goes in the high bits."""
    return file << 32 | page


def layout(mib: int, file_mib: int) -> list[int]:
    """Pages per file: whole files of file_mib, the remainder in a last, shorter one."""
    total = mib * (1 << 20) // PAGE_SIZE
    per_file = file_mib * (1 << 20) // PAGE_SIZE
    sizes = [per_file] * (total // per_file)
    if total % per_file:
        sizes.append(total % per_file)
    return sizes


def file_content(templates: Sequence[bytes], seed: int, file: int, first: int, count: int) -> bytes:
    return b"".join(expected_page(templates, seed, page_stamp(file, page)) for page in range(first, first + count))


def prepare(directory: Path, mib: int, *, file_mib: int, seed: int, drop_caches: bool = True) -> dict[str, object]:
    started = time.monotonic()
    templates = page_templates(seed)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = layout(mib, file_mib)
    for file, pages in enumerate(sizes):
        fd = os.open(directory / file_name(file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for first in range(0, pages, CHUNK_PAGES):
                os.write(fd, file_content(templates, seed, file, first, min(CHUNK_PAGES, pages - first)))
        finally:
            os.close(fd)
    os.sync()
    if drop_caches:
        DROP_CACHES.write_text("3\n")  # the first read must come from the disk
    return {"files": len(sizes), "pages": sum(sizes), "prepare_s": round(time.monotonic() - started, 3)}


def read_pass(directory: Path, sizes: Sequence[int], templates: Sequence[bytes], seed: int) -> tuple[int, list[str]]:
    """Read and check every page once; return (bytes read, the wrong pages as 'fNNNN:page')."""
    total = 0
    bad: list[str] = []
    buffer = bytearray(CHUNK_PAGES * PAGE_SIZE)
    view = memoryview(buffer)
    for file, pages in enumerate(sizes):
        with open(directory / file_name(file), "rb", buffering=0) as handle:
            page = 0
            while True:
                count = handle.readinto(buffer)
                if not count:
                    break
                total += count
                for offset in range(0, count, PAGE_SIZE):
                    # A short or missing page never equals a full expected page.
                    if view[offset : offset + PAGE_SIZE] != expected_page(templates, seed, page_stamp(file, page)):
                        bad.append(f"{file_name(file)}:{page}")
                    page += 1
            if page != pages:  # truncated or grown
                bad.append(f"{file_name(file)}:size {page} pages, expected {pages}")
    return total, bad


def random_pass(directory: Path, sizes: Sequence[int], templates: Sequence[bytes], seed: int,
                reads: int) -> tuple[int, list[str]]:
    """Read and check ``reads`` pages picked at random over the set (the same ones
    in the same order for the same seed); return (bytes read, the wrong pages)."""
    starts = [0]
    for pages in sizes:
        starts.append(starts[-1] + pages)
    picker = random.Random(seed)
    fds = [os.open(directory / file_name(file), os.O_RDONLY) for file in range(len(sizes))]
    total = 0
    bad: list[str] = []
    try:
        for fd in fds:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # one page per read: no readahead
        for _ in range(reads):
            number = picker.randrange(starts[-1])
            file = bisect.bisect_right(starts, number) - 1
            page = number - starts[file]
            data = os.pread(fds[file], PAGE_SIZE, page * PAGE_SIZE)
            total += len(data)
            if data != expected_page(templates, seed, page_stamp(file, page)):
                bad.append(f"{file_name(file)}:{page}")
    finally:
        for fd in fds:
            os.close(fd)
    return total, bad


def read(directory: Path, mib: int, *, file_mib: int, seed: int, passes: int, order: str = "sequential",
         reads: int = 0) -> dict[str, object]:
    templates = page_templates(seed)
    sizes = layout(mib, file_mib)
    pass_times: list[float] = []
    total_bytes = 0
    bad: list[str] = []
    for _ in range(passes):
        started = time.monotonic()
        if order == "random":
            count, wrong = random_pass(directory, sizes, templates, seed, reads or sum(sizes))
        else:
            count, wrong = read_pass(directory, sizes, templates, seed)
        pass_times.append(round(time.monotonic() - started, 3))
        total_bytes += count
        bad += wrong
    return {
        "workload": "pagecache",
        "directory": os.fspath(directory),
        "mib": mib,
        "files": len(sizes),
        "passes": passes,
        "order": order,
        "reads": (reads or sum(sizes)) if order == "random" else None,
        "seed": seed,
        "pass_s": pass_times,
        "total_s": round(sum(pass_times), 3),
        "bytes": total_bytes,
        "bad_pages": len(bad),
        "first_bad_pages": bad[:16],
        "verified": not bad,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tmem_workloads.pagecache", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "read"):
        command = commands.add_parser(name)
        command.add_argument("--dir", type=Path, required=True, help="where the file set is (read: through)")
        command.add_argument("--mib", type=int, required=True, help="file set size in MiB")
        command.add_argument("--file-mib", type=int, default=4, help="size of one file in MiB")
        command.add_argument("--seed", type=int, default=1)
    commands.choices["prepare"].add_argument("--keep-cache", action="store_true", help="do not drop caches")
    commands.choices["read"].add_argument("--passes", type=int, default=2)
    commands.choices["read"].add_argument("--order", choices=("sequential", "random"), default="sequential",
                                          help="whole files in order, or single pages at random")
    commands.choices["read"].add_argument("--reads", type=int, default=0,
                                          help="random: pages read per pass (0: as many as the set has)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        result = prepare(args.dir, args.mib, file_mib=args.file_mib, seed=args.seed, drop_caches=not args.keep_cache)
        print(json.dumps(result), flush=True)
        return 0
    result = read(args.dir, args.mib, file_mib=args.file_mib, seed=args.seed, passes=args.passes,
                  order=args.order, reads=args.reads)
    print(json.dumps(result), flush=True)
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
