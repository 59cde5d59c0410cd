"""`make fuzz`: mutated ABI frames against a live tmemd, which must survive them.

Each round opens a fresh connection as the guest `fuzz`, says HELLO, and sends
a burst of frames built from valid requests of every opcode and then mutated
(bit flips, truncation, length lies, header field swaps, garbage, splices).
Whatever tmemd answers must decode as valid reply frames; when it closes the
connection the next round reconnects. After every round a clean guest on its
own connection must still store and get back its pages exactly. A crash is a
dead daemon, a reply that does not decode, or a clean-guest check that fails.

    python -m tmem_host.fuzz --frames 1000000 [--seed N] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import random
import selectors
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tmem_host.daemon.client import AbiClient, TmemdClosedConnection
from tmem_host.daemon.process import TmemdProcess
from tmem_wire.abi import (
    ALL_POOLS,
    NEED_DATA,
    Frame,
    FrameDecoder,
    Hello,
    Op,
    PoolFlag,
    ProtocolError,
    Status,
    encode_frame,
)
from tmem_workloads.mutation import mutate, seed_frames
from tmem_workloads.usemem import expected_page, page_templates

FUZZ_GUEST = "fuzz"
CLEAN_GUEST = "clean"
# The request id of the STATS probe that ends each round.
PROBE_REQUEST_ID = (1 << 64) - 1


@dataclass
class FuzzReport:
    frames: int = 0
    rounds: int = 0
    closed_by_daemon: int = 0
    replies: int = 0
    clean_checks: int = 0
    crashes: int = 0
    crash_reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0


class CleanGuest:
    """A well-behaved guest whose pages must always come back exactly."""

    def __init__(self, socket_path: Path, rng: random.Random) -> None:
        self.client = AbiClient.open(socket_path)
        self.pool_id, _ = self.client.new_pool(PoolFlag.PERSISTENT)
        self.rng = rng
        self.templates = page_templates(rng.randrange(1 << 30))
        self.stored: dict[int, bytes] = {}

    def check(self) -> str | None:
        """Put a page, read back a few: None when all is well, else what went wrong."""
        index = self.rng.randrange(4096)
        page = expected_page(self.templates, self.rng.randrange(1 << 30), index)
        status = self.client.put(self.pool_id, (1, 0, 0), index, page)
        if status != 0:
            return f"clean guest put refused: {status!r}"
        self.stored[index] = page
        for probe in self.rng.sample(sorted(self.stored), min(4, len(self.stored))):
            status, data = self.client.get(self.pool_id, (1, 0, 0), probe)
            if data != self.stored[probe]:
                return f"clean guest page {probe} came back wrong ({status!r})"
        return None


def _exchange(sock: socket.socket, data: bytes, decoder: FrameDecoder,
              settle_s: float) -> tuple[int, bool]:
    """Send `data` while reading replies; (replies decoded, closed by the daemon).

    Reads as it writes so that neither side blocks on a full socket buffer, and
    stops at the reply to the trailing probe (or `settle_s` after the last byte
    left, when a mutation made tmemd wait for bytes that never come).
    Raises ProtocolError if tmemd sent bytes that are not valid reply frames.
    """
    sock.setblocking(False)
    view = memoryview(data)
    replies = 0
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        deadline = None
        while True:
            if not view and deadline is None:
                deadline = time.monotonic() + settle_s
                selector.modify(sock, selectors.EVENT_READ)
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                return replies, False
            for _, events in selector.select(timeout if timeout is not None else 5.0):
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(1 << 18)
                    except ConnectionResetError:
                        return replies, True
                    if not chunk:
                        return replies, True
                    decoder.feed(chunk)
                    while (frame := decoder.next_frame()) is not NEED_DATA:
                        assert isinstance(frame, Frame)
                        if not frame.is_reply:
                            raise ProtocolError(Status.PROTOCOL_ERROR, "a non-reply frame")
                        replies += 1
                        if frame.request_id == PROBE_REQUEST_ID:
                            return replies, False
                if events & selectors.EVENT_WRITE and view:
                    try:
                        view = view[sock.send(view):]
                    except (BrokenPipeError, ConnectionResetError):
                        return replies, True


def run_fuzz(run_dir: Path, frames: int, *, seed: int = 1, frames_per_round: int = 16,
             settle_s: float = 0.005, daemon: TmemdProcess | None = None) -> FuzzReport:
    """Fuzz the tmemd serving `run_dir` (guests `fuzz` and `clean` must exist)."""
    rng = random.Random(seed)
    report = FuzzReport()
    started = time.monotonic()
    fuzz_socket = run_dir / f"{FUZZ_GUEST}.tmem.sock"
    clean = CleanGuest(run_dir / f"{CLEAN_GUEST}.tmem.sock", rng)
    with AbiClient.open(fuzz_socket) as setup:  # pools 0 and 1 for the seeds to use
        for record in setup.stats():  # left by an earlier run
            setup.destroy_pool(record.pool_id)
        setup.new_pool(PoolFlag.PERSISTENT)
        setup.new_pool(PoolFlag(0))
    hello = encode_frame(Frame(opcode=Op.HELLO, request_id=0, payload=Hello().encode()))
    probe = encode_frame(Frame(opcode=Op.STATS, request_id=PROBE_REQUEST_ID, pool_id=ALL_POOLS))
    try:
        while report.frames < frames:
            seeds = seed_frames(rng, clean.templates)
            burst = [mutate(rng.choice(seeds), rng)
                     for _ in range(min(frames_per_round, frames - report.frames))]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(fuzz_socket))
                replies, closed = _exchange(sock, b"".join([hello, *burst, probe]),
                                            FrameDecoder(), settle_s)
            except ProtocolError as error:
                report.crashes += 1
                report.crash_reasons.append(f"undecodable reply: {error}")
                break
            finally:
                sock.close()
            report.frames += len(burst)
            report.rounds += 1
            report.replies += replies
            report.closed_by_daemon += closed
            if daemon is not None and not daemon.alive():
                report.crashes += 1
                report.crash_reasons.append(f"tmemd died\n{daemon.log_tail()}")
                break
            problem = clean.check()
            report.clean_checks += 1
            if problem is not None:
                report.crashes += 1
                report.crash_reasons.append(problem)
                break
    except (TmemdClosedConnection, ConnectionError, TimeoutError) as error:
        report.crashes += 1
        report.crash_reasons.append(f"tmemd stopped answering: {error!r}")
    finally:
        clean.client.close()
    if daemon is not None and "Traceback" in daemon.log_text():
        # asyncio survives an exception in data_received by dropping the connection:
        # for the fuzzer that is still a crash of the request path.
        report.crashes += 1
        report.crash_reasons.append(f"traceback in the tmemd log\n{daemon.log_tail()}")
    report.seconds = round(time.monotonic() - started, 3)
    return report


def fuzz_daemon_args() -> tuple[str, ...]:
    """Guests of a tmemd started for fuzzing (the fuzz guest capped, so it cannot
    crowd the clean guest out of the budget)."""
    return (f"{FUZZ_GUEST}:cap=16M", CLEAN_GUEST)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tmem_host.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--frames-per-round", type=int, default=16)
    parser.add_argument("--run-dir", type=Path,
                        help=f"fuzz a running tmemd (with guests {FUZZ_GUEST} and {CLEAN_GUEST})"
                             " instead of starting one")
    args = parser.parse_args(argv)
    if args.run_dir is not None:
        report = run_fuzz(args.run_dir, args.frames, seed=args.seed,
                          frames_per_round=args.frames_per_round)
    else:
        with tempfile.TemporaryDirectory(prefix="tmem-fuzz-") as temp_dir, \
                TmemdProcess(Path(temp_dir), budget="256M", guests=fuzz_daemon_args()) as daemon:
            report = run_fuzz(Path(temp_dir), args.frames, seed=args.seed,
                              frames_per_round=args.frames_per_round, daemon=daemon)
    for key, value in asdict(report).items():
        if key != "crash_reasons":
            print(f"{key:>18}: {value}")
    for reason in report.crash_reasons:
        print(f"CRASH: {reason}")
    rate = report.frames / report.seconds if report.seconds else 0.0
    print(f"{'frames/s':>18}: {rate:.0f}")
    return 1 if report.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
