"""`tmemctl`: inspect and steer a running tmemd through its control socket."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from tmem_host.daemon.config import (
    ConfigError,
    OneLineArgumentParser,
    check_seconds,
    format_size,
    parse_cap,
    parse_size,
)
from tmem_host.daemon.control import ControlClient, ControlError
from tmem_host.replies import (
    ForgetReply, JournalStats, PoolRecord, RemoteDrainReply, RemoteForgetReply, RemoteGuestReply,
    RemoteClaimReply, RemoteGuestStats, RemoteStats, RestoreReply, SaveReply, StatsReply,
)

# A guest's counters in the store (replies.ClientStats) that the tables show.
ClientCounter = Literal["puts", "gets", "hits", "refusals", "evictions", "flushes"]
# Counters `top` turns into per-second rates (names as in Store.stats()).
RATE_COUNTERS: tuple[ClientCounter, ...] = ("puts", "gets", "hits", "refusals", "evictions")
STATS_COUNTERS: tuple[ClientCounter, ...] = (*RATE_COUNTERS, "flushes")
# A guest's counters in the remote tier (replies.RemoteGuestStats) that `remote` shows.
RemoteCounter = Literal["puts", "demoted", "gets", "get_missing", "get_errors",
                        "get_unreachable", "stranded", "refused_quota", "refused_unreachable",
                        "refused_inflight", "refused_full", "ephemeral_demoted",
                        "ephemeral_missing", "ephemeral_shed", "prefetched", "read_ahead",
                        "demotions_refused"]
REMOTE_COUNTERS: tuple[RemoteCounter, ...] = (
    "puts", "demoted", "gets", "prefetched", "read_ahead", "get_missing", "get_errors",
    "get_unreachable", "stranded", "refused_quota", "refused_unreachable", "refused_inflight",
    "refused_full", "ephemeral_demoted", "ephemeral_missing", "ephemeral_shed", "demotions_refused")
# Output width when not on a terminal, so tables do not wrap in logs and tests.
PIPE_WIDTH = 160


class UsageError(Exception):
    """Bad arguments that argparse cannot catch (key=value pairs, sizes)."""


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=PIPE_WIDTH)


def _ratio(raw_bytes: int, stored_bytes: int) -> str:
    return f"{raw_bytes / stored_bytes:.2f}x" if stored_bytes else "-"


def _seconds(maximum: float) -> Callable[[str], float]:
    """An argparse type: seconds above 0 and at most `maximum` (a negative or
    endless sleep is a typo, and time.sleep overflows on huge ones)."""
    def parse(text: str) -> float:
        try:
            value: object = float(text)
        except ValueError:
            value = text
        try:
            return check_seconds(value, "value", maximum)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def _limit(num_bytes: int | None) -> str:
    return "none" if num_bytes is None else _size(num_bytes)


def rtt_quantile(histogram: dict[str, int], fraction: float) -> str:
    """The bucket (upper bound in microseconds) that holds the `fraction`
    quantile of the round trips ("-" before the first). The reply lists the
    buckets in ascending order."""
    total = sum(histogram.values())
    seen = 0
    for label, count in histogram.items():
        seen += count
        if total and seen >= fraction * total:
            return f"{label} us"
    return "-"


def _rtt_summary(guest: RemoteGuestStats) -> str:
    histogram = guest["rtt_us_histogram"]
    return f"{rtt_quantile(histogram, 0.5)} / {rtt_quantile(histogram, 0.99)}"


# -- commands --------------------------------------------------------------------


def cmd_list(control: ControlClient, args: argparse.Namespace) -> None:
    table = Table(title="tmemd guests and pools")
    for column in ("guest", "weight", "cap", "conns", "pool", "flags", "page", "pages",
                   "raw", "stored"):
        table.add_column(column, justify="left" if column in ("guest", "flags") else "right")
    for guest in control.guests():
        pools: Sequence[PoolRecord | None] = guest["pools"] or [None]
        for number, pool in enumerate(pools):
            first = number == 0
            row = [
                guest["name"] if first else "",
                str(guest["weight"]) if first else "",
                _size(guest["cap_bytes"]) if first else "",
                str(guest["connections"]) if first else "",
            ]
            if pool is None:
                row += ["-"] * 6
            else:
                row += [str(pool["pool_id"]), ",".join(pool["flags"]) or "ephemeral",
                        _size(1 << pool["page_shift"]), str(pool["pages"]),
                        _size(pool["raw_bytes"]), _size(pool["stored_bytes"])]
            table.add_row(*row)
    _console().print(table)


def stats_table(stats: StatsReply) -> Group:
    store = stats["store"]
    summary = Table.grid(padding=(0, 2))
    summary.add_row(
        f"budget {_size(store['budget_bytes'])}", f"used {_size(store['used_bytes'])}",
        f"free {_size(store['free_bytes'])}", f"pages {store['pages']}",
        f"ratio {_ratio(store['raw_bytes'], store['stored_bytes'])}",
        f"uptime {stats['daemon']['uptime_s']:.0f} s",
    )
    table = Table(title="tmemd stats")
    columns = ("guest", "weight", "cap", "frozen", "pages", "raw", "stored", "ratio", "puts",
               "gets", "hits", "refusals", "evictions", "flushes", "conns", "journal/live")
    for column in columns:
        table.add_column(column, justify="left" if column == "guest" else "right")
    for name, client in store["clients"].items():
        guest = stats["guests"].get(name)
        table.add_row(
            name, str(client["weight"]), _size(client["cap_bytes"]),
            "yes" if client["frozen"] else "no", str(client["pages"]),
            _size(client["raw_bytes"]), _size(client["stored_bytes"]),
            _ratio(client["raw_bytes"], client["stored_bytes"]),
            *(str(client[counter]) for counter in STATS_COUNTERS),
            str(guest["connections"] if guest is not None else 0),
            _journal_cell(stats["journal"].get(name)),
        )
    if stats["remote"] is None:
        return Group(summary, table)
    return Group(summary, table, *remote_tables(stats["remote"]))


def remote_tables(remote: RemoteStats) -> tuple[Table, Table]:
    """The remote tier's state and each guest's pages in memory and in the cluster."""
    errors = remote["connection_errors"] + remote["command_errors"]
    tier = Table.grid(padding=(0, 2))
    tier.add_row(
        "remote tier", f"reachable {'yes' if remote['reachable'] else 'NO'}",
        f"round trips {remote['round_trips']}",
        f"errors {errors} (connection {remote['connection_errors']}, "
        f"command {remote['command_errors']})",
        f"redirections {remote['redirections']}", f"orphaned deletes {remote['orphaned_deletes']}",
        f"used {_size(remote['total_bytes'])}" + (
            f" of {_size(remote['budget_bytes'])}" if remote["budget_bytes"] is not None else ""),
    )
    table = Table(title="remote tier (rtt: median / p99 bucket)")
    for column in ("guest", "local pages", "local", "remote pages", "remote", "limit", "gets",
                   "failed gets", "refused", "rtt"):
        table.add_column(column, justify="left" if column == "guest" else "right")
    for name, guest in remote["guests"].items():
        table.add_row(
            name, str(guest["local_pages"]), _size(guest["local_bytes"]),
            str(guest["remote_pages"]), _size(guest["remote_bytes"]), _limit(guest["limit_bytes"]),
            str(guest["gets"]),
            str(guest["get_missing"] + guest["get_errors"] + guest["get_unreachable"]),
            str(guest["refused_quota"] + guest["refused_unreachable"] + guest["refused_inflight"]
                + guest["refused_full"]),
            _rtt_summary(guest),
        )
    return tier, table


def _journal_cell(journal: JournalStats | None) -> str:
    """The journal's size on disk against what a compaction would keep."""
    if journal is None:
        return "off"
    if journal["broken"]:
        return "broken"
    return f"{_size(journal['size_bytes'])}/{_size(journal['live_bytes'])}"


def cmd_stats(control: ControlClient, args: argparse.Namespace) -> None:
    stats = control.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        _console().print(stats_table(stats))


def top_table(before: StatsReply, after: StatsReply, seconds: float) -> Table:
    """Per-guest rates between two `stats` snapshots taken `seconds` apart."""
    store = after["store"]
    table = Table(title=f"tmemd top: used {_size(store['used_bytes'])} of "
                        f"{_size(store['budget_bytes'])}, {store['pages']} pages")
    remote = after["remote"]
    remote_columns = ("remote", "remote gets/s") if remote is not None else ()
    for column in ("guest", "pages", "raw", "stored", "ratio",
                   *(f"{counter}/s" for counter in RATE_COUNTERS), *remote_columns):
        table.add_column(column, justify="left" if column == "guest" else "right")
    previous = before["store"]["clients"]
    previous_remote = before["remote"]["guests"] if before["remote"] is not None else {}
    for name, client in store["clients"].items():
        old = previous.get(name, client)
        rates = [f"{(client[c] - old[c]) / seconds:.0f}" for c in RATE_COUNTERS]
        if remote is not None:
            guest = remote["guests"].get(name)
            if guest is None:
                rates += ["-", "-"]
            else:
                old_gets = previous_remote.get(name, guest)["gets"]
                rates += [str(guest["remote_pages"]), f"{(guest['gets'] - old_gets) / seconds:.0f}"]
        table.add_row(name, str(client["pages"]), _size(client["raw_bytes"]),
                      _size(client["stored_bytes"]),
                      _ratio(client["raw_bytes"], client["stored_bytes"]), *rates)
    return table


def cmd_top(control: ControlClient, args: argparse.Namespace) -> None:
    before, taken = control.stats(), time.monotonic()
    if args.once:
        time.sleep(args.interval)
        after = control.stats()
        _console().print(top_table(before, after, time.monotonic() - taken))
        return
    try:
        with Live(top_table(before, before, 1.0), console=_console(), screen=False) as live:
            while True:
                time.sleep(args.interval)
                after, now = control.stats(), time.monotonic()
                live.update(top_table(before, after, now - taken))
                before, taken = after, now
    except KeyboardInterrupt:
        pass


def cmd_set(control: ControlClient, args: argparse.Namespace) -> None:
    if not args.settings:
        raise UsageError("set needs weight=N and/or cap=SIZE")
    for setting in args.settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise UsageError(f"expected key=value, not {setting!r}")
        if key == "weight":
            try:
                weight = int(value)
            except ValueError:
                raise UsageError(f"weight must be an integer, not {value!r}") from None
            control.request("set-weight", guest=args.guest, weight=weight)
        elif key == "cap":
            control.request("set-cap", guest=args.guest, cap=parse_cap(value))
        else:
            raise UsageError(f"unknown setting {key!r} (weight or cap)")
    print(f"{args.guest}: " + " ".join(args.settings))


def cmd_set_budget(control: ControlClient, args: argparse.Namespace) -> None:
    result = control.set_budget(parse_size(args.size, "budget"))
    print(f"budget {format_size(result['budget_bytes'])}")


def _guest_command(command: str, done: str) -> Callable[[ControlClient, argparse.Namespace], None]:
    def run(control: ControlClient, args: argparse.Namespace) -> None:
        control.request(command, guest=args.guest)
        print(f"{args.guest}: {done}")

    return run


@dataclass(frozen=True, slots=True)
class DrainResult:
    guest: str
    pages_at_start: int  # persistent pages tmemd held when the drain began
    pages_left: int
    seconds: float


def guest_persistent_pages(control: ControlClient, guest: str) -> int:
    for record in control.guests():
        if record["name"] == guest:
            return sum(pool["pages"] for pool in record["pools"] if "PERSISTENT" in pool["flags"])
    raise ControlError(f"no guest {guest!r}")


def drain(control: ControlClient, guest: str, timeout: float, interval: float = 0.2, *,
          start: Callable[[], int] | None = None) -> DrainResult:
    """Start draining GUEST and wait until tmemd holds none of its persistent pages
    (or `timeout` seconds passed: pages_left > 0). `start` starts it instead of
    the `drain` command and returns the persistent pages it began with."""
    started = time.monotonic()
    at_start = start() if start is not None else control.drain(guest)["persistent_pages"]
    while (left := guest_persistent_pages(control, guest)) and time.monotonic() - started < timeout:
        time.sleep(interval)
    return DrainResult(guest, at_start, left, time.monotonic() - started)


def _report_drain(result: DrainResult) -> None:
    if result.pages_left:
        raise ControlError(f"{result.guest}: {result.pages_left} of {result.pages_at_start} persistent "
                           f"pages still in tmem after {result.seconds:.1f} s (the guest stays draining)")
    print(f"{result.guest}: drained {result.pages_at_start} persistent pages in {result.seconds:.1f} s; "
          "new pages go to its fallback disk until 'tmemctl thaw'")


def cmd_drain(control: ControlClient, args: argparse.Namespace) -> None:
    _report_drain(drain(control, args.guest, args.timeout))


def cmd_forget(control: ControlClient, args: argparse.Namespace) -> None:
    reply: ForgetReply = control.request("forget", guest=args.guest)
    deleted = reply.get("remote_keys_deleted")
    print(f"{args.guest}: forgotten: its pages, journal and fallback file are gone"
          + (f"; {deleted} keys deleted in the cluster" if deleted is not None else ""))


# -- the remote tier -----------------------------------------------------------------


def remote_guest_table(reply: RemoteGuestReply) -> Group:
    """`tmemctl remote GUEST`: its figures, what the cluster holds, its round trips."""
    figures = Table(title=f"{reply['guest']} in the remote tier", show_header=False)
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    keys = reply["cluster_keys"]
    if keys is None:
        keys_cell = f"? ({reply['cluster_error']})"
    else:
        orphans = keys - reply["remote_pages"]
        keys_cell = f"{keys}" + (f" ({orphans} more than its remote pages: orphans)" if orphans > 0 else "")
    rows = [
        ("uuid", reply["uuid"]),
        ("tier reachable", "yes" if reply["reachable"] else "NO"),
        ("remote limit", _limit(reply["limit_bytes"])),
        ("local pages", f"{reply['local_pages']} ({_size(reply['local_bytes'])})"),
        ("remote pages", f"{reply['remote_pages']} ({_size(reply['remote_bytes'])})"),
        ("keys in the cluster", keys_cell),
        *((counter.replace("_", " "), str(reply[counter])) for counter in REMOTE_COUNTERS),
        ("rtt median / p99", _rtt_summary(reply)),
    ]
    for row in rows:
        figures.add_row(*row)
    histogram = reply["rtt_us_histogram"]
    total = sum(histogram.values())
    rtt = Table(title=f"round trips: {total}")
    for column in ("rtt (us)", "round trips", "share"):
        rtt.add_column(column, justify="right")
    for label, count in histogram.items():
        share = count / total if total else 0.0
        rtt.add_row(label, str(count), f"{share:6.1%} " + "#" * round(share * 40))
    return Group(figures, rtt)


def cmd_remote(control: ControlClient, args: argparse.Namespace) -> None:
    reply: RemoteGuestReply = control.request("remote", guest=args.guest)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        _console().print(remote_guest_table(reply))


def cmd_remote_drain(control: ControlClient, args: argparse.Namespace) -> None:
    if args.to == "disk":
        def start() -> int:
            reply: RemoteDrainReply = control.request("remote-drain", guest=args.guest, to="disk")
            return reply["persistent_pages"]

        _report_drain(drain(control, args.guest, args.timeout, start=start))
        return
    reply: RemoteDrainReply = control.request("remote-drain", guest=args.guest, to="home")
    if reply["left"]:
        raise ControlError(f"{args.guest}: moved {reply['moved']} remote pages home, {reply['left']} "
                           "left in the cluster: no more room in memory (raise the budget or the "
                           "guest's cap, or use --to disk)")
    print(f"{args.guest}: moved {reply['moved']} remote pages home; none left in the cluster")


def cmd_remote_forget(control: ControlClient, args: argparse.Namespace) -> None:
    reply: RemoteForgetReply = control.request("remote-forget", guest=args.guest, uuid=args.uuid)
    print(f"{args.guest}: deleted {reply['deleted']} keys of namespace {reply['uuid']} in the cluster")


def cmd_save(control: ControlClient, args: argparse.Namespace) -> None:
    """`save` and `handoff` (the same file; a handoff names remote pages by their keys)."""
    # tmemd writes the file itself: an absolute path, as this shell means it.
    reply: SaveReply = control.request(args.command, guest=args.guest, path=str(args.file.absolute()))
    remote = ("of them by their keys in the cluster" if args.command == "handoff"
              else "read back from the cluster")
    print(f"{reply['guest']}: {'handed off' if args.command == 'handoff' else 'saved'} {reply['pages']} "
          f"pages of {reply['pools']} pools ({reply['remote_pages']} {remote}), {reply['fallback_pages']} "
          f"fallback pages and {reply['lost_pages']} lost pages to {reply['path']} ({reply['bytes']} "
          f"bytes, sha256 {reply['sha256']})"
          + ("; restore it on the destination, then forget it here" if args.command == "handoff" else ""))


def cmd_remote_claim(control: ControlClient, args: argparse.Namespace) -> None:
    reply: RemoteClaimReply = control.request("remote-claim", guest=args.guest)
    print(f"{reply['guest']}: owned in the cluster again (epoch {reply['epoch']})")


def cmd_restore(control: ControlClient, args: argparse.Namespace) -> None:
    reply: RestoreReply = control.request("restore", path=str(args.file.absolute()), guest=args.as_guest,
                                          replace=args.replace)
    print(f"{reply['guest']}: restored {reply['pages']} pages of {reply['pools']} pools, "
          f"{reply['fallback_pages']} fallback pages and {reply['lost_pages']} lost pages "
          f"(saved from {reply['saved_guest']})")


def cmd_flush(control: ControlClient, args: argparse.Namespace) -> None:
    control.request("flush", guest=args.guest, pool=args.pool)
    print(f"{args.guest}: flushed" + (f" pool {args.pool}" if args.pool is not None else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="tmemctl", description="Control a running tmemd.")
    parser.add_argument("--run-dir", type=Path, required=True, help="tmemd's run directory")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="guests and their pools").set_defaults(run=cmd_list)
    stats = commands.add_parser("stats", help="counters of the store and every guest")
    stats.add_argument("--json", action="store_true", help="print the raw stats JSON")
    stats.set_defaults(run=cmd_stats)
    top = commands.add_parser("top", help="live per-guest rates")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    # At most a minute: one control connection serves every frame, and tmemd
    # closes control connections idle for --idle-timeout (300 s by default).
    top.add_argument("--interval", type=_seconds(60), default=1.0,
                     help="seconds between frames (at most 60)")
    top.set_defaults(run=cmd_top)
    set_parser = commands.add_parser("set", help="set a guest's weight and/or cap")
    set_parser.add_argument("guest")
    set_parser.add_argument("settings", nargs="*", metavar="weight=N|cap=SIZE")
    set_parser.set_defaults(run=cmd_set)
    budget = commands.add_parser("set-budget", help="change the memory budget")
    budget.add_argument("size")
    budget.set_defaults(run=cmd_set_budget)
    for name, done, text in (("freeze", "frozen", "refuse the guest's puts"),
                             ("thaw", "thawed", "accept the guest's puts again (ends a drain)")):
        guest_parser = commands.add_parser(name, help=text)
        guest_parser.add_argument("guest")
        guest_parser.set_defaults(run=_guest_command(name, done))
    forget = commands.add_parser(
        "forget", help="discard a guest's pages for good, in the cluster too (refused while it is "
                       "connected)")
    forget.add_argument("guest")
    forget.set_defaults(run=cmd_forget)
    drain_parser = commands.add_parser(
        "drain", help="move a guest's persistent pages back to the guest (its fallback disk) and wait")
    drain_parser.add_argument("guest")
    drain_parser.add_argument("--timeout", type=_seconds(7 * 86400), default=300.0,
                              help="seconds to wait (then exit 1)")
    drain_parser.set_defaults(run=cmd_drain)
    remote = commands.add_parser("remote", help="a guest's pages and round trips in the remote tier")
    remote.add_argument("guest")
    remote.add_argument("--json", action="store_true", help="print the raw reply JSON")
    remote.set_defaults(run=cmd_remote)
    remote_drain = commands.add_parser(
        "remote-drain", help="move a guest's remote pages home (into memory) or to its fallback disk")
    remote_drain.add_argument("guest")
    remote_drain.add_argument("--to", choices=("home", "disk"), required=True)
    remote_drain.add_argument("--timeout", type=_seconds(7 * 86400), default=300.0,
                              help="seconds to wait for the pages to move (then exit 1)")
    remote_drain.set_defaults(run=cmd_remote_drain)
    remote_forget = commands.add_parser(
        "remote-forget", help="delete a guest's keys in the cluster (refused while tmemd serves "
                              "pages of them)")
    remote_forget.add_argument("guest")
    remote_forget.add_argument("--uuid", help="the namespace of a guest tmemd does not serve "
                                              "(default: the guest's own)")
    remote_forget.set_defaults(run=cmd_remote_forget)
    for name, text in (
            ("save", "write a guest's persistent pages (remote ones read back) and its NBD disk's "
                     "fallback data to FILE (the guest must not be connected)"),
            ("handoff", "hand a stopped guest over to another tmemd sharing the cluster: its "
                        "namespace fenced, its state (remote pages by their keys) in FILE")):
        save = commands.add_parser(name, help=text)
        save.add_argument("guest")
        save.add_argument("file", type=Path)
        save.add_argument("--timeout", type=_seconds(7 * 86400), default=600.0,
                          help="seconds to wait for tmemd to write the file")
        save.set_defaults(run=cmd_save)
    remote_claim = commands.add_parser(
        "remote-claim", help="own a guest's namespace in the cluster again (an abandoned handoff)")
    remote_claim.add_argument("guest")
    remote_claim.set_defaults(run=cmd_remote_claim)
    restore = commands.add_parser(
        "restore", help="bring a saved guest back (into a configured guest holding no pages)")
    restore.add_argument("file", type=Path)
    restore.add_argument("--as", dest="as_guest", metavar="GUEST",
                         help="restore into this guest (default: the one saved)")
    restore.add_argument("--replace", action="store_true",
                         help="even if the guest holds pages (discarded here; its keys in the cluster "
                              "stay): to finish a restore a crash interrupted")
    restore.add_argument("--timeout", type=_seconds(7 * 86400), default=600.0,
                         help="seconds to wait for tmemd to restore it")
    restore.set_defaults(run=cmd_restore)
    flush = commands.add_parser("flush", help="drop a guest's pages (or one pool's)")
    flush.add_argument("guest")
    flush.add_argument("pool", type=int, nargs="?")
    flush.set_defaults(run=cmd_flush)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # A command with --timeout may wait that long for one reply (remote-drain --to home,
        # save, restore).
        with ControlClient(args.run_dir, timeout=max(10.0, getattr(args, "timeout", 0.0))) as control:
            args.run(control, args)
    except (UsageError, ConfigError) as exc:
        print(f"tmemctl: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"tmemctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tmemctl: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
