"""cpubench: the same small CPU benchmark in the guest and on the host, the
testbed's calibration: how much slower the guest's (emulated, under TCG) CPU is.

Two kinds of work, because the modes whose ranking depends on the guest CPU
depend on both: lz4 over usemem's page mix (the compression zswap does in the
guest kernel and tmemd does on the host; C code) and a pure-Python loop (the
agent is Python in the guest). Each is timed best-of-``--trials`` to cut noise.
The lz4 part needs the python3-lz4 package (the guest image has it); without it
the result says so and carries only the Python figure.

    python3 -m tmem_workloads.cpubench [--scale 1.0] [--trials 3]

Prints one JSON line: python_s, lz4_s (None without lz4), their work sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

from tmem_workloads.usemem import page_templates

# Work sizes at --scale 1: about 0.1 s each on this project's host cores (0.11 s
# and 0.12 s measured), a few seconds in all for a guest under TCG.
PYTHON_ROUNDS = 1_000_000
LZ4_PAGES = 32_768  # 128 MiB through compress + decompress


def python_work(rounds: int) -> int:
    """Integer arithmetic, a dict and a list: what an interpreter loop does."""
    state, counts = 1, dict[int, int]()
    for number in range(rounds):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        bucket = state % 97
        counts[bucket] = counts.get(bucket, 0) + number
    return sum(counts.values())


def lz4_work(pages: int) -> int:
    import lz4.block

    templates = page_templates(7)
    stored = 0
    for number in range(pages):
        page = templates[number % len(templates)]
        compressed = lz4.block.compress(page, store_size=False)
        if lz4.block.decompress(compressed, uncompressed_size=len(page)) != page:
            raise AssertionError("lz4 round trip changed a page")
        stored += len(compressed)
    return stored


def best_of(trials: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(trials):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def run(scale: float, trials: int) -> dict[str, object]:
    rounds, pages = max(1, int(PYTHON_ROUNDS * scale)), max(1, int(LZ4_PAGES * scale))
    result: dict[str, object] = {
        "python_rounds": rounds, "python_s": round(best_of(trials, lambda: python_work(rounds)), 4),
        "lz4_pages": pages, "lz4_s": None,
    }
    try:
        import lz4.block  # noqa: F401
    except ImportError:
        result["lz4_error"] = "no lz4 module (python3-lz4)"
    else:
        result["lz4_s"] = round(best_of(trials, lambda: lz4_work(pages)), 4)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tmem_workloads.cpubench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="work size multiplier")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.scale, args.trials)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
