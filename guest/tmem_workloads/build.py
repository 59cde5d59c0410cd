"""build: gcc building a real C code base, then running what it built (stdlib only).

The code base is an upstream tarball the image carries in /opt/tmem/src (Lua 5.4
from Debian's archive, images/sources.txt). The build runs where it is started
(the runner puts it in a memory cgroup small enough to make cc1 swap), with
``make -j`` matched to the guest's CPUs; then the built interpreter runs a
script whose answer this module computes itself, so a miscompiled or corrupted
binary (a page that came back wrong from swap) fails the run.

    python3 -m tmem_workloads.build [--cflags -O2] [--jobs 0] [--source DIR]

Prints one JSON line: the build's and the check's times and the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE_DIR = Path("/opt/tmem/src")
TARBALL_GLOB = "lua5.4_*.orig.tar.*"
PRIMES_BELOW = 20000
# A Lua program with an answer Python checks: the sum of the primes below N by
# trial division (integer arithmetic, loops, tables, string formatting).
CHECK_SCRIPT = f"""
local primes, n = {{}}, 2
while n < {PRIMES_BELOW} do
  local prime = true
  for _, p in ipairs(primes) do
    if p * p > n then break end
    if n % p == 0 then prime = false break end
  end
  if prime then primes[#primes + 1] = n end
  n = n + 1
end
local sum = 0
for _, p in ipairs(primes) do sum = sum + p end
print(string.format("%d %d", #primes, sum))
"""


def expected_answer(limit: int = PRIMES_BELOW) -> str:
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\0\0"
    for number in range(2, int(limit**0.5) + 1):
        if sieve[number]:
            sieve[number * number :: number] = bytearray(len(range(number * number, limit, number)))
    primes = [number for number in range(limit) if sieve[number]]
    return f"{len(primes)} {sum(primes)}"


def find_tarball(source: Path) -> Path:
    found = sorted(source.glob(TARBALL_GLOB))
    if not found:
        raise SystemExit(f"build: no {TARBALL_GLOB} in {source} (images/sources.txt)")
    return found[-1]


def run(tarball: Path, work: Path, cflags: str, jobs: int) -> dict[str, object]:
    started = time.monotonic()
    subprocess.run(["tar", "-C", str(work), "-xf", str(tarball)], check=True)
    (tree,) = [path for path in work.iterdir() if path.is_dir()]
    extracted = time.monotonic()
    build = subprocess.run(
        ["make", f"-j{jobs}", "linux", f"MYCFLAGS={cflags}"], cwd=tree,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    built = time.monotonic()
    objects = len(list((tree / "src").glob("*.o")))
    result: dict[str, object] = {
        "source": tarball.name, "cflags": cflags, "jobs": jobs, "objects": objects,
        "extract_s": round(extracted - started, 3), "build_s": round(built - extracted, 3),
        "build_exit": build.returncode,
    }
    if build.returncode != 0:
        result.update(verified=False, total_s=round(built - started, 3), output_tail=build.stdout[-1500:])
        return result
    check = subprocess.run([str(tree / "src" / "lua"), "-e", CHECK_SCRIPT], capture_output=True, text=True,
                           check=False)
    done = time.monotonic()
    answer = check.stdout.strip()
    result.update(
        check_s=round(done - built, 3), total_s=round(done - started, 3), answer=answer,
        expected=expected_answer(), verified=check.returncode == 0 and answer == expected_answer(),
    )
    if check.returncode != 0:
        result["check_error"] = check.stderr[-500:]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m tmem_workloads.build", description=__doc__.split("\n")[0])
    parser.add_argument("--cflags", default="-O2", help="MYCFLAGS for Lua's Makefile (default -O2)")
    parser.add_argument("--jobs", type=int, default=0, help="make -j (default: the CPUs this process may use)")
    parser.add_argument("--source", type=Path, default=SOURCE_DIR, help="where the tarball is")
    parser.add_argument("--work", type=Path, default=Path("/root"), help="where the tree is built")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = args.jobs or len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="build-", dir=args.work))
    try:
        result = run(find_tarball(args.source), work, args.cflags, jobs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
