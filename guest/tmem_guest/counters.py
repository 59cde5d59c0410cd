"""Agent counters and latency histograms, published as JSON files (stdlib only).

Each frontend (swap, cache) owns one `Counters`; a `StatsPublisher` thread
rewrites `/run/tmem-agent/<name>.json` atomically (write + rename) every
interval, and `python3 -m tmem_guest stats` merges the files. Files rather than
a socket: a reader never blocks the agent, and the last state survives the agent.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from tmem_wire.agent import AGENT_RUN_DIR

STATS_DIR = Path(AGENT_RUN_DIR)
# Latency bucket i counts operations that took [2**(i-1), 2**i) microseconds
# (bucket 0: under 1 us); the last bucket takes everything slower (>= 2**26 us ~ 67 s).
LATENCY_BUCKETS = 28


class LatencyHistogram:
    """Power-of-two microsecond buckets: fixed size, no allocation per sample."""

    __slots__ = ("buckets", "count", "total_us", "max_us")

    def __init__(self) -> None:
        self.buckets = [0] * LATENCY_BUCKETS
        self.count = 0
        self.total_us = 0
        self.max_us = 0

    def add(self, microseconds: int) -> None:
        self.buckets[min(microseconds.bit_length(), LATENCY_BUCKETS - 1)] += 1
        self.count += 1
        self.total_us += microseconds
        self.max_us = max(self.max_us, microseconds)

    def percentile_us(self, fraction: float) -> int:
        """Upper bound of the bucket holding the `fraction` quantile (0 if empty)."""
        if self.count == 0:
            return 0
        rank = fraction * self.count
        seen = 0
        for bucket, hits in enumerate(self.buckets):
            seen += hits
            if seen >= rank:
                return 1 << bucket
        return 1 << (LATENCY_BUCKETS - 1)

    def as_dict(self) -> dict[str, object]:
        return {
            "count": self.count,
            "mean_us": round(self.total_us / self.count, 1) if self.count else 0.0,
            "p50_us": self.percentile_us(0.5),
            "p99_us": self.percentile_us(0.99),
            "max_us": self.max_us,
            "buckets_log2_us": list(self.buckets),
        }


COUNTER_NAMES = (
    "puts",  # pages offered to tmem
    "put_refusals",  # pages tmem refused (went to the fallback disk, or were dropped)
    "gets",  # pages asked of tmem
    "hits",  # pages tmem returned
    "misses",  # pages tmem did not have
    "misses_known",  # of those, pages never put (cache): read without asking tmem
    "flushes",  # pages (or objects) invalidated in tmem
    "bytes_put",  # payload bytes of accepted puts
    "bytes_got",  # payload bytes of hits
    "disk_writes",  # pages written to the fallback disk / backing file
    "disk_reads",  # pages read from the fallback disk / backing file
    "lost_pages",  # tmem said MISS for a page only tmem had: answered EIO
    "errors",  # requests answered with an error
    "requests",  # frontend requests served (NBD requests, FUSE reads/writes)
    "channel_down",  # operations that found the channel down
    "unsure_flushed",  # keys flushed after an outage left them unsure (swap)
    "drained_pages",  # pages moved from tmem to the fallback disk by drains (swap)
    "readahead_hits",  # pages a READ took from the agent's readahead window (swap)
    "attribute_requests",  # GETATTRs the kernel sent (cache: one per read() while it keeps none)
    "fills_skipped",  # cache fills not put: the file changed after their read
)


class Counters:
    """The counters of one frontend; `record` takes a lock so threads add safely."""

    def __init__(self, name: str, mode: str) -> None:
        self.name = name
        self.mode = mode
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTER_NAMES, 0)
        self._latency: dict[str, LatencyHistogram] = {}
        self.started = time.time()

    def add(self, **amounts: int) -> None:
        with self._lock:
            values = self._values
            for name, amount in amounts.items():
                values[name] += amount

    def observe(self, operation: str, seconds: float) -> None:
        """Record one operation's latency under `operation` (e.g. "put", "nbd_read")."""
        with self._lock:
            histogram = self._latency.get(operation)
            if histogram is None:
                histogram = self._latency[operation] = LatencyHistogram()
            histogram.add(int(seconds * 1_000_000))

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def snapshot(self, extra: Mapping[str, object] | None = None) -> dict[str, object]:
        with self._lock:
            snapshot: dict[str, object] = {
                "name": self.name,
                "mode": self.mode,
                "uptime_s": round(time.time() - self.started, 3),
                "counters": dict(self._values),
                "latency": {operation: hist.as_dict() for operation, hist in self._latency.items()},
            }
        if extra:
            snapshot.update(extra)
        return snapshot


def write_text_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a part (a rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json_atomically(path: Path, document: Mapping[str, object]) -> None:
    write_text_atomically(path, json.dumps(document, sort_keys=True) + "\n")


class StatsPublisher:
    """A daemon thread that rewrites `<directory>/<name>.json` every `interval` seconds."""

    def __init__(
        self,
        name: str,
        snapshot: Callable[[], Mapping[str, object]],
        *,
        directory: Path = STATS_DIR,
        interval: float = 1.0,
    ) -> None:
        self.path = directory / f"{name}.json"
        self._snapshot = snapshot
        self._interval = interval
        self._stopped = threading.Event()
        directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"stats-{name}", daemon=True)

    def start(self) -> None:
        self.publish()
        self._thread.start()

    def publish(self) -> None:
        write_json_atomically(self.path, self._snapshot())

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        self.publish()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.publish()


def read_all(directory: Path = STATS_DIR) -> dict[str, object]:
    """Every frontend's last published snapshot, keyed by its name."""
    merged: dict[str, object] = {}
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            merged[path.stem] = json.loads(path.read_text())
    return merged
