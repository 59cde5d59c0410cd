"""What redis-py itself moves through a Redis Cluster: the reference for the remote tier.

The same 4 KiB pages tmemd would send, written and read back by redis-py's own
`RedisCluster` (sync; hiredis parses the replies when installed) three ways:

- one key per page, a cluster pipeline of BATCH_PAGES commands per execute;
- BATCH_PAGES keys sharing one hash tag (one slot), one MSET / MGET per batch;
- one value of BATCH_PAGES pages concatenated (256 KiB) per SET / GET.

Each way runs ROUNDS times (SET, then GET checked) and its best round is the
row: the engine's limit, not one run's scheduling. With one request in flight,
these rows wait for a wake-up across CPUs on every round trip and moved 3x
between runs on a 2-core host (docs/REMOTE.md).

Keys live under KEY_PREFIX (never tmemd's) and are deleted afterwards.
`python -m tmem_host.remote.rawbench` runs it on a LocalCluster of its own, or
on a running cluster with --seeds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster

from tmem_host.remote.cluster import LocalCluster
from tmem_host.remote.tier import parse_seeds
from tmem_wire.frontswap import PAGE_SIZE

BATCH_PAGES = 64
KEY_PREFIX = b"rawbench:"
DEFAULT_PAGES = 4096
ROUNDS = 2


@dataclass(frozen=True, slots=True)
class RawRow:
    name: str
    op: str  # "put" or "get"
    pages: int
    seconds: float

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0


# redis-py leaves ClusterNode() and RedisCluster.pipeline() unannotated.
def _client(seed_spec: str) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode(host, port)  # type: ignore[no-untyped-call]
                                       for host, port in parse_seeds(seed_spec)])


def _pipeline(client: RedisCluster) -> ClusterPipeline:
    return client.pipeline()  # type: ignore[no-untyped-call,no-any-return]


def _timed(name: str, op: str, pages: int, work: Callable[[], object]) -> RawRow:
    started = time.perf_counter()
    work()
    return RawRow(name, op, pages, time.perf_counter() - started)


def _batches(count: int) -> list[range]:
    return [range(start, min(start + BATCH_PAGES, count)) for start in range(0, count, BATCH_PAGES)]


def _verify(what: str, found: Sequence[object], expected: Sequence[bytes]) -> None:
    if list(found) != list(expected):
        wrong = sum(1 for got, want in zip(found, expected) if got != want)
        raise RuntimeError(f"{what}: {wrong + abs(len(found) - len(expected))} of "
                           f"{len(expected)} values came back different from what was set")


def raw_cluster_rows(seed_spec: str, pages: list[bytes], rounds: int = ROUNDS) -> list[RawRow]:
    """SET/GET ``pages`` through redis-py's RedisCluster the three ways, the best
    of ``rounds`` each; every GET is checked against what was set (RuntimeError
    if not)."""
    client = _client(seed_spec)
    batches = _batches(len(pages))
    page_keys = [KEY_PREFIX + b"page:%d" % number for number in range(len(pages))]
    # The hash tag {m<batch>} puts a batch's keys in one slot (MSET needs that).
    slot_keys = [KEY_PREFIX + b"{m%d}:%d" % (number // BATCH_PAGES, number)
                 for number in range(len(pages))]
    blob_keys = [KEY_PREFIX + b"blob:%d" % index for index in range(len(batches))]
    blobs = [b"".join(pages[batch.start:batch.stop]) for batch in batches]
    found: list[object] = []
    try:
        def set_pipelined() -> None:
            for batch in batches:
                pipe = _pipeline(client)
                for number in batch:
                    pipe.set(page_keys[number], pages[number])
                if not all(pipe.execute()):
                    raise RuntimeError("a pipelined SET failed")

        def get_pipelined() -> None:
            for batch in batches:
                pipe = _pipeline(client)
                for number in batch:
                    pipe.get(page_keys[number])
                found.extend(pipe.execute())

        def mset_per_slot() -> None:
            for batch in batches:
                client.mset({slot_keys[number]: pages[number] for number in batch})

        def mget_per_slot() -> None:
            for batch in batches:
                found.extend(client.mget([slot_keys[number] for number in batch]))

        def set_blobs() -> None:
            for key, blob in zip(blob_keys, blobs):
                client.set(key, blob)

        def get_blobs() -> None:
            for key in blob_keys:
                found.append(client.get(key))

        blob_name = f"redis-py cluster {BATCH_PAGES * PAGE_SIZE // 1024} KiB value"
        methods: list[tuple[str, Callable[[], None], Callable[[], None], Sequence[bytes]]] = [
            ("redis-py cluster {} pipelined", set_pipelined, get_pipelined, pages),
            ("redis-py cluster M{} per slot", mset_per_slot, mget_per_slot, pages),
            (blob_name + " {}", set_blobs, get_blobs, blobs),
        ]
        rows = []
        for name, put, get, expected in methods:
            puts, gets = [], []
            for _ in range(rounds):
                puts.append(_timed(name.format("SET"), "put", len(pages), put))
                found.clear()
                gets.append(_timed(name.format("GET"), "get", len(pages), get))
                _verify(name.format("GET"), found, expected)
            rows += [min(puts, key=lambda row: row.seconds), min(gets, key=lambda row: row.seconds)]
        return rows
    finally:
        # RedisCluster.delete splits the keys by slot.
        client.delete(*page_keys, *slot_keys, *blob_keys)
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tmem_host.remote.rawbench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", help="a running cluster (host:port,...); default: start one")
    parser.add_argument("--pages", type=int, default=DEFAULT_PAGES)
    args = parser.parse_args(argv)
    # The bench's pages (bench.py's seed), without importing bench.py (it will import us).
    from tmem_workloads.usemem import expected_page, page_templates
    templates = page_templates(20111)
    pages = [expected_page(templates, 20111, number) for number in range(args.pages)]
    if args.seeds:
        rows = raw_cluster_rows(args.seeds, pages)
    else:
        with tempfile.TemporaryDirectory(prefix="tmem-rawbench-") as scratch, \
                LocalCluster(Path(scratch)) as cluster:
            rows = raw_cluster_rows(cluster.seed_spec, pages)
    for row in rows:
        print(f"{row.name:<40} {row.op:<4} {row.pages:>7} pages {row.pages_per_s:>10,.0f} pages/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
